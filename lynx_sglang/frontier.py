"""Every expert-selection rule on one frontier: experts kept vs accuracy lost, on the same batches.

    python -m lynx_sglang.frontier --models models/trained-qwen3-moe --batch-sizes 16,32,64 \\
        --kinds one-domain,mixed --threads 1 --out benchmarks/results/peers_cpu
    python -m lynx_sglang.frontier --from-json benchmarks/results/peers_cpu_*.json --out benchmarks/results/peers_cpu

For each model, batch size B and kind (``one-domain``: batch i holds B independent held-out
windows of domain i mod 4; ``mixed``: domains round robin within the batch), the batches are
built once and selection off runs once per batch; every point of every rule is then measured
on exactly those batches (``accuracy.measure``: teacher-forced decode, the rule applied to each
decode step's B rows on every MoE layer). Rules, each swept over its main knob from "almost
off" to "aggressive" (``frontier_rules``):

* ours (``ExpertSelector``): ``lynx`` and ``lynx+sim`` (refill by expert similarity) over
  ``max_moved_weight`` (``CAP_GRID``, default alpha/beta/keep_level), each with a variant line at
  ``keep_level = 1`` (the default before session 10), and ``lynx+sim`` with the rank guarantee
  the default does not take on that model (``keep_top`` 2 at k < 8, 0 at k >= 8);
  ``oea`` over k0 = k-1 .. 1; ``budget`` over ``max_experts`` as fractions of off's distinct experts;
* peers (``peers``, run by ``ExpertSelector`` too): ``lynx_paper`` over alpha (beta 2, and no
  beta); ``xshare`` over ``expert_budget`` as fractions of E (``top_per_token`` 1, and a few
  points at 0); ``sere`` over S = 1 .. k-1 at a few thresholds rho (0 and quantiles of the model's calibrated similarities, the file
  ``sere_calibrate`` writes beside the model);
* the random-keep control matched in count (every batch, layer and step) to a spread of lynx
  points.

Per point: distinct experts per decode step (mean over layers; and as a fraction of off's on
the same batches), the next-token accuracy change and KL(off || rule) with 95 % paired-bootstrap
intervals (resampling sequences, the same resamples for every rule of a (model, B, kind), so
differences between rules are paired too), top-1 agreement; greedy agreement only with
``--greedy-tokens``. Outputs: ``<out>.json`` (environment, command, every point with its
per-sequence sums, enough to recompute every interval), ``<out>_<model>_b<B>_<kind>.png`` per
frontier (KL on a log axis and the accuracy change, against experts kept), and ``<out>.md``:
each rule line's KL and accuracy change interpolated at 80/70/60 % of off's experts (linear
between a line's neighbouring points, intervals from the bootstrap replicates interpolated the
same way; n/a where a line's points do not span that count), which line is best there, and the
dominance check: peer points with fewer experts and lower KL than one of our lines beyond the
noise (the paired 95 % interval of the KL difference below 0).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lynx_sglang import accuracy as A
from lynx_sglang.corpus import DOMAINS
from lynx_sglang.runtime.selection.config import LynxPolicy, make_policy, policy_params

KINDS = ("one-domain", "mixed")
TARGETS = (0.8, 0.7, 0.6)  # matched expert counts, fractions of off's
OURS = ("lynx", "lynx+sim", "oea", "budget")
REFILL_LAMBDA = 8.0  # lynx's similarity-aware refill (docs/policies.md): at or near the best on every bundled model
PEERS = ("lynx_paper", "xshare", "sere")
FAMILIES = (*OURS, *PEERS, A.RANDOM)
LYNX_FAMILIES = ("lynx", "lynx+sim")  # our lynx lines (the dominance check tests the others against them)
# The line every other line's KL is paired against: the recommended rule (lynx refilling by expert
# similarity) where the similarity file exists, else plain lynx (both over max_moved_weight, defaults otherwise).
REFERENCE_LINES = ("lynx+sim", "lynx")
SERE_QUANTILES = (0.5, 0.9)  # rho values besides 0: quantiles of the off-diagonal similarities
# Our lines' moved-weight caps. Dense where the curve bends: a line is interpolated linearly between its
# points, which over-states KL between sparse points of a convex curve (it is what alternating the two
# settings step by step would give, so a sparse line is never flattered).
CAP_GRID = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 1.0)
VARIANT_CAP_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)  # the variant lines' caps


# ----------------------------------------------------------------------------- rules


@dataclass
class FRule:
    """One point of the sweep: ``policy`` (ours or a peer) or the random control matched to ``matched_to``."""

    label: str
    line: str  # the rule line it belongs to (one curve of the frontier)
    family: str  # FAMILIES
    policy: object = None
    matched_to: Optional[str] = None

    def describe(self) -> dict:
        base = {"label": self.label, "line": self.line, "family": self.family}
        if self.matched_to is not None:
            return {**base, "name": A.RANDOM, "matched_to": self.matched_to}
        return {**base, **policy_params(self.policy)}


def _peer(name: str, **params):
    """A peer policy (``make_policy``: config.py holds the peers' dataclasses)."""
    return make_policy(name, **params)


def sere_thresholds(similarity: Optional[Sequence[torch.Tensor]]) -> List[float]:
    """rho values of the sere lines: 0 and ``SERE_QUANTILES`` of every layer's off-diagonal similarities."""
    if not similarity:
        return [0.0]
    off = torch.cat([m[~torch.eye(m.shape[0], dtype=torch.bool)] for m in similarity]).double()
    return [0.0] + [round(float(torch.quantile(off, q)), 3) for q in SERE_QUANTILES]


def frontier_rules(num_experts: int, top_k: int, off_experts: float, rhos: Sequence[float] = (0.0,),
                   families: Sequence[str] = FAMILIES, lynx_variants: bool = True) -> List[FRule]:
    """The sweep for one (model, B, kind): ``off_experts`` is off's mean distinct experts per step there."""
    E, k = num_experts, top_k
    rules = [FRule("off", "off", "off", make_policy("off"))]
    if "lynx" in families:
        for d in CAP_GRID:
            rules.append(FRule(f"lynx moved<={d:g}", "lynx", "lynx", make_policy("lynx", max_moved_weight=d)))
        if lynx_variants:  # the default before session 10 (keep_level 1), with and without the similarity refill
            for d in VARIANT_CAP_GRID:
                rules.append(FRule(f"lynx keep_level=1 moved<={d:g}", "lynx keep_level=1", "lynx",
                                   make_policy("lynx", keep_level=1, keep_top=0, max_moved_weight=d)))
    if "lynx+sim" in families:  # our lynx, moved picks refilled by expert similarity (needs the similarity file)
        for d in CAP_GRID:
            rules.append(FRule(f"lynx+sim moved<={d:g}", "lynx+sim", "lynx+sim",
                               make_policy("lynx", max_moved_weight=d, refill_similarity=REFILL_LAMBDA)))
        if lynx_variants:
            for d in VARIANT_CAP_GRID:
                rules.append(FRule(f"lynx+sim keep_level=1 moved<={d:g}", "lynx+sim keep_level=1", "lynx+sim",
                                   make_policy("lynx", keep_level=1, keep_top=0, max_moved_weight=d,
                                               refill_similarity=REFILL_LAMBDA)))
            # The per-token rank guarantee the default does not take here: 2 where the default keeps 0 or 1
            # (k < 8; 0 and 1 decide alike at keep_level 0), none where it keeps 2 or more.
            kt = 2 if k // 4 <= 1 else 0
            if kt <= k:
                for d in VARIANT_CAP_GRID:
                    rules.append(FRule(f"lynx+sim keep_top={kt} moved<={d:g}", f"lynx+sim keep_top={kt}", "lynx+sim",
                                       make_policy("lynx", keep_top=kt, max_moved_weight=d,
                                                   refill_similarity=REFILL_LAMBDA)))
    if "oea" in families:
        rules += [FRule(f"oea k0={k0}", "oea", "oea", make_policy("oea", k0=k0)) for k0 in range(k - 1, 0, -1)]
    if "budget" in families:
        sizes = dict.fromkeys(max(k, min(E, round(f * off_experts))) for f in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4))
        rules += [FRule(f"budget {m}", "budget", "budget", make_policy("budget", max_experts=m)) for m in sizes]
    if "lynx_paper" in families:
        # alpha is not monotone with beta = 2 (large alpha clamps most picks to level -2, where the
        # batch's popularity decides; small alpha puts them all at level 0): hence also beta None.
        for beta in (2, None):
            for a in (8.0, 4.0, 2.0, 1.0, 0.5, 0.25):
                rules.append(FRule(f"lynx_paper alpha={a:g} beta={beta}", f"lynx_paper beta={beta}", "lynx_paper",
                                   _peer("lynx_paper", alpha=a, beta=beta)))
    if "xshare" in families:
        def budgets(fracs):
            return dict.fromkeys(max(1, min(E, round(f * E))) for f in fracs)

        for m in budgets((0.875, 0.75, 0.625, 0.5, 0.375, 0.25)):
            rules.append(FRule(f"xshare budget={m} top=1", "xshare top_per_token=1", "xshare",
                               _peer("xshare", expert_budget=m, top_per_token=1)))
        for m in budgets((0.875, 0.75, 0.5)):
            rules.append(FRule(f"xshare budget={m} top=0", "xshare top_per_token=0", "xshare",
                               _peer("xshare", expert_budget=m, top_per_token=0)))
    if "sere" in families:
        for rho in rhos:
            for S in range(k - 1, 0, -1):
                rules.append(FRule(f"sere S={S} rho={rho:g}", f"sere rho={rho:g}", "sere",
                                   _peer("sere", select_top_k=S, threshold=float(rho))))
    if A.RANDOM in families and "lynx" in families:
        for d in (0.2, 0.4, 0.7, 1.0):
            rules.append(FRule(f"random~lynx moved<={d:g}", A.RANDOM, A.RANDOM, matched_to=f"lynx moved<={d:g}"))
    return rules


