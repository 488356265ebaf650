"""End-to-end decode-step estimate for Qwen3-30B-A3B from measured parts, before and after selection.

    step_us(policy) = layers x (other_per_layer_us + moe_layer_us(policy)) + once_per_step_us

* ``other_per_layer_us``: ``layer_total`` of bench_decode_other (norms, QKV, q/k norm, RoPE, KV write,
  decode attention at context L, O projection, router gate + top-k, residual adds), per B and L;
* ``moe_layer_us``: ``time_us`` of bench_moe_layer for the same model shape, B, routing and policy
  (``off`` = stock SGLang fused MoE; ``lynx`` with its defaults; ``lynx+sim`` (the recommended rule, with the
  similarity refill) and ``oea`` where the file has them).
  That time includes the selection stage (``ExpertSelector.run``) for every policy but ``off``;
* ``once_per_step_us``: ``step_total`` of bench_decode_other (embedding, final norm, LM head, argmax);
* ``layers`` = 48 (num_hidden_layers; every layer is MoE, decoder_sparse_step 1, mlp_only_layers []).

Speedup = step_us(off) / step_us(policy), compared with the paper's 1.14-1.22x end-to-end on that model.
Both input files must come from the same device (``environment.device_type`` and ``environment.device``
equal), or the estimate is refused. Assumptions are listed in ``ASSUMPTIONS`` and written to the JSON.

Commands:

    .venv/bin/python -m benchmarks.e2e_estimate --device cpu     # reads benchmarks/results/*_cpu.json
    .venv/bin/python -m benchmarks.e2e_estimate --moe /tmp/moe_layer_cpu_b16_64.json \
        --other benchmarks/results/decode_other_cpu.json
    python -m benchmarks.e2e_estimate --device cuda              # on the GPU machine: benchmarks/run_gpu.sh e2e

Results: ``benchmarks/results/e2e_estimate_<device>.json`` and ``.png`` (stacked bars per B: other vs MoE,
off vs lynx (and oea), one panel per context length and routing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from benchmarks.results_io import RESULTS_DIR, pyplot, write_json

PAPER_E2E = {
    "low": 1.14,
    "high": 1.22,
    "what": "end-to-end decode speedup of Lynx on Qwen3-30B-A3B",
    "source": "Lynx paper (arXiv 2411.08982), as quoted in the project's issue 'Benchmarks' item 5; the figure "
              "was not re-read from the paper for this script",
}

ASSUMPTIONS = [
    "Sequential composition: a decode step is layers x (other + MoE) + once-per-step parts; no overlap between "
    "attention and MoE (or anything else), no communication.",
    "TP = 1, EP = 1: one GPU holds the whole model; no all-reduce / all-to-all time.",
    "No CUDA-graph launch overhead is modelled beyond what the parts measured: each part is timed as CUDA-graph "
    "replays on the GPU, so per-kernel launch gaps inside a part are included, gaps between parts are not; "
    "the scheduler, batch preparation, detokenisation and the CPU side of the server are not included.",
    "The MoE-layer time is bench_moe_layer's time_us: on the GPU SGLang's own Triton fused-MoE kernels (files "
    "exported from the SGLang wheel) with its tuned configs; on the CPU SGLang's native CPU MoE. It includes the "
    "selection stage for every policy except off (selection overhead is included only because that file timed "
    "it; the estimate checks for its selection_us field).",
    "The router gate, softmax and top-k are counted once, in the 'other' part (bench_moe_layer takes them as "
    "inputs); Qwen3-30B-A3B has no shared expert.",
    "Every request in the batch is at the same context length L; attention is torch SDPA over a contiguous KV "
    "cache (SGLang: FlashInfer/FA3 over a paged cache); the 'other' part uses unfused torch ops for add+RMSNorm, "
    "q/k norm and RoPE (SGLang fuses some), so it is if anything overestimated, which lowers the estimated "
    "speedup.",
    "Routing of every layer is represented by the MoE file's routing samples (random: synthetic skewed logits; "
    "trace: recorded router logits of our small trained model, scaled to E = 128), the same for all 48 layers; "
    "the real model's routing skew may differ.",
    "Greedy decoding (argmax), no sampling, no speculative decoding; bf16 weights and KV cache (dtype of the "
    "inputs, recorded below).",
]
LABEL_CPU = "CPU: relative only, not a GPU prediction"


class DeviceMismatch(ValueError):
    """The two input files were measured on different devices."""


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def device_of(payload: dict) -> Dict[str, str]:
    env = payload.get("environment", {})
    return {"device_type": env.get("device_type"), "device": env.get("device")}


def check_same_device(moe: dict, other: dict) -> Dict[str, str]:
    a, b = device_of(moe), device_of(other)
    if None in a.values() or None in b.values() or a != b:
        raise DeviceMismatch(f"refusing to combine measurements from different devices: MoE layer on {a}, "
                             f"other parts on {b}")
    return a


def _moe_rows(moe: dict, shape: str) -> List[dict]:
    return [r for r in moe["results"] if r.get("shape") == shape and "time_us" in r]


def _check_shape(moe: dict, other: dict, shape: str) -> None:
    m = other["model"]
    sh = moe.get("shapes", {}).get(shape)
    if sh is None:
        raise ValueError(f"the MoE-layer file has no shape {shape!r} (has {sorted(moe.get('shapes', {}))})")
    got = (sh["hidden"], sh["experts"], sh["top_k"])
    want = (m["hidden"], m["experts"], m["top_k"])
    if got != want:
        raise ValueError(f"shape mismatch: MoE layer (hidden, E, k) = {got}, other parts {want} ({m['name']})")


def warnings_for(moe: dict, other: dict) -> List[str]:
    w = []
    if moe.get("dtype") != other.get("dtype"):
        w.append(f"dtypes differ: MoE layer {moe.get('dtype')}, other parts {other.get('dtype')}")
    if device_of(moe)["device_type"] == "cpu":
        mc, oc = moe.get("settings", {}).get("cpu_clock"), other.get("settings", {}).get("cpu_clock")
        if mc != oc:
            w.append(f"CPU clocks differ: MoE layer {mc}, other parts {oc}")
        mt, ot = moe["environment"].get("cpu_threads"), other["environment"].get("cpu_threads")
        if mt != ot:
            w.append(f"CPU threads differ: MoE layer {mt}, other parts {ot}")
    for name, p in (("MoE layer", moe), ("other parts", other)):
        if p.get("triton_interpreter"):
            w.append(f"{name} file was measured in Triton's interpreter")
    if moe["environment"].get("commit") != other["environment"].get("commit"):
        w.append(f"commits differ: MoE layer {moe['environment'].get('commit')}, "
                 f"other parts {other['environment'].get('commit')}")
    return w


def paper_position(speedup: float) -> str:
    if speedup < PAPER_E2E["low"]:
        return "below"
    if speedup > PAPER_E2E["high"]:
        return "above"
    return "within"


#: Policies an estimate includes where the MoE-layer file has them (older files lack them).
OPTIONAL_POLICIES = ("lynx+sim", "oea")


def estimate(moe: dict, other: dict, shape: str = "qwen3-30b-a3b", batches: Optional[Sequence[int]] = None,
             policies: Sequence[str] = ("off", "lynx", "lynx+sim", "oea")) -> dict:
    """The estimate's content (rows, missing points, assumptions, provenance). Refuses mismatched devices."""
    dev = check_same_device(moe, other)
    _check_shape(moe, other, shape)
    layers = int(other["model"]["layers"])
    res = other["results"]
    per_layer = {(r["B"], r["L"]): r for r in res
                 if r.get("scope") == "per_layer" and r.get("part") == "layer_total" and "time_us" in r}
    per_step = {r["B"]: r for r in res if r.get("scope") == "per_step" and r.get("part") == "step_total"
                and "time_us" in r}
    mrows = _moe_rows(moe, shape)
    mo = {(r["B"], r["routing"], r["policy"]): r for r in mrows}
    routings = [x for x in ("trace", "random") if any(r["routing"] == x for r in mrows)]
    contexts = sorted({L for (_, L) in per_layer})
    batches = list(batches) if batches else sorted({B for (B, _) in per_layer})
    relative = bool(moe.get("relative_only") or other.get("relative_only") or dev["device_type"] != "cuda")
    rows, missing = [], []
    for B in batches:
        for L in contexts:
            if (B, L) not in per_layer or B not in per_step:
                missing.append(f"B={B} L={L}: no decode_other layer_total/step_total")
                continue
            other_us, once_us = per_layer[(B, L)]["time_us"], per_step[B]["time_us"]
            for routing in routings:
                off = mo.get((B, routing, "off"))
                if off is None:
                    missing.append(f"B={B} {routing}: no 'off' MoE-layer row")
                    continue
                step_off = layers * (other_us + off["time_us"]) + once_us
                for pol in policies:
                    m = mo.get((B, routing, pol))
                    if m is None:
                        if pol not in OPTIONAL_POLICIES:
                            missing.append(f"B={B} {routing}: no {pol!r} MoE-layer row")
                        continue
                    moe_us = m["time_us"]
                    step = layers * (other_us + moe_us) + once_us
                    sp = step_off / step
                    rows.append({
                        "B": B, "L": L, "routing": routing, "policy": pol, "layers": layers,
                        "other_layer_us": other_us, "moe_layer_us": moe_us, "once_per_step_us": once_us,
                        "selection_us": m.get("selection_us"), "selection_timed": "selection_us" in m,
                        "other_step_us": layers * other_us + once_us, "moe_step_us": layers * moe_us,
                        "step_us": step, "moe_share": layers * moe_us / step,
                        "tokens_per_s": B / (step * 1e-6),
                        "moe_layer_speedup": off["time_us"] / moe_us, "speedup": sp,
                        "experts_before": m.get("experts_before"), "experts_after": m.get("experts_after"),
                        "vs_paper": paper_position(sp) if pol == "lynx" and not relative else None,
                    })
    if not rows:
        raise ValueError("no point has both a decode_other and a moe_layer measurement: " + "; ".join(missing))
    sel_note = ("selection included: the MoE-layer file timed it (time_us includes ExpertSelector.run, "
                "selection_us reports it alone)" if all(r["selection_timed"] for r in rows if r["policy"] != "off")
                else "selection NOT confirmed included: some MoE-layer rows lack selection_us")
    return {
        "benchmark": "end-to-end decode-step estimate from measured parts (Qwen3-30B-A3B)",
        "relative_only": relative,
        "label": LABEL_CPU if relative else None,
        "formula": "step_us = layers * (other_layer_us + moe_layer_us) + once_per_step_us; speedup = off / policy",
        "device": dev,
        "shape": shape,
        "layers": layers,
        "paper": PAPER_E2E,
        "paper_comparison": ("not made: CPU numbers are relative only" if relative else
                             "vs_paper on each lynx row: below / within / above the paper's range"),
        "assumptions": ASSUMPTIONS + [sel_note],
        "warnings": warnings_for(moe, other),
        "inputs": {
            "moe_layer": {"environment": moe.get("environment"), "kernel": moe.get("kernel"),
                          "timing": moe.get("timing"), "dtype": moe.get("dtype"), "routing": moe.get("routing")},
            "decode_other": {"environment": other.get("environment"), "timing": other.get("timing"),
                             "dtype": other.get("dtype"), "attention": other.get("attention"),
                             "model": other.get("model")},
        },
        "missing": missing,
        "results": rows,
    }


