"""Timing on a CUDA device, shared by the benchmarks: CUDA events around blocks of graph replays."""

from __future__ import annotations

from typing import List

import torch


def time_cuda(fn, reps: int, per_block: int = 10, graph: bool = True, calls_per_graph: int = 1) -> List[float]:
    """Time per call of ``fn`` from CUDA events around blocks of ``per_block`` calls (graph replays), microseconds.

    ``calls_per_graph``: with ``graph``, capture that many calls in one graph (and divide), so a graph of a
    few small kernels is not charged a whole graph launch per call.
    """
    fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()  # warm the allocator on the capture stream
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            for _ in range(calls_per_graph):
                fn()
        fn = g.replay
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(per_block):
            fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / (per_block * (calls_per_graph if graph else 1)))
    return out