# ----------------------------------------------------------------------------- measurement


def kind_batches(streams, kind: str, batch_size: int, batches: int, length: int, seed: int = 0) -> List[A.EvalBatch]:
    """``batches`` batches of one kind: one-domain batch i is domain i mod 4; mixed: domains round robin."""
    if kind == "mixed":
        return A.make_batches(streams, batch_size, batches, length, seed=seed, kinds=("mixed",))
    if kind != "one-domain":
        raise ValueError(f"unknown kind {kind!r} (choose from {', '.join(KINDS)})")
    names = [d for d in DOMAINS if d in streams]
    return [A.make_batches(streams, batch_size, 1, length, seed=seed + 1000 * (i + 1), kinds=(names[i % len(names)],))[0]
            for i in range(batches)]


@dataclass
class Frontier:
    """Every point of one (model, B, kind), measured on the same batches."""

    model: str
    batch_size: int
    kind: str
    batches: int
    sequences: int
    num_experts: int
    top_k: int
    experts_off: float  # mean distinct experts per decode step with selection off (over layers)
    accuracy_off: float
    seconds: float
    points: List[dict] = field(default_factory=list)  # accuracy.Summary fields + line/family/fraction


def measure_frontier(model, streams, model_name: str, kind: str, batch_size: int, batches: int,
                     rules_for: callable, prefix: int = 32, decode_len: int = 64, greedy_tokens: int = 0,
                     seed: int = 0, similarity=None, log=print) -> Frontier:
    """Build the batches once, run off once per batch, then every rule ``rules_for(off_experts)`` returns."""
    t0 = time.time()
    E, k = A.model_shape(model)
    layers = len(A.moe_blocks(model))
    data = kind_batches(streams, kind, batch_size, batches, prefix + decode_len + 1, seed)
    offs = [A.off_reference(model, b, prefix, greedy_tokens) for b in data]
    per_layer = [A._per_layer_means(o.counts, layers)[0] for o in offs]
    off_experts = sum(sum(p) / layers for p in per_layer) / len(per_layer)
    rules = rules_for(off_experts)
    labels = [r.label for r in rules]
    for r in rules:
        if r.matched_to is not None and (r.matched_to not in labels or labels.index(r.matched_to) > labels.index(r.label)):
            raise ValueError(f"control {r.label!r} must follow the rule it is matched to ({r.matched_to!r})")
    kept: Dict[Tuple[str, int], Tuple[List[int], List[int]]] = {}
    out = Frontier(model_name, batch_size, kind, len(data), batch_size * len(data), E, k, round(off_experts, 3),
                   0.0, 0.0)
    for r in rules:
        t1 = time.time()
        results = []
        for bi, (batch, off) in enumerate(zip(data, offs)):
            if r.matched_to is not None:
                res, _ = A.measure(model, batch, A.RANDOM, off, prefix, greedy_tokens, kept[(r.matched_to, bi)],
                                   seed=seed + bi)
            else:
                res, kept[(r.label, bi)] = A.measure(model, batch, r.policy, off, prefix, greedy_tokens,
                                                     similarity=similarity)
            results.append(res)
        s = asdict(A.summarise(r.describe(), kind, results))
        s.update(line=r.line, family=r.family, fraction=round(s["experts_after"] / s["experts_before"], 4),
                 seconds=round(time.time() - t1, 1))
        if not greedy_tokens:
            s["greedy_agreement"] = None
        out.points.append(s)
        log(f"  {model_name} B={batch_size} {kind:<10} {r.label:<30} experts {s['experts_after']:6.2f}"
            f" ({100 * s['fraction']:5.1f} %)  KL {s['kl']:.5f}  d {s['delta_points']:+.2f} pts  {s['seconds']:.0f} s")
    out.accuracy_off = out.points[0]["accuracy_off"]
    out.seconds = round(time.time() - t0, 1)
    return out


