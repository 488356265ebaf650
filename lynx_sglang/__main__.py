"""``python -m lynx_sglang``: what each policy does to a decode batch at real model shapes.

Synthetic router logits (with a per-batch skew) at the router shapes of
Qwen3-30B-A3B, DeepSeek-V2-Lite and Mixtral-8x7B, through every policy: a quick
look without a model or a server (the main job is ``python -m lynx_sglang.main_job``).
"""

from __future__ import annotations

import argparse

import torch

from lynx_sglang import ExpertSelector, RouterSpec, make_policy
from lynx_sglang.synthetic import random_logits, route

SHAPES = {
    "Qwen3-30B-A3B": RouterSpec(128, 8),
    "DeepSeek-V2-Lite": RouterSpec(64, 6, num_shared_slots=2),
    "Mixtral-8x7B": RouterSpec(8, 2),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--steps", type=int, default=20, help="decode steps (batches) per shape")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    print(f"{'model':18s} {'B':>4s} {'policy':7s} {'experts/step before -> after':>30s} {'rows moved':>11s}")
    for model, router in SHAPES.items():
        for B in args.batch:
            for name in ("off", "lynx", "oea", "budget"):
                params = {"max_experts": max(router.top_k, router.num_experts // 2)} if name == "budget" else {}
                sel = ExpertSelector(router, make_policy(name, **params), B, args.device)
                g = torch.Generator().manual_seed(0)
                for _ in range(args.steps):
                    b = route(router, random_logits(B, router.num_experts, skew=1.0, generator=g, device=args.device))
                    sel.run(b.logits, b.topk_ids, b.topk_weights)
                s = sel.stats()
                print(f"{model:18s} {B:4d} {name:7s} {s.mean_experts_before:14.1f} -> {s.mean_experts_after:6.1f}"
                      f" ({1 - s.mean_experts_after / s.mean_experts_before:4.0%} fewer)"
                      f" {s.rows_changed / s.rows_voting:10.0%}")


if __name__ == "__main__":
    main()