def summary_lines(est: dict) -> List[str]:
    lines = []
    if est["label"]:
        lines.append(f"*** {est['label']} ***")
    lines.append(f"device: {est['device']['device']} ({est['device']['device_type']}); layers {est['layers']}; "
                 f"{est['formula']}")
    lines.append(f"{'B':>4} {'L':>6} {'routing':7} {'policy':8} {'other/layer':>12} {'MoE/layer':>11} "
                 f"{'once/step':>10} {'step':>12} {'MoE share':>9} {'MoE x':>6} {'e2e x':>6}")
    for r in est["results"]:
        lines.append(f"{r['B']:4d} {r['L']:6d} {r['routing']:7s} {r['policy']:8s} {r['other_layer_us']:10.1f}us "
                     f"{r['moe_layer_us']:9.1f}us {r['once_per_step_us']:8.1f}us {r['step_us'] / 1e3:10.2f}ms "
                     f"{100 * r['moe_share']:8.1f}% {r['moe_layer_speedup']:6.3f} {r['speedup']:6.3f}"
                     + (f"  ({r['vs_paper']} paper {PAPER_E2E['low']}-{PAPER_E2E['high']}x)" if r["vs_paper"] else ""))
    lines.append(f"paper: x{PAPER_E2E['low']}-{PAPER_E2E['high']} ({PAPER_E2E['what']}); comparison: "
                 f"{est['paper_comparison']}")
    for m in est["missing"]:
        lines.append(f"missing: {m}")
    for w in est["warnings"]:
        lines.append(f"warning: {w}")
    return lines


