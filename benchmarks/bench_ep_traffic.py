"""Expert-parallel traffic of one MoE layer's decode step, replayed from recorded routing (CPU, exact counts).

A simulation, not a timing: for every routing batch the selection policy runs on
the *global* batch (every rank takes the same decision, as with
``GlobalExpertSelector``), and the step's cost is counted with the same function
the dispatcher accumulates at serving time, ``expert_parallel.accounting.step_traffic``.

Set-up per point (source, EP size N, tokens per rank t, policy):

* global decode batch ``B = N * t``; row i's home rank is ``home_rank(B, N)``
  (contiguous blocks of t rows, as ``--moe-a2a-backend lynx`` splits rows);
* contiguous expert placement, ``ExpertPlacement.contiguous(E, N)`` (rank r holds
  experts ``[r E/N, (r+1) E/N)``; no EPLB replicas);
* ``off`` and ``lynx`` picks go to the rank holding the expert; ``lynx_ep`` gets
  ``rank_mask`` and ``home`` and its ``last_slot_rank`` says where each slot goes;
  ids are mapped to physical slots with ``rank_aware.physical_ids``;
* bf16 activations (2 bytes), int32 ids and fp32 gate weights in the dispatch.

Reported per point, mean (and std) over ``batches`` routing batches x every MoE
layer of the trace (4), one sample per (batch, layer):

* ``a2a_bytes``: dispatch + combine bytes of the variable-size all-to-all, summed
  over ranks, for one MoE layer and one decode step (``step_traffic``);
* ``busiest_rank_expert_bytes``: the busiest rank's distinct experts x one
  expert's weights (3 x hidden x expert_ff x 2 bytes, bf16 gate/up/down);
* ``busiest_rank_tokens``: token rows the busiest rank's experts process;
* ``remote_ranks_per_token``: ranks other than its home a row is sent to
  (``rank_aware.remote_ranks``), mean over the B rows;
* ``token_imbalance``: the busiest rank's token rows / the mean over ranks;
* ``new_visits_pct``: of the (row, rank) pairs the step's rows go to, those the
  router's own picks did not go to (refills landing on a rank the row did not
  visit before); ``busiest_new_pct``: the share of the busiest rank's token rows
  that are such new visits: what steering refills elsewhere could take off it;
* ``distinct_experts``: distinct experts the batch uses (all ranks);
* ``rows_changed_pct``: rows the policy rewrote (``ExpertSelector`` statistics);
* ``capacity_bytes`` (reference): what the fixed-capacity (CUDA-graph) exchange
  sends whatever the routing, ``accounting.capacity_bytes`` with capacity = t;
* ``reduction_pct``: ``100 * (1 - mean(policy) / mean(off))`` on the same samples.

Routing sources (the same token rows feed all three):

1. ``trace``: the bundled model's recorded decode batches
   (``data/routing/trained-qwen3-moe.pt``, E = 32, k = 4, hidden 256, expert ff 96,
   softmax, renormalised), ``independent_mixed`` kind: 32 recorded batches x 128
   rows per layer, each recorded batch one decode position of 128 different
   windows drawn across the four domains. Batch j (of ``batches``) of size B
   concatenates recorded batches s_j, s_j + 1, ..., s_j + m - 1 (mod 32), with
   ``m = ceil(B / 128)`` and ``s_j = floor(j * 32 / batches)``, in recorded order,
   and keeps the first B rows. Row i is the same token in every layer. With 8
   batches the batches are disjoint up to B = 512; at B = 1024 / 2048 they share
   rows (the trace holds 4096 rows per layer), so their spread understates the
   batch-to-batch variation there.
2. ``qwen3-30b-a3b``: E = 128, k = 8, hidden 2048, expert ff 768, softmax,
   renormalised. The same B rows per layer replayed at E = 128 with
   ``routing_stats.scaled_logits`` (the recorded top-k logits kept, tail stretched,
   each recorded expert split into 4 equally popular children, a pick going to a
   random child of its recorded parent: the recorded per-layer load skew and
   co-occurrence carry over); rows are shuffled within the batch by it.
3. ``deepseek-v3``: E = 256 routed, k = 8, hidden 7168, expert ff 2048, sigmoid
   scoring with a correction bias, renormalised, routed scaling 2.5; rows scaled
   as in 2 (8 children per recorded expert). The recorded logits (of a softmax
   router) are taken as the sigmoid router's logits as they are. The correction
   bias is *not* DeepSeek-V3's (we do not have it): a fixed Gaussian vector per
   layer, std ``--dsv3-bias-std`` (0.05), so that picks are ranked by
   ``sigmoid + bias`` as in the model. DeepSeek-V3's grouped top-k (n_group 8,
   topk_group 4: a token's picks come from its 4 best groups of 32 experts) is
   *not* modelled: plain top-8 over 256. Its shared expert is not counted
   (every rank runs it on its own rows: no traffic).

Selection runs through ``ExpertSelector`` (torch backend), one per MoE layer and
policy, with the policies' default parameters. Labelled variants, not tuned
settings: ``lynx_ep_slack0`` (``rank_slack = 0``) and the diagnostic
``lynx_ep_nocap`` (``max_moved_weight = 1``: no moved-weight cap; shows how much
of the gap the cap accounts for, not a setting we propose).

The issue's target, checked per source and printed as PASS / MISS: at N = 4,
64 tokens per rank, ``lynx_ep`` (defaults) sends >= 35 % fewer all-to-all bytes
AND loads >= 35 % fewer expert-weight bytes on the busiest rank than ``off``.

    nice -n 19 .venv/bin/python -m benchmarks.bench_ep_traffic            # full grid, ~1.5 min on one thread
    nice -n 19 .venv/bin/python -m benchmarks.bench_ep_traffic --quick --out /tmp/ep_traffic

Results: ``benchmarks/results/ep_traffic.{json,png,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from benchmarks.bench_moe_layer import DEFAULT_TRACE, SHAPES, MoEShape
from benchmarks.results_io import RESULTS_DIR, cpu_threads, environment, pyplot
from lynx_sglang import ExpertSelector, RouterSpec, make_policy
from lynx_sglang.runtime.selection.config import policy_params
from lynx_sglang.runtime.expert_parallel import ExpertPlacement, capacity_bytes, home_rank, step_traffic
from lynx_sglang.runtime.expert_parallel.accounting import ID_BYTES, WEIGHT_BYTES, visited_ranks
from lynx_sglang.runtime.expert_parallel.rank_aware import RankAwareSelector, default_pick_rank, physical_ids, remote_ranks
from lynx_sglang.routing_stats import load_trace, scaled_logits
from lynx_sglang.synthetic import route

DEVICE = "cpu (simulation: exact counts, no timings)"
ACTIVATION_BYTES = 2  # bf16 hidden rows on the wire
WEIGHT_ELEM_BYTES = 2  # bf16 expert weights
TRACE_KIND = "independent_mixed"
TARGET = {"ep": 4, "tokens_per_rank": 64, "policy": "lynx_ep", "min_reduction_pct": 35.0}

EP_SIZES = (2, 4, 8)
TOKENS_PER_RANK = (16, 64, 256)
NUM_BATCHES = 8
QUICK = {"ep": (2, 4), "tokens": (16, 64), "batches": 2}

#: label -> (policy name, parameters); every label but the first three is a labelled variant.
POLICY_VARIANTS: Dict[str, tuple] = {
    "off": ("off", {}),
    "lynx": ("lynx", {}),
    "lynx_ep": ("lynx_ep", {}),
    "lynx_ep_slack0": ("lynx_ep", {"rank_slack": 0.0}),
    # lynx's default cap, for comparison with lynx_ep's default 0.3.
    "lynx_ep_cap0.4": ("lynx_ep", {"max_moved_weight": 0.4}),
    # Diagnostic, not a proposed setting: no moved-weight cap (a row's whole routed weight may move).
    "lynx_ep_nocap": ("lynx_ep", {"max_moved_weight": 1.0}),
}
DEFAULT_POLICIES = tuple(POLICY_VARIANTS)

METRICS = ("a2a_bytes", "dispatch_bytes", "combine_bytes", "busiest_rank_expert_bytes", "busiest_rank_experts",
           "busiest_rank_tokens", "remote_ranks_per_token", "token_imbalance", "new_visits_pct", "busiest_new_pct",
           "distinct_experts",
           "rows_changed", "rows_changed_pct")
#: Per-sample values kept in the JSON (the others follow from them: bytes = experts x expert_bytes, ...).
RAW = ("a2a_bytes", "busiest_rank_experts", "busiest_rank_tokens", "remote_ranks_per_token", "distinct_experts",
       "rows_changed")
REDUCED = ("a2a_bytes", "busiest_rank_expert_bytes", "busiest_rank_tokens", "remote_ranks_per_token",
           "distinct_experts")


@dataclass(frozen=True)
class Source:
    """A routing source: a model shape and how its router scores and weights picks."""

    name: str
    shape: MoEShape
    scoring_func: str = "softmax"
    correction_bias: bool = False
    routed_scaling: float = 1.0
    scaled: bool = True  # replayed at a larger E with scaled_logits (False: recorded rows as they are)
    note: str = ""

    def router(self) -> RouterSpec:
        return RouterSpec(self.shape.experts, self.shape.top_k, scoring_func=self.scoring_func,
                          has_correction_bias=self.correction_bias)

    def expert_bytes(self) -> int:
        return self.shape.expert_bytes(WEIGHT_ELEM_BYTES)


SOURCES: Dict[str, Source] = {
    s.name: s
    for s in (
        Source("trace", MoEShape("trained-qwen3-moe", 32, 4, 256, 96, renormalize=True), scaled=False,
               note="bundled model's recorded decode rows as they are"),
        Source("qwen3-30b-a3b", SHAPES["qwen3-30b-a3b"],
               note="trace rows scaled to E=128, k=8 with routing_stats.scaled_logits"),
        Source("deepseek-v3", MoEShape("deepseek-v3", 256, 8, 7168, 2048, renormalize=True), scoring_func="sigmoid",
               correction_bias=True, routed_scaling=2.5,
               note="trace rows scaled to E=256, k=8; sigmoid + synthetic correction bias; grouped top-k "
                    "(n_group 8, topk_group 4) not modelled; shared expert not counted"),
    )
}


# --------------------------------------------------------------------------- routing


def trace_rows(trace: dict, batch: int, j: int, num_batches: int) -> tuple:
    """Rows of batch ``j`` of size ``batch``: [layers, batch, E] recorded logits and the recorded batches used.

    Concatenates recorded batches s, s + 1, ..., s + m - 1 (mod nb), m = ceil(batch / rows per recorded
    batch), s = floor(j * nb / num_batches), and keeps the first ``batch`` rows (the same rows in every layer).
    """
    z = trace["kinds"][TRACE_KIND]["logits"]  # [L, nb, B_rec, E] float16
    L, nb, b_rec, E = z.shape
    m = -(-batch // b_rec)
    start = (j * nb) // num_batches
    used = [(start + i) % nb for i in range(m)]
    rows = z[:, used].reshape(L, m * b_rec, E)[:, :batch].float()
    return rows, used


def correction_biases(source: Source, num_layers: int, std: float, seed: int) -> List[Optional[torch.Tensor]]:
    """One fixed bias vector per layer (synthetic: see the module docstring), or None."""
    if not source.correction_bias:
        return [None] * num_layers
    return [torch.randn(source.shape.experts, generator=torch.Generator().manual_seed(seed * 7919 + 31 * layer + 1))
            * std for layer in range(num_layers)]


def layer_logits(source: Source, trace: dict, rows: torch.Tensor, layer: int, seed: int) -> torch.Tensor:
    """Router logits [B, E] of one layer for one batch of recorded rows (``rows``: [L, B, E_rec])."""
    if not source.scaled:
        return rows[layer].clone()
    # scaled_logits reads a trace dict: hand it a one-batch trace holding exactly these rows.
    sub = {"num_experts": int(trace["num_experts"]), "num_layers": rows.shape[0],
           "kinds": {TRACE_KIND: {"logits": rows[:, None]}}}
    g = torch.Generator().manual_seed(seed)  # the same seed in every layer: the same row order
    return scaled_logits(sub, layer, source.shape.experts, source.shape.top_k, rows.shape[1], generator=g,
                         kind=TRACE_KIND)


# --------------------------------------------------------------------------- one step


def measure_step(ids: torch.Tensor, slot_rank: torch.Tensor, placement: ExpertPlacement, home: torch.Tensor,
                 hidden: int, expert_bytes: int, rows_changed: int, routed_rank: torch.Tensor) -> dict:
    """The counts of one step from its (logical) output ids and the rank of each routed slot.

    ids / slot_rank: [T, k]; home: [T]; routed_rank: [T, k] the ranks of the router's own picks.
    Bytes come from ``step_traffic`` on the physical ids.
    """
    T, k = slot_rank.shape
    phys = physical_ids(ids, slot_rank, placement.replica_on_rank())
    traffic = step_traffic(phys, placement, home, hidden, ACTIVATION_BYTES).as_dict(expert_bytes)
    remote = remote_ranks(slot_rank, home, placement.num_ranks)
    # Cross-check of the two countings: every remote (row, rank) pair is one transfer each way.
    per_transfer = 2 * hidden * ACTIVATION_BYTES + k * (ID_BYTES + WEIGHT_BYTES)
    assert traffic["a2a_bytes"] == int(remote.sum()) * per_transfer, "step_traffic and remote_ranks disagree"
    after, before = visited_ranks(slot_rank, placement.num_ranks), visited_ranks(routed_rank, placement.num_ranks)
    tokens = traffic["rank_tokens"]
    busiest = max(range(len(tokens)), key=tokens.__getitem__)
    return {
        "a2a_bytes": traffic["a2a_bytes"],
        "dispatch_bytes": traffic["dispatch_bytes"],
        "combine_bytes": traffic["combine_bytes"],
        "busiest_rank_expert_bytes": traffic["busiest_rank_expert_bytes"],
        "busiest_rank_experts": traffic["busiest_rank_experts"],
        "busiest_rank_tokens": traffic["busiest_rank_tokens"],
        "remote_ranks_per_token": float(remote.double().mean()),
        "token_imbalance": max(tokens) * len(tokens) / max(1, sum(tokens)),
        "new_visits_pct": 100.0 * int((after & ~before).sum()) / max(1, int(after.sum())),
        "busiest_new_pct": 100.0 * int((after & ~before)[:, busiest].sum()) / max(1, tokens[busiest]),
        "distinct_experts": int(sum(traffic["rank_experts"])),
        "rows_changed": int(rows_changed),
        "rows_changed_pct": 100.0 * rows_changed / T,
    }


class Point:
    """One (source, N, t, policy): a selector per layer and the samples collected so far."""

    def __init__(self, source: Source, ep: int, tokens: int, label: str, biases: List[Optional[torch.Tensor]]):
        self.source, self.ep, self.tokens, self.label = source, ep, tokens, label
        self.B = ep * tokens
        self.placement = ExpertPlacement.contiguous(source.shape.experts, ep)
        self.mask = self.placement.logical_on_rank()
        self.home = home_rank(self.B, ep)
        name, params = POLICY_VARIANTS[label]
        self.policy = make_policy(name, **params)
        self.rank_aware = name == "lynx_ep"
        self.selectors = [
            RankAwareSelector(source.router(), self.policy, self.B, "cpu", correction_bias=bias, backend="torch",
                              rank_mask=self.mask)
            if self.rank_aware else
            ExpertSelector(source.router(), self.policy, self.B, "cpu", correction_bias=bias, backend="torch")
            for bias in biases
        ]
        self.samples: List[dict] = []

    def run(self, layer: int, logits, topk_ids, topk_weights) -> dict:
        sel = self.selectors[layer]
        before = sel.stats().rows_changed
        if self.rank_aware:
            ids, _ = sel.run(logits, topk_ids, topk_weights, home=self.home)
            slot_rank = sel.last_slot_rank.clone()
        else:
            ids, _ = sel.run(logits, topk_ids, topk_weights)
            slot_rank = default_pick_rank(ids, self.mask, self.source.shape.top_k)
        changed = sel.stats().rows_changed - before
        routed_rank = default_pick_rank(topk_ids, self.mask, self.source.shape.top_k)
        s = measure_step(ids[:, : self.source.shape.top_k].clone(), slot_rank, self.placement, self.home,
                         self.source.shape.hidden, self.source.expert_bytes(), changed, routed_rank)
        self.samples.append(s)
        return s


# --------------------------------------------------------------------------- the grid


def _mean_std(v: Sequence[float]) -> tuple:
    n = len(v)
    m = sum(v) / n
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / n)


def run_source(source: Source, trace: dict, ep_sizes, tokens_list, labels, num_batches: int, seed: int,
               bias_std: float) -> tuple:
    """Every point of one source; returns (rows, batch provenance)."""
    L = int(trace["num_layers"])
    biases = correction_biases(source, L, bias_std, seed)
    points = {(n, t, lab): Point(source, n, t, lab, biases) for n in ep_sizes for t in tokens_list for lab in labels}
    provenance = {}
    for B in sorted({n * t for n in ep_sizes for t in tokens_list}):
        provenance[str(B)] = []
        for j in range(num_batches):
            rows, used = trace_rows(trace, B, j, num_batches)
            provenance[str(B)].append(used)
            for layer in range(L):
                logits = layer_logits(source, trace, rows, layer, seed * 1_000_003 + B * 7919 + j)
                rb = route(source.router(), logits, biases[layer], renormalize=source.shape.renormalize,
                           scaling=source.routed_scaling)
                for (n, t, lab), p in points.items():
                    if n * t == B:
                        p.run(layer, rb.logits, rb.topk_ids, rb.topk_weights)
    out = []
    for n in ep_sizes:
        for t in tokens_list:
            off = points.get((n, t, "off"))
            for lab in labels:
                p = points[(n, t, lab)]
                stats = {m: _mean_std([s[m] for s in p.samples]) for m in METRICS}
                raw = {m: [round(s[m], 6) for s in p.samples] for m in RAW}
                row = {
                    "source": source.name, "ep": n, "tokens_per_rank": t, "batch": n * t, "policy": lab,
                    "policy_params": policy_params(p.policy), "samples": len(p.samples),
                    "mean": {m: s[0] for m, s in stats.items()}, "std": {m: s[1] for m, s in stats.items()},
                    "capacity_bytes": capacity_bytes(t, n, source.shape.hidden, ACTIVATION_BYTES, source.shape.top_k),
                    "raw": raw,  # one value per (batch, layer), batch-major
                }
                if off is not None:
                    off_mean = {m: _mean_std([s[m] for s in off.samples])[0] for m in REDUCED}
                    row["reduction_pct"] = {m: (100.0 * (1.0 - row["mean"][m] / off_mean[m]) if off_mean[m] else 0.0)
                                            for m in REDUCED}
                out.append(row)
    return out, provenance


def target_verdicts(rows: List[dict]) -> List[dict]:
    """The issue's target per source (lynx_ep defaults) and, labelled, for the other policies."""
    out = []
    for r in rows:
        if (r["ep"], r["tokens_per_rank"]) != (TARGET["ep"], TARGET["tokens_per_rank"]) or r["policy"] == "off" \
                or "reduction_pct" not in r:
            continue
        a2a = r["reduction_pct"]["a2a_bytes"]
        w = r["reduction_pct"]["busiest_rank_expert_bytes"]
        ok = a2a >= TARGET["min_reduction_pct"] and w >= TARGET["min_reduction_pct"]
        out.append({"source": r["source"], "policy": r["policy"], "target_policy": r["policy"] == TARGET["policy"],
                    "a2a_reduction_pct": a2a, "busiest_rank_expert_bytes_reduction_pct": w,
                    "verdict": "PASS" if ok else "MISS"})
    return out


