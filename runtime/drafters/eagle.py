"""EAGLE drafter (EAGLE-1/2): one decoder layer that drafts from the target's own features.

Why: a verify step of the 135M target costs about the same at 1 and at 64 tree tokens on the GPU,
so tokens per step is the whole lever, and the drafter that accepts most (the 3-layer draft LM)
spends more time drafting than verifying. Feature-level drafting (the DESIGN's EAGLE probe) accepts
as much with one layer, because the target's last hidden state already knows most of the future.

The head (treespec.models.eagle) takes, per row t, the target's feature at position t (its final
post-norm hidden state) fused with the embedding of token t+1; it predicts the feature at t+1 and,
through the target's lm_head, token t+2. It keeps its own one-layer KV cache of the context:
  * after every target step the drafter feeds the TARGET's features at the kept positions (the
    prompt at the prefill, the accepted path after a verification) paired with the token that
    followed each, and commits those rows; the last row's output drafts the root's children;
  * deeper tree levels fuse the head's OWN predicted feature of a node's parent with the node's
    token, attending to the committed context and to the node's ancestors (tree mask, uncommitted).

With a draft vocabulary (EAGLE-3's, treespec.models.draft_vocab) the head's logits are over K target
ids only: `_candidates` maps the ranked positions back to target ids, and the distribution q that
sampling verifies is spread over the target's vocabulary, zero outside the subset.

This module is the host-side drafter over any head runner with the TreeBackend shape (reset, step,
commit): `OrtEagleHead` runs eagle.onnx with ONNX Runtime; runtime/drafters/eagle_torch.py runs
the PyTorch head and drafts whole EAGLE-2 trees on the device in one captured CUDA graph.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from treespec.errors import BackendError
from treespec.models.draft_vocab import DraftVocab
from treespec.runtime.backends.base import StepInputs, StepOutputs, TreeBackend
from treespec.runtime.backends.device_tensors import LazyHost, topk_logprobs
from treespec.runtime.backends.onnxruntime import OnnxRuntimeBackend
from treespec.runtime.drafters.base import Candidates, Drafter, Features
from treespec.runtime.trees.tree import Tree

EAGLE_TOP_K = 8  # candidates per node when the manifest does not say
# The most pending rows a draft feeds as its own work (the last step's accepted path: depth + 1 at
# most); older rows (a prompt, the features of plain steps) are caught up first, as one-off work.
STEADY_ROWS = 16
OUTPUT_NAMES = ["logits", "next_hidden_states", "new_key_0", "new_value_0"]


@dataclass
class EagleStepInputs(StepInputs):
    """A head step: the tree I/O inputs plus the feature each row fuses with its token."""

    hidden_states: np.ndarray | None = None  # [B, T, H]


class OrtEagleHead(OnnxRuntimeBackend):
    """eagle.onnx under ONNX Runtime: the target backend's cache and commit, one more input."""

    name = "onnxruntime-eagle"

    def step(self, inputs: StepInputs) -> StepOutputs:
        if self._binding is None or not isinstance(inputs, EagleStepInputs):
            raise BackendError("the EAGLE head needs reset() and then EagleStepInputs")
        binding = self._binding
        binding.bind_cpu_input("hidden_states", np.ascontiguousarray(inputs.hidden_states, dtype=self.dtype))
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(inputs.input_ids, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(inputs.position_ids, dtype=np.int64))
        binding.bind_cpu_input("tree_mask", np.ascontiguousarray(inputs.tree_mask, dtype=np.bool_))
        binding.bind_cpu_input("past_lengths", self._lengths.copy())
        for name in OUTPUT_NAMES:
            binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        logits, hidden, key, value = binding.copy_outputs_to_cpu()
        return StepOutputs(logits=logits, hidden_states=hidden, new_kv=[key, value])


class PinnedFeatures(LazyHost):
    """Rows that pin_pending copied out of a step's outputs: nothing overwrites them."""


@dataclass
class _Rows:
    """One padded head step for a batch, and where each sequence's rows are."""

    inputs: EagleStepInputs
    count: list[int]  # real rows per sequence


