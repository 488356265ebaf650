"""What would the busiest-rank expert-weight target cost? Expert budgets at EP=4, B=256 (64 rows per rank).

lynx_ep cannot lower the busiest rank's distinct experts at this batch size:
nearly every kept expert is mandatory (docs/accuracy.md, "Expert
parallelism"). This probe forces the count down with the ``budget`` policy
(at most m experts per batch, by total gate weight) and measures, on the
bundled model, the busiest rank's experts and the accuracy it costs, next to
a random keep of the same count.

    python -m benchmarks.probe_ep_weight_target      # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from benchmarks.results_io import environment, save
from lynx_sglang.accuracy import Rule, domain_streams, load_model, sweep
from lynx_sglang.runtime.selection.config import make_policy

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Run the probe and write its JSON."""
    torch.set_num_threads(1)
    model, tokenizer = load_model(ROOT / "models" / "trained-qwen3-moe")
    rules = [Rule("off", make_policy("off"), ep=4)]
    rules += [Rule(f"budget-{m}", make_policy("budget", max_experts=m), ep=4) for m in (24, 20)]
    rules += [Rule("random~budget-20", matched_to="budget-20", ep=4)]
    summaries = sweep(model, domain_streams(tokenizer), rules, batch_sizes=(256,), batches_per_kind=1, seed=0)
    rows = [dataclasses.asdict(s) for s in summaries]
    save("ep_weight_target_probe_cpu", {"environment": environment(torch.device("cpu")),
                                        "model": "models/trained-qwen3-moe", "ep": 4, "batch_size": 256,
                                        "rows": rows})
    for s in summaries:
        if s.kind in ("one-domain", "mixed"):
            print(f"{s.rule['label']:18s} {s.kind:10s} d_acc {s.delta_points:+.2f} pts  busiest-rank experts "
                  f"{s.busiest_experts_before:.2f} -> {s.busiest_experts_after:.2f}")


if __name__ == "__main__":
    main()
