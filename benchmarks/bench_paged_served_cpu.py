"""SGLang's paged experts, served: stock against lynx on the CPU server, page-ins counted by SGLang's executor.

``bench_offload`` replays teacher-forced routing through SGLang's ``LRUPolicy``. This one serves: the
CPU server (``launch/cpu_server.sh``) with ``--enable-paged-experts --paged-experts-num-resident K``
runs SGLang's own eager paged executor (LRU, ``plan_waves``, page-ins, waves, merge), made runnable on
a CPU by ``lynx_sglang.runtime.cpu.support`` (pageable host store, per-entry MoE outputs, a torch
top-k sum, the LRU mirrored into a ``DeviceResidency`` in CPU memory). Each server appends one line
per paged MoE layer and step to ``LYNX_CPU_PAGED_LOG`` (rows, distinct experts, experts paged in,
waves), counted where SGLang copies them in (``HostExpertStore.page_in``).

Per model, one server after the other (the cores are not shared): an unpaged stock server, then
stock, lynx and lynx's residency modes all paged at K = E/4. Each gets the same B held-out prompts
at once (token ids, greedy, ``ignore_eos``), so decode steps carry B rows until the requests end
together. Reported per server: page-ins per paged layer and full decode step (rows == B), waves,
distinct experts, and how many generated tokens equal those of stock paged at K = E (every expert
resident: the same per-entry arithmetic without a page-in). Paging itself must be exact, so stock at
K = E/4 matches that control token for token; lynx's rewrites change some. Both paged stock servers
differ a little from the unpaged one: the CPU runner computes paged entries one (token, expert) row
at a time, in bf16, in another order than the fused sum.

A CPU "page-in" is a memory copy: the times say nothing about PCIe (docs/offload.md section 4 has
the GPU estimate). ::

    python -m benchmarks.bench_paged_served_cpu                      # trained-qwen3-moe, B = 16, 4 rounds
    python -m benchmarks.bench_paged_served_cpu --models trained-qwen3-moe,trained-qwen3-moe-e128
    python -m benchmarks.bench_paged_served_cpu --models trained-glm4-moe --caps 0.7 --layer-caps 0.35/0.8/0.7/0.9
    python -m benchmarks.bench_paged_served_cpu --caps 0.55 --page-budgets 10@0.55

Writes ``benchmarks/results/paged_served_cpu.{json,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.bench_offload import (add_paged_rule_args, layer_caps_label, parse_layer_caps, parse_page_budgets,
                                      slot_counts)
from lynx_sglang import accuracy
from lynx_sglang.runtime.selection.output_norms import DEFAULT_NAME as OUTPUT_NORMS_FILE
from lynx_sglang.runtime.cpu.support import PAGED_LOG_ENV
from lynx_sglang.server_process import start_server

ROOT = Path(__file__).resolve().parent.parent


def servers(num_experts: int, num_slots: int, caps: Sequence[float],
            layer_plans: Sequence[Tuple[str, Path]] = (),
            page_budgets: Sequence[Tuple[int, float]] = (),
            output_norms: Optional[Path] = None) -> Dict[str, List[str]]:
    """Launch arguments per server: unpaged stock, stock paged with every expert resident (K = E:
    SGLang's paged path without a page-in, the control for its numerics), then every rule paged at
    ``num_slots``; ``layer_plans``: (label, ``--lynx-config`` file) of resident-first with a cap per layer;
    ``page_budgets``: (budget, cap) of resident-first with ``--lynx-residency-page-budget``, and with
    ``output_norms`` (the heads file) each also ranked by it (``--lynx-residency-output-norms``)."""
    def resident(n: int) -> List[str]:
        return ["--enable-paged-experts", "--paged-experts-num-resident", str(n)]

    paged = resident(num_slots)
    lynx = ["--moe-backend", "lynx"]
    out = {"stock (not paged)": [], "off, K = E": resident(num_experts), "off": paged, "lynx": paged + lynx,
           "resident-first": paged + lynx + ["--lynx-residency", "prefer"]}
    for c in caps:
        out[f"resident-first moved<={c:g}"] = paged + lynx + ["--lynx-residency", "prefer",
                                                             "--lynx-residency-max-moved-weight", str(c)]
    for label, path in layer_plans:
        out[label] = paged + lynx + ["--lynx-config", str(path)]
    for p, c in page_budgets:
        label = f"resident-first moved<={c:g} pages<={p}"
        out[label] = paged + lynx + ["--lynx-residency", "prefer", "--lynx-residency-max-moved-weight", str(c),
                                     "--lynx-residency-page-budget", str(p)]
        if output_norms is not None:
            out[f"{label} by output"] = out[label] + ["--lynx-residency-output-norms", str(output_norms)]
    return out


def layer_plan(layer_ids: Sequence[int], caps: Sequence[float], path: Path) -> Tuple[str, Path]:
    """Write a ``--lynx-config`` file: resident-first with ``caps[i]`` as the paged cap of MoE layer ``layer_ids[i]``
    (``layer_params``, as ``bench_offload --layer-caps`` replays it); returns (label, path)."""
    if len(caps) != len(layer_ids):
        raise SystemExit(f"--layer-caps: {len(caps)} caps for a model with {len(layer_ids)} MoE layers")
    path.write_text(json.dumps({"moe_backend": "lynx", "policy": "lynx", "params": {"residency": "prefer"},
                                "layer_params": {str(i): {"residency_max_moved_weight": c}
                                                 for i, c in zip(layer_ids, caps)}}))
    return f"resident-first {layer_caps_label(caps)}", path


def prompts(model_dir: Path, batch_size: int, rounds: int, prompt_len: int, seed: int) -> List[List[List[int]]]:
    """``rounds`` batches of B held-out windows of ``prompt_len`` tokens, one per domain in turn (the
    harness's mixed batches)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = accuracy.make_batches(accuracy.domain_streams(tokenizer), batch_size, rounds, prompt_len, seed=seed,
                                    kinds=("mixed",))
    return [b.tokens.tolist() for b in batches]


def serve_once(name: str, args: List[str], model_dir: Path, rounds: List[List[List[int]]], new_tokens: int,
               log_dir: Path) -> dict:
    """Start one server, send each round's prompts at once (rounds one after the other), stop it; its
    outputs (all rounds, in order) and its paged-layer log lines."""
    log = log_dir / f"paged-{abs(hash(name))}.jsonl"
    log.unlink(missing_ok=True)
    env = {PAGED_LOG_ENV: str(log)} if "--enable-paged-experts" in args else {}
    batch_size = len(rounds[0])
    srv = start_server("--model-path", str(model_dir), "--max-running-requests", str(batch_size), *args,
                       env=env, log_dir=log_dir)
    try:
        start = log.stat().st_size if log.exists() else 0  # warm-up steps are not counted
        params = {"temperature": 0.0, "max_new_tokens": new_tokens, "ignore_eos": True}
        t0 = time.perf_counter()
        outs = []
        with ThreadPoolExecutor(batch_size) as pool:
            for ids in rounds:
                outs += pool.map(lambda p: srv.post("/generate", {"input_ids": p, "sampling_params": params},
                                                    timeout=600.0), ids)
        seconds = time.perf_counter() - t0
    finally:
        srv.stop()
    lines = []
    if log.exists():
        with open(log) as f:
            f.seek(start)
            lines = [json.loads(line) for line in f if line.strip()]
    return {"name": name, "args": args, "seconds": round(seconds, 3), "startup_s": round(srv.started_in_s, 1),
            "output_ids": [o["output_ids"] for o in outs], "steps": lines}


def agreement(outputs: List[List[int]], reference: List[List[int]]) -> dict:
    """Generated tokens equal to ``reference``'s at the same position, and the mean position of the first
    difference (greedy continuations part for good at their first different token)."""
    same = sum(a == b for o, r in zip(outputs, reference) for a, b in zip(o, r))
    first = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(r)) for o, r in zip(outputs, reference)]
    return {"equal": same, "tokens": sum(len(r) for r in reference), "mean_first_difference": sum(first) / len(first)}