class EagleDrafter(Drafter):
    kind = "eagle"
    resets_slots = True

    def __init__(self, head: TreeBackend, hidden_size: int, top_k: int = EAGLE_TOP_K,
                 vocab: DraftVocab | None = None):
        """`head`: a runner of the head with its KV cache (OrtEagleHead, or the torch one). `vocab`:
        the head's draft vocabulary, when its logits are over those K target ids only."""
        self.head = head
        self.hidden_size = hidden_size
        self.vocab = vocab
        self.top_k = top_k if vocab is None else min(top_k, len(vocab))
        self.tokens: list[list[int]] = []  # every token of each sequence so far
        self.pending: list[list[Features]] = []  # target features not yet fed to the head
        self.predicted: list[dict[tuple[int, ...], np.ndarray]] = []  # path from the root -> its row's feature

    def reset(self, contexts: list[list[int]], capacity: int) -> None:
        self.head.reset(len(contexts), capacity + 1)
        self.tokens = [list(c) for c in contexts]
        self.pending = [[] for _ in contexts]
        self.predicted = [{} for _ in contexts]

    def reset_slot(self, b: int, context: list[int]) -> None:
        """The slot's head rows are dead once its length is 0 (past lengths mask them)."""
        self.tokens[b] = list(context)
        self.pending[b] = []
        self.predicted[b] = {}
        self.head.lengths[b] = 0

    def pin_pending(self) -> None:
        """Pending features reference a step's outputs (a captured graph's static buffers on CUDA, a
        reused staging buffer for TensorRT), which the next target step overwrites: copy their rows.
        Device outputs are copied by one gather per output on their own device (no host round trip),
        host outputs into arrays of their own. The engines call this before every target step, so
        only each sequence's newest features (the last step's) can still need it."""
        live: dict[int, list[int]] = {}
        for b, pending in enumerate(self.pending):
            f = pending[-1] if pending else None
            owned = f is not None and isinstance(f.hidden, np.ndarray) and f.hidden.base is None
            if f is None or owned or isinstance(f.hidden, PinnedFeatures):
                continue
            if isinstance(f.hidden, LazyHost):
                live.setdefault(id(f.hidden), []).append(b)
            else:
                pending[-1] = Features(f.host()[None].copy(), 0, list(range(len(f.rows))))
        for group in live.values():
            newest = [self.pending[b][-1] for b in group]
            seq = [f.b for f in newest for _ in f.rows]
            rows = [r for f in newest for r in f.rows]
            copied = PinnedFeatures(newest[0].hidden.tensor[seq, rows][None], len(rows))  # indexing copies
            start = 0
            for b, f in zip(group, newest):
                self.pending[b][-1] = Features(copied, 0, list(range(start, start + len(f.rows))))
                start += len(f.rows)

    def accept(self, b: int, new_tokens: list[int], features: Features) -> None:
        self.tokens[b] += new_tokens
        self.pending[b].append(features)

    def expand(self, trees: list[Tree], frontiers: list[list[int]]) -> list[list[Candidates]]:
        if all(f == [0] for f in frontiers if f):  # a new tree: feed the context first
            self._catch_up()
            out, rows = self._feed_pending()
            for b, frontier in enumerate(frontiers):
                self.predicted[b] = {(): self._row_feature(out, b, rows[b])} if frontier else {}
            return self._candidates(out, [[(b, rows[b])] if f else [] for b, f in enumerate(frontiers)])
        out, where = self._feed_tree(trees, frontiers)
        for b, (tree, frontier) in enumerate(zip(trees, frontiers)):
            for node, row in zip(frontier, where[b]):
                self.predicted[b][_path(tree, node)] = self._row_feature(out, b, row)
        return self._candidates(out, [[(b, r) for r in rows] for b, rows in enumerate(where)])

    # -- the two kinds of head step ---------------------------------------------------------------
    def _catch_up(self, keep: int | None = None) -> None:
        """Feed and commit all but the last `keep` pending rows of each sequence (default: the rows of
        its newest Features, the last step's accepted path, at most STEADY_ROWS), leaving at most one
        pending Features per sequence; the time it takes goes to one_off_s (the planners price a
        steady draft: a prompt or the features of plain steps are fed once, whatever is drafted)."""
        t0 = time.perf_counter()
        kept = [keep if keep is not None else min(len(p[-1].rows), STEADY_ROWS) if p else 0 for p in self.pending]
        late = [len(p) > 1 or (len(p) == 1 and len(p[0].rows) > k) for p, k in zip(self.pending, kept)]
        if not any(late):
            return
        rows = self._host_rows([p if flush else [] for p, flush in zip(self.pending, late)])
        heads = []
        for b, (flush, keep_b) in enumerate(zip(late, kept)):
            cut = max(len(rows[b]) - keep_b, 0)
            heads.append(rows[b][:cut])
            if flush:
                self.pending[b] = [Features(rows[b][cut:][None], 0, list(range(len(rows[b]) - cut)))]
        if any(len(h) for h in heads):
            self._feed(heads)
        self.one_off_s += time.perf_counter() - t0

    def _host_rows(self, pending: list[list[Features]]) -> list[np.ndarray]:
        """Each sequence's pending features as one float32 [rows, H] host array."""
        read = self._row_reader(pending)
        return [np.concatenate([read(f) for f in p]) if p else np.zeros((0, self.hidden_size), np.float32)
                for p in pending]

    def _row_reader(self, pending: list[list[Features]]) -> Callable[[Features], np.ndarray]:
        """How _host_rows reads one Features' rows (the torch drafter copies device rows at once)."""
        return Features.host

    def _feed_pending(self) -> tuple[StepOutputs, list[int]]:
        """Feed and commit (target feature at position j, token j+1) for every pending feature;
        return the step and each sequence's last row (the one that drafts the root's children)."""
        chains = self._host_rows(self.pending)
        self.pending = [[] for _ in self.pending]
        out, counts = self._feed(chains)
        return out, [max(n, 1) - 1 for n in counts]

    def _feed(self, chains: list[np.ndarray]) -> tuple[StepOutputs, list[int]]:
        """One head step of each sequence's chain of features (row j paired with the token after
        it), after its cached rows, committed; the step and each chain's length."""
        start = self.head.lengths.copy()
        ids = [self.tokens[b][start[b] + 1:start[b] + 1 + len(c)] for b, c in enumerate(chains)]
        step = _chain_rows(chains, ids, start, self.hidden_size)
        out = self.head.step(step.inputs)
        self.head.commit(out, [list(range(n)) for n in step.count])
        return out, step.count

    def _feed_tree(self, trees: list[Tree], frontiers: list[list[int]]) -> tuple[StepOutputs, list[list[int]]]:
        """Feed the frontier nodes and their drafted ancestors (uncommitted): each fuses its
        parent's predicted feature with its own token. Returns the step and the frontier's rows."""
        batch, hidden = len(trees), self.hidden_size
        nodes = [_closure(t, f) for t, f in zip(trees, frontiers)]
        width = max(max((len(n) for n in nodes), default=1), 1)
        feats = np.zeros((batch, width, hidden), np.float32)
        ids = np.zeros((batch, width), np.int64)
        pos = np.zeros((batch, width), np.int64)
        mask = np.zeros((batch, width, width), np.bool_)
        mask[:, np.arange(width), np.arange(width)] = True
        lengths = self.head.lengths
        for b, (tree, picked) in enumerate(zip(trees, nodes)):
            if not picked:
                continue
            n = len(picked)
            feats[b, :n] = [self.predicted[b][_path(tree, tree.parents[node])] for node in picked]
            ids[b, :n] = [tree.tokens[node] for node in picked]
            pos[b, :n] = lengths[b] - 1 + np.asarray([tree.depths[node] for node in picked])
            mask[b, :n, :n] = tree.ancestor_mask()[np.ix_(picked, picked)]
        out = self.head.step(EagleStepInputs(ids, pos, mask, hidden_states=feats))
        where = [[picked.index(node) for node in frontier] for picked, frontier in zip(nodes, frontiers)]
        return out, where

    def _row_feature(self, out: StepOutputs, b: int, row: int) -> np.ndarray:
        return np.asarray(out.hidden_states[b, row], dtype=np.float32).reshape(-1)

    def _candidates(self, out: StepOutputs, rows: list[list[tuple[int, int]]]) -> list[list[Candidates]]:
        flat = [r for per_seq in rows for r in per_seq]
        if not flat:
            return [[] for _ in rows]
        ids, logprobs = topk_logprobs(out.logits, flat, self.top_k)
        dists = [self._distribution(np.asarray(out.logits[b, t])) for b, t in flat] \
            if self.return_distributions else None
        if self.vocab is not None:
            ids = self.vocab.target_ids(ids)
        cands, i = [], 0
        for per_seq in rows:
            cands.append([Candidates(ids[i + j], logprobs[i + j], dists[i + j] if dists else None)
                          for j in range(len(per_seq))])
            i += len(per_seq)
        return cands

    def _distribution(self, logits: np.ndarray) -> np.ndarray:
        """The head's q over target ids (zero outside a draft vocabulary), as sampling verifies it."""
        q = _softmax(logits)
        return q if self.vocab is None else self.vocab.full_distribution(q)