def plot(est: dict, png: Path) -> None:
    """Stacked bars (other vs MoE, per step) for each B and policy; one panel per (routing, L)."""
    plt = pyplot(png)
    if plt is None:
        return

    rows = est["results"]
    routings = [x for x in ("trace", "random") if any(r["routing"] == x for r in rows)]
    contexts = sorted({r["L"] for r in rows})
    policies = [p for p in ("off", "lynx", "lynx+sim", "oea") if any(r["policy"] == p for r in rows)]
    batches = sorted({r["B"] for r in rows})
    colors = {"off": "black", "lynx": "tab:blue", "lynx+sim": "tab:green", "oea": "tab:orange"}
    fig, axes = plt.subplots(len(routings), len(contexts), figsize=(4.2 * len(contexts) + 1, 3.6 * len(routings)),
                             squeeze=False)
    width = 0.8 / len(policies)
    for i, routing in enumerate(routings):
        for j, L in enumerate(contexts):
            ax = axes[i][j]
            for bi, B in enumerate(batches):
                for pi, pol in enumerate(policies):
                    r = next((x for x in rows if (x["B"], x["L"], x["routing"], x["policy"]) == (B, L, routing, pol)),
                             None)
                    if r is None:
                        continue
                    x = bi + (pi - (len(policies) - 1) / 2) * width
                    oth, moe = r["other_step_us"] / 1e3, r["moe_step_us"] / 1e3
                    ax.bar(x, oth, width * 0.9, color="lightgrey", edgecolor="grey",
                           label="other (attention, norms, router, LM head)" if (bi, pi) == (0, 0) else None)
                    ax.bar(x, moe, width * 0.9, bottom=oth, color=colors.get(pol, "grey"),
                           label=f"MoE layers: {pol}" if bi == 0 else None)
                    if pol != "off":
                        ax.text(x, oth + moe, f"x{r['speedup']:.2f}", ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(batches)))
            ax.set_xticklabels([f"B={B}" for B in batches])
            ax.set_ylabel("decode step (ms)")
            ax.set_title(f"{routing} routing, context L={L}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            if (i, j) == (0, 0):
                ax.legend(fontsize=6, loc="upper left")
    title = (f"Estimated Qwen3-30B-A3B decode step from measured parts on {est['device']['device']} "
             f"({est['layers']} layers); paper: x{PAPER_E2E['low']}-{PAPER_E2E['high']} end-to-end")
    if est["label"]:
        title += f"\n{est['label']}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    print(f"wrote {png}")


def _ints(s: Optional[str]) -> Optional[List[int]]:
    return [int(x) for x in s.split(",") if x] if s else None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="device type of the default input/output names (cpu, cuda)")
    ap.add_argument("--moe", type=Path, default=None, help="bench_moe_layer JSON (default results/moe_layer_<device>)")
    ap.add_argument("--other", type=Path, default=None,
                    help="bench_decode_other JSON (default results/decode_other_<device>)")
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--out", type=Path, default=None, help="output prefix (default results/e2e_estimate_<device>)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    dev = args.device.split(":")[0]
    moe_path = args.moe or RESULTS_DIR / f"moe_layer_{dev}.json"
    other_path = args.other or RESULTS_DIR / f"decode_other_{dev}.json"
    est = estimate(load(moe_path), load(other_path), args.shape, _ints(args.batches))
    est["inputs"]["moe_layer"]["path"] = str(moe_path)
    est["inputs"]["decode_other"]["path"] = str(other_path)
    print("\n".join(summary_lines(est)))
    prefix = args.out or RESULTS_DIR / f"e2e_estimate_{est['device']['device_type']}"
    write_json(prefix, est)
    if not args.no_plot:
        plot(est, prefix.with_name(prefix.name + ".png"))
    return est


if __name__ == "__main__":
    main()
