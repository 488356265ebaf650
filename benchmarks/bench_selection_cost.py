"""Cost of the CPU selection path against the MoE layer it sits in front of, on the bandwidth-realistic twin.

Per MoE layer and decode batch size B:

* ``selection_us``: ``ExpertSelector(..., backend="torch").run`` with the default ``lynx`` policy at the
  bundled model's E and k (what the CPU server runs per MoE layer and step), on the model's *recorded*
  router logits (``data/routing/<model>.pt``, independent_mixed rows: B held-out sequences, one token
  each), routed as the model routes them (softmax top-k, renormalised).
* ``moe_us``: the twin's stock MoE layer at the same B and routing: SGLang's CPU MoE
  (``fused_moe_native.moe_forward_native`` through ``cpu.support.moe_forward_skipping_unused_slots``,
  exactly what the CPU server runs; reads only the experts in use), bf16, experts of the twin's width
  (``lynx_sglang.twin``: moe_intermediate_size x r). Weights are random (values do not change the time);
  one weight set per layer of the model, taken in turn, so consecutive calls do not find the same
  experts in cache.
* ``fraction``: selection_us / moe_us (medians), and its spread over the rounds.

Both are timed in one process in the order a server runs them: MoE layer, selection, MoE layer,
selection, ... (every selection right after a MoE layer has streamed its experts through the caches,
every MoE layer on the next model layer's weights), one torch thread, on the process's CPU time
(``--clock wall`` for wall time), ``--rounds`` rounds of ``--reps`` pairs each; each round takes the
next recorded batch. ``selection_warm_us``: the same selection called back to back (caches warm), for
comparison: on this CPU a selection after a MoE layer costs about three times its warm time.
Target (issue): selection <= 5 % of the MoE layer at B = 16.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_selection_cost            # ~3 min
    .venv/bin/python -m benchmarks.bench_selection_cost --profile 16                 # torch.profiler table at B=16

Results: ``benchmarks/results/selection_cost_cpu.json`` (environment, settings, raw timings) and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import types
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import torch

from benchmarks.bench_moe_layer import CPU_CLOCKS, time_interleaved
from benchmarks.results_io import RESULTS_DIR, cpu_threads, environment, pyplot, write_json
from lynx_sglang import ExpertSelector, RouterSpec, make_policy
from lynx_sglang.runtime.selection.model_identity import model_identity
from lynx_sglang.runtime.selection.similarity import DEFAULT_NAME as SIMILARITY_NAME, load_similarity
from lynx_sglang.synthetic import route
from lynx_sglang.twin import default_factor, expert_bytes, moe_config

REPO = Path(__file__).resolve().parent.parent
TARGET = 0.05  # selection / MoE layer at B = 16


def _q(xs: List[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


class NativeMoE:
    """SGLang's CPU MoE through our CPU server's hook (as bench_moe_layer's ``sglang_native``)."""

    def __init__(self, num_experts: int):
        from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
        from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig

        from lynx_sglang.runtime.cpu import support as cpu_support

        self.E = num_experts
        self._native, self._hook = moe_forward_native, cpu_support.moe_forward_skipping_unused_slots
        self._config = MoeRunnerConfig(activation="silu")

    def __call__(self, x, w13, w2, ids, weights):
        layer = types.SimpleNamespace(num_experts=self.E, w13_weight=w13, w2_weight=w2)
        return self._hook(self._native, layer, x, (weights, ids, None), self._config)


def recorded_batches(trace: dict, B: int, router: RouterSpec, renormalize: bool, kind: str = "independent_mixed"):
    """Every recorded (layer, batch) of the trace cut to its first B rows, routed as the model routes."""
    z = trace["kinds"][kind]["logits"]  # [layers, nb, 128, E] float16
    out = []
    for layer in range(z.shape[0]):
        for b in range(z.shape[1]):
            rb = route(router, z[layer, b, :B].float(), renormalize=renormalize)
            out.append((layer, rb))
    return out


def profile_table(fn, calls: int = 200, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(20):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(calls):
            fn()
    return p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "trained-qwen3-moe")
    ap.add_argument("--trace", type=Path, default=None, help="routing trace (default data/routing/<model name>.pt)")
    ap.add_argument("--factor", type=int, default=None, help="twin width factor (default: lynx_sglang.twin's)")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--policy", default="lynx")
    ap.add_argument("--refill-similarity", type=float, default=0.0, metavar="LAMBDA",
                    help="lynx's similarity-aware refill (the CPU server's default when the model has "
                         "sere_similarity.safetensors: 8); 0: refill by router score")
    ap.add_argument("--torch-compile", action="store_true",
                    help="compile each selector's step first (ExpertSelector.compile_step, the server's "
                         "--lynx-torch-compile)")
    ap.add_argument("--rounds", type=int, default=8, help="rounds per B (each on another recorded batch)")
    ap.add_argument("--reps", type=int, default=10, help="interleaved calls of each per round")
    ap.add_argument("--clock", default="cpu", choices=tuple(CPU_CLOCKS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", type=int, default=None, metavar="B", help="print torch.profiler's table of the "
                    "selection at this B and exit")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "selection_cost_cpu")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)

    from lynx_sglang.routing_stats import load_trace

    config = json.loads((args.model / "config.json").read_text())
    mc = moe_config(config)
    E, k, d, ff = mc["experts"], mc["top_k"], mc["hidden"], mc["ff"]
    r = args.factor or default_factor(d, ff)
    layers = int(config["num_hidden_layers"])
    renorm = bool(config.get("norm_topk_prob", True))
    if config.get("model_type") != "qwen3_moe":
        raise SystemExit("this benchmark routes recorded logits as qwen3_moe does (softmax top-k); "
                         f"{config.get('model_type')} is not supported here")
    trace_path = args.trace or REPO / "data" / "routing" / f"{args.model.name}.pt"
    trace = load_trace(trace_path)
    if int(trace["num_experts"]) != E or int(trace["top_k"]) != k:
        raise SystemExit(f"{trace_path} is E={trace['num_experts']}, k={trace['top_k']}; the model is E={E}, k={k}")
    router = RouterSpec(E, k)
    device = torch.device("cpu")
    batches = [int(b) for b in args.batches.split(",") if b]

    with cpu_threads(device, args.threads):
        params = {"refill_similarity": args.refill_similarity} if args.refill_similarity else {}
        policy = make_policy(args.policy, **params)
        similarity = (load_similarity(args.model / SIMILARITY_NAME, model_identity(types.SimpleNamespace(**config)),
                                      range(layers))
                      if args.refill_similarity else None)

        def selector(T: int, layer: int) -> ExpertSelector:
            sim = None if similarity is None else similarity.matrices[layer]
            sel = ExpertSelector(router, policy, T, device, backend="torch", similarity=sim)
            if args.torch_compile:
                sel.compile_step()
            return sel
        if args.profile:
            _, rb = recorded_batches(trace, args.profile, router, renorm)[0]
            sel = selector(args.profile, 0)
            print(profile_table(lambda: sel.run(rb.logits, rb.topk_ids, rb.topk_weights)))
            return {}
        env = environment(device)
        gen = torch.Generator().manual_seed(0)
        weights = []
        for _ in range(layers):  # one weight set per model layer, taken in turn
            w13 = torch.empty(E, 2 * ff * r, d, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            w2 = torch.empty(E, d, ff * r, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            weights.append((w13, w2))
        moe = NativeMoE(E)
        rows = []
        for B in batches:
            recs = recorded_batches(trace, B, router, renorm)
            sels = {}  # per model layer (the refill's similarity is the layer's own)
            x = torch.randn(B, d, generator=gen).bfloat16()
            now = CPU_CLOCKS[args.clock]
            sel_t, moe_t, warm_t, ratios, distinct = [], [], [], [], []
            for rnd in range(args.rounds):
                layer, rb = recs[(rnd * 37) % len(recs)]
                sel = sels.get(layer) or sels.setdefault(layer, selector(B, layer))
                ts, tm = [], []
                for i in range(-1, args.reps):  # i = -1: warm-up pair, not recorded
                    w13, w2 = weights[(layer + i) % layers]  # the next model layer's experts
                    t0 = now()
                    moe(x, w13, w2, rb.topk_ids, rb.topk_weights)
                    t1 = now()
                    sel.run(rb.logits, rb.topk_ids, rb.topk_weights)
                    t2 = now()
                    if i >= 0:
                        tm.append((t1 - t0) * 1e6)
                        ts.append((t2 - t1) * 1e6)
                warm_t += time_interleaved([lambda rb=rb: sel.run(rb.logits, rb.topk_ids, rb.topk_weights)],
                                           args.reps, warmup=2, clock=args.clock)[0]
                sel_t += ts
                moe_t += tm
                ratios.append(statistics.median(ts) / statistics.median(tm))
                distinct.append(int(torch.unique(rb.topk_ids).numel()))
            s_med, m_med = statistics.median(sel_t), statistics.median(moe_t)
            row = {"B": B, "selection_us": s_med, "moe_us": m_med, "fraction": s_med / m_med,
                   "selection_warm_us": statistics.median(warm_t), "selection_warm_times_us": warm_t,
                   "fraction_per_round": ratios, "fraction_min": min(ratios), "fraction_max": max(ratios),
                   "selection_iqr_us": _q(sel_t, 0.75) - _q(sel_t, 0.25), "moe_iqr_us": _q(moe_t, 0.75) - _q(moe_t, 0.25),
                   "distinct_experts_mean": statistics.mean(distinct),
                   "selection_times_us": sel_t, "moe_times_us": moe_t}
            rows.append(row)
            print(f"B={B:3d}  selection {s_med:8.1f} us (warm {row['selection_warm_us']:6.1f})  MoE layer {m_med:9.1f} us  fraction "
                  f"{100 * row['fraction']:5.2f} % (rounds {100 * min(ratios):.2f}-{100 * max(ratios):.2f} %)  "
                  f"distinct experts {row['distinct_experts_mean']:.1f}", flush=True)
    payload = {
        "benchmark": "CPU selection path (ExpertSelector torch backend) vs the twin's stock MoE layer, per layer",
        "model": str(args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model),
        "E": E, "k": k, "hidden": d, "moe_intermediate_size": ff, "twin_factor": r,
        "twin_moe_intermediate_size": ff * r, "bytes_per_expert_bf16": expert_bytes(d, ff * r),
        "policy": args.policy, "policy_params": asdict(policy),
        "routing": f"{trace_path.relative_to(REPO) if trace_path.is_relative_to(REPO) else trace_path}: recorded "
                   "router logits, independent_mixed batches cut to B rows, softmax top-k "
                   f"({'renormalised' if renorm else 'not renormalised'}); round i takes recorded batch (37 i) mod "
                   f"{layers * trace['kinds']['independent_mixed']['logits'].shape[1]} and that layer's weights",
        "moe_layer": "SGLang CPU MoE, sglang.srt.layers.moe.fused_moe_native.moe_forward_native through "
                     "lynx_sglang.runtime.cpu.support.moe_forward_skipping_unused_slots (the CPU server's path), "
                     "bf16, stock routing ids; random weights of the twin's shape, one set per model layer",
        "timing": f"{'process CPU time' if args.clock == 'cpu' else 'wall clock'}, {args.threads} torch thread(s); "
                  f"MoE layer then selection, alternating as in a server (each MoE call on the next layer's "
                  f"weights), {args.rounds} rounds x {args.reps} pairs; median over all calls; fraction_per_round "
                  "= ratio of the round medians; selection_warm_us: the selection back to back",
        "target_fraction_at_B16": TARGET,
        "settings": {k_: (str(v) if isinstance(v, Path) else v) for k_, v in vars(args).items()},
        "environment": env,
        "results": rows,
    }
    write_json(args.out, payload)
    if not args.no_plot:
        plot(payload, args.out.with_name(args.out.name + ".png"))
    return payload


def plot(payload: dict, png: Path) -> None:
    plt = pyplot(png)
    if plt is None:
        return
    rows = payload["results"]
    Bs = [r["B"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    st = payload["settings"]
    what = (f"{payload['policy']}{' + refill %g' % st['refill_similarity'] if st.get('refill_similarity') else ''}"
            f"{', torch.compile' if st.get('torch_compile') else ', eager'}")
    a1.plot(Bs, [r["selection_us"] for r in rows], marker="o", label=f"selection ({what}) after a MoE layer")
    a1.plot(Bs, [r["selection_warm_us"] for r in rows], marker=".", ls=":", label="selection back to back (warm)")
    a1.plot(Bs, [r["moe_us"] for r in rows], marker="s", label=f"twin MoE layer (r={payload['twin_factor']}, bf16)")
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("decode batch B")
    a1.set_ylabel("time per layer (us)")
    a1.legend(fontsize=8)
    # The pooled fraction (ratio of the medians over all calls) need not lie inside the per-round range,
    # so the range is drawn as its own bar rather than as error bars around the point.
    a2.vlines(Bs, [100 * r["fraction_min"] for r in rows], [100 * r["fraction_max"] for r in rows],
              color="gray", label="range of the per-round fractions")
    a2.plot(Bs, [100 * r["fraction"] for r in rows], marker="o", ls="-", label="pooled: median / median")
    a2.axhline(100 * payload["target_fraction_at_B16"], color="red", linestyle="--", label="target at B=16")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("decode batch B")
    a2.set_ylabel("selection / MoE layer (%)")
    a2.legend(fontsize=8)
    fig.suptitle(f"{payload['model']} E={payload['E']} k={payload['k']}, {payload['environment']['device']}, "
                 f"{payload['timing'][:60]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    main()