def _chain_rows(chains: list[np.ndarray], ids: list[list[int]], start: np.ndarray, hidden: int) -> _Rows:
    """One padded step of per-sequence chains (causal among themselves; padding sees itself)."""
    batch, width = len(chains), max(max(len(c) for c in chains), 1)
    feats = np.zeros((batch, width, hidden), np.float32)
    tokens = np.zeros((batch, width), np.int64)
    pos = np.zeros((batch, width), np.int64)
    mask = np.broadcast_to(np.eye(width, dtype=np.bool_), (batch, width, width)).copy()
    for b, (chain, toks) in enumerate(zip(chains, ids)):
        n = len(chain)
        if len(toks) != n:
            raise BackendError(f"EAGLE drafter: {n} features but {len(toks)} tokens for sequence {b}")
        feats[b, :n] = chain
        tokens[b, :n] = toks
        pos[b] = start[b] + np.arange(width)
        mask[b, :n, :n] = np.tril(np.ones((n, n), np.bool_))
    return _Rows(EagleStepInputs(tokens, pos, mask, hidden_states=feats), [len(c) for c in chains])


def _closure(tree: Tree, frontier: list[int]) -> list[int]:
    """The frontier's nodes and their drafted (non-root) ancestors, parents first."""
    keep: set[int] = set()
    for node in frontier:
        keep.update(tree.path_to(node)[1:])
    return sorted(keep)


def _path(tree: Tree, node: int) -> tuple[int, ...]:
    """A node's tokens from the root's child down (stable across tree rebuilds: OPT, eagle2)."""
    return tuple(tree.tokens[n] for n in tree.path_to(node)[1:])


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64).reshape(-1)
    z = np.exp(z - z.max())
    return z / z.sum()
