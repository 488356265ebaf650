"""Per-layer curves of resident-first's moved-weight cap on a paged model (issue 18, session 13).

Can a cap per MoE layer reach fewer page-ins than one cap on every layer, at less accuracy? On the calibration
split (``data/corpus/calibration.jsonl.gz``; the held-out text is never read here), every MoE layer in turn runs
resident-first at each cap while the other layers stay at the base cap (lynx's default), with SGLang's LRU at
K = E/4 replayed as in ``bench_offload``. Recorded per point: page-ins per decode step of every layer, KL against
selection off, next-token accuracy change. A layer whose page-ins fall most per unit of KL is the cheap one to
cut; the vectors chosen from these curves are then measured on held-out text with
``python -m benchmarks.bench_offload --layer-caps ...`` (docs/offload.md, "Session 13").

    python -m benchmarks.explore_paged_layer_caps --model trained-glm4-moe \\
        --out benchmarks/results/offload_glm4_layer_curves_cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from benchmarks import bench_offload as bo
from lynx_sglang import accuracy
from lynx_sglang.runtime.selection.config import LynxPolicy

CALIBRATION = bo.ROOT / "data" / "corpus" / "calibration.jsonl.gz"


def curves(path: Path, batch_size: int, batches_per_kind: int, prefix: int, decode_len: int, seed: int,
           caps: Sequence[float], base: float, log=print) -> dict:
    """Each layer alone at each cap in ``caps`` (the others at ``base``), resident-first at K = E/4."""
    model, tokenizer = accuracy.load_model(path)
    streams = accuracy.domain_streams(tokenizer, CALIBRATION)
    E, k = accuracy.model_shape(model)
    layers = len(accuracy.moe_blocks(model))
    (K,) = bo.slot_counts(E, k, (4,))
    batches = accuracy.make_batches(streams, batch_size, batches_per_kind, prefix + decode_len + 1, seed=seed)
    offs = [accuracy.off_reference(model, b, prefix, 0) for b in batches]
    points = [("base", None, base)] + [("layer", layer, c) for layer in range(layers) for c in caps]
    rows, t0 = [], time.time()
    for kind, layer, cap in points:
        vec = tuple(cap if i == layer else base for i in range(layers))
        rule = bo.ResidencyRule("prefer", K, LynxPolicy(), vec)
        loads, kl, tokens, delta = [0] * layers, 0.0, 0, 0
        for batch, off in zip(batches, offs):
            with bo.recording([K]):
                res = accuracy.measure(model, batch, rule, off, prefix, 0)[0]
            for i, steps in enumerate(bo.OffloadPatch.last.steps[K]):
                loads[i] += sum(c.loads for c in steps)
            kl, tokens, delta = kl + res.kl, tokens + res.tokens, delta + res.correct - res.correct_off
        steps = len(batches) * decode_len
        row = {"layer": layer, "cap": cap, "layer_caps": list(vec),
               "page_ins_per_step": [x / steps for x in loads], "kl": kl / tokens,
               "delta_acc_points": 100.0 * delta / tokens, "tokens": tokens}
        rows.append(row)
        log(f"{kind} {layer} {cap:g}: page-ins {[round(x, 2) for x in row['page_ins_per_step']]} "
            f"KL {row['kl']:.5f} Δacc {row['delta_acc_points']:+.3f} ({time.time() - t0:.0f} s)")
    return {"model": path.name, "num_experts": E, "top_k": k, "moe_layers": layers, "num_slots": K,
            "batch_size": batch_size, "batches": len(batches), "data": str(CALIBRATION.relative_to(bo.ROOT)),
            "base_cap": base, "rows": rows}


def plot(result: dict, png: Path) -> None:
    """Per layer: page-ins saved on that layer against KL added, one point per cap."""
    from benchmarks.results_io import pyplot, save_png

    plt = pyplot(png)
    if plt is None:
        return
    base = result["rows"][0]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for layer in range(result["moe_layers"]):
        pts = [r for r in result["rows"] if r["layer"] == layer]
        saved = [base["page_ins_per_step"][layer] - r["page_ins_per_step"][layer] for r in pts]
        added = [r["kl"] - base["kl"] for r in pts]
        ax.plot(added, saved, marker="o", label=f"layer {layer}")
        for r, x, y in zip(pts, added, saved):
            ax.annotate(f"{r['cap']:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel(f"KL added over resident-first at cap {result['base_cap']:g} on every layer")
    ax.set_ylabel("page-ins saved on that layer per decode step")
    ax.set_title(f"{result['model']}: one layer's cap raised (K={result['num_slots']}, B={result['batch_size']}, "
                 f"calibration text)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_png(fig, png)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from benchmarks.results_io import RESULTS_DIR, environment, write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bo.add_batch_args(ap, batches=2)
    ap.add_argument("--caps", default="0.5,0.6,0.7,0.8,0.9,1.0")
    ap.add_argument("--base-cap", type=float, default=bo.DEFAULT_CAP)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "offload_glm4_layer_curves_cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    result = curves(bo.ROOT / "models" / args.model, args.batch_size, args.batches, args.prefix, args.decode_len,
                    args.seed, [float(c) for c in args.caps.split(",")], args.base_cap)
    payload = {**environment(torch.device("cpu")),
               "command": "python -m benchmarks.explore_paged_layer_caps " + " ".join(
                   sys.argv[1:] if argv is None else argv),
               "seconds": round(time.time() - t0, 1), **result}
    write_json(args.out, payload)
    plot(payload, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