# ----------------------------------------------------------------------------- analysis


def replicates(frontier: dict, reps: int = A.BOOTSTRAP_REPS, seed: int = 0) -> Dict[str, Dict[str, torch.Tensor]]:
    """Bootstrap replicates of every point, all from the same resamples of the frontier's sequences."""
    n = frontier["sequences"]
    index = A.bootstrap_indices(n, reps, seed)
    out = {}
    for p in frontier["points"]:
        if len(p["per_sequence"]["tokens"]) != n:
            raise ValueError(f"point {p['rule']['label']} has {len(p['per_sequence']['tokens'])} sequences, not {n}")
        out[p["rule"]["label"]] = A.bootstrap_replicates(p["per_sequence"], index=index)
    return out


def interpolate(xs: Sequence[float], ys: Sequence, target: float):
    """Linear interpolation of a line's points at ``target`` x (ys: floats or tensors of replicates).

    The points are sorted by x; the first segment whose ends bracket ``target`` is used; None
    when no segment does (the line's points do not span that x).
    """
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    for a, b in zip(order, order[1:]):
        x0, x1 = xs[a], xs[b]
        if x0 <= target <= x1:
            if x1 == x0:
                return ys[a]
            w = (target - x0) / (x1 - x0)
            return ys[a] * (1 - w) + ys[b] * w
    if len(xs) == 1 and xs[0] == target:
        return ys[0]
    return None


