"""Where the selection stage's time goes on a GPU: each kernel's own device time, against the stage's time in a
CUDA graph (what a served decode step pays).

Per policy and shape (E, k, B): the device kernels one ``ExpertSelector.run`` launches, with their mean duration
from the CUDA profiler (CUPTI), their sum, and the stage's median time per call in a CUDA graph. The gap between
the graph time and the kernels' sum is launch and scheduling overhead, which only fewer launches remove; a large
kernel time is work that a better kernel removes.

    python -m benchmarks.profile_selection                        # on a GPU, about 30 s
    python -m benchmarks.profile_selection --device cpu --quick   # logic check (CPU ops, torch backend)

Writes benchmarks/results/profile_selection_cuda.json on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.results_io import environment, save
from lynx_sglang import ExpertSelector, RouterSpec, make_policy
from lynx_sglang.synthetic import random_logits, random_similarity, route

POLICIES = {"lynx": {}, "lynx+sim": {"refill_similarity": 8.0}, "oea": {}, "budget": {"max_experts": 32},
            "off": {}}
SHAPES = ((64, 8, 16), (128, 8, 16), (128, 8, 64), (256, 8, 64))
CALLS = 10


def _device_us(event) -> float:
    """An averaged profiler event's own device (or, on CPU, self CPU) time per call, microseconds."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, attr) and getattr(event, attr):
            return getattr(event, attr) / max(1, event.count)
    return event.self_cpu_time_total / max(1, event.count)


def kernel_table(events, calls: int, cuda: bool) -> list[dict]:
    """Per kernel (CUDA) or op (CPU) name: launches per call and mean time per launch, from ``key_averages()``."""
    rows = []
    for ev in events:
        if cuda and getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        if not cuda and not ev.key.startswith("aten::"):
            continue
        rows.append({"name": ev.key, "per_call": ev.count / calls, "mean_us": _device_us(ev)})
    return sorted(rows, key=lambda r: -r["per_call"] * r["mean_us"])


def profile_one(device, name: str, E: int, k: int, B: int) -> dict:
    """One policy and shape: the kernel table, its sum per call, and the stage's graph (or eager) time."""
    params = POLICIES[name]
    base = "lynx" if name == "lynx+sim" else name
    policy = make_policy(base, **{**params, **({"max_experts": min(params["max_experts"], E)}
                                             if "max_experts" in params else {})})
    cuda = device.type == "cuda"
    sel = ExpertSelector(RouterSpec(E, k), policy, B, device, backend="triton" if cuda else "torch",
                         similarity=random_similarity(E, device) if name == "lynx+sim" else None)
    batch = route(RouterSpec(E, k), random_logits(B, E, skew=1.0, generator=torch.Generator().manual_seed(B),
                                                  device=device))
    args = (batch.logits, batch.topk_ids, batch.topk_weights)
    for _ in range(3):
        sel.run(*args)
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(CALLS):
            sel.run(*args)
        if cuda:
            torch.cuda.synchronize()
    table = kernel_table(prof.key_averages(), CALLS, cuda)
    row = {"policy": name, "E": E, "k": k, "B": B, "kernels": table,
           "kernel_sum_us": sum(r["per_call"] * r["mean_us"] for r in table)}
    if cuda:
        from benchmarks.timing import time_cuda
        times = time_cuda(lambda: sel.run(*args), reps=15, per_block=20, graph=True)
        row["graph_us"] = statistics.median(times)
        row["graph_times_us"] = times
    print(f"{name:9s} E={E:3d} k={k} B={B:3d}  kernels {row['kernel_sum_us']:7.2f} us"
          + (f"  graph {row['graph_us']:7.2f} us" if cuda else "") + "  "
          + ", ".join(f"{r['name'][:24]} {r['mean_us']:.2f}x{r['per_call']:g}" for r in table[:6]), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="one small shape (the CPU logic check)")
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = ((16, 4, 8),) if args.quick else SHAPES
    rows = [profile_one(device, name, E, k, B) for name in POLICIES for E, k, B in shapes]
    if device.type == "cuda":
        save("profile_selection_cuda", {"environment": environment(device), "calls_profiled": CALLS,
                                        "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
