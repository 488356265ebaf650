"""GPU checks of the selection kernels: agreement with the torch reference and CUDA-graph replay.

Plain Python (no pytest, no sglang): the GPU machine carries only this tree.

    python -m benchmarks.gpu_checks                    # on a GPU
    TRITON_INTERPRET=1 python -m benchmarks.gpu_checks --device cpu --quick   # logic check on CPU

Writes benchmarks/results/gpu_checks_cuda.json on a GPU; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.results_io import environment, save
from lynx_sglang import ExpertSelector, RouterSpec, make_policy
from lynx_sglang.synthetic import random_logits, route

POLICIES = [("lynx", {}), ("oea", {}), ("budget", {"max_experts": 32}), ("off", {})]


def agreement(device, shapes) -> list[dict]:
    """Kernels on ``device`` against the torch reference on CPU: ids equal, weights close, stats equal."""
    rows = []
    for E, k, shared, T in shapes:
        for name, params in POLICIES:
            router = RouterSpec(E, k, shared)
            policy = make_policy(name, **params)
            g = torch.Generator().manual_seed(E + 7 * T + k)
            batch = route(router, random_logits(T, E, skew=1.0, generator=g).to(torch.bfloat16))
            ref = ExpertSelector(router, policy, T, "cpu", backend="torch")
            ker = ExpertSelector(router, policy, T, device, backend="triton")
            nv = max(1, T - 3)
            r_ids, r_w = ref.run(batch.logits, batch.topk_ids, batch.topk_weights, nv)
            k_ids, k_w = ker.run(batch.logits.to(device), batch.topk_ids.to(device), batch.topk_weights.to(device),
                                 torch.tensor(nv, device=device))
            ok = (torch.equal(k_ids.cpu(), r_ids) and torch.allclose(k_w.cpu(), r_w, rtol=1e-5, atol=1e-6)
                  and ker.stats() == ref.stats())
            rows.append({"check": "agreement", "policy": name, "E": E, "k": k, "shared": shared, "T": T, "ok": ok})
    return rows


def cuda_graph_replay(device) -> list[dict]:
    """Capture ``run`` in a CUDA graph on static inputs; replays on new batches must equal eager runs."""
    rows = []
    for E, k, T in ((128, 8, 16), (128, 8, 64), (256, 8, 64)):
        router = RouterSpec(E, k)
        policy = make_policy("lynx")
        captured = ExpertSelector(router, policy, T, device)
        eager = ExpertSelector(router, policy, T, device)
        g = torch.Generator().manual_seed(T)
        first = route(router, random_logits(T, E, skew=1.0, generator=g, device=device))
        static = [t.clone() for t in (first.logits, first.topk_ids, first.topk_weights)]
        nv = torch.tensor(T, device=device)
        captured.run(*static, nv)  # warm up (compiles the kernels) outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_ids, out_w = captured.run(*static, nv)
        captured.reset_stats()
        ok = True
        for step in range(3):
            b = route(router, random_logits(T, E, skew=1.0, generator=g, device=device))
            for dst, src in zip(static, (b.logits, b.topk_ids, b.topk_weights)):
                dst.copy_(src)
            nv.fill_(T - step)
            graph.replay()
            want_ids, want_w = eager.run(b.logits, b.topk_ids, b.topk_weights, torch.tensor(T - step, device=device))
            ok &= torch.equal(out_ids, want_ids) and torch.equal(out_w, want_w)
        ok &= captured.stats() == eager.stats()
        rows.append({"check": "cuda_graph_replay", "E": E, "k": k, "T": T, "ok": bool(ok)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="few shapes (for the CPU interpreter)")
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = [(64, 8, 0, 16), (128, 8, 2, 5)] if args.quick else [
        (E, k, s, T) for E in (8, 64, 128, 256) for k, s in ((2, 0), (8, 1)) if k <= E for T in (1, 16, 64, 256, 512)]
    rows = agreement(device, shapes)
    if device.type == "cuda":
        rows += cuda_graph_replay(device)
    failed = [r for r in rows if not r["ok"]]
    if device.type == "cuda":  # on CPU this only checks the script's logic: not a result to keep
        save("gpu_checks_cuda", {"environment": environment(device), "results": rows,
                                 "passed": len(rows) - len(failed), "failed": len(failed)})
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    for r in failed:
        print("FAILED", r)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