def line_at(pts: List[dict], reps: Dict[str, Dict[str, torch.Tensor]], x: float, key: str = "kl"):
    """A line's ``key`` (a point field with bootstrap replicates: ``kl``, ``delta_points``) interpolated at
    expert share ``x`` through ``pts``, and its replicates interpolated the same way: ``(value, replicates)``,
    or None where the points do not span ``x``."""
    xs = [p["fraction"] for p in pts]
    value = interpolate(xs, [p[key] for p in pts], x)
    if value is None:
        return None
    return value, interpolate(xs, [reps[p["rule"]["label"]][key] for p in pts], x)


def lines(frontier: dict) -> Dict[str, List[dict]]:
    """The frontier's rule lines (random control and off excluded), points in measurement order."""
    out: Dict[str, List[dict]] = {}
    for p in frontier["points"]:
        if p["family"] not in ("off", A.RANDOM):
            out.setdefault(p["line"], []).append(p)
    return out


def pareto(points: List[dict]) -> List[dict]:
    """A line's own frontier: its points that no other point of the line beats on both experts kept
    and KL (a knob that is not monotone, e.g. lynx_paper's alpha at beta 2, leaves some behind),
    sorted by experts kept. Interpolation and the dominance check use these."""
    pts = sorted(points, key=lambda p: (p["fraction"], p["kl"]))
    out, best = [], float("inf")
    for p in pts:
        if p["kl"] < best:
            out.append(p)
            best = p["kl"]
    return out


def _ci(r: torch.Tensor) -> List[float]:
    return list(A.percentile_interval(r))


def reference_line(frontier: dict) -> Optional[str]:
    """The line others are paired against (``REFERENCE_LINES``: the first the frontier has), or None."""
    have = lines(frontier)
    return next((n for n in REFERENCE_LINES if n in have), None)


def matched_table(frontier: dict, reps: Dict[str, Dict[str, torch.Tensor]], targets=TARGETS) -> List[dict]:
    """Per line and target fraction: KL and accuracy change interpolated, with intervals, and the
    paired difference of KL against our main line at the same count."""
    rows = []
    ref = reference_line(frontier)
    main = pareto(lines(frontier).get(ref, [])) if ref else []
    for name, pts in lines(frontier).items():
        pts = pareto(pts)
        row = {"line": name, "family": pts[0]["family"], "at": {}}
        for t in targets:
            at_kl = line_at(pts, reps, t)
            if at_kl is None:
                row["at"][str(t)] = None
                continue
            (kl, r_kl), (d, r_d) = at_kl, line_at(pts, reps, t, "delta_points")
            cell = {"kl": kl, "kl_ci": _ci(r_kl), "delta_points": d, "delta_points_ci": _ci(r_d)}
            main_at = line_at(main, reps, t) if main and name != ref else None
            if main_at is not None:
                cell["kl_minus_ref"] = kl - main_at[0]
                cell["kl_minus_ref_ci"] = _ci(r_kl - main_at[1])
            row["at"][str(t)] = cell
        rows.append(row)
    return rows


def dominance(frontier: dict, reps: Dict[str, Dict[str, torch.Tensor]]) -> List[dict]:
    """Points of another family that keep fewer experts than one of our lines and have lower KL
    beyond the noise: at the point's expert count the line's KL is interpolated (or, left of
    the line's points, its most aggressive point is taken: fewer experts and lower KL than
    that point); "beyond the noise" = the paired 95 % interval of KL(point) - KL(line) < 0."""
    out = []
    ours = {n: pareto(pts) for n, pts in lines(frontier).items() if pts[0]["family"] in LYNX_FAMILIES}
    for p in frontier["points"]:
        if p["family"] in ("off", A.RANDOM) or p["family"] in LYNX_FAMILIES:
            continue
        x = p["fraction"]
        r_p = reps[p["rule"]["label"]]["kl"]
        for name, pts in ours.items():
            if x < min(q["fraction"] for q in pts):
                q = min(pts, key=lambda q: q["fraction"])
                kl_line, r_line, where = q["kl"], reps[q["rule"]["label"]]["kl"], f"its point {q['rule']['label']}"
            else:
                at = line_at(pts, reps, x)
                if at is None:
                    continue
                (kl_line, r_line), where = at, "interpolated"
            lo, hi = _ci(r_p - r_line)
            if hi < 0:
                out.append({"point": p["rule"]["label"], "family": p["family"], "fraction": x, "kl": p["kl"],
                            "line": name, "line_kl": kl_line, "where": where, "kl_diff_ci": [lo, hi]})
    return out


