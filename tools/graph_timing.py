"""Timing of GPU work replayed from a CUDA graph, for the tuners in tools/ (run on a GPU machine)."""
from __future__ import annotations

from typing import Callable

import torch


def captured(work: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `work()`: called once first (Triton compiles, cuBLAS picks its kernels),
    captured, replayed once to warm up."""
    work()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def replay_us(work: Callable[[], object], reps: int) -> float:
    """Microseconds per replay of a CUDA graph of `work()` (`captured`), replayed `reps` times back to back."""
    graph = captured(work)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps
