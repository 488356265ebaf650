"""Time of the expert-selection stage per MoE layer, over batch size, experts and top-k.

GPU: the three Triton kernels, captured in a CUDA graph (as decode runs them)
and timed with CUDA events over many replays; eager time is reported beside it.
CPU: the torch reference backend (what the CPU server runs); relative numbers only.

    python benchmarks/bench_selection.py                 # CPU, all shapes
    python benchmarks/bench_selection.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.results_io import RESULTS_DIR, environment, pyplot, save
from benchmarks.timing import time_cuda
from lynx_sglang import ExpertSelector, RouterSpec, make_policy
from lynx_sglang.runtime.expert_parallel import ExpertPlacement, home_rank
from lynx_sglang.synthetic import random_logits, route

GPU_TARGET_US = 10.0  # per layer at B <= 64 (issue: Lynx core)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def time_cpu(fn, iters: int) -> list[float]:
    """Wall time of each call, microseconds."""
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--policies", default="lynx,lynx_ep,oea,budget",
                    help="lynx_ep runs the torch backend with a contiguous placement over --ep ranks and the rows' homes")
    ap.add_argument("--ep", type=int, default=4, help="expert-parallel ranks for lynx_ep (E must divide by it)")
    ap.add_argument("--batches", default="1,8,16,32,64,128,256")
    ap.add_argument("--experts", default="8,64,128,256")
    ap.add_argument("--topk", default="2,8")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--name", default=None, help="result file name (default: selection_<device>)")
    args = ap.parse_args()
    device = torch.device(args.device)
    env = environment(device)
    rows = []
    for name in args.policies.split(","):
        for E in _ints(args.experts):
            for k in _ints(args.topk):
                if k > E:
                    continue
                for B in _ints(args.batches):
                    router = RouterSpec(E, k)
                    if name == "lynx_ep" and E % args.ep:
                        continue
                    policy = make_policy(name, **({"max_experts": max(k, E // 2)} if name == "budget" else {}))
                    g = torch.Generator().manual_seed(B * 7919 + E * 31 + k)
                    batch = route(router, random_logits(B, E, skew=1.0, generator=g, device=device))
                    kw, extra = {}, {}
                    if name == "lynx_ep":
                        kw = {"rank_mask": ExpertPlacement.contiguous(E, args.ep).logical_on_rank()}
                        extra = {"home": home_rank(B, args.ep, device)}
                    sel = ExpertSelector(router, policy, B, device, **kw)
                    fn = lambda: sel.run(batch.logits, batch.topk_ids, batch.topk_weights, **extra)  # noqa: E731
                    fn()
                    row = {"policy": name, "E": E, "k": k, "B": B, "backend": sel.backend}
                    if device.type == "cuda":
                        # 20 selections per captured graph: a decode graph holds one per MoE layer, back to back.
                        row["graph_us"] = time_cuda(fn, max(1, args.iters // 20), per_block=5, graph=True,
                                                    calls_per_graph=20)
                        row["eager_us"] = time_cuda(fn, max(1, args.iters // 20), per_block=20, graph=False)
                        key = "graph_us"
                    else:
                        row["wall_us"] = time_cpu(fn, args.iters)
                        key = "wall_us"
                    row["median_us"] = statistics.median(row[key])
                    sel.reset_stats()
                    sel.run(batch.logits, batch.topk_ids, batch.topk_weights, **extra)
                    st = sel.stats()
                    row["experts_before"], row["experts_after"] = st.experts_before, st.experts_after
                    rows.append(row)
                    print(f"{name:6s} E={E:3d} k={k} B={B:3d}  {row['median_us']:9.1f} us  "
                          f"experts {st.experts_before:3d} -> {st.experts_after:3d}", flush=True)
    out_name = args.name or f"selection_{device.type}"
    payload = {
        "benchmark": "expert-selection stage time per MoE layer",
        "timing": "CUDA graph replay (20 selections per graph), CUDA events, median" if device.type == "cuda"
        else "CPU wall clock of the torch reference backend, median; relative numbers only",
        "routing": "Gaussian logits (scale 2) plus a shared per-batch skew (scale 1)",
        "gpu_target_us_at_B_le_64": GPU_TARGET_US,
        "environment": env,
        "results": rows,
    }
    path = save(out_name, payload)
    plot(payload, RESULTS_DIR / f"{out_name}.png")
    print(f"wrote {path}")


def plot(payload: dict, png) -> None:
    """Median time per layer against batch size, one panel per policy (skipped without matplotlib)."""
    plt = pyplot(png)  # the GPU machine may not have matplotlib: the JSON is the result
    if plt is None:
        return

    rows = payload["results"]
    policies = sorted({r["policy"] for r in rows})
    fig, axes = plt.subplots(1, len(policies), figsize=(5 * len(policies), 4), squeeze=False)
    for ax, pol in zip(axes[0], policies):
        for (E, k) in sorted({(r["E"], r["k"]) for r in rows if r["policy"] == pol}):
            pts = sorted((r["B"], r["median_us"]) for r in rows if r["policy"] == pol and (r["E"], r["k"]) == (E, k))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"E={E} k={k}")
        if payload["environment"]["device_type"] == "cuda":
            ax.axhline(GPU_TARGET_US, color="red", linestyle="--", linewidth=1, label="target (B<=64)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens in batch (B)")
        ax.set_ylabel("time per layer (us)")
        ax.set_title(f"{pol} on {payload['environment']['device']}")
        ax.legend(fontsize=7)
    fig.suptitle(payload["timing"], fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
