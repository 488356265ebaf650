"""Two more ways to page fewer experts on glm4, tried in session 13 (kept for the record, then removed).

* ``--variant drop``: a moved pick is dropped, not re-routed: its slot becomes -1 and the row's surviving picks
  are rescaled to the row's routed sum (``reference._finish``), for every rule of the sweep (``reference.reroute``
  patched). A row that would lose every pick keeps its best-scored one.
* ``--variant popular-last``: an SGLang-side change, measured in the replay only: ``plan_waves`` gets the step's
  non-resident experts ordered by how many rows pick them (fewest first), so the most-picked misses land in the
  last wave and stay resident for the next step (SGLang orders them by id).

    python -m benchmarks.explore_offload_variants_s13 --variant drop --out benchmarks/results/offload_variants_s13/drop
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks import bench_offload as bo
from benchmarks.results_io import environment, write_json
from lynx_sglang.runtime.selection import reference as R


def drop_instead_of_reroute(router, logits, topk_ids, topk_weights, sel, row_ok, keep, out=None, ids_c=None,
                            refill_bias=None):
    T, E = logits.shape
    k = router.top_k
    if ids_c is None:
        ids_c = topk_ids[:, :k].long().clamp(0, E - 1)
    keep_rows = keep if keep.dim() == 2 else keep[None, :].expand(T, E)
    freed = ~keep_rows.gather(1, ids_c)
    # A row that would lose every pick keeps its best-scored one (the runtime's "every row keeps an expert";
    # without it the row's weights are 0/0).
    best = sel.gather(1, ids_c).argmax(dim=1, keepdim=True)
    freed = freed & ~(freed.all(dim=1, keepdim=True) & (torch.arange(k)[None, :] == best))
    changed = row_ok & freed.any(dim=1)
    new_ids = torch.where(freed, torch.full_like(ids_c, -1), ids_c)
    return R._finish(router, logits, topk_ids, topk_weights, new_ids, changed, out)


_replay_step = bo.replay_step


def popular_last(policy, ids_or_experts):
    if torch.is_tensor(ids_or_experts):
        ids = ids_or_experts.reshape(-1)
        ids = ids[ids >= 0].long()
        counts = torch.bincount(ids, minlength=1).tolist()
        return _replay_step(policy, sorted(set(ids.tolist()), key=lambda e: (counts[e], e)))
    return _replay_step(policy, ids_or_experts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=("drop", "popular-last"), required=True)
    ap.add_argument("--model", default="trained-glm4-moe")
    ap.add_argument("--out", type=lambda s: __import__("pathlib").Path(s), required=True)
    args = ap.parse_args()
    if args.variant == "drop":
        R.reroute = drop_instead_of_reroute
    else:
        bo.replay_step = popular_last
    torch.set_num_threads(1)
    t0 = time.time()
    model = bo.run_model(bo.ROOT / "models" / args.model, [16], 6, 32, 64, 0, caps=[0.6, 0.7], slot_divisors=[4])
    write_json(args.out, {**environment(torch.device("cpu")), "variant": args.variant,
                          "command": "python -m benchmarks.explore_offload_variants_s13 " + " ".join(sys.argv[1:]),
                          "seconds": round(time.time() - t0, 1), "models": [model]})


if __name__ == "__main__":
    main()
