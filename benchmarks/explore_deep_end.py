"""The deep end of lynx's knob (issue 15): three studies on the frontier's own batches and measurement.

Session 10 left peer points below the recommended line (``lynx+sim``) only where it cuts deepest: official Lynx
(alpha 8, beta 2) at about 50 % of off's experts on the 32-expert, top-4 model, and OEA (k0 = 1, 2) at the
line's very end. Each study puts candidate settings beside the recommended line at the same caps:

* ``keep_level``: lynx+sim with ``keep_level`` 1 and ``alpha`` 4 (a pick within 2/alpha = 0.5 logits of its
  row's best also keeps its expert: near-ties, by affinity rather than by weight), and official Lynx alpha 8 / 4
  with beta 2, and OEA k0 = 1.
* ``min_keep``: lynx+sim with a larger kept-set floor (the best-voted experts: a popularity fill).
* ``lambda``: the similarity refill's weight (``refill_similarity``) at deep caps, 0 being plain lynx.

    python -m benchmarks.explore_deep_end --study keep_level --models models/trained-qwen3-moe --batch-size 16 \\
        --out benchmarks/results/deep_end_keep_level_cpu

Writes ``<out>.json`` / ``.md`` / PNGs with ``lynx_sglang.frontier``'s writer (tables at matched counts, the
dominance check against ``lynx+sim`` where the study has that line).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from lynx_sglang import accuracy as A
from lynx_sglang import frontier as F
from lynx_sglang.runtime.selection.config import make_policy

STUDIES = ("keep_level", "min_keep", "lambda")
KEEP_LEVEL_CAPS = (0.2, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 1.0)


def _sim(label: str, line: str, **params) -> F.FRule:
    return F.FRule(label, line, "lynx+sim", make_policy("lynx", refill_similarity=F.REFILL_LAMBDA, **params))


def study_rules(study: str):
    """``rules_for(off_experts)`` for ``measure_frontier``: off, then the study's lines."""
    def rules_for(off_experts):
        rules = [F.FRule("off", "off", "off", make_policy("off"))]
        if study == "keep_level":
            rules += [_sim(f"lynx+sim moved<={d:g}", "lynx+sim", max_moved_weight=d) for d in KEEP_LEVEL_CAPS]
            rules += [_sim(f"lynx+sim keep_level=1 alpha=4 moved<={d:g}", "lynx+sim keep_level=1 alpha=4",
                           keep_level=1, alpha=4.0, max_moved_weight=d) for d in KEEP_LEVEL_CAPS]
            rules += [F.FRule(f"lynx_paper alpha={a:g} beta=2", "lynx_paper beta=2", "lynx_paper",
                              make_policy("lynx_paper", alpha=a, beta=2)) for a in (8.0, 4.0)]
            rules.append(F.FRule("oea k0=1", "oea", "oea", make_policy("oea", k0=1)))
        elif study == "min_keep":
            rules += [_sim(f"lynx+sim moved<={d:g}", "lynx+sim", max_moved_weight=d) for d in (0.5, 0.6, 0.7, 1.0)]
            rules += [_sim(f"lynx+sim min_keep={m} moved<={d:g}", f"lynx+sim min_keep={m}", min_keep=m,
                           max_moved_weight=d) for m in (6, 8, 10) for d in (0.5, 0.7, 1.0)]
        else:
            rules += [F.FRule(f"lynx refill={lam:g} moved<={d:g}", f"lynx refill={lam:g}", "lynx+sim",
                              make_policy("lynx", max_moved_weight=d, refill_similarity=lam))
                      for lam in (F.REFILL_LAMBDA, 4.0, 2.0, 0.0) for d in (0.35, 0.5, 0.6, 0.7, 1.0)]
        return rules
    return rules_for


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", choices=STUDIES, required=True)
    ap.add_argument("--models", required=True, help="comma-separated model folders (with sere_similarity.safetensors)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--kinds", default="one-domain,mixed")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    frontiers = []
    meta = {**F.environment(sys.argv if argv is None else ["explore_deep_end", *argv]), "study": args.study}
    for mp in map(Path, args.models.split(",")):
        model, tokenizer = A.load_model(mp)
        streams = A.domain_streams(tokenizer)
        similarity = F.load_similarity_for(model, mp / "sere_similarity.safetensors")
        if similarity is None:
            print(f"no SERE similarity at {mp}: python -m lynx_sglang.sere_calibrate {mp}", file=sys.stderr)
            return 2
        for kind in args.kinds.split(","):
            f = asdict(F.measure_frontier(model, streams, str(mp), kind, args.batch_size, args.batches,
                                          study_rules(args.study), similarity=similarity))
            f.update(sere_thresholds=[0.0], similarity_file=str(mp / "sere_similarity.safetensors"))
            frontiers.append(f)
            F.write_outputs({"meta": meta, "frontiers": frontiers}, args.out)
    print(f"wrote {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