# ----------------------------------------------------------------------------- outputs


def _fmt_cell(v: float, ci: Sequence[float], kind: str) -> str:
    if kind == "kl":
        return f"{v:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"
    return f"{v:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def markdown(frontiers: List[dict], analyses: List[dict], meta: dict) -> str:
    """The matched-count tables, the best line per count and the dominance check."""
    runs = meta.get("runs") or [meta]
    out = ["# Expert-selection frontier: every rule on the same batches", ""]
    for run in runs:
        out += [f"- `{run.get('command', '')}`: {run.get('date', '')}, git {run.get('git', '')}, {run.get('cpu', '')}, "
                f"{run.get('threads', '')} thread(s), torch {run.get('torch', '')}, transformers "
                f"{run.get('transformers', '')}, sglang {run.get('sglang', '')}"]
    out += ["",
           "Cells: KL(off || rule) in nats per token and next-token accuracy change in points, linearly interpolated at "
           "the given share of off's distinct experts per decode step (mean over layers), with 95 % paired-bootstrap "
           f"intervals ({A.BOOTSTRAP_REPS} resamples of sequences, interpolated the same way); n/a: the line's points "
           "do not span that count. \"KL vs ref\": the paired difference of KL to the reference line at the same count "
           "(negative: lower KL than the reference; the reference is `lynx+sim`, the recommended rule, where the "
           "similarity file exists, else `lynx`). Each line is interpolated through its own Pareto points (points of the "
           "line that another point of the same line beats on both experts and KL are left out).", ""]
    for f, an in zip(frontiers, analyses):
        out += [f"## {Path(f['model']).name}, B = {f['batch_size']}, {f['kind']}", "",
                f"{f['batches']} batches, {f['sequences']} sequences, {f['points'][0]['tokens']} scored tokens; off: "
                f"{f['experts_off']:.2f} of {f['num_experts']} experts per step, "
                f"accuracy {100 * f['accuracy_off']:.2f} %.", ""]
        head = "| line |" + "".join(f" {int(100 * t)} %: KL | Δ points | KL vs ref |" for t in TARGETS)
        out += [head, "|---|" + "---|---|---|" * len(TARGETS)]
        for row in an["table"]:
            cells = []
            for t in TARGETS:
                c = row["at"].get(str(t))
                if c is None:
                    cells += ["n/a", "n/a", ""]
                else:
                    vs = (_fmt_cell(c["kl_minus_ref"], c["kl_minus_ref_ci"], "kl")
                          if "kl_minus_ref" in c else "")
                    cells += [_fmt_cell(c["kl"], c["kl_ci"], "kl"), _fmt_cell(c["delta_points"], c["delta_points_ci"], "d"),
                              vs]
            out.append(f"| {row['line']} | " + " | ".join(cells) + " |")
        out.append("")
        for t in TARGETS:
            have = [(r["at"][str(t)]["kl"], r["line"], r["at"][str(t)]) for r in an["table"] if r["at"].get(str(t))]
            if have:
                kl, line, cell = min(have, key=lambda h: h[0])
                vs = ""
                ref = an.get("reference")
                if "kl_minus_ref_ci" in cell:
                    lo, hi = cell["kl_minus_ref_ci"]
                    verdict = "beyond the noise" if hi < 0 else "within the noise"
                    vs = f"; vs {ref} {cell['kl_minus_ref']:+.4f} [{lo:+.4f}, {hi:+.4f}], {verdict}"
                peer = [h for h in have if h[2].get("kl_minus_ref") is not None and h[1] != line
                        and any(h[1].startswith(f) for f in PEERS)]
                best_peer = min(peer, key=lambda h: h[0]) if peer else None
                bp = ""
                if best_peer is not None and not any(line.startswith(f) for f in PEERS):
                    c = best_peer[2]
                    bp = (f"; best peer `{best_peer[1]}` {best_peer[0]:.4f} (vs {ref} {c['kl_minus_ref']:+.4f} "
                          f"[{c['kl_minus_ref_ci'][0]:+.4f}, {c['kl_minus_ref_ci'][1]:+.4f}])")
                out.append(f"- at {int(100 * t)} %: lowest KL {kl:.4f} by `{line}`{vs}{bp}")
        dp = an.get("default")
        if dp:
            spans = [ln for ln in dp["lines"] if ln["kl"] is not None]
            out.append(f"- the default (`{dp['point']}`) keeps {100 * dp['fraction']:.1f} % at KL "
                       + _fmt_cell(dp["kl"], dp["kl_ci"], "kl") + "; other lines at that count (KL, paired difference "
                       "to the default, positive = worse): "
                       + ("; ".join(f"`{ln['line']}` {ln['kl']:.4f} ({ln['kl_minus_default']:+.4f} "
                                    f"[{ln['ci'][0]:+.4f}, {ln['ci'][1]:+.4f}])" for ln in spans) or "none spans it")
                       + (f"; not reaching it: {', '.join(ln['line'] for ln in dp['lines'] if ln['kl'] is None)}"
                          if len(spans) < len(dp["lines"]) else ""))
            out.append("- points of other rules with fewer experts and lower KL than the default, beyond the noise: "
                       + ("; ".join(f"`{q['point']}` at {100 * q['fraction']:.1f} %, KL {q['kl']:.4f} "
                                    f"[{q['ci'][0]:+.4f}, {q['ci'][1]:+.4f}]" for q in dp["dominating"]) or "none")
                       + ".")
        rnd = [p for p in f["points"] if p["family"] == A.RANDOM]
        if rnd:
            out.append("- random control (matched to lynx points): " + "; ".join(
                f"{100 * p['fraction']:.0f} % -> KL {p['kl']:.4f}, {p['delta_points']:+.2f} pts" for p in rnd))
        for title, fams in (("peer", PEERS), ("oea/budget", ("oea", "budget"))):
            dom = [d for d in an["dominance"] if d["family"] in fams]
            if not dom:
                out.append(f"- dominance, {title} points: none has fewer experts and lower KL than a lynx line beyond "
                           "the noise.")
                continue
            out.append(f"- **dominance, {title} points** with fewer experts and lower KL than a lynx line beyond the "
                       "noise (line's KL there, paired 95 % interval of the difference):")
            by_point: Dict[str, List[dict]] = {}
            for d in dom:
                by_point.setdefault(d["point"], []).append(d)
            for point, ds in by_point.items():
                d0 = ds[0]
                vs = "; ".join(f"`{d['line']}` {d['line_kl']:.4f} ({100 * (d['kl'] / d['line_kl'] - 1):+.0f} %, "
                               f"[{d['kl_diff_ci'][0]:+.4f}, {d['kl_diff_ci'][1]:+.4f}]"
                               + (f", vs {d['where']}" if d["where"] != "interpolated" else "") + ")" for d in ds)
                out.append(f"  - `{point}` at {100 * d0['fraction']:.1f} %, KL {d0['kl']:.4f}: below {vs}")
        out.append("")
    return "\n".join(out)


