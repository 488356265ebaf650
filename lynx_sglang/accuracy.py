"""Accuracy harness: what does each expert-selection policy cost on held-out text?

The in-process path runs a transformers MoE model (Qwen3-MoE, or GLM-4.5-style
``glm4_moe``: sigmoid router with correction bias, expert groups, routed scaling and a
shared expert; see ``lynx_sglang.model_routing``) on batches of B
*independent* held-out sequences and applies expert selection exactly where a
serving engine would: on every MoE layer, to the B rows of one decode step
(one position of every sequence), with the same ``ExpertSelector`` the SGLang
plugin runs. Each sequence's first ``prefix`` tokens are the prompt (prefill:
never rewritten); every later position is a decode step.

Teacher forcing makes one full forward pass equivalent to step-by-step decode:
the row of position t only depends on rows at positions <= t, so rewriting each
position's column of B rows reproduces what a decode loop would compute,
including key/value entries written under selection. Metrics, against the same
batches with selection off:

* next-token accuracy (points) and mean log-likelihood of the held-out token;
* KL(off || policy) of the next-token distribution;
* top-1 agreement with off, and greedy-continuation agreement (a real decode
  loop with a KV cache: fraction of ``greedy_tokens`` generated before the
  first token that differs from off's greedy continuation).

Every result keeps per-sequence sums (``SEQ_FIELDS``), and summaries carry 95 %
paired-bootstrap intervals of the accuracy change and of KL (``BOOTSTRAP_REPS``
resamples of whole sequences, the same ones for off and the rule; seed 0), so
intervals can be recomputed and pooled across runs. Peer rules (``peers``:
lynx_paper, xshare, sere) run through ``ExpertSelector`` like ours;
``lynx_sglang.frontier`` puts every rule on one frontier.

A random-keep control keeps, in every (batch, layer, step), as many randomly
chosen experts of the batch's picked set as the policy it is matched to kept,
and re-routes the same way: if selection is good, it must lose clearly less.
The rank-drop control tests lynx_ep's other choice, which rank visits a token
gives up: on every step it keeps lynx_ep's kept set and refill, but frees the
picks of as many randomly chosen (row, remote rank) visits as lynx_ep frees
through weak picks on that same step input (``RankDropControl``).

Expert parallelism: a rule with ``ep = N`` runs as if the experts were split
over N ranks (contiguous placement) and every rank owned ``B / N`` rows of the
step (``home_rank``); ``lynx_ep`` gets the rank mask and the rows' home ranks,
and for every such rule each decode step is also costed with
``expert_parallel.step_traffic`` (all-to-all bytes, busiest rank's experts).

    python -m lynx_sglang.accuracy models/trained-qwen3-moe --out benchmarks/results/accuracy_cpu
    python -m lynx_sglang.accuracy models/trained-qwen3-moe --ep 4 --batch-sizes 64 --out build/accuracy_ep
    python -m lynx_sglang.accuracy models/trained-glm4-moe --out benchmarks/results/accuracy_glm4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lynx_sglang import model_routing
from lynx_sglang.model_routing import BlockRouter
from lynx_sglang.runtime.selection import reference
from lynx_sglang.runtime.selection.config import (
    Policy, RankAwareLynxPolicy, RouterSpec, make_policy, needs_similarity, policy_params,
)
from lynx_sglang.corpus import DOMAINS, HELDOUT, read_jsonl
from lynx_sglang.runtime.expert_parallel import ExpertPlacement, home_rank, step_traffic
from lynx_sglang.runtime.expert_parallel.accounting import visited_ranks
from lynx_sglang.runtime.expert_parallel.rank_aware import (
    RankAwareSelector,
    finish_rank_aware,
    plan_rank_aware,
    refill_stays_near,
    weak_rank_drops,
)
from lynx_sglang.runtime.selection.selector import ExpertSelector

BOOTSTRAP_REPS = 1000  # paired bootstrap replicates (resampling sequences)
BOOTSTRAP_LEVEL = 0.95
RANDOM = "random"  # the control: random experts, matched in count
RANK_DROP = "random-rank-drop"  # the control of lynx_ep's rank drops: random visits, matched in count
ACTIVATION_BYTES = 2  # expert parallelism: hidden rows travel in bf16


# ----------------------------------------------------------------------------- data


@dataclass
class EvalBatch:
    """B independent windows of held-out tokens; ``domain`` is one domain or ``mixed``."""

    domain: str
    tokens: torch.Tensor  # [B, length] int64


def domain_streams(tokenizer, heldout: Path = HELDOUT) -> Dict[str, torch.Tensor]:
    """Held-out documents of every domain, tokenised and concatenated (end-of-text between)."""
    from lynx_sglang.train_model import token_streams

    return token_streams(read_jsonl(heldout), tokenizer)


def make_batches(
    streams: Dict[str, torch.Tensor],
    batch_size: int,
    batches_per_kind: int,
    length: int,
    seed: int = 0,
    kinds: Sequence[str] = (*DOMAINS, "mixed"),
) -> List[EvalBatch]:
    """Deterministic batches of independent windows: per domain, and mixed across domains.

    Windows start at random offsets of their domain's held-out stream, so rows
    of one batch are unrelated positions of (usually) different files.
    """
    gen = torch.Generator().manual_seed(seed)
    names = [d for d in DOMAINS if d in streams]
    out = []
    for kind in kinds:
        if kind != "mixed" and kind not in streams:
            continue
        for _ in range(batches_per_kind):
            rows = []
            for r in range(batch_size):
                s = streams[names[r % len(names)] if kind == "mixed" else kind]
                start = int(torch.randint(0, s.numel() - length, (1,), generator=gen))
                rows.append(s[start : start + length])
            out.append(EvalBatch(kind, torch.stack(rows)))
    return out


# ----------------------------------------------------------------------------- model patch


def moe_blocks(model) -> List[torch.nn.Module]:
    """The model's sparse MoE blocks, in layer order (Qwen3-MoE and glm4_moe families only)."""
    blocks = model_routing.moe_blocks(model)
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no {' or '.join(model_routing.FAMILY_BLOCKS)}: the in-process harness "
            "supports the Qwen3-MoE family and glm4_moe; measure other models through the server path"
        )
    return blocks


def model_shape(model) -> Tuple[int, int]:
    """``(num_experts, top_k)`` of the model's routed experts (from its MoE blocks' routers)."""
    r = model_routing.block_router(moe_blocks(model)[0])
    return r.num_experts, r.top_k


def moe_layer_ids(model) -> List[int]:
    """Decoder layer index of every MoE block, in block order (SGLang's ``layer_id``; SERE's file keys)."""
    blocks = {id(b): i for i, b in enumerate(moe_blocks(model))}
    out = [None] * len(blocks)
    for name, mod in model.named_modules():
        if id(mod) in blocks:
            digits = [p for p in name.split(".") if p.isdigit()]
            out[blocks[id(mod)]] = int(digits[-1]) if digits else blocks[id(mod)]
    return out


