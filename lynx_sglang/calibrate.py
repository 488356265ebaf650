"""Calibrate a MoE model to a stated accuracy budget: per-layer settings of a policy's main knob.

    python -m lynx_sglang.calibrate --model-path models/trained-qwen3-moe --budget-kl 0.01 --out lynx_cal.json
    python -m lynx_sglang.calibrate --model-path /path/to/model --data texts.jsonl --budget-kl 0.01 --out cal.json
    python -m sglang.launch_server --model-path M --moe-backend lynx --lynx-config lynx_cal.json ...

The budget is KL(off || selection) of the next-token distribution, in nats per token, measured
like the accuracy harness (``lynx_sglang.accuracy``) measures it: decode-like batches of B
*independent* sequences, teacher-forced, one decode step = one position across the B
sequences, selection applied to that step's B rows on every MoE layer. Instead of asking for
alpha and beta, you say how much accuracy you can give, and the tool finds the setting.

1. **Per-layer curves.** For every MoE layer and every value of the policy's main knob
   (``KNOBS``; ``lynx``: ``max_moved_weight`` 0.1 .. 1.0), the layer alone selects (the others
   are off) on the calibration batches: its KL and the distinct experts it removes per
   decode step.
2. **Greedy search.** From "every layer off", repeatedly take the move (one layer to a more
   aggressive value) with the most experts removed per unit of KL, by the layer's own curve.
   The move order does not depend on the budget; a budget takes the longest prefix of moves
   whose summed per-layer KL fits (so a bigger budget never removes fewer experts).
3. **Verification and back-off.** Layer KLs do not add exactly, so the combined setting is
   measured on the calibration batches; while its KL exceeds the budget the last move is
   undone, and while the next move's measured KL still fits it is taken (deterministically,
   one move at a time; every measured prefix is cached and shared by all budgets).
4. **Held-out measurement.** The chosen setting is measured on held-out text the search never
   saw: KL and next-token accuracy change against selection off with 95 % paired-bootstrap
   intervals (resampling sequences), experts per decode step per layer, before and after.
   ``--compare-global`` also measures every single global setting (the same knob on all
   layers) and reports the per-layer plan's gain in experts removed over the global setting
   with the same held-out KL (interpolated along the global curve, interval from the same
   bootstrap resamples).

Data: for the bundled models (folders under the repository's ``models/``) the default is the
corpus's calibration split (``data/corpus/calibration.jsonl.gz``: training documents only) and
held-out measurement uses ``data/corpus/heldout.jsonl.gz``. Any other model needs ``--data``:
JSON lines, each with ``text`` (and optionally ``domain``; gzip if the name ends in .gz); the
held-out part is then ``--heldout FILE`` or, without it, the last quarter of every domain's
token stream (never read by the search).

The output (``FORMAT``) is what ``--lynx-config`` takes: the server refuses it for another model
(``model_identity``; layers, E, top-k, scoring) and gives every layer its own policy object.
Written atomically: an error leaves nothing behind.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lynx_sglang import __version__
from lynx_sglang import accuracy as A
from lynx_sglang import model_routing
from lynx_sglang.runtime.selection.config import (DEFAULT_REFILL_SIMILARITY, WEIGHT_Q, ConfigError, make_policy,
                                                   policy_params)
from lynx_sglang.runtime.selection.model_identity import model_identity
from lynx_sglang.runtime.selection.similarity import DEFAULT_NAME as SIMILARITY_NAME, load_similarity
from lynx_sglang.runtime.sglang.options import CALIBRATION_FORMAT

FORMAT = CALIBRATION_FORMAT  # "lynx-calibration/2"
REPORT_FORMAT = "lynx-calibration-report/1"
TOOL = f"lynx_sglang.calibrate {__version__}"
BUNDLED_MODELS = Path(__file__).resolve().parent.parent / "models"
HELDOUT_TAIL = 0.25  # --data without --heldout: this tail of every domain's stream is held out
MIN_WINDOWS = 4  # a domain needs at least this many non-overlapping windows of text to be used


class CalibrationError(Exception):
    """A clear, user-facing refusal (bad budget, data, model); nothing has been written."""


# ----------------------------------------------------------------------------- the knob table


@dataclass(frozen=True)
class Knob:
    """A policy's main knob: ``param`` over ``grid(E, k)`` values, least to most aggressive;
    ``fixed``: the other parameters every layer shares (the file's ``base_params``)."""

    policy: str
    param: str
    grid: Callable[[int, int], List]
    fixed: Dict = field(default_factory=dict)
    kind: type = float


def _fractions_of_e(fracs):
    return lambda E, k: list(dict.fromkeys(max(k, min(E, round(f * E))) for f in fracs))


#: The search aims at budget x (1 - headroom) on the calibration text. 0.15: on trained-qwen3-moe the held-out
#: KL ran 10-15 % above what calibration measured (its calibration text is training text), so with no headroom
#: the budget was missed there (docs/calibration.md).
DEFAULT_HEADROOM = 0.15

KNOBS: Dict[str, Knob] = {
    "lynx": Knob("lynx", "max_moved_weight", lambda E, k: [round(0.1 * i, 1) for i in range(1, 11)]),
    "oea": Knob("oea", "k0", lambda E, k: list(range(k - 1, 0, -1)), kind=int),
    "budget": Knob("budget", "max_experts", _fractions_of_e((0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)), kind=int),
    "xshare": Knob("xshare", "expert_budget", _fractions_of_e((0.875, 0.75, 0.625, 0.5, 0.375, 0.25)),
                   fixed={"top_per_token": 1}, kind=int),
    # beta 2 (the official presets' depth). alpha is not monotone there (frontier.py): the greedy search
    # only takes a move that removes more experts than the layer's current value, so the order matters little.
    "lynx_paper": Knob("lynx_paper", "alpha", lambda E, k: [0.25, 0.5, 1.0, 2.0, 4.0, 8.0], fixed={"beta": 2}),
}


def _refill_for(model_path: Path, policy: str, refill: Optional[float]) -> float:
    """The refill_similarity to calibrate with (see ``run``); refused for a policy other than lynx."""
    if refill is not None and refill != 0 and policy != "lynx":
        raise CalibrationError(f"--refill-similarity is a parameter of policy lynx, not of {policy}")
    if refill is not None:
        if not (isinstance(refill, (int, float)) and 0 <= refill < float("inf")):
            raise CalibrationError(f"--refill-similarity must be a finite number >= 0, got {refill!r}")
        return float(refill)
    return DEFAULT_REFILL_SIMILARITY if policy == "lynx" and (Path(model_path) / SIMILARITY_NAME).is_file() else 0.0


def base_params(knob: Knob, router: RouterSpec) -> dict:
    """Every parameter of the calibrated policy but the knob, written out (format 2), so a later change of a
    default does not change what the file means (lynx's ``keep_top`` resolved for the model's top-k)."""
    policy = make_policy(knob.policy, **knob.fixed)
    params = policy_params(policy)
    params.pop("name")
    params.pop(knob.param)
    if params.get("keep_top", 0) is None:
        params["keep_top"] = policy.resolved_keep_top(router)
    return params


def knob_for(policy: str) -> Knob:
    if policy not in KNOBS:
        raise CalibrationError(f"--policy {policy}: no main knob to calibrate (choose from {', '.join(KNOBS)})")
    return KNOBS[policy]


# ----------------------------------------------------------------------------- data


def is_bundled(model_path: Path) -> bool:
    """A model folder shipped in this repository's ``models/`` (trained on our corpus)."""
    return Path(model_path).resolve().parent == BUNDLED_MODELS


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_texts(path: Path) -> Dict[str, List[str]]:
    """JSON lines with ``text`` (and optionally ``domain``) -> {domain: texts}, in file order."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        lines = raw.decode("utf-8").splitlines()
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as e:
        raise CalibrationError(f"cannot read calibration data {path}: {e}") from e
    out: Dict[str, List[str]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise CalibrationError(f"{path}:{n}: not JSON ({e})") from e
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise CalibrationError(f"{path}:{n}: each line must be a JSON object with a string 'text'")
        if text.strip():
            out.setdefault(str(row.get("domain", "text")), []).append(text)
    if not out:
        raise CalibrationError(f"calibration data {path} holds no text")
    return out


def token_streams(texts: Dict[str, List[str]], tokenizer) -> Dict[str, torch.Tensor]:
    """Per domain, every text's tokens followed by end-of-text (when the tokenizer has one), concatenated."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = {}
    for domain, docs in texts.items():
        ids: List[int] = []
        for t in docs:
            ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"] + eos)
        if ids:
            out[domain] = torch.tensor(ids, dtype=torch.long)
    return out


def usable_streams(streams: Dict[str, torch.Tensor], length: int, what: str) -> Dict[str, torch.Tensor]:
    """The domains with at least ``MIN_WINDOWS`` windows of ``length`` tokens; refuse when none has."""
    need = MIN_WINDOWS * length
    ok = {d: s for d, s in streams.items() if s.numel() >= need}
    if not ok:
        sizes = ", ".join(f"{d}: {s.numel()}" for d, s in streams.items()) or "none"
        raise CalibrationError(f"{what} is too small: every domain needs at least {need} tokens ({MIN_WINDOWS} windows "
                               f"of prefix + decode length + 1 = {length}), it holds {sizes}")
    return ok


def decode_batches(streams: Dict[str, torch.Tensor], batch_size: int, per_kind: int, length: int,
                   seed: int = 0) -> List[A.EvalBatch]:
    """Deterministic decode-like batches of B independent windows: per domain, and mixed (domains round robin)."""
    gen = torch.Generator().manual_seed(seed)
    names = list(streams)
    kinds = names + (["mixed"] if len(names) > 1 else [])
    out = []
    for kind in kinds:
        for _ in range(per_kind):
            rows = []
            for r in range(batch_size):
                s = streams[names[r % len(names)] if kind == "mixed" else kind]
                start = int(torch.randint(0, s.numel() - length + 1, (1,), generator=gen))
                rows.append(s[start:start + length])
            out.append(A.EvalBatch(kind, torch.stack(rows)))
    return out


# ----------------------------------------------------------------------------- model


def load_model(model_path: Path):
    """transformers model (fp32, eval) and tokenizer, with clear errors for unreadable or non-MoE models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except Exception as e:  # noqa: BLE001  transformers raises many types for a bad folder
        raise CalibrationError(f"cannot load model {model_path}: {type(e).__name__}: {e}") from e
    try:
        blocks = A.moe_blocks(model)
    except ValueError as e:
        raise CalibrationError(f"{model_path} has no MoE layer this tool can calibrate: {e}") from e
    if not blocks:
        raise CalibrationError(f"{model_path} has no MoE layer")
    return model, tokenizer


# ----------------------------------------------------------------------------- measurement


class PlanPatch(A.SelectionPatch):
    """``SelectionPatch`` with one policy per MoE block (``plan``: block index -> policy, or None: off)."""

    def __init__(self, model, plan: Dict[int, object], similarity: Optional[Sequence[torch.Tensor]] = None):
        super().__init__(model, None, similarity=similarity)
        self.plan = dict(plan)

    def _select(self, layer, logits, ids, weights):
        self.rule = self.plan.get(layer)  # the block's own policy (its selector is cached per block)
        return super()._select(layer, logits, ids, weights)


@dataclass
class Point:
    """One setting measured on a set of batches (summed per sequence; experts averaged per decode step)."""

    per_sequence: Dict[str, list]
    before: List[float]  # per MoE block: distinct experts per decode step, selection off
    after: List[float]  # under the setting
    # Per MoE block, summed over the batches: (routed weight re-routed tokens had on experts they lost, in
    # 1/WEIGHT_Q; re-routed tokens), from the selectors' statistics (what lynx:moved_weight_total counts).
    moved: List[Tuple[int, int]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.per_sequence["tokens"])

    @property
    def kl(self) -> float:
        return sum(self.per_sequence["kl"]) / max(1, self.tokens)

    @property
    def delta_points(self) -> float:
        return 100 * (sum(self.per_sequence["correct"]) - sum(self.per_sequence["correct_off"])) / max(1, self.tokens)

    @property
    def removed(self) -> float:
        """Distinct experts removed per decode step, summed over MoE layers."""
        return sum(self.before) - sum(self.after)

    def removed_on(self, block: int) -> float:
        return self.before[block] - self.after[block]


def _per_block(counts, blocks: int) -> List[float]:
    sums, ns = [0.0] * blocks, [0] * blocks
    for layer, _, after in counts:
        sums[layer] += after
        ns[layer] += 1
    return [s / n if n else 0.0 for s, n in zip(sums, ns)]


def _sequence_sums(off_logits: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> Dict[str, list]:
    """The harness's per-sequence sums (``accuracy.SEQ_FIELDS``) of one batch."""
    logp_off, logp = F.log_softmax(off_logits, dim=-1), F.log_softmax(logits, dim=-1)
    kl_pos = (logp_off.exp() * (logp_off - logp)).sum(-1)
    dll = (logp.gather(-1, target[..., None]) - logp_off.gather(-1, target[..., None]))[..., 0]
    return {
        "tokens": [target.shape[1]] * target.shape[0],
        "correct_off": (off_logits.argmax(-1) == target).sum(1).tolist(),
        "correct": (logits.argmax(-1) == target).sum(1).tolist(),
        "kl": [round(x, 7) for x in kl_pos.double().sum(1).tolist()],
        "top1": (logits.argmax(-1) == off_logits.argmax(-1)).sum(1).tolist(),
        "dloglik": [round(x, 5) for x in dll.double().sum(1).tolist()],
    }


class BatchSet:
    """Batches of one batch size, their selection-off reference, and a cache of measured plans."""

    def __init__(self, model, batches: List[A.EvalBatch], prefix: int,
                 similarity: Optional[Sequence[torch.Tensor]] = None):
        self.model, self.batches, self.prefix = model, batches, prefix
        self.similarity = similarity  # per MoE block [E, E] (lynx's refill), or None
        self.blocks = len(A.moe_blocks(model))
        self.offs = [A.off_reference(model, b, prefix, 0) for b in batches]
        self.before = [sum(_per_block([(l, 0, b) for l, b, _ in o.counts], self.blocks)[i] for o in self.offs)
                       / len(self.offs) for i in range(self.blocks)]
        self._cache: Dict[tuple, Point] = {}

    @torch.no_grad()
    def measure(self, plan: Dict[int, object]) -> Point:
        key = tuple(sorted((b, repr(p)) for b, p in plan.items() if p is not None))
        if key in self._cache:
            return self._cache[key]
        seqs, after, moved = [], [0.0] * self.blocks, [(0, 0)] * self.blocks
        for batch, off in zip(self.batches, self.offs):
            with PlanPatch(self.model, plan, self.similarity) as patch:
                patch.decode_start = self.prefix
                logits = self.model(input_ids=batch.tokens[:, :-1]).logits[:, self.prefix:].float()
                counts = list(patch.counts)
            seqs.append(_sequence_sums(off.logits, logits, batch.tokens[:, self.prefix + 1:]))
            after = [a + x for a, x in zip(after, _per_block(counts, self.blocks))]
            for block, sel in patch.selectors.items():
                st = sel.stats()
                moved[block] = (moved[block][0] + st.moved_weight, moved[block][1] + st.rows_changed)
        point = Point(A.concat_sequences(seqs), list(self.before), [a / len(self.batches) for a in after], moved)
        self._cache[key] = point
        return point


# ----------------------------------------------------------------------------- search


@dataclass(frozen=True)
class Move:
    """One greedy move: block ``block`` to grid index ``index``; totals estimated from the layer curves."""

    block: int
    index: int
    est_kl: float  # summed per-layer KL after this move
    est_removed: float  # summed per-layer experts removed per decode step after this move


def greedy_moves(curves: Sequence[Sequence[Tuple[float, float]]]) -> List[Move]:
    """The budget-independent move order: ``curves[b][j]`` = (KL, experts removed) of block b alone at grid j.

    From every block off (-1: KL 0, nothing removed), take the move of one block to any more
    aggressive index with more experts removed, maximising removed per unit of added KL (a move
    whose KL is not above the current one's counts as free); ties: lower block, lower index.
    Estimated KL adds each move's positive increment, so it never decreases along the order.
    """
    state = [-1] * len(curves)
    at = lambda b, j: (0.0, 0.0) if j < 0 else curves[b][j]  # noqa: E731
    moves, kl, removed = [], 0.0, 0.0
    while True:
        best = None
        for b, curve in enumerate(curves):
            k0, r0 = at(b, state[b])
            for j in range(state[b] + 1, len(curve)):
                k1, r1 = curve[j]
                gain = r1 - r0
                if gain <= 1e-9:
                    continue
                cost = max(k1 - k0, 0.0)
                ratio = gain / max(cost, 1e-12)
                key = (-ratio, b, j)
                if best is None or key < best[0]:
                    best = (key, b, j, cost, gain)
        if best is None:
            return moves
        _, b, j, cost, gain = best
        state[b] = j
        kl, removed = kl + cost, removed + gain
        moves.append(Move(b, j, kl, removed))


def state_after(moves: Sequence[Move], blocks: int, prefix: int) -> List[int]:
    """Grid index of every block (-1: off) after the first ``prefix`` moves."""
    state = [-1] * blocks
    for m in moves[:prefix]:
        state[m.block] = m.index
    return state


def longest_fitting(moves: Sequence[Move], budget: float) -> int:
    """The longest prefix of ``moves`` whose estimated KL is within ``budget``."""
    p = 0
    while p < len(moves) and moves[p].est_kl <= budget:
        p += 1
    return p


def choose(moves: Sequence[Move], budget: float, measured_kl: Callable[[int], float],
           log: Callable[[str], None] = lambda s: None) -> Tuple[int, int]:
    """(prefix, shift): the prefix of ``moves`` to take for ``budget``, and how far it lies from the estimate's.

    Start at the longest prefix whose *estimated* KL fits (``longest_fitting``) and measure it
    (``measured_kl(p)``, cached by the caller): if the measured KL exceeds the budget, undo one
    move at a time until it fits (back-off; 0 moves always fits); if it fits, take one more move
    at a time while the measured KL still fits (layer KLs are often sub-additive). Deterministic,
    and monotone: a bigger budget never ends on a shorter prefix (its start is no shorter, and
    every prefix the smaller budget accepted fits it too).
    """
    p = start = longest_fitting(moves, budget)
    if p > 0 and measured_kl(p) > budget:
        while p > 0 and measured_kl(p) > budget:
            log(f"[calibrate]   {p} moves: measured KL {measured_kl(p):.5f} > budget {budget:g}: back off one move")
            p -= 1
        return p, p - start
    while p < len(moves) and measured_kl(p + 1) <= budget:
        p += 1
        log(f"[calibrate]   {p} moves: measured KL {measured_kl(p):.5f} fits budget {budget:g}: one more move")
    return p, p - start


# ----------------------------------------------------------------------------- the tool


def _plan(knob: Knob, state: Sequence[int], grid: Sequence) -> Dict[int, object]:
    return {b: make_policy(knob.policy, **knob.fixed, **{knob.param: grid[j]}) for b, j in enumerate(state) if j >= 0}


def _summary(point: Point, layer_ids: Sequence[int], reps_index=None) -> dict:
    ci = A.sequence_intervals(point.per_sequence)
    before, after = sum(point.before), sum(point.after)
    return {
        "kl": round(point.kl, 6), "kl_ci": ci["kl_ci"],
        "delta_points": round(point.delta_points, 3), "delta_points_ci": ci["delta_points_ci"],
        "top1_agreement": round(sum(point.per_sequence["top1"]) / max(1, point.tokens), 5),
        "accuracy_off": round(sum(point.per_sequence["correct_off"]) / max(1, point.tokens), 5),
        "tokens": point.tokens, "sequences": len(point.per_sequence["tokens"]),
        "experts_before": round(before, 3), "experts_after": round(after, 3),  # per decode step, summed over layers
        "removed_per_step": round(before - after, 3), "reduction": round(1 - after / before, 4) if before else 0.0,
        "per_layer": {str(lid): {"experts_before": round(b, 3), "experts_after": round(a, 3),
                                 # what the server's rate(lynx:moved_weight_total) / rate(lynx:tokens_rerouted_total)
                                 # should read for this layer, within noise, on text like this
                                 "moved_per_rerouted_token": round(mw / WEIGHT_Q / rc, 4) if rc else 0.0}
                      for lid, b, a, (mw, rc) in zip(layer_ids, point.before, point.after,
                                                     point.moved or [(0, 0)] * len(layer_ids))},
    }


def global_removed_at(kls: Sequence[float], removed: Sequence[float], x: float) -> Tuple[float, bool]:
    """Experts removed by the best global setting at KL ``x``: linear along the global curve's own frontier
    (points sorted by KL, keeping those that remove more than every point of lower KL; off = (0, 0) first).
    Returns (removed, inside): ``inside`` False when ``x`` lies past the curve's last point (then its
    removal, a lower bound of what a more aggressive global setting would remove)."""
    pts, best = [], -1.0
    for k, r in sorted(zip([0.0, *kls], [0.0, *removed])):
        if r > best:
            pts.append((k, r))
            best = r
    for (k0, r0), (k1, r1) in zip(pts, pts[1:]):
        if k0 <= x <= k1:
            return (r0 if k1 == k0 else r0 + (r1 - r0) * (x - k0) / (k1 - k0)), True
    return (pts[-1][1] if x > pts[-1][0] else 0.0), x <= pts[-1][0]


def compare_to_global(plan_point: Point, globals_: Sequence[Point], grid: Sequence) -> dict:
    """The per-layer plan against the global curve at the plan's held-out KL, with a paired bootstrap
    interval of the gain (resampling sequences, the same resamples for every setting; expert counts are
    those measured on the same batches)."""
    n = len(plan_point.per_sequence["tokens"])
    index = A.bootstrap_indices(n)
    r_plan = A.bootstrap_replicates(plan_point.per_sequence, index=index)["kl"]
    r_glob = [A.bootstrap_replicates(g.per_sequence, index=index)["kl"] for g in globals_]
    removed = [g.removed for g in globals_]
    at, inside = global_removed_at([g.kl for g in globals_], removed, plan_point.kl)
    gains = torch.tensor([plan_point.removed - global_removed_at([float(r[i]) for r in r_glob], removed,
                                                                 float(r_plan[i]))[0] for i in range(len(r_plan))])
    lo, hi = A.percentile_interval(gains)
    fitting = [(g.removed, v) for g, v in zip(globals_, grid) if g.kl <= plan_point.kl]
    best = max(fitting, key=lambda t: t[0]) if fitting else None
    return {
        "kl": round(plan_point.kl, 6), "removed_per_step": round(plan_point.removed, 3),
        "global_removed_at_same_kl": round(at, 3), "inside_global_curve": inside,
        "gain_removed_per_step": round(plan_point.removed - at, 3), "gain_ci": [round(lo, 3), round(hi, 3)],
        "best_global_grid_value_within_kl": None if best is None else best[1],
        "best_global_grid_removed": None if best is None else round(best[0], 3),
    }


class Calibrator:
    """Measures per-layer curves once and answers any number of budgets (sharing every measurement)."""

    def __init__(self, model, knob: Knob, calib: Dict[int, BatchSet], log: Callable[[str], None] = print):
        self.model, self.knob, self.calib, self.log = model, knob, calib, log
        E, k = A.model_shape(model)
        self.grid = knob.grid(E, k)
        self.blocks = len(A.moe_blocks(model))
        self.layer_ids = A.moe_layer_ids(model)
        self.curves: List[List[Tuple[float, float]]] = []
        self.moves: List[Move] = []
        self._measured: Dict[int, Dict[int, Point]] = {}

    def _kl(self, points: Dict[int, Point]) -> float:
        """The constraint: the largest KL over batch sizes."""
        return max(p.kl for p in points.values())

    def measure_curves(self) -> None:
        t0, total, done = time.time(), self.blocks * len(self.grid), 0
        for b in range(self.blocks):
            curve = []
            for j, v in enumerate(self.grid):
                pts = {B: s.measure(_plan(self.knob, [j if i == b else -1 for i in range(self.blocks)], self.grid))
                       for B, s in self.calib.items()}
                kl = self._kl(pts)
                removed = sum(p.removed_on(b) for p in pts.values()) / len(pts)
                curve.append((kl, removed))
                done += 1
                self.log(f"[calibrate] curve {done}/{total}: layer {self.layer_ids[b]} {self.knob.param}={v}: "
                         f"KL {kl:.5f}, removed {removed:.2f} experts/step ({time.time() - t0:.0f} s)")
            self.curves.append(curve)
        self.moves = greedy_moves(self.curves)

    def measured(self, prefix: int) -> Dict[int, Point]:
        if prefix not in self._measured:
            plan = _plan(self.knob, state_after(self.moves, self.blocks, prefix), self.grid)
            self._measured[prefix] = {B: s.measure(plan) for B, s in self.calib.items()}
        return self._measured[prefix]

    def solve(self, budget: float) -> dict:
        """The plan for ``budget``: per-layer values, and what the search estimated and measured."""
        prefix, shift = choose(self.moves, budget, lambda p: self._kl(self.measured(p)), self.log)
        state = state_after(self.moves, self.blocks, prefix)
        pts = self.measured(prefix) if prefix else None
        layer_params = {str(lid): (None if j < 0 else {self.knob.param: self.grid[j]})
                        for lid, j in zip(self.layer_ids, state)}
        est = self.moves[prefix - 1] if prefix else None
        if self.moves and prefix == len(self.moves):
            self.log(f"[calibrate] budget {budget:g}: every layer at its most aggressive useful {self.knob.param}; "
                     f"the budget is not spent (this knob cannot remove more)")
        search = {
            "moves_available": len(self.moves), "moves_taken": prefix,
            "moves_past_estimate": shift,  # < 0: backed off (measured KL over budget); > 0: measured KL left room
            # Every move taken: the knob's grid is exhausted before the budget (its KL cannot be spent with this knob).
            "saturated": prefix == len(self.moves) and len(self.moves) > 0,
            "estimated_kl": round(est.est_kl, 6) if est else 0.0,
            "estimated_removed_per_step": round(est.est_removed, 3) if est else 0.0,
            "measured_kl": round(self._kl(pts), 6) if pts else 0.0,
            "per_batch_size": {str(B): _summary(p, self.layer_ids) for B, p in (pts or {}).items()},
            "curves": {str(lid): [{"value": v, "kl": round(kl, 6), "removed_per_step": round(r, 3)}
                                  for v, (kl, r) in zip(self.grid, curve)]
                       for lid, curve in zip(self.layer_ids, self.curves)},
        }
        return {"state": state, "layer_params": layer_params, "search": search}


def write_atomic(path: Path, payload: dict) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder (no half-written file on error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(payload, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass
class Settings:
    batch_sizes: Tuple[int, ...] = (32,)
    batches_per_kind: int = 1
    heldout_batches_per_kind: int = 2
    prefix: int = 32
    decode_len: int = 64
    seed: int = 0
    grid: Optional[List] = None  # None: the knob table's grid

    @property
    def length(self) -> int:
        return self.prefix + self.decode_len + 1


def _data(model_path: Path, tokenizer, data: Optional[Path], heldout: Optional[Path], length: int):
    """(calibration streams, held-out streams, provenance) with the rules of the module docstring."""
    from lynx_sglang.corpus import CALIBRATION, HELDOUT, read_calibration, read_jsonl

    if data is None:
        if not is_bundled(model_path):
            raise CalibrationError(f"{model_path} is not a bundled model (under {BUNDLED_MODELS}): give calibration "
                                   "text it was trained on (or serves) with --data FILE.jsonl (our corpus is not "
                                   "representative of it)")
        cal_texts: Dict[str, List[str]] = {}
        for d in read_calibration():
            cal_texts.setdefault(d.domain, []).append(d.text)
        data = CALIBRATION
        if heldout is None:
            heldout = HELDOUT
            held_texts: Dict[str, List[str]] = {}
            for d in read_jsonl(HELDOUT):
                held_texts.setdefault(d.domain, []).append(d.text)
        else:
            held_texts = read_texts(heldout)
    else:
        cal_texts = read_texts(data)
        held_texts = read_texts(heldout) if heldout is not None else None
    cal = token_streams(cal_texts, tokenizer)
    if held_texts is None:  # the tail of every stream is held out, never read by the search
        cut = {d: int(s.numel() * (1 - HELDOUT_TAIL)) for d, s in cal.items()}
        held = {d: s[cut[d]:] for d, s in cal.items()}
        cal = {d: s[:cut[d]] for d, s in cal.items()}
        held_what = f"the last {HELDOUT_TAIL:.0%} of every domain's tokens of {data}"
    else:
        held = token_streams(held_texts, tokenizer)
        held_what = str(heldout)
    cal = usable_streams(cal, length, f"calibration data {data}")
    held = usable_streams(held, length, f"held-out data ({held_what})")
    prov = {"calibration": {"path": str(data), "sha256": sha256_of(data),
                            "tokens": {d: int(s.numel()) for d, s in cal.items()}},
            "heldout": {"source": held_what, "sha256": sha256_of(heldout) if heldout is not None else sha256_of(data),
                        "tokens": {d: int(s.numel()) for d, s in held.items()}}}
    return cal, held, prov


def run(model_path: Path, budgets: Sequence[float], policy: str = "lynx", data: Optional[Path] = None,
        heldout: Optional[Path] = None, settings: Settings = Settings(), compare_global: bool = False,
        log: Callable[[str], None] = print, headroom: float = DEFAULT_HEADROOM,
        refill_similarity: Optional[float] = None) -> dict:
    """Calibrate ``model_path`` for every budget; returns {"calibrations": [file payload per budget],
    "global": ... (with ``compare_global``)}. Raises CalibrationError on bad input (nothing written).

    ``refill_similarity`` (policy lynx): the refill every layer shares (a base parameter of the file). None:
    what the server does by default, ``DEFAULT_REFILL_SIMILARITY`` when the model has the expert-similarity
    file beside it, else 0 (refill by router score); 0: plain lynx. The file is checked against the model."""
    t0 = time.time()
    budgets = list(budgets)
    if not budgets:
        raise CalibrationError("give at least one --budget-kl")
    for b in budgets:
        if not isinstance(b, (int, float)) or not b > 0 or b != b or b == float("inf"):
            raise CalibrationError(f"--budget-kl must be a positive number of nats per token, got {b!r}")
    if not 0.0 <= headroom < 1.0:
        raise CalibrationError(f"--headroom must be in [0, 1), got {headroom!r}")
    knob = knob_for(policy)
    refill = _refill_for(model_path, policy, refill_similarity)
    if refill:
        knob = Knob(knob.policy, knob.param, knob.grid, {**knob.fixed, "refill_similarity": refill}, knob.kind)
    if not settings.batch_sizes or any(B < 2 for B in settings.batch_sizes):
        raise CalibrationError(f"--batch-sizes must be decode batch sizes >= 2, got {settings.batch_sizes}")
    if data is None and not is_bundled(model_path):  # before the (slow) model load
        _data(model_path, None, None, heldout, settings.length)
    model, tokenizer = load_model(model_path)
    cal, held, prov = _data(model_path, tokenizer, data, heldout, settings.length)
    E, k = A.model_shape(model)
    if settings.grid is not None:
        knob = Knob(knob.policy, knob.param, lambda E, k, g=list(settings.grid): g, knob.fixed, knob.kind)
    grid = knob.grid(E, k)
    try:
        for v in grid:
            make_policy(knob.policy, **knob.fixed, **{knob.param: v}).validate(
                model_routing.block_router(A.moe_blocks(model)[0]).spec, max(settings.batch_sizes))
    except ConfigError as e:
        raise CalibrationError(f"grid value of {knob.param} not valid for this model: {e}") from e
    layer_ids = A.moe_layer_ids(model)
    router = model_routing.block_router(A.moe_blocks(model)[0]).spec
    similarity, sim_prov = None, None
    if refill:
        path = Path(model_path) / SIMILARITY_NAME
        try:
            sim = load_similarity(path, model_identity(model.config), layer_ids)
        except ConfigError as e:
            raise CalibrationError(f"refill_similarity {refill:g} needs the model's expert similarity: {e}") from e
        similarity = [sim.matrices[lid] for lid in layer_ids]
        sim_prov = {"path": str(path), "sha256": sha256_of(path), "method": sim.method}
    log(f"[calibrate] {model_path}: {len(layer_ids)} MoE layers, E={E}, k={k}, {router.scoring_func}; "
        f"{policy}{f' (refill_similarity {refill:g})' if refill else ''} over {knob.param} in {grid}; "
        f"B={list(settings.batch_sizes)}")
    calib = {B: BatchSet(model, decode_batches(cal, B, settings.batches_per_kind, settings.length, settings.seed),
                         settings.prefix, similarity) for B in settings.batch_sizes}
    c = Calibrator(model, knob, calib, log)
    c.measure_curves()
    log(f"[calibrate] {len(c.moves)} greedy moves; curves done in {time.time() - t0:.0f} s")
    held_sets = {B: BatchSet(model, decode_batches(held, B, settings.heldout_batches_per_kind, settings.length,
                                                   settings.seed + 1), settings.prefix, similarity)
                 for B in settings.batch_sizes}
    globals_ = {}
    if compare_global:
        for j, v in enumerate(grid):
            plan = _plan(knob, [j] * len(layer_ids), grid)
            globals_[v] = ({B: s.measure(plan) for B, s in held_sets.items()},
                           {B: s.measure(plan) for B, s in calib.items()})
            log(f"[calibrate] global {knob.param}={v}: held-out KL "
                + ", ".join(f"B={B} {p.kl:.5f} removed {p.removed:.2f}" for B, p in globals_[v][0].items()))
    identity = model_identity(model.config)
    out = []
    for budget in budgets:
        sol = c.solve(budget * (1.0 - headroom))
        plan = _plan(knob, sol["state"], grid)
        held_pts = {B: s.measure(plan) for B, s in held_sets.items()}
        heldout_summary = {str(B): _summary(p, layer_ids) for B, p in held_pts.items()}
        for B, summ in heldout_summary.items():  # each layer's setting and its KL alone on the calibration data
            for lid, j, curve in zip(layer_ids, sol["state"], c.curves):
                summ["per_layer"][str(lid)].update(setting=None if j < 0 else grid[j],
                                                   calibration_kl_alone=None if j < 0 else round(curve[j][0], 6))
        payload = {
            "format": FORMAT, "tool": TOOL, "model_path": str(model_path), "policy": policy,
            "knob": {"param": knob.param, "grid": grid}, "base_params": base_params(knob, router),
            "layer_params": sol["layer_params"], "budget_kl": budget,
            "headroom": headroom, "search_kl_target": budget * (1.0 - headroom),
            "identity": identity, "num_experts": E, "top_k": k, "scoring": router.scoring_func,
            "moe_layers": layer_ids, "data": {**prov, **({"similarity": sim_prov} if sim_prov else {})},
            "settings": {"batch_sizes": list(settings.batch_sizes), "batches_per_kind": settings.batches_per_kind,
                         "heldout_batches_per_kind": settings.heldout_batches_per_kind, "prefix": settings.prefix,
                         "decode_len": settings.decode_len, "seed": settings.seed, "threads": torch.get_num_threads()},
            "search": sol["search"], "heldout": heldout_summary,
        }
        if compare_global:
            payload["global_comparison"] = {
                str(B): compare_to_global(held_pts[B], [globals_[v][0][B] for v in grid], grid)
                for B in settings.batch_sizes}
            # The practical alternative: the most aggressive global value whose calibration KL fits the budget.
            for B in settings.batch_sizes:
                fit = [v for v in grid if globals_[v][1][B].kl <= budget * (1.0 - headroom)]
                cmp = payload["global_comparison"][str(B)]
                if fit:
                    v = max(fit, key=lambda v: globals_[v][1][B].removed)
                    g = globals_[v][0][B]
                    cmp["global_calibrated"] = {"value": v, "heldout": _summary(g, layer_ids)}
                    for key in ("per_layer",):
                        cmp["global_calibrated"]["heldout"].pop(key)
                else:
                    cmp["global_calibrated"] = None
        payload["seconds"] = round(time.time() - t0, 1)
        h = heldout_summary[str(settings.batch_sizes[0])]
        log(f"[calibrate] budget {budget:g}: {sol['layer_params']} -> calibration KL "
            f"{sol['search']['measured_kl']:.5f}; held-out B={settings.batch_sizes[0]} KL {h['kl']:.5f} "
            f"{h['kl_ci']}, d acc {h['delta_points']:+.2f} {h['delta_points_ci']} pts, experts/step "
            f"{h['experts_before']:.2f} -> {h['experts_after']:.2f}")
        out.append(payload)
    report = {"format": REPORT_FORMAT, "tool": TOOL, "model_path": str(model_path), "policy": policy,
              "calibrations": out, "seconds": round(time.time() - t0, 1)}
    if compare_global:
        report["global"] = {str(v): {"heldout": {str(B): _summary(p, layer_ids) for B, p in h.items()},
                                     "calibration": {str(B): _summary(p, layer_ids) for B, p in cc.items()}}
                            for v, (h, cc) in globals_.items()}
    return report


def _budget_path(out: str, budget: float, several: bool) -> Path:
    if "{budget}" in out:
        return Path(out.replace("{budget}", f"{budget:g}"))
    if several:
        raise CalibrationError("several budgets: --out must contain {budget} (one servable file per budget)")
    return Path(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", type=Path, required=True)
    ap.add_argument("--budget-kl", required=True,
                    help="KL(off || selection) budget in nats per next token on decode-like batches (comma-separated "
                         "for several)")
    ap.add_argument("--data", type=Path, help="calibration text, JSON lines with 'text' (default for bundled models: "
                    "data/corpus/calibration.jsonl.gz)")
    ap.add_argument("--heldout", type=Path, help="held-out text for the final measurement (default: bundled models "
                    "data/corpus/heldout.jsonl.gz; with --data, the last quarter of its tokens)")
    ap.add_argument("--batch-sizes", default="32", help="decode batch sizes to calibrate on (KL must fit at each)")
    ap.add_argument("--policy", default="lynx", choices=sorted(KNOBS))
    ap.add_argument("--refill-similarity", type=float, default=None, metavar="LAMBDA",
                    help="lynx: refill moved picks by expert similarity, every layer (default: %g when the model "
                         "has %s beside it, as the server does; 0: refill by router score)"
                         % (DEFAULT_REFILL_SIMILARITY, SIMILARITY_NAME))
    ap.add_argument("--grid", default=None, help="comma-separated values of the policy's main knob (default: table)")
    ap.add_argument("--batches-per-kind", type=int, default=1, help="calibration batches per domain and mixed")
    ap.add_argument("--heldout-batches-per-kind", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=32, help="prompt tokens per sequence")
    ap.add_argument("--decode-len", type=int, default=64, help="teacher-forced decode steps per sequence")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                    help="search for KL <= budget x (1 - headroom) on the calibration data, leaving room for text the "
                         "model fits less well (default %(default)s)")
    ap.add_argument("--compare-global", action="store_true",
                    help="also measure every global setting on the held-out batches and report the per-layer gain")
    ap.add_argument("--out", help="calibration file to write (--lynx-config); with several budgets a path with {budget}")
    ap.add_argument("--report", type=Path, help="also write every budget's result (and the global comparison) here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        try:
            budgets = [float(x) for x in args.budget_kl.split(",") if x.strip()]
            sizes = tuple(int(x) for x in args.batch_sizes.split(",") if x.strip())
            grid = None if args.grid is None else [knob_for(args.policy).kind(x) for x in args.grid.split(",")]
        except ValueError as e:
            raise CalibrationError(f"bad number in --budget-kl, --batch-sizes or --grid: {e}") from e
        if not args.out and not args.report:
            raise CalibrationError("give --out (the calibration file) and/or --report")
        paths = [_budget_path(args.out, b, len(budgets) > 1) for b in budgets] if args.out else []
        settings = Settings(sizes, args.batches_per_kind, args.heldout_batches_per_kind, args.prefix, args.decode_len,
                            args.seed, grid)
        report = run(args.model_path, budgets, args.policy, args.data, args.heldout, settings, args.compare_global,
                     log=lambda s: print(s, file=sys.stderr, flush=True), headroom=args.headroom,
                     refill_similarity=args.refill_similarity)
    except CalibrationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, payload in zip(paths, report["calibrations"]):
        write_atomic(path, payload)
        print(json.dumps({"wrote": str(path), "budget_kl": payload["budget_kl"], "layer_params": payload["layer_params"]}))
    if args.report:
        write_atomic(args.report, report)
        print(json.dumps({"wrote": str(args.report)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
