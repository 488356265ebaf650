"""Offload-aware selection: exact expert page-ins of SGLang's paged experts under each rule.

SGLang 0.5.23's paged experts (``--enable-paged-experts --paged-experts-num-resident K``) keep K
expert slots per MoE layer on the GPU and page every other expert a step uses in from pinned host
memory, least recently used slot first (``sglang.srt.layers.moe.paged_experts``; docs/offload.md
says when and where). This benchmark replays real decode routing of a bundled trained model
through SGLang's own ``LRUPolicy`` / ``plan_waves`` (imported, not rewritten), one LRU state per
MoE layer, steps in time order, and counts the page-ins.

Routing comes from the accuracy harness (``lynx_sglang.accuracy``): B independent held-out
sequences, teacher-forced, one position across the B sequences = one decode step, rewritten by
each rule exactly where the server rewrites it. ``OffloadPatch`` (a ``SelectionPatch``) records
every (layer, step)'s final ids and feeds them to the layer's LRU(s) as the eager executor does
(``torch.unique(topk_ids)`` -> ``plan_waves``). The B prompts are replayed first as one prefill
step (never rewritten, not counted), so decode starts from the residency a prefill leaves.

Rules:

* ``off``, ``lynx`` (defaults): their ids do not depend on residency; one pass feeds every K.
* ``lynx+resident`` (``ResidencyRule("keep")``): lynx's kept set plus every resident expert some
  row picked (a resident expert costs no PCIe), re-routed with ``reference.reroute``. Moves a
  subset of lynx's moved picks.
* ``resident-first`` (``ResidencyRule("prefer")``): the kept set is the resident experts some row
  picked plus the experts some row cannot move (a confident row's rank-0 expert, picks held by the
  moved-weight cap: lynx's ``mandatory`` votes). A non-resident pick that the cap lets move goes,
  even when it is near the row's best; freed slots refill from the kept set by score, so they land
  on resident experts or on non-resident ones that are paged in anyway. Still at most
  ``max_moved_weight`` of any row's routed weight moves.

``--caps`` (default 0.5, 0.6) adds ``lynx moved<=c`` and ``resident-first moved<=c`` at each cap. ``--layer-caps``
adds resident-first with one cap per MoE layer (``0.35/0.7/0.7/0.9``: what a ``--lynx-config`` plan's
``layer_params`` of ``residency_max_moved_weight`` serves). Each row also
carries an ``estimate`` (not a measurement) of a large model's decode-step time at its per-layer page-in rate
(``estimate_step_ms``: bytes over PCIe Gen5 x16 and H200 HBM3e bandwidth; docs/offload.md, section 4).

Both residency rules read the layer's resident set before the step (``LRUPolicy.resident``) and
run the server's rule: lynx with ``residency`` keep / prefer (``--lynx-residency``), i.e.
``reference.select(..., resident=mask)`` -> ``reference.residency_keep``, the torch path a paged
layer's selector runs. They go through the same ``SelectionPatch`` so their accuracy comes from the
very ids that were paged.

    python -m benchmarks.bench_offload                       # the three bundled models, B = 16 and 32
    python -m benchmarks.bench_offload --models trained-qwen3-moe --batch-sizes 16 --batches 1

Writes ``benchmarks/results/offload_cpu.{json,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from lynx_sglang import accuracy
from lynx_sglang.runtime.selection import reference
from lynx_sglang.runtime.selection.output_norms import pick_scale
from lynx_sglang.runtime.selection.config import LynxPolicy, RouterSpec, make_policy

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("trained-qwen3-moe", "trained-qwen3-moe-e128", "trained-glm4-moe")
# One routed expert of Qwen3-30B-A3B in bf16: gate + up + down, hidden 2048, expert FFN 768.
QWEN3_30B_EXPERT_BYTES = 3 * 2048 * 768 * 2
# One routed expert of DeepSeek-V3 in its fp8 checkpoint: hidden 7168, expert FFN 2048 (scales ignored).
DEEPSEEK_V3_EXPERT_BYTES = 3 * 7168 * 2048 * 1
BF16 = 2

# ----------------------------------------------------------------------------- GPU cost model (an estimate)
# Not a measurement: bytes over bandwidth, with the eager executor's page-ins serialised with compute
# (it copies a wave's experts, then runs it, on one stream). Bandwidths: PCIe Gen5 x16 as achieved
# (~55 GB/s of 64), H200 HBM3e (4.8 TB/s peak).
PCIE_BYTES_PER_S = 55e9
HBM_BYTES_PER_S = 4.8e12
LARGE_MODELS = {
    # name: (expert bytes, MoE layers, bytes of every non-routed-expert weight read per step)
    "qwen3_30b_a3b": (QWEN3_30B_EXPERT_BYTES, 48, 1.5e9 * 2),  # ~1.5 B non-expert params, bf16
    "deepseek_v3": (DEEPSEEK_V3_EXPERT_BYTES, 58, 17e9),  # ~17 B non-routed params, ~1 byte each
}


def estimate_step_ms(page_ins_per_layer: float, distinct_per_layer: float, model: str) -> dict:
    """Estimated decode-step time (ms) of a large model paging experts at these per-layer rates."""
    expert, layers, dense = LARGE_MODELS[model]
    pcie = page_ins_per_layer * layers * expert / PCIE_BYTES_PER_S * 1e3
    hbm = (distinct_per_layer * layers * expert + dense) / HBM_BYTES_PER_S * 1e3
    return {"pcie_ms": round(pcie, 3), "hbm_ms": round(hbm, 3), "step_ms": round(pcie + hbm, 3)}


def sglang_lru():
    """SGLang's own residency bookkeeping (imported lazily: the package import takes ~10 s)."""
    from sglang.srt.layers.moe.paged_experts.residency import LRUPolicy, plan_waves

    return LRUPolicy, plan_waves