PEER_NAMES = ("lynx_paper", "xshare", "sere")


def is_peer(policy) -> bool:
    """A peer rule (``peers``: lynx_paper, xshare, sere), not one of ours."""
    return getattr(policy, "name", None) in PEER_NAMES


def _distinct(ids: torch.Tensor, num_experts: int) -> int:
    ids = ids[ids >= 0]
    return int(torch.bincount(ids.reshape(-1), minlength=num_experts).gt(0).sum())


@dataclass(frozen=True)
class RankDropControl:
    """The rank-drop control of a ``lynx_ep`` policy (see the module docstring)."""

    policy: RankAwareLynxPolicy


def _visits(drops: torch.Tensor, pick_rank: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """[T, N] bool: the (row, rank) visits that ``drops`` ([T, k] bool) frees picks on."""
    return visited_ranks(torch.where(drops, pick_rank, -1), num_ranks)


def random_rank_drops(plan, gen: torch.Generator) -> Tuple[torch.Tensor, int, int]:
    """The control's stage c: (dropped [T, k] bool, visits lynx_ep drops, visits the control drops).

    Candidates are every (row, remote rank) visit through surviving picks,
    strong or weak, taken in a random order; a visit is dropped while the row
    passes lynx_ep's refill check (``RankAwarePlan.refillable``) with it, until
    as many are dropped as ``weak_rank_drops`` (after the same check) drops on
    this input.
    """
    N = plan.rank_mask.shape[1]
    target = int(_visits(plan.refillable(weak_rank_drops(plan)), plan.pick_rank, N).sum())
    droppable = plan.droppable
    pairs = _visits(droppable, plan.pick_rank, N).nonzero().tolist()
    dropped = torch.zeros_like(droppable)
    done = 0
    for i in torch.randperm(len(pairs), generator=gen).tolist():
        if done == target:
            break
        t, r = pairs[i]
        row = slice(t, t + 1)
        trial = dropped[row] | (droppable[row] & (plan.pick_rank[row] == r))
        if refill_stays_near(~plan.survive[row] | trial, plan.pick_rank[row], plan.home[row],
                             plan.candidates[row], plan.rank_mask).item():
            dropped[row] = trial
            done += 1
    return dropped, target, done


class SelectionPatch:
    """Rewrites the top-k of decode rows on every MoE block of a transformers model.

    ``rule`` is a policy (run through ``ExpertSelector``, as in the server),
    ``RANDOM`` (the control, which needs ``random_counts`` from a matched run),
    a ``RankDropControl`` (needs ``ep``),
    or None (selection off: the patched forward then equals the stock one);
    ``layers`` restricts it to those MoE layers (as ``--lynx-layers`` does).
    Rows at sequence positions >= ``decode_start`` of each forward call are
    decode rows; a decode step's batch is one position across all sequences.
    ``ep``: number of expert-parallel ranks (contiguous placement, rows owned
    as ``home_rank``); then ``lynx_ep`` gets the rank mask and the rows' homes,
    and every decode step's traffic is recorded in ``traffic``.
    A peer rule (``peers``: lynx_paper, xshare, sere; ``make_policy``) runs through
    ``ExpertSelector`` like ours; ``similarity`` ([E, E] per MoE block, in block order) is
    SERE's plan-time input.
    """

    def __init__(self, model, rule, seed: int = 0, layers: Optional[Sequence[int]] = None,
                 ep: Optional[int] = None, similarity: Optional[Sequence[torch.Tensor]] = None):
        self.blocks = moe_blocks(model)
        # Each layer's router as the model runs it: RouterSpec (softmax, or sigmoid with the layer's
        # correction bias), and how the block combines routed experts (+ shared expert).
        self.routers: List[BlockRouter] = [model_routing.block_router(b) for b in self.blocks]
        self.layers = None if layers is None else set(layers)  # None: every MoE layer
        cfg = model.config
        self.router: RouterSpec = self.routers[0].spec  # the same shape and semantics on every layer
        self.rule = rule
        self.decode_start = 0
        self.selectors: Dict[int, ExpertSelector] = {}
        self.counts: List[Tuple[int, int, int]] = []  # (layer, experts_before, experts_after) per decode step
        self.rows = [0, 0]  # decode rows whose top-k changed, decode rows
        self.placement = None if ep is None else ExpertPlacement.contiguous(self.router.num_experts, ep)
        self.hidden_size = cfg.hidden_size
        self.traffic: List[Tuple[int, int, int]] = []  # ep: (layer, all-to-all bytes, busiest rank's experts)
        self.random_counts: Optional[List[int]] = None  # experts to keep, consumed in call order
        self.rank_drops = [0, 0]  # rank-drop control: visits lynx_ep would drop, visits dropped
        self._gen = torch.Generator().manual_seed(seed)
        self._saved = []
        self.similarity = similarity

    def __enter__(self):
        for layer, block in enumerate(self.blocks):
            self._saved.append((block, block.forward))
            block.forward = types.MethodType(self._make_forward(layer), block)
        return self

    def __exit__(self, *exc):
        for block, fwd in self._saved:
            block.forward = fwd
        self._saved.clear()

    def _selector(self, layer: int, rows: int, logits: torch.Tensor, ids: torch.Tensor) -> ExpertSelector:
        sel = self.selectors.get(layer)
        if sel is None or sel.max_tokens < rows:
            rank_aware = isinstance(self.rule, RankAwareLynxPolicy) and self.placement is not None
            common = (self.router, self.rule, max(rows, 1), logits.device, ids.dtype, torch.float32)
            bias = self.routers[layer].correction_bias
            sim = None
            if needs_similarity(self.rule):  # sere, lynx with refill_similarity: the layer's matrix at plan time
                if self.similarity is None:
                    raise ValueError(f"{self.rule.name} needs the similarity matrices (sere_calibrate)")
                sim = self.similarity[layer]
            if is_peer(self.rule) or sim is not None:  # torch backend, like the server's CPU path
                sel = ExpertSelector(*common, correction_bias=bias, backend="torch", similarity=sim)
                self.selectors[layer] = sel
                return sel
            sel = (RankAwareSelector(*common, correction_bias=bias, backend="torch",
                                     rank_mask=self.placement.logical_on_rank())
                   if rank_aware else ExpertSelector(*common, correction_bias=bias, backend="torch"))
            self.selectors[layer] = sel
        return sel

    def _select(self, layer: int, logits, ids, weights):
        """One decode step of one layer: [B, E] logits, [B, k] ids/weights."""
        E = self.router.num_experts
        before = _distinct(ids, E)
        home = None if self.placement is None else home_rank(ids.shape[0], self.placement.num_ranks)
        if self.rule is None or (self.layers is not None and layer not in self.layers):
            new_ids, new_w = ids, weights
        elif self.rule == RANDOM:
            new_ids, new_w = self._random_keep(layer, logits, ids, weights)
        elif isinstance(self.rule, RankDropControl):
            new_ids, new_w = self._random_rank_drop(layer, logits, ids, weights, home)
        else:
            sel = self._selector(layer, ids.shape[0], logits, ids)
            ranks = {"home": home} if isinstance(sel, RankAwareSelector) else {}
            new_ids, new_w = sel.run(logits.float().contiguous(), ids.contiguous(), weights.float().contiguous(),
                                     **ranks)
            new_ids, new_w = new_ids.clone(), new_w.clone().to(weights.dtype)
        self.counts.append((layer, before, _distinct(new_ids, E)))
        self.rows[0] += int((new_ids != ids).any(dim=1).sum())
        self.rows[1] += ids.shape[0]
        if self.placement is not None:
            t = step_traffic(new_ids, self.placement, home, self.hidden_size, ACTIVATION_BYTES)
            self.traffic.append((layer, int(t.dispatch_bytes + t.combine_bytes), int(t.rank_experts.max())))
        return new_ids, new_w

    def _random_keep(self, layer, logits, ids, weights):
        if not self.random_counts:
            raise RuntimeError("the random-keep control needs the expert counts of a matched run")
        m = self.random_counts.pop(0)
        E = self.router.num_experts
        picked = torch.bincount(ids.reshape(-1), minlength=E).gt(0).nonzero().flatten()
        chosen = picked[torch.randperm(picked.numel(), generator=self._gen)[:m]]
        keep = torch.zeros(E, dtype=torch.bool)
        keep[chosen] = True
        sel = reference.selection_score(self.router, logits, self.routers[layer].correction_bias)
        row_ok = torch.ones(ids.shape[0], dtype=torch.bool)
        new_ids, new_w, _ = reference.reroute(self.router, logits, ids, weights.float(), sel, row_ok, keep)
        return new_ids, new_w.to(weights.dtype)

    def _random_rank_drop(self, layer, logits, ids, weights, home):
        if self.placement is None:
            raise ValueError("the rank-drop control needs expert parallelism (ep)")
        plan = plan_rank_aware(self.rule.policy, self.router, logits.float(), ids, weights.float(),
                               self.placement.logical_on_rank(), home=home,
                               correction_bias=self.routers[layer].correction_bias)
        dropped, target, done = random_rank_drops(plan, self._gen)
        self.rank_drops[0] += target
        self.rank_drops[1] += done
        new_ids, new_w, _, _ = finish_rank_aware(plan, dropped)
        return new_ids, new_w.to(weights.dtype)

    def _make_forward(self, layer: int) -> Callable:
        patch = self
        router = self.routers[layer]

        def forward(block, hidden_states: torch.Tensor) -> torch.Tensor:
            # The block's own router and combine (model_routing): with selection off this is the stock forward.
            b, s, d = hidden_states.shape
            logits, weights, ids = router.route(hidden_states)
            if patch.decode_start < s:
                k = ids.shape[-1]
                lg, i3, w3 = logits.view(b, s, -1), ids.view(b, s, k).clone(), weights.view(b, s, k).clone()
                for t in range(patch.decode_start, s):
                    i3[:, t], w3[:, t] = patch._select(layer, lg[:, t], i3[:, t], w3[:, t])
                ids, weights = i3.view(-1, k), w3.view(-1, k)
                # transformers' experts take index E as "no expert" (an empty slot: weight 0).
                ids = torch.where(ids < 0, torch.full_like(ids, patch.router.num_experts), ids)
            return router.moe_output(hidden_states, ids, weights)

        return forward


# ----------------------------------------------------------------------------- measurement


@dataclass
class BatchResult:
    """One batch under one rule, against selection off."""

    domain: str
    batch_size: int
    tokens: int  # scored positions
    correct_off: int
    correct: int
    loglik_off: float  # sums over scored positions
    loglik: float
    kl: float
    top1_agree: int
    greedy_agree: float  # mean fraction of the greedy continuation before the first difference
    experts_before: List[float]  # mean per decode step, per layer
    experts_after: List[float]
    rows_changed: float = 0.0  # fraction of decode rows (teacher-forced, all layers) whose top-k changed
    # ep only: mean per decode step, per layer, of all-to-all bytes and of the busiest rank's distinct experts
    a2a_before: List[float] = field(default_factory=list)
    a2a_after: List[float] = field(default_factory=list)
    busiest_before: List[float] = field(default_factory=list)
    busiest_after: List[float] = field(default_factory=list)
    rank_drops: Tuple[int, int] = (0, 0)  # rank-drop control: visits lynx_ep would drop, visits it dropped
    # Per sequence (row of the batch, in row order): sums over its scored positions (``SEQ_FIELDS``).
    per_sequence: Dict[str, list] = field(default_factory=dict)


# Per-sequence sums kept with every result, so paired intervals can be recomputed and pooled:
# scored positions, correct next tokens with selection off / under the rule, KL(off || rule)
# summed over positions, positions whose top-1 equals off's, log-likelihood change summed.
SEQ_FIELDS = ("tokens", "correct_off", "correct", "kl", "top1", "dloglik")


def concat_sequences(parts: Sequence[Dict[str, list]]) -> Dict[str, list]:
    """The per-sequence sums of several batches (or runs), one after the other."""
    out: Dict[str, list] = {f: [] for f in SEQ_FIELDS}
    for part in parts:
        for f in SEQ_FIELDS:
            out[f].extend(part.get(f, []))
    return out


def bootstrap_indices(n: int, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> torch.Tensor:
    """[reps, n] int64: sequences drawn with replacement; deterministic in (n, reps, seed), so
    every rule measured on the same n sequences gets the same resamples (paired across rules)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (reps, n), generator=gen)


def bootstrap_replicates(per_sequence: Dict[str, list], reps: int = BOOTSTRAP_REPS, seed: int = 0,
                         index: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Paired bootstrap over sequences: [reps] float64 replicates of the pooled statistics.

    Resamples whole sequences (tokens of one sequence are correlated), the same sequences for
    the rule and for selection off (the difference is paired). Statistics: ``delta_points``
    (next-token accuracy change, points), ``kl`` (nats per token), ``top1`` (agreement).
    """
    n = len(per_sequence["tokens"])
    if index is None:
        index = bootstrap_indices(n, reps, seed)
    col = {f: torch.tensor(per_sequence[f], dtype=torch.float64)[index].sum(dim=1) for f in SEQ_FIELDS}
    tokens = col["tokens"].clamp(min=1)
    return {"delta_points": 100 * (col["correct"] - col["correct_off"]) / tokens,
            "kl": col["kl"] / tokens, "top1": col["top1"] / tokens}


def percentile_interval(replicates: torch.Tensor, level: float = BOOTSTRAP_LEVEL) -> Tuple[float, float]:
    """The percentile interval of bootstrap replicates (e.g. 2.5 % and 97.5 % at level 0.95)."""
    lo, hi = torch.quantile(replicates.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def sequence_intervals(per_sequence: Dict[str, list], reps: int = BOOTSTRAP_REPS, seed: int = 0) -> dict:
    """``delta_points_ci`` and ``kl_ci``: 95 % paired-bootstrap percentile intervals (Summary fields)."""
    if not per_sequence or len(per_sequence.get("tokens", [])) < 2:
        return {"delta_points_ci": None, "kl_ci": None}
    r = bootstrap_replicates(per_sequence, reps, seed)
    d, k = percentile_interval(r["delta_points"]), percentile_interval(r["kl"])
    return {"delta_points_ci": [round(d[0], 3), round(d[1], 3)], "kl_ci": [round(k[0], 6), round(k[1], 6)]}


def _per_layer_means(counts, layers: int) -> Tuple[List[float], List[float]]:
    before = [[] for _ in range(layers)]
    after = [[] for _ in range(layers)]
    for layer, b, a in counts:
        before[layer].append(b)
        after[layer].append(a)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return [mean(x) for x in before], [mean(x) for x in after]


@torch.no_grad()
def _teacher_forced(model, patch: SelectionPatch, tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    patch.decode_start = prefix
    return model(input_ids=tokens[:, :-1]).logits[:, prefix:].float()


@torch.no_grad()
def _greedy(model, patch: SelectionPatch, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decode loop with a KV cache: the prompt is prefill, every new token a decode step."""
    patch.decode_start = prompt.shape[1]  # prefill: no row is a decode row
    out = model(input_ids=prompt, use_cache=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    generated = [nxt]
    patch.decode_start = 0
    for _ in range(steps - 1):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(nxt)
    return torch.cat(generated, dim=1)


def _common_prefix_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    same = (a == b).long().cumprod(dim=1)
    return float(same.sum(dim=1).float().mean() / a.shape[1])


@dataclass
class OffReference:
    """What selection-off computes for one batch (shared by every rule)."""

    logits: torch.Tensor
    greedy: torch.Tensor
    counts: list
    traffic: list  # with ep: SelectionPatch.traffic of the teacher-forced pass


def off_reference(model, batch: EvalBatch, prefix: int, greedy_tokens: int, ep: Optional[int] = None) -> OffReference:
    """Run one batch with selection off (through the patch, which must then be the identity)."""
    with SelectionPatch(model, None, ep=ep) as patch:
        logits = _teacher_forced(model, patch, batch.tokens, prefix)
        counts, traffic = list(patch.counts), list(patch.traffic)
        greedy = _greedy(model, patch, batch.tokens[:, :prefix], greedy_tokens) if greedy_tokens else None
    return OffReference(logits, greedy, counts, traffic)


def measure(
    model,
    batch: EvalBatch,
    rule,
    off: OffReference,
    prefix: int,
    greedy_tokens: int,
    random_counts: Optional[Tuple[List[int], List[int]]] = None,
    seed: int = 0,
    layers: Optional[Sequence[int]] = None,
    ep: Optional[int] = None,
    similarity: Optional[Sequence[torch.Tensor]] = None,
) -> Tuple[BatchResult, Tuple[List[int], List[int]]]:
    """One batch under ``rule`` (``off`` must have been run with the same ``ep``).

    Returns the result and the experts kept at every decode step of the
    teacher-forced pass and of the greedy loop (in call order), which is what
    the random-keep control matched to this rule consumes as ``random_counts``.
    """
    num_layers = len(moe_blocks(model))
    with SelectionPatch(model, rule, seed=seed, layers=layers, ep=ep, similarity=similarity) as patch:
        if random_counts is not None:
            patch.random_counts = list(random_counts[0])
        logits = _teacher_forced(model, patch, batch.tokens, prefix)
        counts, traffic, (changed, rows) = list(patch.counts), list(patch.traffic), patch.rows
        patch.counts.clear()
        if random_counts is not None:
            patch.random_counts = list(random_counts[1])
        greedy = _greedy(model, patch, batch.tokens[:, :prefix], greedy_tokens) if greedy_tokens else None
        greedy_counts = list(patch.counts)
    target = batch.tokens[:, prefix + 1 :]
    logp_off = F.log_softmax(off.logits, dim=-1)
    logp = F.log_softmax(logits, dim=-1)
    kl_pos = (logp_off.exp() * (logp_off - logp)).sum(-1)  # [B, positions]
    kl = float(kl_pos.sum())
    hit_off = off.logits.argmax(-1) == target
    hit = logits.argmax(-1) == target
    same_top1 = logits.argmax(-1) == off.logits.argmax(-1)
    dll = (logp.gather(-1, target[..., None]) - logp_off.gather(-1, target[..., None]))[..., 0]
    per_sequence = {
        "tokens": [target.shape[1]] * target.shape[0],
        "correct_off": hit_off.sum(1).tolist(),
        "correct": hit.sum(1).tolist(),
        "kl": [round(x, 7) for x in kl_pos.double().sum(1).tolist()],
        "top1": same_top1.sum(1).tolist(),
        "dloglik": [round(x, 5) for x in dll.double().sum(1).tolist()],
    }
    # Reductions are against what the batch touches with selection off.
    before, _ = _per_layer_means(off.counts, num_layers)
    _, after = _per_layer_means(counts, num_layers)
    a2a_before, busiest_before = _per_layer_means(off.traffic, num_layers) if ep else ([], [])
    a2a_after, busiest_after = _per_layer_means(traffic, num_layers) if ep else ([], [])
    result = BatchResult(
        domain=batch.domain,
        batch_size=batch.tokens.shape[0],
        tokens=target.numel(),
        correct_off=int((off.logits.argmax(-1) == target).sum()),
        correct=int((logits.argmax(-1) == target).sum()),
        loglik_off=float(logp_off.gather(-1, target[..., None]).sum()),
        loglik=float(logp.gather(-1, target[..., None]).sum()),
        kl=kl,
        top1_agree=int((logits.argmax(-1) == off.logits.argmax(-1)).sum()),
        greedy_agree=_common_prefix_fraction(greedy, off.greedy) if greedy_tokens else float("nan"),
        experts_before=before,
        experts_after=after,
        rows_changed=changed / max(1, rows),
        a2a_before=a2a_before,
        a2a_after=a2a_after,
        busiest_before=busiest_before,
        busiest_after=busiest_after,
        rank_drops=tuple(patch.rank_drops),
        per_sequence=per_sequence,
    )
    return result, ([a for _, _, a in counts], [a for _, _, a in greedy_counts])


@dataclass
class Summary:
    """Many batches of one (rule, batch kind, batch size)."""

    rule: dict
    kind: str
    batch_size: int
    tokens: int
    accuracy_off: float
    accuracy: float
    delta_points: float
    delta_loglik: float
    kl: float
    top1_agreement: float
    greedy_agreement: float
    experts_before: float  # mean distinct experts per decode step, over layers
    experts_after: float
    reduction: float  # 1 - after / before
    per_layer_before: List[float] = field(default_factory=list)
    per_layer_after: List[float] = field(default_factory=list)
    rows_changed: float = 0.0  # fraction of decode rows whose top-k the rule changed
    # ep only (else None): all-to-all bytes per decode step (summed over MoE layers) and the
    # busiest rank's distinct experts (mean over layers), off -> rule
    a2a_bytes_before: Optional[float] = None
    a2a_bytes_after: Optional[float] = None
    a2a_reduction: Optional[float] = None  # 1 - after / before
    busiest_experts_before: Optional[float] = None
    busiest_experts_after: Optional[float] = None
    # rank-drop control only: visits it dropped / visits lynx_ep drops on the same inputs
    rank_drops_matched: Optional[float] = None
    # Paired bootstrap over sequences (BOOTSTRAP_REPS replicates, seed 0): 95 % percentile intervals
    # of delta_points (points) and kl (nats per token); per_sequence: the sums they come from
    # (SEQ_FIELDS), so intervals can be recomputed and pooled.
    sequences: int = 0
    delta_points_ci: Optional[List[float]] = None
    kl_ci: Optional[List[float]] = None
    per_sequence: Optional[Dict[str, list]] = None


def summarise(rule: dict, kind: str, results: List[BatchResult]) -> Summary:
    """Pool batch results (token-weighted; per-layer expert counts averaged over batches)."""
    n = sum(r.tokens for r in results)
    layers = len(results[0].experts_before)
    mean = lambda attr: [sum(getattr(r, attr)[i] for r in results) / len(results) for i in range(layers)]  # noqa: E731
    pl_before, pl_after = mean("experts_before"), mean("experts_after")
    before, after = sum(pl_before) / layers, sum(pl_after) / layers
    acc_off = sum(r.correct_off for r in results) / n
    acc = sum(r.correct for r in results) / n
    ep = {}
    if results[0].a2a_before:
        b_before, b_after = sum(mean("a2a_before")), sum(mean("a2a_after"))
        ep = dict(
            a2a_bytes_before=round(b_before, 1),
            a2a_bytes_after=round(b_after, 1),
            a2a_reduction=round(1 - b_after / b_before, 4) if b_before else 0.0,
            busiest_experts_before=round(sum(mean("busiest_before")) / layers, 3),
            busiest_experts_after=round(sum(mean("busiest_after")) / layers, 3),
        )
    want, got = (sum(r.rank_drops[i] for r in results) for i in (0, 1))
    if want:
        ep["rank_drops_matched"] = round(got / want, 4)
    seqs = concat_sequences([r.per_sequence for r in results]) if all(r.per_sequence for r in results) else None
    if seqs is not None:
        ep.update(sequences=len(seqs["tokens"]), per_sequence=seqs, **sequence_intervals(seqs))
    return Summary(
        rule=rule,
        kind=kind,
        batch_size=results[0].batch_size,
        tokens=n,
        accuracy_off=round(acc_off, 5),
        accuracy=round(acc, 5),
        delta_points=round(100 * (acc - acc_off), 3),
        delta_loglik=round(sum(r.loglik - r.loglik_off for r in results) / n, 5),
        kl=round(sum(r.kl for r in results) / n, 6),
        top1_agreement=round(sum(r.top1_agree for r in results) / n, 5),
        greedy_agreement=round(sum(r.greedy_agree for r in results) / len(results), 4),
        experts_before=round(before, 3),
        experts_after=round(after, 3),
        reduction=round(1 - after / before, 4) if before else 0.0,
        per_layer_before=[round(x, 3) for x in pl_before],
        per_layer_after=[round(x, 3) for x in pl_after],
        rows_changed=round(sum(r.rows_changed for r in results) / len(results), 4),
        **ep,
    )


# Summary fields that pooling recomputes from the pooled fields instead of averaging.
_DERIVED = {"delta_points", "reduction", "a2a_reduction", "sequences", "delta_points_ci", "kl_ci", "per_sequence"}


def pool_summaries(runs: Sequence[Sequence[Summary]]) -> List[Summary]:
    """Pool the summaries of separate runs (e.g. seeds) per (rule label, kind, batch size).

    Every averaged field is weighted by scored tokens (runs of one batch size
    score the same tokens per batch, so this is also the batch weighting); the
    reductions and the accuracy change are recomputed from the pooled values.
    Keys present in only some runs are pooled over those.
    """
    groups: Dict[tuple, List[Summary]] = {}
    for run in runs:
        for s in run:
            groups.setdefault((s.rule["label"], s.kind, s.batch_size), []).append(s)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        n = sum(s.tokens for s in group)

        def avg(name, digits):
            have = [s for s in group if getattr(s, name) is not None]
            if not have:
                return None
            w = sum(s.tokens for s in have)
            first = getattr(have[0], name)
            if isinstance(first, list):
                return [round(sum(getattr(s, name)[i] * s.tokens for s in have) / w, digits) for i in range(len(first))]
            return round(sum(getattr(s, name) * s.tokens for s in have) / w, digits)

        digits = {"accuracy_off": 5, "accuracy": 5, "delta_loglik": 5, "kl": 6, "top1_agreement": 5,
                  "greedy_agreement": 4, "rows_changed": 4, "a2a_bytes_before": 1, "a2a_bytes_after": 1,
                  "rank_drops_matched": 4}
        fields = {f.name: avg(f.name, digits.get(f.name, 3)) for f in dataclasses.fields(Summary)
                  if f.name not in {"rule", "kind", "batch_size", "tokens"} | _DERIVED}
        pooled = Summary(rule=group[0].rule, kind=group[0].kind, batch_size=group[0].batch_size, tokens=n,
                         delta_points=round(100 * (fields["accuracy"] - fields["accuracy_off"]), 3),
                         reduction=round(1 - fields["experts_after"] / fields["experts_before"], 4)
                         if fields["experts_before"] else 0.0, **fields)
        if pooled.a2a_bytes_before:
            pooled.a2a_reduction = round(1 - pooled.a2a_bytes_after / pooled.a2a_bytes_before, 4)
        if all(s.per_sequence for s in group):  # sequences of separate runs are independent: concatenate
            seqs = concat_sequences([s.per_sequence for s in group])
            pooled.per_sequence, pooled.sequences = seqs, len(seqs["tokens"])
            for key, value in sequence_intervals(seqs).items():
                setattr(pooled, key, value)
        out.append(pooled)
    return out


# ----------------------------------------------------------------------------- sweep


@dataclass
class Rule:
    """One point of the sweep: a policy, or the random control matched to another rule's label."""

    label: str
    policy: Optional[Policy] = None
    matched_to: Optional[str] = None
    control: str = RANDOM  # with matched_to: RANDOM (experts kept) or RANK_DROP (lynx_ep's rank drops)
    layers: Optional[Tuple[int, ...]] = None  # MoE layers it applies to (None: all)
    ep: Optional[int] = None  # expert-parallel ranks (contiguous placement): lynx_ep's input, traffic recorded

    def describe(self) -> dict:
        """The rule as recorded in result files."""
        extra = {} if self.layers is None else {"layers": list(self.layers)}
        if self.ep is not None:
            extra["ep"] = self.ep
        if self.matched_to is not None:
            return {"label": self.label, "name": self.control, "matched_to": self.matched_to, **extra}
        return {"label": self.label, **policy_params(self.policy), **extra}


def default_rules(num_experts: int, top_k: int) -> List[Rule]:
    """The sweep: each policy over its main parameter, and random keeps matched to lynx.

    lynx's main parameter is ``max_moved_weight`` (at the default alpha); two
    uncapped points (``max_moved_weight = 1``: the window of ``keep_level /
    alpha`` logits alone) show what the cap changes.
    """
    rules = [Rule("off", make_policy("off"))]
    lynx = [Rule(f"lynx moved<={d:g}", make_policy("lynx", max_moved_weight=d)) for d in (0.2, 0.3, 0.4, 0.5, 1.0)]
    uncapped = [Rule(f"lynx alpha={a:g} uncapped", make_policy("lynx", alpha=a, max_moved_weight=1.0)) for a in (1.0, 3.0)]
    rules += lynx + uncapped
    for k0 in range(1, top_k):
        rules.append(Rule(f"oea k0={k0}", make_policy("oea", k0=k0)))
    for frac in (0.375, 0.5, 0.625, 0.75):
        m = round(frac * num_experts)
        rules.append(Rule(f"budget {m}", make_policy("budget", max_experts=m)))
    rules += [Rule(f"random~{r.label}", matched_to=r.label) for r in lynx]
    return rules


def ep_rules(ep: int) -> List[Rule]:
    """Expert parallelism over ``ep`` ranks: off, lynx, lynx_ep (defaults, no slack, caps 0.4 and 0.2), controls.

    Both controls are matched to lynx_ep (defaults): the random one in experts
    kept, the rank-drop one in rank visits dropped.
    """
    rules = [
        Rule("off", make_policy("off"), ep=ep),
        Rule("lynx", make_policy("lynx"), ep=ep),
        Rule("lynx_ep", make_policy("lynx_ep"), ep=ep),
        Rule("lynx_ep slack=0", make_policy("lynx_ep", rank_slack=0.0), ep=ep),
    ]
    # The default cap is 0.3; 0.4 (lynx's default) and 0.2 bracket it.
    rules += [Rule(f"lynx_ep moved<={d:g}", make_policy("lynx_ep", max_moved_weight=d), ep=ep) for d in (0.4, 0.2)]
    return rules + [Rule("random~lynx_ep", matched_to="lynx_ep", ep=ep),
                    Rule("rank-drop~lynx_ep", matched_to="lynx_ep", control=RANK_DROP, ep=ep)]


def sweep(
    model,
    streams: Dict[str, torch.Tensor],
    rules: List[Rule],
    batch_sizes: Sequence[int] = (16, 32, 64),
    batches_per_kind: int = 2,
    prefix: int = 32,
    decode_len: int = 64,
    greedy_tokens: int = 16,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> List[Summary]:
    """Run every rule on the same batches; summaries per (rule, kind, batch size).

    Kinds: every domain alone, ``one-domain`` (all single-domain batches pooled)
    and ``mixed``. Rules that are random controls must come after the rule they
    are matched to.
    """
    labels = [r.label for r in rules]
    for r in rules:
        if r.matched_to is not None and (r.matched_to not in labels or labels.index(r.matched_to) > labels.index(r.label)):
            raise ValueError(f"control {r.label!r} must follow the rule it is matched to ({r.matched_to!r})")
        if r.matched_to is not None and r.control == RANK_DROP:
            target = rules[labels.index(r.matched_to)]
            if not isinstance(target.policy, RankAwareLynxPolicy) or r.ep is None or target.ep != r.ep:
                raise ValueError(f"rank-drop control {r.label!r} needs a lynx_ep rule with the same ep to match")
        elif r.matched_to is not None and r.control != RANDOM:
            raise ValueError(f"unknown control {r.control!r} in rule {r.label!r}")
    summaries: List[Summary] = []
    for B in batch_sizes:
        t0 = time.time()
        batches = make_batches(streams, B, batches_per_kind, prefix + decode_len + 1, seed=seed)
        results: Dict[str, List[BatchResult]] = {r.label: [] for r in rules}
        eps = dict.fromkeys(r.ep for r in rules)  # selection off runs once per batch and expert-parallel size
        for bi, batch in enumerate(batches):
            offs = {ep: off_reference(model, batch, prefix, greedy_tokens, ep) for ep in eps}
            kept: Dict[str, Tuple[List[int], List[int]]] = {}
            for r in rules:
                if r.matched_to is not None and r.control == RANK_DROP:
                    control = RankDropControl(rules[labels.index(r.matched_to)].policy)
                    res, _ = measure(model, batch, control, offs[r.ep], prefix, greedy_tokens, seed=seed + bi,
                                     layers=r.layers, ep=r.ep)
                elif r.matched_to is not None:
                    res, _ = measure(model, batch, RANDOM, offs[r.ep], prefix, greedy_tokens, kept[r.matched_to],
                                     seed=seed + bi, layers=r.layers, ep=r.ep)
                else:
                    res, kept[r.label] = measure(model, batch, r.policy, offs[r.ep], prefix, greedy_tokens,
                                                 layers=r.layers, ep=r.ep)
                results[r.label].append(res)
        for r in rules:
            rs = results[r.label]
            kinds = {"one-domain": [x for x in rs if x.domain != "mixed"]}
            for x in rs:
                kinds.setdefault(x.domain, []).append(x)
            for kind, group in kinds.items():
                if group:
                    summaries.append(summarise(r.describe(), kind, group))
        log(f"B={B}: {len(batches)} batches x {len(rules)} rules in {time.time() - t0:.0f} s")
    return summaries


def plot(summaries: List[Summary], path: Path, title: str) -> None:
    """Accuracy change vs distinct experts kept, one curve per policy; panels per batch kind and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({s.batch_size for s in summaries})
    kinds = ["one-domain", "mixed"]
    fig, axes = plt.subplots(len(kinds), len(sizes), figsize=(4.2 * len(sizes), 3.6 * len(kinds)), squeeze=False)
    styles = {"lynx": ("C0", "o"), "lynx uncapped": ("C4", "D"), "oea": ("C1", "s"), "budget": ("C2", "^"),
              RANDOM: ("C3", "x"), "off": ("k", "*")}

    def series(s: Summary) -> str:
        if s.rule["name"] == "lynx" and "uncapped" in s.rule["label"]:
            return "lynx uncapped"
        return s.rule["name"]

    for i, kind in enumerate(kinds):
        for j, B in enumerate(sizes):
            ax = axes[i][j]
            pts = [s for s in summaries if s.kind == kind and s.batch_size == B]
            for name, (color, marker) in styles.items():
                sel = sorted((s for s in pts if series(s) == name), key=lambda s: s.experts_after)
                if sel:
                    ax.plot([s.experts_after for s in sel], [s.delta_points for s in sel], marker=marker,
                            color=color, label=name, linestyle="-" if name != "off" else "none")
            if pts:
                ax.axvline(pts[0].experts_before, color="grey", lw=0.6, ls=":")
            _style_panel(ax, f"{kind}, B={B}", "distinct experts per decode step (mean over layers)")
    _save_figure(fig, axes, title, path)


def _style_panel(ax, title: str, xlabel: str) -> None:
    """Zero line, the 0.5-point budget line and the labels every accuracy panel carries."""
    ax.axhline(0, color="grey", lw=0.6)
    ax.axhline(-0.5, color="grey", lw=0.6, ls="--")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("next-token accuracy change (points)", fontsize=8)
    ax.tick_params(labelsize=7)


def _save_figure(fig, axes, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ep(summaries: List[Summary], path: Path, title: str) -> None:
    """Expert parallelism: accuracy change vs all-to-all bytes cut, one point per rule; panels per kind and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [s for s in summaries if s.a2a_reduction is not None]
    sizes = sorted({s.batch_size for s in summaries})
    kinds = ["one-domain", "mixed"]
    fig, axes = plt.subplots(len(kinds), len(sizes), figsize=(4.6 * len(sizes), 3.8 * len(kinds)), squeeze=False)
    labels = list(dict.fromkeys(s.rule["label"] for s in summaries))
    markers = "*osD^vxP"
    for i, kind in enumerate(kinds):
        for j, B in enumerate(sizes):
            ax = axes[i][j]
            for n, label in enumerate(labels):
                for s in summaries:
                    if s.kind == kind and s.batch_size == B and s.rule["label"] == label:
                        ax.plot(100 * s.a2a_reduction, s.delta_points, marker=markers[n % len(markers)],
                                color="k" if label == "off" else f"C{n}", linestyle="none", label=label)
            _style_panel(ax, f"{kind}, B={B}", "all-to-all bytes per decode step cut vs off (%)")
    _save_figure(fig, axes, title, path)


def _ci(ci: Optional[Sequence[float]], fmt: str) -> str:
    return "" if ci is None else f"[{ci[0]:{fmt}},{ci[1]:{fmt}}]"


def table(summaries: List[Summary], kinds=("one-domain", "mixed")) -> str:
    """A plain-text table of the summaries (one line per rule, kind and batch size)."""
    head = (f"{'rule':<22} {'kind':<10} {'B':>3} {'experts':>13} {'cut':>6} {'acc':>6} {'d pts':>7} {'95% CI':>15}"
            f" {'KL':>8} {'95% CI':>17} {'top1':>6} {'greedy':>6} {'rows':>5}")
    ep = any(s.a2a_reduction is not None for s in summaries)
    if ep:
        head += f" {'a2a KB/step':>15} {'cut':>6} {'busiest':>11}"
    lines = [head, "-" * len(head)]
    for s in summaries:
        if s.kind in kinds:
            line = (
                f"{s.rule['label']:<22} {s.kind:<10} {s.batch_size:>3} {s.experts_before:>6.2f}->{s.experts_after:<6.2f}"
                f"{100 * s.reduction:>5.1f}% {100 * s.accuracy:>6.2f} {s.delta_points:>+7.2f}"
                f" {_ci(s.delta_points_ci, '+.2f'):>15}"
                f" {s.kl:>8.5f} {_ci(s.kl_ci, '.5f'):>17} {s.top1_agreement:>6.3f} {s.greedy_agreement:>6.3f}"
                f" {s.rows_changed:>5.2f}"
            )
            if ep and s.a2a_reduction is not None:
                kb_before, kb_after = s.a2a_bytes_before / 1024, s.a2a_bytes_after / 1024
                line += (f" {kb_before:>7.0f}->{kb_after:<7.0f}{100 * s.a2a_reduction:>5.1f}%"
                         f" {s.busiest_experts_before:>5.2f}->{s.busiest_experts_after:<5.2f}")
            lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- server path


@dataclass
class ServerComparison:
    """Greedy decode of the same prompts on a selection-off server and a policy server."""

    kind: str
    batch_size: int
    sequences: int
    greedy_agreement: float  # mean fraction generated before the first differing token
    token_agreement: float  # fraction of positions with the same token
    mean_abs_logprob_delta: float  # |log p_off - log p_rule| of the shared token, over shared prefixes
    experts_before: float  # from the policy server's lynx metrics (mean over layers, per decode step)
    experts_after: float


def _generate_batch(url: str, prompts: torch.Tensor, steps: int, timeout: float) -> List[Tuple[List[int], List[float]]]:
    """B concurrent greedy requests (so the scheduler decodes them as one batch)."""
    from concurrent.futures import ThreadPoolExecutor

    from lynx_sglang.client import _post

    def one(ids):
        out = _post(
            f"{url}/generate",
            {
                "input_ids": ids,
                "sampling_params": {"temperature": 0.0, "max_new_tokens": steps, "ignore_eos": True},
                "return_logprob": True,
            },
            timeout,
        )
        pairs = out["meta_info"]["output_token_logprobs"]
        return [int(p[1]) for p in pairs], [float(p[0]) for p in pairs]

    with ThreadPoolExecutor(max_workers=prompts.shape[0]) as pool:
        return list(pool.map(one, prompts.tolist()))


def compare_servers(
    off_url: str,
    rule_url: str,
    batches: List[EvalBatch],
    prefix: int,
    steps: int,
    timeout: float = 600.0,
) -> List[ServerComparison]:
    """Send the same batches of prompts to both servers; compare their greedy continuations.

    The decode rows of a server are only what it generates, so the server path
    measures agreement with off (not held-out accuracy, which needs teacher
    forcing: the in-process path). Expert counts come from the policy server's
    Prometheus metrics (``--enable-metrics``), as differences around each kind.
    """
    from lynx_sglang.client import scrape_lynx_metrics

    def totals():
        stats = scrape_lynx_metrics(rule_url)
        steps_ = sum(s.steps for s in stats.values())
        return steps_, sum(s.experts_before for s in stats.values()), sum(s.experts_after for s in stats.values())

    by_kind: Dict[Tuple[str, int], List[EvalBatch]] = {}
    for b in batches:
        by_kind.setdefault(("one-domain" if b.domain != "mixed" else "mixed", b.tokens.shape[0]), []).append(b)
    out = []
    for (kind, B), group in by_kind.items():
        n0, before0, after0 = totals()
        seqs, agree, same, pos, dlp, shared = 0, 0.0, 0, 0, 0.0, 0
        for b in group:
            prompts = b.tokens[:, :prefix]
            off = _generate_batch(off_url, prompts, steps, timeout)
            got = _generate_batch(rule_url, prompts, steps, timeout)
            for (ids_o, lp_o), (ids_r, lp_r) in zip(off, got):
                n = 0
                while n < len(ids_o) and n < len(ids_r) and ids_o[n] == ids_r[n]:
                    n += 1
                seqs += 1
                agree += n / steps
                same += sum(a == c for a, c in zip(ids_o, ids_r))
                pos += steps
                # Within the shared prefix both servers scored the same token in the same context.
                dlp += sum(abs(lp_o[i] - lp_r[i]) for i in range(n))
                shared += n
        n1, before1, after1 = totals()
        decode_steps = max(1, n1 - n0)
        out.append(
            ServerComparison(
                kind=kind,
                batch_size=B,
                sequences=seqs,
                greedy_agreement=round(agree / seqs, 4),
                token_agreement=round(same / pos, 4),
                mean_abs_logprob_delta=round(dlp / max(1, shared), 5),
                experts_before=round((before1 - before0) / decode_steps, 3),
                experts_after=round((after1 - after0) / decode_steps, 3),
            )
        )
    return out


def load_model(path: Path):
    """A transformers Qwen3-MoE or glm4_moe model in fp32 (eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    moe_blocks(model)  # clear error for unsupported models
    return model, AutoTokenizer.from_pretrained(path)


def run_server_comparison(model_path: Path, args, rule_args: List[str]) -> List[ServerComparison]:
    """Start a selection-off server and a policy server (CPU launch script) and compare them."""
    from transformers import AutoTokenizer

    from lynx_sglang.server_process import running_server

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    streams = domain_streams(tokenizer)
    common = ("--model-path", str(model_path), "--enable-metrics", "--decode-log-interval", "1", "--moe-backend", "lynx",
              *args.server_args.split())
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    batches = [
        b for B in sizes for b in make_batches(streams, B, args.batches, args.prefix + args.greedy_tokens + 1, args.seed)
    ]
    with running_server(*common, "--lynx-policy", "off") as off, running_server(*common, *rule_args) as rule:
        return compare_servers(off.url, rule.url, batches, args.prefix, args.greedy_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, nargs="?", help="model folder (not with --pool)")
    ap.add_argument("--pool", type=Path, nargs="+", metavar="JSON",
                    help="instead of measuring: pool the summaries of these result files (separate runs, e.g. "
                    "seeds or batch sizes) into --out")
    ap.add_argument("--out", type=Path, help="result prefix: writes <out>.json and <out>.png")
    ap.add_argument("--batch-sizes", default="16,32,64")
    ap.add_argument("--batches", type=int, default=2, help="batches per kind (each domain, and mixed)")
    ap.add_argument("--prefix", type=int, default=32, help="prompt tokens (prefill) per sequence")
    ap.add_argument("--decode-len", type=int, default=64, help="teacher-forced decode steps scored per sequence")
    ap.add_argument("--greedy-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ep", type=int, default=None, metavar="N",
                    help="expert parallelism over N ranks instead of the default sweep: off, lynx, lynx_ep variants "
                    "and their controls, with all-to-all traffic (plots accuracy vs bytes cut)")
    ap.add_argument("--rules", metavar="LABELS", default=None,
                    help="comma-separated rule labels: run only these of the sweep (a control needs its rule)")
    ap.add_argument(
        "--server", metavar="ARGS", default=None,
        help="server path instead: start a CPU server with these Lynx flags (e.g. '--lynx-policy lynx') and one "
        "with --lynx-policy off, and compare their greedy continuations",
    )
    ap.add_argument("--server-args", metavar="ARGS", default="--dtype float32",
                    help="launch arguments for both servers of the server path (default: %(default)s)")
    args = ap.parse_args()
    if args.pool:
        return _pool_files(args.pool, args.out)
    if args.model is None:
        ap.error("a model folder is needed (or --pool)")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    from datetime import datetime, timezone

    meta = {
        "model": str(args.model),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "model"},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    if args.server is not None:
        comparisons = run_server_comparison(args.model, args, args.server.split())
        for c in comparisons:
            print(json.dumps(asdict(c)))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            payload = {**meta, "seconds": round(time.time() - t0, 1), "server": [asdict(c) for c in comparisons]}
            args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        return
    model, tokenizer = load_model(args.model)
    streams = domain_streams(tokenizer)
    num_experts, top_k = model_shape(model)
    rules = default_rules(num_experts, top_k) if args.ep is None else ep_rules(args.ep)
    if args.rules:
        wanted = args.rules.split(",")
        unknown = sorted(set(wanted) - {r.label for r in rules})
        if unknown:
            ap.error(f"--rules: no rule labelled {unknown}; the sweep has {[r.label for r in rules]}")
        rules = [r for r in rules if r.label in wanted]
    summaries = sweep(
        model, streams, rules, [int(b) for b in args.batch_sizes.split(",")], args.batches,
        args.prefix, args.decode_len, args.greedy_tokens, args.seed,
    )
    print(table(summaries))
    if args.out:
        payload = {
            **meta,
            "num_experts": num_experts,
            "top_k": top_k,
            "router": model_routing.block_router(moe_blocks(model)[0]).record(),
            "threads": torch.get_num_threads(),
            "seconds": round(time.time() - t0, 1),
            "summaries": [asdict(s) for s in summaries],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        if args.ep is None:
            plot(summaries, args.out.with_suffix(".png"),
                 f"{args.model.name}: accuracy vs experts kept (held-out, teacher-forced decode)")
        else:
            plot_ep(summaries, args.out.with_suffix(".png"),
                    f"{args.model.name}, EP={args.ep}: accuracy vs all-to-all bytes (held-out, teacher-forced decode)")
        print(f"wrote {args.out.with_suffix('.json')} and .png")


def _pool_files(paths: Sequence[Path], out: Optional[Path]) -> None:
    """``--pool``: one result file from several runs' files (their settings and times kept as provenance)."""
    payloads = [json.loads(p.read_text()) for p in paths]
    runs = [[Summary(**s) for s in p["summaries"]] for p in payloads]
    summaries = pool_summaries(runs)
    print(table(summaries))
    if out is None:
        return
    base = {k: v for k, v in payloads[0].items() if k not in ("settings", "seconds", "summaries", "date")}
    payload = {**base, "runs": [{"file": str(path), "date": p.get("date"), "settings": p.get("settings"),
                                 "seconds": p.get("seconds")} for path, p in zip(paths, payloads)],
               "seconds": round(sum(p.get("seconds", 0) for p in payloads), 1),
               "summaries": [asdict(s) for s in summaries]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    name = Path(payload.get("model", "model")).name
    if any(s.a2a_reduction is not None for s in summaries):
        plot_ep(summaries, out.with_suffix(".png"), f"{name}: accuracy vs all-to-all bytes (pooled runs)")
    else:
        plot(summaries, out.with_suffix(".png"), f"{name}: accuracy vs experts kept (pooled runs)")
    print(f"wrote {out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