def summarise(run: dict, batch_size: int, unpaged: List[List[int]], paged_control: Optional[List[List[int]]]) -> dict:
    """Means over full decode steps (rows == B) of every paged layer; agreement with the unpaged stock
    server's outputs and with stock paged at K = E (``paged_control``; None for that server itself)."""
    full = [s for s in run["steps"] if s["rows"] == batch_size]
    mean = lambda key: sum(s[key] for s in full) / len(full) if full else float("nan")  # noqa: E731
    out = {"name": run["name"], "args": run["args"], "seconds": run["seconds"],
           "full_decode_layer_steps": len(full), "layer_steps_logged": len(run["steps"]),
           "page_ins_per_layer_step": mean("page_ins"), "waves_per_layer_step": mean("waves"),
           "distinct_per_layer_step": mean("distinct"),
           "page_ins_per_layer_step_max": max((s["page_ins"] for s in full), default=float("nan"))}
    out["vs_unpaged_stock"] = agreement(run["output_ids"], unpaged)
    if paged_control is not None:
        out["vs_stock_paged_k_e"] = agreement(run["output_ids"], paged_control)
    out["output_ids"] = run["output_ids"]
    return out


def run_model(name: str, batch_size: int, rounds: int, prompt_len: int, new_tokens: int, caps: Sequence[float],
              seed: int, log_dir: Path, log=print, layer_caps: Sequence[Tuple[float, ...]] = (),
              page_budgets: Sequence[Tuple[int, float]] = (), output_norms: bool = False) -> dict:
    model_dir = ROOT / "models" / name
    cfg = json.loads((model_dir / "config.json").read_text())
    E = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg["n_routed_experts"]
    k = cfg["num_experts_per_tok"]
    K = slot_counts(E, k, (4,))[0]  # E/4, at least top-k: the replay's K
    ids = prompts(model_dir, batch_size, rounds, prompt_len, seed)
    plans = []
    if layer_caps:
        layer_ids = accuracy.moe_layer_ids(accuracy.load_model(model_dir)[0])
        plans = [layer_plan(layer_ids, v, log_dir / f"{name}-plan-{i}.json") for i, v in enumerate(layer_caps)]
    rows, unpaged, control = [], None, None
    norms = model_dir / OUTPUT_NORMS_FILE if output_norms else None
    for label, args in servers(E, K, caps, plans, page_budgets, norms).items():
        run = serve_once(label, args, model_dir, ids, new_tokens, log_dir)
        if unpaged is None:
            unpaged = run["output_ids"]
            continue
        row = summarise(run, batch_size, unpaged, control)
        if control is None:
            control = run["output_ids"]
        rows.append(row)
        vs = row.get("vs_stock_paged_k_e", row["vs_unpaged_stock"])
        log(f"{name} K={K} {label}: {row['page_ins_per_layer_step']:.2f} page-ins / layer-step over "
            f"{row['full_decode_layer_steps']} full decode layer-steps (at most {row['page_ins_per_layer_step_max']}), "
            f"{row['waves_per_layer_step']:.2f} waves, "
            f"{row['distinct_per_layer_step']:.1f} distinct; {row['vs_unpaged_stock']['equal']}/{vs['tokens']} "
            f"tokens equal to unpaged stock, {vs['equal']} to stock paged at K = E; {run['seconds']:.1f} s")
    off = next(r for r in rows if r["name"] == "off")["page_ins_per_layer_step"]  # at K = E/4
    for r in rows:
        r["page_ins_vs_off"] = r["page_ins_per_layer_step"] / off if off else float("nan")
    return {"model": name, "num_experts": E, "top_k": k, "num_slots": K, "batch_size": batch_size,
            "rounds": rounds, "prompt_len": prompt_len, "new_tokens": new_tokens, "rows": rows}


