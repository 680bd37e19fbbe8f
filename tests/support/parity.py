"""Tree-step references shared by the parity tests: random trees, the HF forward given the
equivalent 4-D mask, and one backend's tree step after a committed prefix."""
from __future__ import annotations

import numpy as np
import torch

from treespec.runtime.backends.base import StepInputs
from treespec.runtime.trees.tree import Tree, batch_tree_inputs, chain_tree


def random_tree(rng: np.random.Generator, size: int, vocab: int) -> Tree:
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, size)]
    return Tree(tokens=[int(t) for t in rng.integers(0, vocab, size)], parents=parents)


def hf_tree_logits(model, prefix: list[int], tree: Tree) -> np.ndarray:
    """Reference: HF forward over the prefix, then over the tree with a 4-D additive mask."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prefix]), use_cache=True)
        past_len = len(prefix)
        allowed = np.concatenate([np.ones((len(tree), past_len), bool), tree.ancestor_mask()], axis=1)
        mask = torch.where(torch.from_numpy(allowed), 0.0, torch.finfo(torch.float32).min)[None, None]
        pos = torch.tensor([[past_len + d for d in tree.depths]])
        logits = model(input_ids=torch.tensor([tree.tokens]), position_ids=pos, attention_mask=mask,
                       past_key_values=out.past_key_values).logits
    return logits[0].numpy()


def backend_tree_logits(backend, prefix: list[int], tree: Tree) -> np.ndarray:
    backend.reset(1, len(prefix) + len(tree) + 8)
    for t in (chain_tree(prefix),):
        ids, pos, mask = batch_tree_inputs([t], backend.lengths)
        out = backend.step(StepInputs(ids, pos, mask))
        backend.commit(out, [list(range(len(prefix)))])
    ids, pos, mask = batch_tree_inputs([tree], backend.lengths)
    return np.asarray(backend.step(StepInputs(ids, pos, mask)).logits[0])
