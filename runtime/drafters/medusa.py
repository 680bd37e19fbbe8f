"""Medusa drafter: K heads on the target's last hidden state, one head per tree level.

After each verification the heads run once on the hidden state of the last accepted node; head d
gives the candidates for every node at depth d+1 (Medusa heads do not condition on the path).
"""
from __future__ import annotations

import numpy as np
import torch

from treespec.models.drafter_models import MedusaHeads
from treespec.runtime.drafters.base import Candidates, Drafter, Features
from treespec.runtime.trees.tree import Tree


class MedusaDrafter(Drafter):
    kind = "medusa"
    resets_slots = True  # a sequence's state is the last feature, which the prefill's accept replaces

    def __init__(self, session, num_heads: int, top_k: int, hidden_size: int, dtype=np.float32):
        """`session`: an ONNX Runtime session over the Medusa graph (runtime/loader.py opens it)."""
        self.session = session
        self.max_depth = num_heads
        self.top_k = top_k
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.output_names = [o.name for o in session.get_outputs()] if session is not None else []
        self.heads: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []

        self.pending: list[np.ndarray | None] = []  # hidden state the heads have not run on yet

    def reset(self, contexts: list[list[int]], capacity: int) -> None:
        self.heads = [(np.zeros((0, 0), np.int64), np.zeros((0, 0)), None) for _ in contexts]
        self.pending = [None for _ in contexts]

    def reset_slot(self, b: int, context: list[int]) -> None:
        """Nothing to clear: the prefill's accept replaces the slot's feature before any draft."""

    def accept(self, b: int, new_tokens: list[int], features: Features) -> None:
        # The heads run when a tree is drafted (expand), not here: a step that drafts nothing
        # (`auto` planned a plain step) then costs what a plain step costs.
        self.pending[b] = features.last().copy()

    def _run_heads(self, b: int) -> None:
        hidden, self.pending[b] = self.pending[b], None
        feed = {"hidden_states": hidden.astype(self.dtype).reshape(1, 1, -1)}
        wanted = self.output_names if self.return_distributions else ["topk_ids", "topk_logprobs"]
        outs = dict(zip(wanted, self.session.run(wanted, feed)))
        probs = None
        if self.return_distributions:
            logits = outs["logits"][0, 0].astype(np.float64)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
        self.heads[b] = (outs["topk_ids"][0, 0], outs["topk_logprobs"][0, 0].astype(np.float64), probs)

    def expand(self, trees: list[Tree], frontiers: list[list[int]]) -> list[list[Candidates]]:
        out = []
        for b, (tree, frontier) in enumerate(zip(trees, frontiers)):
            if frontier and self.pending[b] is not None:
                self._run_heads(b)
            ids, logprobs, probs = self.heads[b]
            per_node = []
            for node in frontier:
                head = tree.depths[node]
                if head >= self.max_depth:
                    per_node.append(Candidates.empty())
                    continue
                dist = probs[head] if probs is not None else None
                per_node.append(Candidates(ids[head].astype(np.int64), logprobs[head], dist))
            out.append(per_node)
        return out


class TorchMedusaDrafter(MedusaDrafter):
    """The same drafter with the heads run by PyTorch on the target's device (torch backend)."""

    def __init__(self, heads: MedusaHeads, top_k: int, hidden_size: int, device: str):
        """`heads`: the Medusa heads on the target's device and dtype (runtime/loader.py builds them)."""
        self.torch = torch
        self.module = heads
        self.device = torch.device(device)
        self.param_dtype = heads.lm_head.weight.dtype
        self._graph = None
        super().__init__(None, heads.num_heads, top_k, hidden_size, np.float32)

    def _heads(self, hidden):
        """[H] hidden -> [K, 2*top_k] float32: the top-k ids (exact in float32) and log-probs."""
        torch = self.torch
        logits = self.module.head_logits(hidden.to(self.param_dtype).reshape(1, 1, -1)).float()[0, 0]
        lp, ids = torch.topk(torch.log_softmax(logits, -1), self.top_k, dim=-1)
        return torch.cat([ids.float(), lp], dim=-1)

    def _capture(self) -> None:
        """One CUDA graph for the heads + top-k: a step's ~30 small launches become one replay."""
        torch = self.torch
        self._input = torch.zeros(self.hidden_size, dtype=torch.float32, device=self.device)
        self._host = torch.zeros(self.hidden_size, dtype=torch.float32, pin_memory=True)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                self._heads(self._input)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self._graph):
            self._output = self._heads(self._input)

    def accept(self, b: int, new_tokens: list[int], features: Features) -> None:
        torch = self.torch
        hidden = features.last()
        if self.return_distributions:  # sampling needs the full distributions: run eagerly
            with torch.inference_mode():
                x = torch.as_tensor(hidden, device=self.device)
                logp = torch.log_softmax(self.module.head_logits(
                    x.to(self.param_dtype).reshape(1, 1, -1)).float()[0, 0], -1)
                lp, ids = torch.topk(logp, self.top_k, dim=-1)
                self.heads[b] = (ids.cpu().numpy(), lp.double().cpu().numpy(), logp.exp().double().cpu().numpy())
            return
        if self.device.type == "cuda":
            if self._graph is None:
                self._capture()
            self._host.numpy()[:] = hidden
            self._input.copy_(self._host, non_blocking=True)
            self._graph.replay()
            packed = self._output.cpu().numpy()
        else:
            with torch.inference_mode():
                packed = self._heads(torch.as_tensor(hidden, device=self.device)).cpu().numpy()
        k = self.top_k
        self.heads[b] = (packed[:, :k].astype(np.int64), packed[:, k:].astype(np.float64), None)