def distinct_experts(ids: torch.Tensor) -> List[int]:
    """What the eager executor pages for one step: ``torch.unique(topk_ids)`` without padding (-1)."""
    return [e for e in torch.unique(ids).tolist() if e >= 0]


@dataclass
class StepCost:
    distinct: int
    waves: int
    loads: int


def replay_step(policy, ids_or_experts) -> StepCost:
    """One step of one layer through SGLang's ``plan_waves`` (mutates ``policy``)."""
    _, plan_waves = sglang_lru()
    experts = distinct_experts(ids_or_experts) if torch.is_tensor(ids_or_experts) else list(ids_or_experts)
    waves = plan_waves(policy=policy, distinct=experts)
    return StepCost(len(experts), len(waves), sum(len(w.loads) for w in waves))


def replay(num_slots: int, steps: Iterable) -> List[StepCost]:
    """A trace of one layer (each step: ids tensor or list of experts) from SGLang's initial state."""
    LRUPolicy, _ = sglang_lru()
    policy = LRUPolicy(num_slots)
    return [replay_step(policy, s) for s in steps]


# ----------------------------------------------------------------------------- residency-aware rules


DEFAULT_CAP = LynxPolicy().max_moved_weight  # lynx's default moved-weight cap (the unlabelled points)


def parse_layer_caps(text: str) -> List[Tuple[float, ...]]:
    """``--layer-caps``: vectors separated by ',', one cap per MoE layer separated by '/' ("" -> none)."""
    return [tuple(float(c) for c in v.split("/")) for v in text.split(",") if v]


def parse_page_budgets(text: str) -> List[Tuple[int, float]]:
    """``--page-budgets 20@0.6,18@0.65`` -> [(20, 0.6), (18, 0.65)]: a page budget and the cap it trims."""
    out = []
    for item in filter(None, text.split(",")):
        budget, _, cap = item.partition("@")
        if not cap:
            raise SystemExit(f"--page-budgets: {item!r} is not BUDGET@CAP (e.g. 20@0.6)")
        out.append((int(budget), float(cap)))
    return out


def add_paged_rule_args(ap) -> None:
    """``--layer-caps`` and ``--page-budgets``: the resident-first variants a paged-layer benchmark adds
    (read back with ``parse_layer_caps`` / ``parse_page_budgets``)."""
    ap.add_argument("--layer-caps", default="",
                    help="also resident-first with one moved-weight cap per MoE layer (what a --lynx-config plan's "
                         "layer_params serves): vectors separated by ',', caps by '/' (e.g. 0.35/0.7/0.7/0.9)")
    ap.add_argument("--page-budgets", default="",
                    help="also resident-first with a page budget over a cap: BUDGET@CAP items separated by ',' "
                         "(e.g. 20@0.6: --lynx-residency-page-budget 20 --lynx-residency-max-moved-weight 0.6)")
    ap.add_argument("--output-norms", action="store_true",
                    help="also each page-budget rule ranked by predicted output share (--lynx-residency-output-norms "
                         "with the heads file beside the model: python -m lynx_sglang.output_norm_calibrate)")