def verdict_line(v: dict) -> str:
    tag = "target" if v["target_policy"] else f"info, {v['policy']} (not the target policy)"
    return (f"{v['verdict']} [{v['source']}] EP={TARGET['ep']}, {TARGET['tokens_per_rank']} tokens/rank, "
            f"{v['policy']} vs off: all-to-all bytes {-v['a2a_reduction_pct']:+.1f}%, busiest-rank expert bytes "
            f"{-v['busiest_rank_expert_bytes_reduction_pct']:+.1f}% "
            f"(target: both <= -{TARGET['min_reduction_pct']:.0f}%; {tag})")


# --------------------------------------------------------------------------- output


def _mb(x: float) -> str:
    return f"{x / 1e6:.3f}" if x < 1e7 else f"{x / 1e6:.1f}"


def _red(r: dict, m: str) -> str:
    return "" if r["policy"] == "off" or "reduction_pct" not in r else f"{-r['reduction_pct'][m]:+.1f}%"


def markdown(payload: dict) -> str:
    lines = [f"# Expert-parallel traffic per MoE layer and decode step ({payload['device']})", "",
             payload["summary"], ""]
    for name, src in payload["sources"].items():
        rows = [r for r in payload["results"] if r["source"] == name]
        if not rows:
            continue
        lines += [f"## {name}: E={src['experts']}, k={src['top_k']}, hidden {src['hidden']}, expert ff {src['ff']}, "
                  f"{src['scoring_func']}; one expert {src['expert_bytes'] / 1e6:.3f} MB", "", src["note"], "",
                  "| EP | tok/rank | B | policy | a2a MB | vs off | busiest-rank expert MB | vs off | "
                  "busiest-rank tokens | vs off | busiest / mean tokens | new rank visits (busiest rank) | "
                  "remote ranks/token | distinct experts | rows changed | fixed-cap a2a MB |",
                  "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            m, s = r["mean"], r["std"]
            lines.append(
                f"| {r['ep']} | {r['tokens_per_rank']} | {r['batch']} | {r['policy']} | "
                f"{_mb(m['a2a_bytes'])} ± {_mb(s['a2a_bytes'])} | {_red(r, 'a2a_bytes')} | "
                f"{_mb(m['busiest_rank_expert_bytes'])} ({m['busiest_rank_experts']:.2f} exp) | "
                f"{_red(r, 'busiest_rank_expert_bytes')} | {m['busiest_rank_tokens']:.1f} | "
                f"{_red(r, 'busiest_rank_tokens')} | {m['token_imbalance']:.3f} | {m['new_visits_pct']:.1f}% ({m['busiest_new_pct']:.1f}%) | "
                f"{m['remote_ranks_per_token']:.3f} | {m['distinct_experts']:.1f} | {m['rows_changed_pct']:.1f}% | "
                f"{_mb(r['capacity_bytes'])} |")
        lines.append("")
    lines += ["## Target (EP=4, 64 tokens/rank: >= 35% fewer a2a bytes AND busiest-rank expert bytes)", ""]
    lines += [f"- {verdict_line(v)}" for v in payload["target"]] or ["- (target point not in this run)"]
    return "\n".join(lines) + "\n"


def plot(payload: dict, png: Path) -> None:
    """Per source two rows (a2a bytes, busiest-rank expert bytes) x one column per EP; lines per policy."""
    plt = pyplot(png)
    if plt is None:
        return

    rows = payload["results"]
    sources = [s for s in payload["sources"] if any(r["source"] == s for r in rows)]
    eps = sorted({r["ep"] for r in rows})
    fig, axes = plt.subplots(2 * len(sources), len(eps), figsize=(4.4 * len(eps), 3.0 * 2 * len(sources)),
                             squeeze=False)
    # Variants dashed / dotted: lynx_ep and lynx_ep_slack0 often coincide, lynx and off too.
    styles = {"off": ("black", "-", 2.2), "lynx": ("tab:blue", "-", 1.2), "lynx_ep": ("tab:red", "-", 1.8),
              "lynx_ep_slack0": ("tab:orange", "--", 1.2), "lynx_ep_cap0.4": ("tab:green", "-.", 1.2),
              "lynx_ep_nocap": ("tab:purple", ":", 1.4)}
    for si, s in enumerate(sources):
        for ci, n in enumerate(eps):
            ax_b, ax_w = axes[2 * si][ci], axes[2 * si + 1][ci]
            for lab in payload["settings"]["policies"]:
                pts = sorted((r["tokens_per_rank"], r) for r in rows if r["source"] == s and r["ep"] == n
                             and r["policy"] == lab)
                if not pts:
                    continue
                ts = [p[0] for p in pts]
                color, ls, lw = styles.get(lab, ("grey", "-.", 1.0))
                kw = dict(color=color, ls=ls, lw=lw, marker="o", ms=3, label=lab)
                ax_b.errorbar(ts, [p[1]["mean"]["a2a_bytes"] / 1e6 for p in pts],
                              yerr=[p[1]["std"]["a2a_bytes"] / 1e6 for p in pts], capsize=2, **kw)
                ax_w.errorbar(ts, [p[1]["mean"]["busiest_rank_expert_bytes"] / 1e6 for p in pts],
                              yerr=[p[1]["std"]["busiest_rank_expert_bytes"] / 1e6 for p in pts], capsize=2, **kw)
            cap = sorted({(r["tokens_per_rank"], r["capacity_bytes"]) for r in rows
                          if r["source"] == s and r["ep"] == n})
            if cap:
                ax_b.plot([c[0] for c in cap], [c[1] / 1e6 for c in cap], ls="--", color="grey", label="fixed capacity")
            ax_b.set_title(f"{s}, EP={n}: all-to-all MB / layer / step", fontsize=8)
            ax_w.set_title(f"{s}, EP={n}: busiest rank's expert weights (MB)", fontsize=8)
            ax_b.set_yscale("log")
            ax_w.set_ylim(bottom=0)
            for ax in (ax_b, ax_w):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("tokens per rank")
                ax.grid(alpha=0.3)
            if ci == 0:
                ax_b.legend(fontsize=6)
    fig.suptitle(f"Expert-parallel traffic from recorded routing ({payload['device']}); mean ± std over "
                 f"{payload['settings']['batches']} batches x {payload['num_layers']} layers", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(png, dpi=80)
    plt.close(fig)


def _dumps(payload: dict) -> str:
    """JSON with one line per list of numbers (the raw samples) instead of one line per number."""
    text = json.dumps(payload, indent=1)
    return re.sub(r"\[\s*([-0-9.e+]+(?:,\s*[-0-9.e+]+)*)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


# --------------------------------------------------------------------------- CLI


def _ints(s: str) -> List[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", default=",".join(SOURCES), help=f"comma list of {', '.join(SOURCES)}")
    ap.add_argument("--ep", type=_ints, default=None, help="EP sizes (default 2,4,8; --quick 2,4)")
    ap.add_argument("--tokens", type=_ints, default=None, help="tokens per rank (default 16,64,256; --quick 16,64)")
    ap.add_argument("--batches", type=int, default=None, help="routing batches per point (default 8; --quick 2)")
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help=f"labels of {', '.join(POLICY_VARIANTS)}")
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dsv3-bias-std", type=float, default=0.05, help="std of the synthetic correction bias")
    ap.add_argument("--quick", action="store_true", help="EP 2,4, tokens 16,64, 2 batches (for tests)")
    ap.add_argument("--out", type=Path, default=None, help="output prefix (default benchmarks/results/ep_traffic)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    args.sources = [s for s in args.sources.split(",") if s]
    args.policies = [p for p in args.policies.split(",") if p]
    for s in args.sources:
        if s not in SOURCES:
            ap.error(f"unknown source {s!r} (choose from {', '.join(SOURCES)})")
    for p in args.policies:
        if p not in POLICY_VARIANTS:
            ap.error(f"unknown policy label {p!r} (choose from {', '.join(POLICY_VARIANTS)})")
    if "off" not in args.policies:
        args.policies = ["off"] + args.policies  # reductions need the baseline
    args.ep = args.ep or list(QUICK["ep"] if args.quick else EP_SIZES)
    args.tokens = args.tokens or list(QUICK["tokens"] if args.quick else TOKENS_PER_RANK)
    args.batches = args.batches or (QUICK["batches"] if args.quick else NUM_BATCHES)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    with cpu_threads(torch.device("cpu"), 1):
        trace = load_trace(args.trace)
        rows, provenance = [], {}
        for name in args.sources:
            src = SOURCES[name]
            r, provenance[name] = run_source(src, trace, args.ep, args.tokens, args.policies, args.batches,
                                             args.seed, args.dsv3_bias_std)
            rows += r
            print(f"{name}: {len(r)} points ({time.perf_counter() - t0:.1f} s)", flush=True)
    env = environment(torch.device("cpu"))
    env["device"] = DEVICE
    L = int(trace["num_layers"])
    payload = {
        "benchmark": "expert-parallel all-to-all bytes and busiest-rank load of one MoE layer's decode step, "
                     "simulated from recorded routing",
        "device": DEVICE,
        "environment": env,
        "summary": (f"Per MoE layer and decode step; mean ± std over {args.batches} batches x {L} layers "
                    f"(one sample per batch and layer). Global batch B = EP x tokens/rank, selection on the "
                    f"global batch, home rank = contiguous blocks (home_rank), contiguous expert placement, "
                    f"bf16 activations; 'vs off' = mean(policy) / mean(off) - 1. Fixed-cap: the CUDA-graph "
                    f"exchange (capacity = tokens/rank), for reference."),
        "counting": {
            "a2a_bytes": "accounting.step_traffic: dispatch (hidden row bf16 + k int32 ids + k fp32 weights) plus "
                         "combine (hidden row bf16) per (row, remote rank holding >= 1 of its picks), "
                         "summed over ranks",
            "busiest_rank_expert_bytes": "max over ranks of distinct local experts used x 3*hidden*expert_ff*2 bytes",
            "busiest_rank_tokens": "max over ranks of rows its experts process (local + received)",
            "remote_ranks_per_token": "rank_aware.remote_ranks: ranks other than the row's home, mean over rows",
            "distinct_experts": "distinct experts the batch uses after selection, all ranks",
            "rows_changed_pct": "rows rewritten by the policy (ExpertSelector statistics) / B",
            "capacity_bytes": "accounting.capacity_bytes(tokens_per_rank, EP, hidden, 2, k)",
            "reduction_pct": "100 * (1 - mean(policy) / mean(off)), same samples",
        },
        "routing": {
            "trace": f"{args.trace} ({trace['model']}, E={trace['num_experts']}, k={trace['top_k']}, "
                     f"{L} MoE layers), kind {TRACE_KIND}",
            "batch_construction": "batch j of B rows: recorded batches s_j..s_j+m-1 (mod 32) concatenated in "
                                  "recorded order, first B rows, m = ceil(B/128), s_j = floor(j*32/batches); the same "
                                  "rows in every layer; the scaled sources replay these rows with "
                                  "routing_stats.scaled_logits (rows shuffled within the batch)",
            "recorded_batches_used": provenance,
            "deepseek_v3": f"sigmoid scoring, synthetic correction bias N(0, {args.dsv3_bias_std}^2) per layer "
                           f"(not the model's), renormalised, routed scaling 2.5; grouped top-k (n_group 8, "
                           f"topk_group 4) NOT modelled (plain top-8 of 256); shared expert not counted",
        },
        "sources": {n: {**asdict(SOURCES[n].shape), "scoring_func": SOURCES[n].scoring_func,
                        "correction_bias": SOURCES[n].correction_bias, "routed_scaling": SOURCES[n].routed_scaling,
                        "scaled_from_trace": SOURCES[n].scaled, "expert_bytes": SOURCES[n].expert_bytes(),
                        "note": SOURCES[n].note} for n in args.sources},
        "policies": {lab: policy_params(make_policy(POLICY_VARIANTS[lab][0], **POLICY_VARIANTS[lab][1]))
                     for lab in args.policies},
        "num_layers": L,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target": None,
        "results": rows,
    }
    payload["target"] = target_verdicts(rows)
    payload["run_time_s"] = round(time.perf_counter() - t0, 1)
    prefix = args.out or RESULTS_DIR / "ep_traffic"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = prefix.with_name(prefix.name + ".json")
    md_path = prefix.with_name(prefix.name + ".md")
    json_path.write_text(_dumps(payload))
    md = markdown(payload)
    md_path.write_text(md)
    print(md)
    if not args.no_plot:
        plot(payload, prefix.with_name(prefix.name + ".png"))
    print(f"wrote {json_path}, {md_path}" + ("" if args.no_plot else f", {prefix.with_name(prefix.name + '.png')}"))
    print(f"run time {payload['run_time_s']} s")
    for v in payload["target"]:
        if v["target_policy"]:
            print(verdict_line(v))
    return payload


if __name__ == "__main__":
    main()