def plot(payload: dict, png: Path) -> None:
    from benchmarks.results_io import pyplot, save_png

    plt = pyplot(png)
    if plt is None:
        return
    models = payload["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models) + 2.5, 4.0), squeeze=False)
    for ax, m in zip(axes[0], models):
        names = [r["name"] for r in m["rows"]]
        ax.barh(names, [r["page_ins_per_layer_step"] for r in m["rows"]], color="tab:blue")
        for i, r in enumerate(m["rows"]):
            ax.annotate(f"{r['page_ins_vs_off']:.2f}x off",
                        (r["page_ins_per_layer_step"], i), fontsize=7, xytext=(3, -3), textcoords="offset points")
        ax.invert_yaxis()
        ax.set_xlabel("experts paged in per layer and full decode step (served, SGLang's executor)")
        ax.set_title(f"{m['model']} (E={m['num_experts']}, k={m['top_k']}), K={m['num_slots']}, "
                     f"B={m['batch_size']}", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Paged experts served on the CPU server: page-ins per decode step", fontsize=10)
    save_png(fig, png)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from benchmarks.results_io import RESULTS_DIR, environment, write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="trained-qwen3-moe", help="bundled model folders under models/")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4, help="batches of B prompts per server, one after the other")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--caps", default="0.55", help="resident-first at these paged-layer caps too")
    add_paged_rule_args(ap)  # --layer-caps are served from a --lynx-config plan written per model
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "paged_served_cpu")
    args = ap.parse_args(argv)
    t0 = time.time()
    caps = [float(c) for c in args.caps.split(",") if c]
    with tempfile.TemporaryDirectory(prefix="lynx-paged-") as tmp:
        models = [run_model(m, args.batch_size, args.rounds, args.prompt_len, args.new_tokens, caps, args.seed,
                            Path(tmp), layer_caps=parse_layer_caps(args.layer_caps),
                            page_budgets=parse_page_budgets(args.page_budgets), output_norms=args.output_norms)
                  for m in args.models.split(",")]
    payload = {**environment(torch.device("cpu")),
               "command": "python -m benchmarks.bench_paged_served_cpu " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv),
               "settings": {k: str(v) for k, v in vars(args).items()}, "seconds": round(time.time() - t0, 1),
               "note": "CPU server: a page-in is a host memory copy, so seconds are not a PCIe measurement; "
                       "page-ins, waves and distinct experts are counted in SGLang's eager paged executor",
               "models": models}
    write_json(args.out, payload)
    plot(payload, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