def add_batch_args(ap, batches: int) -> None:
    """The held-out batches' options shared by the paged-layer explorations (one model, one B):
    ``--model --batch-size --batches --prefix --decode-len --seed``."""
    ap.add_argument("--model", default="trained-glm4-moe", help="bundled model folder under models/")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=batches, help="batches per kind (each domain, and mixed)")
    ap.add_argument("--prefix", type=int, default=32)
    ap.add_argument("--decode-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)


def layer_caps_label(caps: Sequence[float]) -> str:
    """How a per-layer cap vector is named in results: ``layer caps 0.35/0.7/0.7/0.9``."""
    return "layer caps " + "/".join(f"{c:g}" for c in caps)


@dataclass(frozen=True)
class ResidencyRule:
    """A residency-aware point of the sweep, for one K: lynx (``policy``) in residency mode ``mode``.

    The rule itself is the server's (``runtime_policy``: ``LynxPolicy(residency=mode)``, decided by
    ``reference.residency_keep``); this class only names the point and its K.
    """

    mode: str  # "keep": lynx + resident picks; "prefer": resident picks + experts rows cannot move
    num_slots: int
    policy: LynxPolicy = LynxPolicy()
    # One moved-weight cap per MoE layer (in block order) instead of the policy's: what a calibration
    # file's layer_params serves (``--lynx-config``). None: the policy's cap on every layer.
    layer_caps: Optional[Tuple[float, ...]] = None
    # ``residency_page_budget`` (--lynx-residency-page-budget): at most this many experts paged per layer-step
    # beyond rows' best picks. None: no budget.
    page_budget: Optional[int] = None
    # --lynx-residency-output-norms: the budget ranks by routed weight x predicted output norm (the heads file
    # beside the model, ``OffloadPatch.output_norms``) instead of routed weight.
    output_norms: bool = False

    @property
    def label(self) -> str:
        name = {"keep": "lynx+resident", "prefer": "resident-first"}[self.mode]
        if self.layer_caps is not None:
            name = f"{name} {layer_caps_label(self.layer_caps)}"
        elif self.policy.max_moved_weight != DEFAULT_CAP:
            name = f"{name} moved<={self.policy.max_moved_weight:g}"
        if self.page_budget is not None:
            name = f"{name} pages<={self.page_budget}"
        if self.output_norms:
            name = f"{name} by output"
        return name if self.policy.keep_top is None else f"{name} keep_top={self.policy.keep_top}"

    def at_layer(self, layer: int) -> "ResidencyRule":
        """The rule MoE layer ``layer`` (block order) runs: its own cap where ``layer_caps`` names one."""
        if self.layer_caps is None:
            return self
        return replace(self, policy=replace(self.policy, max_moved_weight=self.layer_caps[layer]), layer_caps=None)

    @property
    def runtime_policy(self) -> LynxPolicy:
        """What the server runs for this point: ``--lynx-residency <mode>`` over this lynx policy."""
        return replace(self.policy, residency=self.mode, residency_page_budget=self.page_budget)


def residency_select(rule: ResidencyRule, router: RouterSpec, logits: torch.Tensor, ids: torch.Tensor,
                     weights: torch.Tensor, resident: torch.Tensor,
                     correction_bias: Optional[torch.Tensor] = None, similarity: Optional[torch.Tensor] = None,
                     hidden: Optional[torch.Tensor] = None, head: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
    """One (layer, step): new (ids, weights, changed) under ``rule`` given the resident mask [E] bool.

    The runtime rule on its torch path, ``reference.select(..., resident=...)``: what a paged layer's
    selector runs with ``resident = expert_slot >= 0``. ``similarity``: the layer's expert-similarity
    matrix, for a rule with ``refill_similarity`` > 0 (scaled as the selector scales it at plan time).
    ``hidden`` [B, H] and ``head`` (the layer's output-norm head): for a rule with ``output_norms``."""
    policy = rule.runtime_policy
    refill = None
    if policy.refill_similarity > 0:
        if similarity is None:
            raise ValueError("a residency rule with refill_similarity needs the layer's similarity matrix")
        refill = (similarity * policy.refill_similarity).contiguous()
    scale = None
    if rule.output_norms:
        if hidden is None or head is None:
            raise ValueError("a residency rule with output_norms needs the step's hidden states and the layer's head")
        scale = pick_scale(hidden, *head)
    new_ids, new_w, _ = reference.select(policy, router, logits.float(), ids, weights.float(),
                                         correction_bias=correction_bias, resident=resident, refill_bias=refill,
                                         pick_scale=scale)
    return new_ids, new_w, (new_ids != ids).any(dim=1)


def resident_mask(policy, num_experts: int) -> torch.Tensor:
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[list(policy.resident)] = True
    return mask


# ----------------------------------------------------------------------------- the recording patch


class OffloadPatch(accuracy.SelectionPatch):
    """A ``SelectionPatch`` that replays each (layer, step)'s final ids through SGLang's LRU.

    ``slots``: the K values to replay (one ``LRUPolicy`` per layer and K); a ``ResidencyRule``
    replays only its own K and decides on that LRU's resident set. The last instance made is
    ``OffloadPatch.last`` (``measure`` makes its patch itself).
    """

    slots: Sequence[int] = ()
    last: Optional["OffloadPatch"] = None
    output_norms: Optional[list] = None  # per MoE block: its (weight, bias) output-norm head, for output_norms rules

    def __init__(self, model, rule, *args, **kwargs):
        # Per layer: the hidden states of the forward call in progress, and its next decode position.
        self._hidden: Dict[int, torch.Tensor] = {}
        self._position: Dict[int, int] = {}
        super().__init__(model, rule, *args, **kwargs)
        LRUPolicy, _ = sglang_lru()
        ks = [rule.num_slots] if isinstance(rule, ResidencyRule) else list(self.slots)
        if isinstance(rule, ResidencyRule) and rule.layer_caps is not None and len(rule.layer_caps) != len(self.blocks):
            raise ValueError(f"{len(rule.layer_caps)} layer caps for a model with {len(self.blocks)} MoE layers")
        self.lru: List[Dict[int, object]] = [{k: LRUPolicy(k) for k in ks} for _ in self.blocks]
        # (K) -> per layer: list of StepCost of the decode steps, and the prefill's
        self.steps: Dict[int, List[List[StepCost]]] = {k: [[] for _ in self.blocks] for k in ks}
        self.prefill: Dict[int, List[StepCost]] = {k: [] for k in ks}
        for layer, router in enumerate(self.routers):
            object.__setattr__(router, "route", self._recording_route(layer, router.route))
        OffloadPatch.last = self

    def _recording_route(self, layer: int, route):
        def wrapped(hidden):
            # Decode steps of this forward call are its positions from decode_start on, in order.
            self._hidden[layer], self._position[layer] = hidden, self.decode_start
            logits, weights, ids = route(hidden)
            if hidden.dim() == 3 and self.decode_start > 0:
                b, s = hidden.shape[:2]
                prompt = ids.reshape(b, s, -1)[:, : min(self.decode_start, s)]
                for k, policy in self.lru[layer].items():  # one prefill step, never rewritten
                    self.prefill[k].append(replay_step(policy, prompt))
            return logits, weights, ids

        return wrapped

    def _select(self, layer: int, logits, ids, weights):
        if isinstance(self.rule, ResidencyRule):
            new_ids, new_w = self._residency_select(layer, logits, ids, weights)
        else:
            new_ids, new_w = super()._select(layer, logits, ids, weights)
        for k, policy in self.lru[layer].items():
            self.steps[k][layer].append(replay_step(policy, new_ids))
        return new_ids, new_w

    def step_hidden(self, layer: int) -> torch.Tensor:
        """[B, H] fp32: the hidden states entering MoE layer ``layer`` at the decode step being selected (each
        call moves to the next step)."""
        t = self._position[layer]
        self._position[layer] += 1
        return self._hidden[layer][:, t].detach().float()

    def _residency_select(self, layer, logits, ids, weights):
        rule: ResidencyRule = self.rule.at_layer(layer)
        E = self.router.num_experts
        resident = resident_mask(self.lru[layer][rule.num_slots], E)
        sim = None if self.similarity is None else self.similarity[layer]
        hidden = self.step_hidden(layer) if rule.output_norms else None
        head = OffloadPatch.output_norms[layer] if rule.output_norms else None
        new_ids, new_w, _ = residency_select(rule, self.router, logits, ids.contiguous(), weights, resident,
                                             self.routers[layer].correction_bias, sim, hidden, head)
        new_w = new_w.to(weights.dtype)
        # The harness's own bookkeeping (what SelectionPatch._select records).
        self.counts.append((layer, len(distinct_experts(ids)), len(distinct_experts(new_ids))))
        self.rows[0] += int((new_ids != ids).any(dim=1).sum())
        self.rows[1] += ids.shape[0]
        return new_ids, new_w


@contextlib.contextmanager
def recording(slots: Sequence[int]):
    """Make the harness build ``OffloadPatch`` (replaying ``slots``) while inside."""
    saved = accuracy.SelectionPatch
    OffloadPatch.slots = tuple(slots)
    accuracy.SelectionPatch = OffloadPatch
    try:
        yield
    finally:
        accuracy.SelectionPatch = saved
        OffloadPatch.slots = ()


# ----------------------------------------------------------------------------- the sweep


def expert_bytes(model) -> int:
    """Bytes of one routed expert of the bundled model in bf16 (gate, up, down)."""
    cfg = model.config
    return 3 * cfg.hidden_size * cfg.moe_intermediate_size * BF16


def slot_counts(num_experts: int, top_k: int, divisors: Sequence[int] = (8, 4, 2)) -> List[int]:
    """K = E/d for each divisor d, at least top-k (SGLang refuses fewer slots than the router's top-k)."""
    return [max(top_k, num_experts // d) for d in divisors]


@dataclass
class Series:
    """One (rule, K) over the batches: per batch, per layer, the decode steps' costs; accuracy per batch."""

    rule: str
    num_slots: int
    steps: List[List[List[StepCost]]]  # [batch][layer][step]
    prefill: List[List[StepCost]]  # [batch][layer]
    results: list  # accuracy.BatchResult per batch

    def mean(self, field: str) -> float:
        """Mean per (layer, decode step)."""
        vals = [getattr(c, field) for b in self.steps for layer in b for c in layer]
        return sum(vals) / max(1, len(vals))

    def step_tail(self) -> dict:
        """Page-ins per decode step (all MoE layers together): 99th percentile and maximum over the steps
        of every batch. A step's PCIe time follows its total, so the tail is a step-time tail."""
        per_step = torch.tensor([float(sum(col)) for b in self.steps for col in zip(*(
            [c.loads for c in layer] for layer in b))], dtype=torch.float64)
        if per_step.numel() == 0:
            return {"page_ins_per_decode_step_p99": float("nan"), "page_ins_per_decode_step_max": float("nan")}
        return {"page_ins_per_decode_step_p99": float(torch.quantile(per_step, 0.99)),
                "page_ins_per_decode_step_max": float(per_step.max())}

    def accuracy(self) -> dict:
        tokens = sum(r.tokens for r in self.results)
        d = sum(r.correct - r.correct_off for r in self.results)
        seqs = [(c - o, n, kl) for r in self.results for c, o, n, kl in zip(
            r.per_sequence["correct"], r.per_sequence["correct_off"], r.per_sequence["tokens"],
            r.per_sequence["kl"])]
        return {"delta_acc_points": 100.0 * d / tokens, "kl": sum(r.kl for r in self.results) / tokens,
                "delta_acc_ci95": _bootstrap(seqs), "tokens": tokens}


    def paired_vs(self, other: "Series", reps: int = 1000, seed: int = 0) -> dict:
        """This rule's next-token accuracy minus ``other``'s on the same sequences (points), with a
        95 % paired bootstrap interval over sequences: the statistic "within x points of lynx" needs."""
        seqs = []
        for mine, theirs in zip(self.results, other.results):
            if mine.per_sequence["tokens"] != theirs.per_sequence["tokens"]:
                raise ValueError("paired_vs needs the same batches for both rules")
            seqs += [(a - b, n, 0.0) for a, b, n in zip(mine.per_sequence["correct"], theirs.per_sequence["correct"],
                                                      mine.per_sequence["tokens"])]
        tokens = sum(n for _, n, _ in seqs)
        return {"points": 100.0 * sum(d for d, _, _ in seqs) / tokens, "ci95": _bootstrap(seqs, reps, seed)}


def _bootstrap(seqs, reps: int = 1000, seed: int = 0) -> List[float]:
    """95 % percentile interval of the pooled Δ accuracy (points), resampling sequences."""
    if not seqs:
        return [float("nan")] * 2
    d = torch.tensor([s[0] for s in seqs], dtype=torch.float64)
    n = torch.tensor([s[1] for s in seqs], dtype=torch.float64)
    idx = torch.randint(0, len(seqs), (reps, len(seqs)), generator=torch.Generator().manual_seed(seed))
    rep = 100.0 * d[idx].sum(1) / n[idx].sum(1)
    lo, hi = torch.quantile(rep, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [round(lo, 4), round(hi, 4)]


def model_output_norms(model, path: Path) -> list:
    """Per MoE block (block order): the (weight, bias) output-norm head of the file beside the model, as the
    server loads it (``output_norms.load_output_norms``: refused if made for another model)."""
    from lynx_sglang.runtime.selection.model_identity import model_identity
    from lynx_sglang.runtime.selection.output_norms import DEFAULT_NAME, load_output_norms

    layer_ids = accuracy.moe_layer_ids(model)
    heads = load_output_norms(Path(path) / DEFAULT_NAME, model_identity(model.config), layer_ids).heads
    return [heads[i] for i in layer_ids]


def held_out_batches(streams, batch_size: int, batches_per_kind: int, length: int, seeds: int | Sequence[int]) -> list:
    """``accuracy.make_batches`` for each seed, in order: several seeds pool their batches into one paired set."""
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    return [b for s in seeds for b in accuracy.make_batches(streams, batch_size, batches_per_kind, length, seed=s)]


def run_model(path: Path, batch_sizes: Sequence[int], batches_per_kind: int, prefix: int, decode_len: int,
              seed: int | Sequence[int], caps: Sequence[float] = (0.5, 0.6), log=print, slot_divisors: Sequence[int] = (8, 4, 2),
              keep_tops: Sequence[int] = (), refill_similarity: float = 0.0,
              layer_caps: Sequence[Tuple[float, ...]] = (),
              page_budgets: Sequence[Tuple[int, float]] = (), output_norms: bool = False) -> dict:
    model, tokenizer = accuracy.load_model(path)
    OffloadPatch.output_norms = model_output_norms(model, path) if output_norms else None
    sim = None
    if refill_similarity > 0:  # lynx's refill by expert similarity (the server's default where the file exists)
        from lynx_sglang.frontier import load_similarity_for
        from lynx_sglang.runtime.sglang.options import default_similarity_path

        sim = load_similarity_for(model, default_similarity_path(path))
        if sim is None:
            raise SystemExit(f"--refill-similarity needs {path}'s similarity file (python -m lynx_sglang.sere_calibrate)")
    streams = accuracy.domain_streams(tokenizer)
    E, k = accuracy.model_shape(model)
    layers = len(accuracy.moe_blocks(model))
    ks = slot_counts(E, k, slot_divisors)
    out = {"model": path.name, "num_experts": E, "top_k": k, "moe_layers": layers,
           "expert_bytes_bf16": expert_bytes(model), "slots": ks, "batch_sizes": {}}
    for B in batch_sizes:
        t0 = time.time()
        batches = held_out_batches(streams, B, batches_per_kind, prefix + decode_len + 1, seed)
        # Residency-independent rules (one pass feeds every K), then the residency rules per K.
        lam = {"refill_similarity": refill_similarity}
        plain = {"lynx": make_policy("lynx", **lam)}
        plain.update({f"lynx moved<={c:g}": make_policy("lynx", max_moved_weight=c, **lam) for c in caps})
        residency = [ResidencyRule(mode, K, LynxPolicy(max_moved_weight=c, **lam)) for K in ks
                     for mode, c in [("keep", DEFAULT_CAP), ("prefer", DEFAULT_CAP)] + [("prefer", c) for c in caps]]
        # resident-first with another keep_top (--lynx-keep-top): how many best picks every row holds
        residency += [ResidencyRule("prefer", K, LynxPolicy(max_moved_weight=c, keep_top=t, **lam)) for K in ks
                      for t in keep_tops for c in [DEFAULT_CAP, *caps]]
        # resident-first with one cap per MoE layer (a calibration file's layer_params)
        residency += [ResidencyRule("prefer", K, LynxPolicy(**lam), tuple(v)) for K in ks for v in layer_caps]
        # resident-first with a page budget over a cap (--lynx-residency-page-budget)
        residency += [ResidencyRule("prefer", K, LynxPolicy(max_moved_weight=c, **lam), page_budget=p, output_norms=o)
                      for K in ks for p, c in page_budgets for o in ([False, True] if output_norms else [False])]
        series: Dict[tuple, Series] = {}

        def add(label, K, patch, res):
            s = series.setdefault((label, K), Series(label, K, [], [], []))
            s.steps.append(patch.steps[K])
            s.prefill.append(patch.prefill[K])
            s.results.append(res)

        for batch in batches:
            with recording(ks):
                off = accuracy.off_reference(model, batch, prefix, 0)
                off_patch = OffloadPatch.last
                zero = accuracy.measure(model, batch, make_policy("off"), off, prefix, 0)[0]
                for K in ks:
                    add("off", K, off_patch, zero)
                for label, policy in plain.items():
                    res = accuracy.measure(model, batch, policy, off, prefix, 0, similarity=sim)[0]
                    for K in ks:
                        add(label, K, OffloadPatch.last, res)
            for rule in residency:
                with recording([rule.num_slots]):
                    res = accuracy.measure(model, batch, rule, off, prefix, 0, similarity=sim)[0]
                add(rule.label, rule.num_slots, OffloadPatch.last, res)
        rows = []
        for (label, K), s in series.items():
            row = {"rule": label, "num_slots": K,
                   "page_ins_per_layer_step": s.mean("loads"),
                   "waves_per_layer_step": s.mean("waves"),
                   "distinct_per_layer_step": s.mean("distinct"),
                   **s.step_tail(),
                   **s.accuracy(),
                   "raw": {"loads": [[[c.loads for c in layer] for layer in b] for b in s.steps],
                           "waves": [[[c.waves for c in layer] for layer in b] for b in s.steps],
                           "distinct": [[[c.distinct for c in layer] for layer in b] for b in s.steps],
                           "prefill_loads": [[c.loads for c in b] for b in s.prefill]}}
            row["page_ins_per_decode_step"] = row["page_ins_per_layer_step"] * layers
            row["bytes_per_decode_step_bundled"] = row["page_ins_per_decode_step"] * out["expert_bytes_bf16"]
            row["bytes_per_layer_step_if_qwen3_30b_sized"] = row["page_ins_per_layer_step"] * QWEN3_30B_EXPERT_BYTES
            row["estimate"] = {m: estimate_step_ms(row["page_ins_per_layer_step"], row["distinct_per_layer_step"], m)
                               for m in LARGE_MODELS}
            # Paired against lynx's defaults on the same sequences (the issue's "within x points of lynx").
            row["delta_vs_lynx"] = s.paired_vs(series[("lynx", K)])
            rows.append(row)
        for K in ks:
            base = next(r for r in rows if r["rule"] == "off" and r["num_slots"] == K)["page_ins_per_layer_step"]
            for r in rows:
                if r["num_slots"] == K:
                    r["page_ins_vs_off"] = r["page_ins_per_layer_step"] / base if base else float("nan")
        out["batch_sizes"][str(B)] = {"batches": len(batches), "decode_steps_per_batch": decode_len, "rows": rows}
        log(f"{path.name} B={B}: {len(batches)} batches in {time.time() - t0:.0f} s")
        log(table(out, B))
    return out


def table(model_out: dict, B: int) -> str:
    lines = [f"{model_out['model']} (E={model_out['num_experts']}, k={model_out['top_k']}), B={B}",
             "| K | rule | page-ins / layer-step | vs off | p99 / max per step | waves | distinct | Δacc (pts) [95% CI] "
             "| vs lynx (pts) [95% CI, paired] | KL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in model_out["batch_sizes"][str(B)]["rows"]:
        ci = r["delta_acc_ci95"]
        vs = r.get("delta_vs_lynx")
        paired = f"{vs['points']:+.2f} [{vs['ci95'][0]:+.2f}, {vs['ci95'][1]:+.2f}]" if vs else "-"
        lines.append(f"| {r['num_slots']} | {r['rule']} | {r['page_ins_per_layer_step']:.2f} | "
                     f"{r['page_ins_vs_off']:.2f} | {r['page_ins_per_decode_step_p99']:.0f} / "
                     f"{r['page_ins_per_decode_step_max']:.0f} | {r['waves_per_layer_step']:.2f} | "
                     f"{r['distinct_per_layer_step']:.1f} | "
                     f"{r['delta_acc_points']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}] | {paired} | {r['kl']:.4f} |")
    return "\n".join(lines)


def plot(payload: dict, png: Path) -> None:
    from benchmarks.results_io import pyplot, save_png

    plt = pyplot(png)
    if plt is None:
        return
    models = payload["models"]
    sizes = sorted({int(b) for m in models for b in m["batch_sizes"]})
    # Per batch size: accuracy against mean page-ins, then the per-step tail against the mean.
    fig, axes = plt.subplots(2 * len(sizes), len(models), figsize=(max(7.0, 5.2 * len(models)), 9.0 * len(sizes)),
                             squeeze=False)
    colors = {"off": "k", "lynx": "tab:blue", "lynx+resident": "tab:green", "resident-first": "tab:red"}
    palette = iter(["tab:cyan", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:gray",
                    *plt.get_cmap("tab20b").colors[::2], *plt.get_cmap("tab20c").colors[::4]])
    for m in models:
        for b in m["batch_sizes"].values():
            for r in b["rows"]:
                if r["rule"] not in colors:
                    colors[r["rule"]] = next(palette, "0.5")
    markers = {0: "o", 1: "s", 2: "^"}
    for i, B in enumerate(sizes):
        for j, m in enumerate(models):
            ax, tail = axes[2 * i][j], axes[2 * i + 1][j]
            rows = m["batch_sizes"].get(str(B), {}).get("rows", [])
            layers = m["moe_layers"]
            for ki, K in enumerate(m["slots"]):
                for r in rows:
                    if r["num_slots"] == K:
                        ax.scatter(r["page_ins_per_layer_step"], r["delta_acc_points"], color=colors[r["rule"]],
                                   marker=markers[ki], s=40,
                                   label=f"{r['rule']}" if ki == len(m["slots"]) // 2 else None)
                        ax.annotate(f"K={K}", (r["page_ins_per_layer_step"], r["delta_acc_points"]), fontsize=6,
                                    xytext=(3, 3), textcoords="offset points")
                        if "page_ins_per_decode_step_p99" in r:  # results written before session 14 lack it
                            tail.scatter(r["page_ins_per_layer_step"] * layers, r["page_ins_per_decode_step_p99"],
                                         color=colors[r["rule"]], marker=markers[ki], s=40)
            ax.axhline(0, color="0.7", lw=0.8)
            ax.set_title(f"{m['model']} (E={m['num_experts']}, k={m['top_k']}), B={B}", fontsize=9)
            ax.set_xlabel("experts paged in per layer and decode step (SGLang LRU)")
            ax.set_ylabel("Δ next-token accuracy vs off (points)")
            ax.grid(alpha=0.3)
            tail.set_title(f"{m['model']}, B={B}: the per-step tail", fontsize=9)
            tail.set_xlabel(f"mean experts paged in per decode step ({layers} MoE layers)")
            tail.set_ylabel("99th percentile over decode steps")
            tail.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=6, loc="lower right", title="K: " + ", ".join(f"{markers[i]} {K}" for i, K in enumerate(m["slots"])),
                          title_fontsize=7)
    fig.suptitle("Paged experts: page-ins vs accuracy (teacher-forced held-out decode, CPU replay)", fontsize=10)
    save_png(fig, png)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from benchmarks.results_io import RESULTS_DIR, environment

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="bundled model folders under models/")
    ap.add_argument("--batch-sizes", default="16,32")
    ap.add_argument("--batches", type=int, default=2, help="batches per kind (each domain, and mixed)")
    ap.add_argument("--prefix", type=int, default=32)
    ap.add_argument("--decode-len", type=int, default=64)
    ap.add_argument("--seed", default="0", help="batch seed; several (0,1) pool their batches into one paired set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--caps", default="0.5,0.6", help="extra moved-weight caps: lynx and resident-first at each")
    ap.add_argument("--slot-divisors", default="8,4,2", help="replay K = E/d (at least top-k) for each d")
    ap.add_argument("--keep-tops", default="", help="also resident-first with these keep_top values, at every cap")
    ap.add_argument("--refill-similarity", type=float, default=0.0,
                    help="lynx's refill_similarity for lynx and the residency rules (the server uses 8 where the "
                         "model has a similarity file; 0: refill by router score)")
    add_paged_rule_args(ap)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "offload_cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    models = [run_model(ROOT / "models" / name, [int(b) for b in args.batch_sizes.split(",")], args.batches,
                        args.prefix, args.decode_len, [int(x) for x in args.seed.split(",")],
                        [float(c) for c in args.caps.split(",") if c],
                        slot_divisors=[int(d) for d in args.slot_divisors.split(",")],
                        keep_tops=[int(t) for t in args.keep_tops.split(",") if t],
                        refill_similarity=args.refill_similarity,
                        layer_caps=parse_layer_caps(args.layer_caps),
                        page_budgets=parse_page_budgets(args.page_budgets), output_norms=args.output_norms)
              for name in args.models.split(",")]
    import transformers

    payload = {
        **environment(torch.device("cpu")),
        "transformers": transformers.__version__,
        "command": "python -m benchmarks.bench_offload " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "seconds": round(time.time() - t0, 1),
        "replay": "sglang.srt.layers.moe.paged_experts.residency.LRUPolicy / plan_waves, one LRU per MoE layer "
                  "and K, initial state experts 0..K-1, the B prompts replayed first as one prefill step "
                  "(not counted); a step pages torch.unique(topk_ids) (the eager executor's path, which every "
                  "decode step with B*k > K takes)",
        "expert_bytes": {"qwen3_30b_a3b_bf16": QWEN3_30B_EXPERT_BYTES, "deepseek_v3_fp8": DEEPSEEK_V3_EXPERT_BYTES},
        "estimate_note": "ESTIMATE, not measured: a large model paging experts at this row's per-layer rates; "
                         "pcie_ms = page-ins x layers x expert bytes / 55 GB/s (PCIe Gen5 x16, serialised with "
                         "compute as in the eager executor); hbm_ms = (distinct experts x layers x expert bytes + "
                         "non-expert weights) / 4.8 TB/s (H200)",
        "models": models,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload) + "\n")
    print(f"wrote {args.out.with_suffix('.json')}")
    plot(payload, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