STYLES = {"lynx": ("C0", "o", "-"), "lynx+sim": ("C9", "*", "-"), "lynx keep_level=1": ("C0", "v", "--"),
          "lynx+sim keep_level=1": ("C9", "v", "--"), "lynx+sim keep_top=2": ("C9", "^", ":"),
          "lynx+sim keep_top=0": ("C9", "^", ":"),
          "oea": ("C1", "s", "-"), "budget": ("C2", "D", "-"), "lynx_paper beta=2": ("C4", "P", "-"),
          "lynx_paper beta=None": ("C4", "p", "--"),
          "xshare top_per_token=1": ("C5", "X", "-"), "xshare top_per_token=0": ("C5", "x", "--")}


def plot_frontier(f: dict, path: Path) -> None:
    """KL (log) and accuracy change against experts kept (fraction of off's): every line, random as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    sere_colors = iter(("C6", "C7", "C8", "C9", "C3"))
    for name, pts in lines(f).items():
        color, marker, ls = STYLES.get(name) or (next(sere_colors, "C9"), "*", "-")
        pts = sorted(pts, key=lambda p: p["fraction"])
        x = [100 * p["fraction"] for p in pts]
        for ax, key, ci in ((axes[0], "kl", "kl_ci"), (axes[1], "delta_points", "delta_points_ci")):
            y = [max(p[key], 1e-6) if key == "kl" else p[key] for p in pts]
            err = [[max(0.0, yy - (p[ci][0] if p[ci] else yy)) for yy, p in zip(y, pts)],
                   [max(0.0, (p[ci][1] if p[ci] else yy) - yy) for yy, p in zip(y, pts)]]
            ax.errorbar(x, y, yerr=err, color=color, marker=marker, ls=ls, ms=4, lw=1.1, capsize=2, label=name)
    rnd = [p for p in f["points"] if p["family"] == A.RANDOM]
    if rnd:
        axes[0].plot([100 * p["fraction"] for p in rnd], [max(p["kl"], 1e-6) for p in rnd], "kx", ms=7,
                     label="random keep (matched to lynx)")
        axes[1].plot([100 * p["fraction"] for p in rnd], [p["delta_points"] for p in rnd], "kx", ms=7)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("KL(off || rule), nats per token (log)")
    axes[1].set_ylabel("next-token accuracy change (points)")
    axes[1].axhline(0, color="grey", lw=0.6)
    axes[1].axhline(-0.5, color="grey", lw=0.6, ls="--")
    for ax in axes:
        ax.set_xlabel("distinct experts per decode step kept (% of off's)")
        for t in TARGETS:
            ax.axvline(100 * t, color="grey", lw=0.5, ls=":")
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{Path(f['model']).name}, B = {f['batch_size']}, {f['kind']}: off keeps {f['experts_off']:.1f} of "
                 f"{f['num_experts']} experts per step ({f['sequences']} sequences, 95 % paired-bootstrap intervals)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def default_position(frontier: dict, reps: Dict[str, Dict[str, torch.Tensor]]) -> Optional[dict]:
    """Where the recommended default (the reference line's point at lynx's default cap) stands: every other
    family's line interpolated at the default's expert count (paired KL difference, positive = worse than the
    default), and the other families' points with fewer experts and lower KL than the default beyond the noise.
    None when the frontier has no such point."""
    ref = reference_line(frontier)
    label = f"{ref} moved<={LynxPolicy().max_moved_weight:g}" if ref else None
    d = next((p for p in frontier["points"] if p["rule"]["label"] == label), None)
    if d is None:
        return None
    x, r_d = d["fraction"], reps[label]["kl"]
    out = {"point": label, "fraction": x, "kl": d["kl"], "kl_ci": _ci(r_d), "lines": [], "dominating": []}
    for name, pts in lines(frontier).items():
        if pts[0]["family"] in LYNX_FAMILIES:
            continue
        at = line_at(pareto(pts), reps, x)
        if at is None:
            out["lines"].append({"line": name, "kl": None})
            continue
        kl, r = at
        out["lines"].append({"line": name, "kl": kl, "kl_minus_default": kl - d["kl"], "ci": _ci(r - r_d)})
    for p in frontier["points"]:
        if p["family"] in ("off", A.RANDOM) or p["family"] in LYNX_FAMILIES or p["fraction"] > x:
            continue
        lo, hi = _ci(reps[p["rule"]["label"]]["kl"] - r_d)
        if hi < 0:
            out["dominating"].append({"point": p["rule"]["label"], "fraction": p["fraction"], "kl": p["kl"],
                                      "ci": [lo, hi]})
    return out


def analyse(f: dict) -> dict:
    reps = replicates(f)
    return {"table": matched_table(f, reps), "dominance": dominance(f, reps), "reference": reference_line(f),
            "default": default_position(f, reps)}


def write_outputs(payload: dict, out: Path) -> None:
    """``<out>.json``, ``<out>.md`` and one PNG per frontier."""
    out.parent.mkdir(parents=True, exist_ok=True)
    analyses = [analyse(f) for f in payload["frontiers"]]
    payload["analysis"] = analyses
    out.with_suffix(".json").write_text(json.dumps(payload, indent=None, separators=(",", ":")) + "\n")
    out.with_suffix(".md").write_text(markdown(payload["frontiers"], analyses, payload["meta"]) + "\n")
    for f in payload["frontiers"]:
        plot_frontier(f, png_path(out, f))


def png_path(out: Path, f: dict) -> Path:
    """``<out>_<model>_b<B>_<kind>.png`` (``<out>_b<B>_<kind>.png`` when ``out`` already names the model)."""
    name = Path(f["model"]).name
    stem = out.name if out.name.endswith(name) else f"{out.name}_{name}"
    return out.parent / f"{stem}_b{f['batch_size']}_{f['kind']}.png"


def environment(argv: Sequence[str]) -> dict:
    """What the numbers were measured with."""
    import transformers

    try:
        import sglang

        sgl = sglang.__version__
    except Exception:  # pragma: no cover - optional
        sgl = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        git += " (uncommitted changes)" if dirty else ""
    except Exception:  # pragma: no cover
        git = None
    return {"command": "python -m lynx_sglang.frontier " + " ".join(argv), "date": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "git": git, "device": "cpu", "cpu": cpu, "threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "sglang": sgl, "bootstrap": {"replicates": A.BOOTSTRAP_REPS, "level": A.BOOTSTRAP_LEVEL, "seed": 0,
                                     "resampled": "sequences (paired between off and every rule)"}}


def load_similarity_for(model, path: Optional[Path]) -> Optional[List[torch.Tensor]]:
    """SERE's matrices in MoE-block order from ``path`` (None: none, sere is skipped)."""
    from lynx_sglang.runtime.selection.model_identity import model_identity
    from lynx_sglang.runtime.selection.similarity import load_similarity

    if path is None or not Path(path).exists():
        return None
    ids = A.moe_layer_ids(model)
    sim = load_similarity(path, model_identity(model.config), ids)
    return [sim.matrices[i].float().contiguous() for i in ids]


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=str, help="comma-separated model folders")
    ap.add_argument("--from-json", type=Path, nargs="+", metavar="JSON",
                    help="instead of measuring: merge these result files and rewrite tables and plots to --out")
    ap.add_argument("--out", type=Path, required=True, help="prefix: <out>.json, <out>.md, <out>_<model>_b<B>_<kind>.png")
    ap.add_argument("--batch-sizes", default="16,32,64")
    ap.add_argument("--kinds", default="one-domain,mixed")
    ap.add_argument("--batches", type=int, default=4, help="batches per (B, kind) (default %(default)s)")
    ap.add_argument("--prefix", type=int, default=32)
    ap.add_argument("--decode-len", type=int, default=64)
    ap.add_argument("--greedy-tokens", type=int, default=0, help="greedy-agreement tokens (0: off, the default)")
    ap.add_argument("--families", default=",".join(FAMILIES), help="rule families to sweep (default: all)")
    ap.add_argument("--rules", default=None, help="comma-separated rule labels: only these points (off always runs)")
    ap.add_argument("--no-lynx-variants", action="store_true", help="only the main lynx line")
    ap.add_argument("--similarity", type=Path, default=None,
                    help="SERE similarity file (default <model>/sere_similarity.safetensors; absent: sere skipped)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.from_json:
        payloads = [json.loads(p.read_text()) for p in args.from_json]
        # A merged file's own runs are listed, not the merge itself (so a re-merge keeps every command).
        runs = [r for p in payloads for r in (p["meta"].get("runs") or [p["meta"]])]
        merged = {"meta": {**payloads[0]["meta"], "merged_from": [str(p) for p in args.from_json], "runs": runs},
                  "frontiers": [f for p in payloads for f in p["frontiers"]]}
        write_outputs(merged, args.out)
        print(f"wrote {args.out.with_suffix('.md')}")
        return
    if not args.models:
        ap.error("--models is needed (or --from-json)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer  # noqa: F401  (load_model needs it)

    families = args.families.split(",")
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        ap.error(f"--families: unknown {unknown} (choose from {', '.join(FAMILIES)})")
    kinds = args.kinds.split(",")
    meta = environment(argv)
    frontiers = []
    for model_path in args.models.split(","):
        model_path = Path(model_path)
        model, tokenizer = A.load_model(model_path)
        streams = A.domain_streams(tokenizer)
        E, k = A.model_shape(model)
        sim_path = args.similarity or model_path / "sere_similarity.safetensors"
        wants_sim = [f for f in ("sere", "lynx+sim") if f in families]
        similarity = load_similarity_for(model, sim_path) if wants_sim else None
        fams = [f for f in families if f not in wants_sim or similarity is not None]
        if wants_sim and similarity is None:
            print(f"no SERE similarity at {sim_path}: {', '.join(wants_sim)} skipped "
                  f"(python -m lynx_sglang.sere_calibrate {model_path})")
        rhos = sere_thresholds(similarity)

        def rules_for(off_experts, E=E, k=k, fams=fams, rhos=rhos):
            rules = frontier_rules(E, k, off_experts, rhos, fams, lynx_variants=not args.no_lynx_variants)
            if args.rules:
                wanted = set(args.rules.split(","))
                rules = [r for r in rules if r.label == "off" or r.label in wanted]
            return rules

        for B in [int(b) for b in args.batch_sizes.split(",")]:
            for kind in kinds:
                f = measure_frontier(model, streams, str(model_path), kind, B, args.batches, rules_for, args.prefix,
                                     args.decode_len, args.greedy_tokens, args.seed, similarity)
                f_dict = asdict(f)
                f_dict["sere_thresholds"] = rhos
                f_dict["similarity_file"] = str(sim_path) if similarity is not None else None
                frontiers.append(f_dict)
                print(f"{model_path.name} B={B} {kind}: {len(f.points)} points in {f.seconds:.0f} s")
                # Written after every frontier, so a long sweep leaves usable results if stopped.
                write_outputs({"meta": {**meta, "settings": vars(args) | {"out": str(args.out), "similarity": str(
                    args.similarity), "from_json": None}}, "frontiers": frontiers}, args.out)
    print(f"wrote {args.out.with_suffix('.json')}, .md and {len(frontiers)} PNG(s)")


if __name__ == "__main__":
    main()
