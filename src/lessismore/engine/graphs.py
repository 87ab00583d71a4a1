"""CUDA-graph capture of the engine's decode step, one graph per (batch bucket, sampling) key.

All graphs of a runner share one private memory pool. ``reset`` (a method switch) drops the graphs
and the pool together, after the device is idle, so a later capture starts a fresh pool: capturing
into a pool whose graphs were freed while their tensors were still referenced is what broke a second
capture (``use_count > 0`` in the caching allocator).
"""
from __future__ import annotations

import gc
from typing import Callable, Hashable

import torch


class GraphRunner:
    """Replays ``step(*key)`` from a graph captured on first use of each key.

    ``warmup(*key)`` runs before a capture (compiling kernels) and must leave the engine's state as it
    found it; ``release()`` drops the references a step leaves behind (tensors in the pool)."""

    def __init__(self, device: torch.device, step: Callable, warmup: Callable, release: Callable[[], None]):
        self.device, self.step, self.warmup, self.release = device, step, warmup, release
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def run(self, *key) -> None:
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(key)
        graph.replay()

    def _capture(self, key) -> torch.cuda.CUDAGraph:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.warmup(*key)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.release()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.step(*key)
        self.release()
        self.graphs[key] = graph
        return graph

    def reset(self) -> None:
        """Drop every graph and the pool (the next run captures afresh)."""
        if not self.graphs and self.pool is None:
            return
        torch.cuda.synchronize(self.device)
        self.release()
        self.graphs.clear()
        self.pool = None
        gc.collect()
        torch.cuda.empty_cache()
