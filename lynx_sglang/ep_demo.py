"""Try the expert-parallel data path on N local CPU processes (gloo), no GPU or server needed.

    python -m lynx_sglang.ep_demo --world 4 --tokens-per-rank 64

Every rank builds the same skewed router batch, selects on it (off, lynx,
lynx_ep), dispatches the rows it owns with ``AllToAllDispatcher``, runs its
local experts and combines; the result is checked against a single-process
MoE, and the step's traffic (``accounting.step_traffic``) and round-trip time
are printed per policy. CPU times say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import time

import torch

from lynx_sglang.runtime.selection.config import RouterSpec, make_policy
from lynx_sglang.runtime.selection.reference import select
from lynx_sglang.synthetic import random_logits, route
from lynx_sglang.runtime.expert_parallel.accounting import step_traffic
from lynx_sglang.runtime.expert_parallel.dispatch import AllToAllDispatcher
from lynx_sglang.ep_oracle import ExpertWeights, ep_moe_forward, moe_reference
from lynx_sglang.local_group import run_group
from lynx_sglang.runtime.expert_parallel.placement import ExpertPlacement, home_rank, owned_rows
from lynx_sglang.runtime.expert_parallel.rank_aware import select_rank_aware

POLICIES = ("off", "lynx", "lynx_ep")


def global_batch(args, policy_name: str, world: int):
    """The same selected batch on every rank: (hidden, ids, weights)."""
    g = torch.Generator().manual_seed(args.seed)
    T = args.tokens_per_rank * world
    router = RouterSpec(args.experts, args.top_k)
    batch = route(router, random_logits(T, args.experts, skew=args.skew, generator=g))
    hidden = torch.randn(T, args.hidden, generator=g)
    policy = make_policy(policy_name)
    if policy_name == "lynx_ep":
        mask = ExpertPlacement.contiguous(args.experts, world).logical_on_rank()
        ids, w, _, _ = select_rank_aware(policy, router, batch.logits, batch.topk_ids, batch.topk_weights, mask,
                                         home=home_rank(T, world))
    else:
        ids, w, _ = select(policy, router, batch.logits, batch.topk_ids, batch.topk_weights)
    return hidden, ids, w


def _rank_main(rank: int, world: int, args) -> dict:
    placement = ExpertPlacement.contiguous(args.experts, world)
    experts = ExpertWeights.random(args.experts, args.hidden, args.ffn, seed=args.seed)
    disp = AllToAllDispatcher(placement, rank)
    out = {}
    for name in POLICIES:
        hidden, ids, w = global_batch(args, name, world)
        lo, hi = owned_rows(hidden.shape[0], world, rank)
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            y = ep_moe_forward(disp, experts, hidden[lo:hi], ids[lo:hi], w[lo:hi])
            times.append(time.perf_counter() - t0)
        out[name] = {"output": y, "median_ms": sorted(times)[len(times) // 2] * 1e3}
    return out


def main(argv=None) -> None:
    """Run the demo and print one line per policy."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--tokens-per-rank", type=int, default=64)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=96)
    p.add_argument("--skew", type=float, default=1.5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    results = run_group(_rank_main, args.world, args)
    experts = ExpertWeights.random(args.experts, args.hidden, args.ffn, seed=args.seed)
    placement = ExpertPlacement.contiguous(args.experts, args.world)
    expert_bytes = 3 * args.hidden * args.ffn * 2
    print(f"EP={args.world}, {args.tokens_per_rank} tokens per rank, E={args.experts} top-{args.top_k}, "
          f"hidden {args.hidden} (bytes counted as bf16)")
    for name in POLICIES:
        hidden, ids, w = global_batch(args, name, args.world)
        got = torch.cat([r[name]["output"] for r in results])
        err = (got - moe_reference(hidden, ids.long(), w, experts)).abs().max().item()
        t = step_traffic(ids, placement, home_rank(hidden.shape[0], args.world), args.hidden, 2).as_dict(expert_bytes)
        slowest = max(r[name]["median_ms"] for r in results)
        print(f"  {name:8s} a2a {t['a2a_bytes'] / 1024:8.1f} KiB  busiest rank {t['busiest_rank_experts']:3d} experts "
              f"{t['busiest_rank_tokens']:4d} tokens  per-rank experts {t['rank_experts']}  "
              f"max|err| {err:.1e}  round trip {slowest:.1f} ms (slowest rank, CPU)")


if __name__ == "__main__":
    main()
