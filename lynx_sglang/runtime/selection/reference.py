"""Pure-torch reference of every expert-selection policy: this file is the spec.

One batch (one MoE layer, one decode step) goes through three stages, which
the Triton kernels in ``lynx_sglang.kernels.expert_selection`` fuse into three
launches:

1. ``vote``:    check each row, rank its picks, and let every valid row vote for
                the experts it picked (policy-specific votes).
2. ``keep``:    turn the votes into the batch's kept expert set.
3. ``reroute``: rows whose picks are all kept stay bit for bit; the others keep
                their surviving picks and fill the freed slots with their
                best-scoring kept experts; weights are recomputed from the logits
                and rescaled to the row's original routed weight sum.

Every comparison that decides an expert id is exact (integer votes and scores,
logits compared as they are), so the kernels can match this file id for id.
Ties between experts always go to the lower expert id.

Because the votes are integer sums (and ORs) over rows, votes of disjoint row
shards add up to the votes of the whole batch: ``select(..., vote_reduce=...)``
lets expert parallelism reduce them over ranks so that every rank keeps the
global batch's expert set (``lynx_sglang.runtime.expert_parallel.global_selection``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from lynx_sglang.runtime.selection.config import WEIGHT_Q, BudgetPolicy, LynxPolicy, OeaPolicy, OffPolicy, Policy, RouterSpec

# Gate weights are quantised to 1/WEIGHT_Q for integer scores (budget) and the moved-weight cap.
WEIGHT_SCALE = float(WEIGHT_Q)
# A row whose routed weights are negative, non-finite or above this is malformed and passes through.
MAX_GATE_WEIGHT = 1.0e6


@dataclass
class Votes:
    """What stage 1 hands to stage 2 (all exact integers, order-independent).

    ``row_ok`` and ``rank`` are per row and stay with the rows; every other
    field is a sum (or an OR) over voting rows, so a reducer may replace them
    with their totals over several row shards (stage 2 reads only those).
    """

    row_ok: torch.Tensor  # [T] bool: row is valid, well formed, and votes
    rank: torch.Tensor  # [T, k] int64: rank of each pick inside its row (0 = best)
    picks: torch.Tensor  # [E] int64: voting rows that picked each expert
    lynx_votes: Optional[torch.Tensor] = None  # [E, beta+1] int64: votes per affinity bin
    mandatory: Optional[torch.Tensor] = None  # [E] bool: rank-0 of a confident row
    oea_core: Optional[torch.Tensor] = None  # [E] bool: in some row's top-k0
    budget_score: Optional[torch.Tensor] = None  # [E] int64: quantised total gate weight
    # A paged layer under lynx's residency_page_budget (``page_votes``): the same total gate weight (or
    # predicted output share), and [E] bool: the best pick of some voting row (None when ranking by
    # predicted output share: a row's best pick is then ranked with the rest).
    demand: Optional[torch.Tensor] = None
    row_best: Optional[torch.Tensor] = None
    # 0-d int64: voting rows, the B of the lynx score (None: row_ok.sum()). A reducer sets
    # it to the global count, which row_ok (this shard's rows only) cannot give.
    num_voting: Optional[torch.Tensor] = None

    def voting_rows(self) -> torch.Tensor:
        """Number of voting rows the votes were collected from (0-d int64)."""
        return self.row_ok.sum() if self.num_voting is None else self.num_voting


@dataclass
class SelectionInfo:
    """Per-batch facts the statistics are made of.

    With a ``vote_reduce`` the expert counts are those of the reduced (global)
    batch, identical on every shard, while the row counts are this shard's own.
    """

    keep: torch.Tensor  # [E] bool
    experts_before: torch.Tensor  # scalar int64: distinct experts picked by voting rows (all shards)
    experts_after: torch.Tensor  # scalar int64: distinct experts after selection
    rows_changed: torch.Tensor  # scalar int64: this shard's rows
    rows_voting: torch.Tensor  # scalar int64: this shard's rows
    moved_weight: torch.Tensor  # scalar int64: ``moved_weight`` of this shard's rows, in 1/WEIGHT_Q


def selection_score(router: RouterSpec, logits: torch.Tensor, correction_bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The quantity the router ranks experts by, fp32 [T, E].

    Without a correction bias softmax and sigmoid are monotone, so the logits
    themselves rank exactly; with one, the router ranks ``score + bias``.
    """
    z = logits.float()
    if correction_bias is None:
        return z
    score = z.softmax(dim=-1) if router.scoring_func == "softmax" else z.sigmoid()
    return score + correction_bias.float()


@dataclass(frozen=True)
class LynxConstants:
    """A lynx policy's float parameters as fp32 0-d tensors on one device (the kernels use fp32;
    Python floats would be applied in double on some paths).

    Built once per (policy values, device) by ``lynx_constants`` (a selector does it at plan
    time), so a step builds no tensor from Python data: ``torch.tensor(x, device=...)`` inside a
    step is a host-to-device copy on every MoE layer, and not capturable in a CUDA graph.
    """

    alpha: torch.Tensor  # bins per logit of affinity
    margin: torch.Tensor  # logit margin that makes a row confident
    neg_alpha: Optional[torch.Tensor] = None  # -alpha (fp32 negation is exact: -fp32(a) == fp32(-a))
    powers: Optional[torch.Tensor] = None  # [beta + 1] int64: beta, ..., 0 (exponents of B in the lynx score)


_LYNX_CONSTANTS: dict = {}


def lynx_constants(policy: LynxPolicy, device: torch.device | str) -> LynxConstants:
    """The ``LynxConstants`` of ``policy`` on ``device``: made on the first call, the same object after."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:  # "cuda" -> "cuda:0", as tensors report it
        device = torch.empty(0, device=device).device
    key = (float(policy.alpha), float(policy.margin), int(policy.beta), device)
    consts = _LYNX_CONSTANTS.get(key)
    if consts is None:
        # torch.full rounds the Python double to fp32 exactly as torch.tensor(x, dtype=float32) does.
        make = lambda x: torch.full((), x, dtype=torch.float32, device=device)  # noqa: E731
        alpha = make(key[0])
        consts = _LYNX_CONSTANTS.setdefault(key, LynxConstants(
            alpha=alpha, margin=make(key[1]), neg_alpha=-alpha,
            powers=torch.arange(key[2], -1, -1, dtype=torch.int64, device=device)))
    return consts


def vote(
    policy: Policy,
    router: RouterSpec,
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_valid: int | torch.Tensor,
    sel: torch.Tensor,
    consts: Optional[LynxConstants] = None,
) -> Votes:
    """Stage 1: validate rows, rank picks, collect the policy's votes.

    ``consts``: lynx's ``lynx_constants`` (None: looked up for the logits' device).
    """
    return _vote(policy, router, logits, topk_ids, topk_weights, num_valid, sel, consts)[0]


def _vote(policy, router, logits, topk_ids, topk_weights, num_valid, sel, consts=None):
    """``vote`` and the clamped ids [T, k] int64 (``reroute`` reuses them).

    Written for few torch ops (each costs a few microseconds on a CPU server; a launch on a GPU); the
    decisions are those of the plain formulation (tests/test_policies.py, test_kernels.py, test_properties.py).
    """
    T, E = logits.shape
    k = router.top_k
    dev = logits.device
    ids = topk_ids[:, :k].long()
    w = topk_weights[:, :k].float()
    z = logits.float()
    ids_c = ids.clamp(0, E - 1)

    # A row votes only if it is real (not padding) and well formed; any other
    # row passes through unchanged (docs/policies.md, "The contract").
    # In range: clamping changes nothing. Weights in [0, MAX]: clamping changes nothing (NaN != NaN).
    # Finite logits: z * 0 is 0 for every finite logit, NaN for inf and NaN, so the row sum is 0 or NaN.
    # No duplicate: sorted ids never repeat a neighbour (out-of-range rows fail the range check anyway).
    sorted_ids = ids_c.sort(dim=1).values
    row_ok = (
        ((ids_c == ids) & (w.clamp(0.0, MAX_GATE_WEIGHT) == w)).all(dim=1)
        & (sorted_ids[:, 1:] != sorted_ids[:, :-1]).all(dim=1)
        & ((z * 0.0).sum(dim=1) == 0)
    )
    if not (isinstance(num_valid, int) and num_valid >= T):
        row_ok &= torch.arange(T, device=dev) < num_valid

    # rank[t, s] = number of picks of row t that beat pick s (higher score, then lower id).
    sel_p = sel.gather(1, ids_c)
    beats = (sel_p[:, None, :] > sel_p[:, :, None]) | (
        (sel_p[:, None, :] == sel_p[:, :, None]) & (ids_c[:, None, :] < ids_c[:, :, None])
    )
    rank = beats.sum(dim=-1)

    # Votes are scatter-adds of 0/1 (or integer weights) masked by row_ok: exact and sync-free.
    voting = row_ok[:, None].expand(T, k)
    amount = voting.long()

    if isinstance(policy, LynxPolicy):
        if consts is None or consts.neg_alpha is None:
            consts = lynx_constants(policy, dev)
        # A voting row's ranks are 0..k-1, each once: its best two picks are the first two of argsort.
        top = rank.argsort(dim=1)[:, : min(k, 2)]
        z_p = sel_p if sel is z else z.gather(1, ids_c)
        z_top = z_p.gather(1, top)  # logits of the row's best (and second best) pick
        level = affinity_level(policy, z, ids_c, rank, voting, consts, z_p=z_p, z_best=z_top[:, 0])
        nb = policy.beta + 1
        lynx_votes = _count(ids_c * nb + level, amount, E * nb).view(E, nb)
        out = Votes(row_ok=row_ok, rank=rank, picks=lynx_votes.sum(dim=1), lynx_votes=lynx_votes)
        # Mandatory: the best pick of a confident voting row, a voting row's keep_top best picks, picks the
        # moved-weight cap holds. keep_top >= 1 already holds every voting row's best pick, confident or not.
        keep_top = policy.resolved_keep_top(router)
        if keep_top:
            flagged = voting & (rank < keep_top)
        else:
            lead = row_ok & ((z_top[:, 0] - z_top[:, 1]) >= consts.margin) if k >= 2 else row_ok
            flagged = (rank == 0) & lead[:, None]
        if policy.moved_weight_q < WEIGHT_Q:
            flagged |= held_by_cap(policy, w, rank, voting)  # False on rows that do not vote
        # Every write is True, so repeated experts need no order; unflagged picks land on a spare slot E.
        out.mandatory = torch.zeros(E + 1, dtype=torch.bool, device=dev).scatter_(
            0, torch.where(flagged, ids_c, E).view(-1), True)[:E]
        return out, ids_c

    out = Votes(row_ok=row_ok, rank=rank, picks=_count(ids_c, amount, E))
    if isinstance(policy, OeaPolicy):
        core = amount * (rank < policy.resolved_k0(router))
        out.oea_core = _count(ids_c, core, E) > 0
    elif isinstance(policy, BudgetPolicy):
        q = quantized(w)
        out.budget_score = _count(ids_c, q * amount, E)
    return out, ids_c


def page_votes(votes: Votes, topk_weights: torch.Tensor, ids_c: torch.Tensor, num_experts: int,
               pick_scale: Optional[torch.Tensor] = None) -> Votes:
    """Add what ``residency_page_budget`` ranks by to ``votes`` (in place; returned): each expert's
    total routed weight over voting rows (``demand``, in 1/WEIGHT_Q) and whether it is some voting
    row's best pick (``row_best``). Sums and ORs over rows, like every other vote.

    ``pick_scale``: [T, E] fp32, each row's predicted output norm per expert (``output_norms.pick_scale``);
    a pick then counts w * scale (its predicted share of the row's output) instead of w, and ``row_best``
    stays None: no pick is exempt from the ranking (routed weight needs that guard, predicted output share
    measured better without it: docs/offload.md)."""
    k = ids_c.shape[1]
    voting = votes.row_ok[:, None].expand_as(ids_c)
    w = topk_weights[:, :k].float()
    if pick_scale is not None:
        w = w * pick_scale.gather(1, ids_c)
    votes.demand = _count(ids_c, quantized(torch.where(voting, w, 0.0)), num_experts)
    if pick_scale is None:
        votes.row_best = _count(ids_c, (voting & (votes.rank == 0)).long(), num_experts) > 0
    return votes


def quantized(w: torch.Tensor) -> torch.Tensor:
    """int64 weights in units of 1/WEIGHT_Q, rounded half up (as the kernels round)."""
    return torch.floor(w * WEIGHT_SCALE + 0.5).long()


def affinity_level(policy: LynxPolicy, z: torch.Tensor, ids_c: torch.Tensor, rank: torch.Tensor,
                   voting: torch.Tensor, consts: Optional[LynxConstants] = None,
                   z_p: Optional[torch.Tensor] = None, z_best: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[T, k] int64 lynx level of each pick: 0 = as close as the row's best expert, up to beta.

    Bins are floor((z_pick - z_best) * alpha) in fp32 (as the kernels compute them);
    rows that do not vote (``voting`` False; they may hold NaN) get level 0.
    ``consts``: ``lynx_constants(policy, z.device)`` (None: looked up). ``z_p`` / ``z_best``: the picks'
    logits [T, k] and the row's best pick's logit [T] where the caller has them (None: computed).

    Computed as clamp(ceil((z_pick - z_best) * -alpha), 0, beta), which is -clamp(floor(min(z_pick -
    z_best, 0) * alpha), -beta, 0) exactly: fp32 negation is exact and ceil(-x) == -floor(x).
    """
    if consts is None or consts.neg_alpha is None:
        consts = lynx_constants(policy, z.device)
    if z_p is None:
        z_p = z.gather(1, ids_c)
    if z_best is None:
        z_best = (z_p * (rank == 0)).sum(dim=1)
    level = ((z_p - z_best[:, None]) * consts.neg_alpha).ceil_().clamp_(0, policy.beta)
    return level.masked_fill_(~voting, 0).long()


def held_by_cap(policy: LynxPolicy, w: torch.Tensor, rank: torch.Tensor, voting: torch.Tensor) -> torch.Tensor:
    """[T, k] bool: picks the moved-weight cap holds in place.

    A pick may move only while the weight of it and every weaker pick of its row
    stays within max_moved_weight of the row's weight; the others are held.
    Integers (weights in 1/WEIGHT_Q) keep the comparison exact and independent of
    summation order. Rows that do not vote hold nothing.
    """
    q = quantized(torch.where(voting, w, 0.0))
    weaker = (q[:, None, :] * (rank[:, None, :] >= rank[:, :, None])).sum(dim=-1)
    return weaker * WEIGHT_Q > q.sum(dim=1, keepdim=True) * policy.moved_weight_q


def route_topk(router: RouterSpec, logits: torch.Tensor, correction_bias: Optional[torch.Tensor] = None,
               renormalize: bool = True, scaling: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k the way SGLang's router does: int64 ids [T, k + shared] by score (+ bias), fp32 weights from the
    unbiased score (renormalised and scaled as asked); fused shared experts take ids E, E+1, ... with weight 1."""
    T, E = logits.shape
    k, ns = router.top_k, router.num_shared_slots
    ids = selection_score(router, logits, correction_bias).topk(k, dim=1).indices
    z = logits.float()
    gate = z.softmax(dim=1) if router.scoring_func == "softmax" else z.sigmoid()
    w = gate.gather(1, ids)
    if renormalize:
        w = w / w.sum(dim=1, keepdim=True)
    w = w * scaling
    ids = torch.cat([ids, torch.arange(E, E + ns, device=logits.device).expand(T, ns)], dim=1)
    w = torch.cat([w, torch.ones(T, ns, device=logits.device)], dim=1)
    return ids, w


def moved_weight(k: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor, new_ids: torch.Tensor,
                 changed: torch.Tensor) -> torch.Tensor:
    """Scalar int64: the routed gate weight the changed rows had on experts they no longer hold, summed,
    in units of 1/WEIGHT_Q (each pick's weight rounded half up, as ``quantized``).

    Per re-routed token, ``moved_weight / rows_changed / WEIGHT_Q`` is what the ``lynx:moved_weight_total``
    metric reports and ``calibrate`` records per layer, so a drift from what calibration saw is visible.
    """
    gone = (topk_ids[:, :k, None] != new_ids[:, None, :k]).all(dim=2) & changed[:, None]
    # Changed rows vote, so their weights are finite and >= 0: truncation is the floor.
    q = (topk_weights[:, :k].float() * WEIGHT_SCALE + 0.5).long()
    return q.masked_fill_(~gone, 0).sum()


def gate_weights(router: RouterSpec, logits: torch.Tensor, new_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
    """fp32 [T, k] gate weights of a rewritten row's picks (-1: none), rescaled to its original routed sum."""
    k = router.top_k
    z = logits.float()
    free = new_ids < 0
    z_new = z.gather(1, new_ids.clamp(min=0))
    if router.scoring_func != "softmax":  # log sigmoid: a sigmoid gate itself underflows to 0 below logit -88
        z_new = torch.nn.functional.logsigmoid(z_new)
    # Relative to the row's largest held gate (softmax: the normaliser cancels; sigmoid: no underflow).
    z_max = z_new.masked_fill(free, float("-inf")).max(dim=1, keepdim=True).values
    gate = torch.exp(z_new - z_max).masked_fill_(free, 0.0)
    row_sum = topk_weights[:, :k].float().sum(dim=1, keepdim=True)
    return row_sum * gate / gate.sum(dim=1, keepdim=True)


def _count(index: torch.Tensor, amount: torch.Tensor, size: int) -> torch.Tensor:
    """int64 histogram: out[i] = sum of amount where index == i."""
    out = torch.zeros(size, dtype=torch.int64, device=index.device)
    return out.scatter_add_(0, index.reshape(-1), amount.reshape(-1))


def lynx_scores(votes: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """score[e] = sum_j votes[e, j] * B**(beta - j), exact in int64.

    This is the paper's sum of B**bin over the votes (bin = -j), multiplied by
    B**beta so that it stays an integer; B is the number of voting rows.
    """
    score = torch.zeros_like(votes[:, 0])
    for j in range(votes.shape[1]):  # Horner: highest bin first
        score = score * batch + votes[:, j]
    return score


def keep_set(policy: Policy, router: RouterSpec, votes: Votes, consts: Optional[LynxConstants] = None) -> torch.Tensor:
    """Stage 2: the batch's kept experts, [E] bool (always a subset of the picked ones).

    ``consts``: lynx's ``lynx_constants`` (None: looked up for the votes' device).
    """
    if isinstance(policy, OffPolicy):
        return votes.picks > 0
    if isinstance(policy, OeaPolicy):
        return votes.oea_core
    if isinstance(policy, BudgetPolicy):
        active = votes.picks > 0
        # Greedy by total gate weight, ties to the lower id (stable sort), only picked experts.
        score = torch.where(active, votes.budget_score, torch.full_like(votes.budget_score, -1))
        order = torch.sort(score, descending=True, stable=True).indices
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel(), device=order.device)
        return active & (position < policy.max_experts)
    assert isinstance(policy, LynxPolicy)
    if consts is None or consts.powers is None:
        consts = lynx_constants(policy, votes.lynx_votes.device)
    # B**(beta - j) for every bin j, and the score as one product: the same exact integers as
    # lynx_scores' Horner loop (integer arithmetic; config.LynxPolicy.validate rules out overflow).
    powers = votes.voting_rows().pow(consts.powers)
    score = (votes.lynx_votes * powers).sum(dim=1)
    # Level threshold: min_votes votes at bin >= -keep_level, in the same integer units.
    theta = powers[policy.keep_level]
    if policy.min_votes != 1:
        theta = policy.min_votes * theta
    # Dynamic part: lower the threshold to the min_keep-th largest score (a value: ties do not matter).
    m = policy.resolved_min_keep(router)
    theta = torch.minimum(theta, score.topk(m).values[m - 1])
    theta = theta.clamp(min=1)  # never keep an expert nobody picked
    return (score >= theta) | votes.mandatory


def residency_keep(policy: LynxPolicy, router: RouterSpec, votes: Votes, resident: torch.Tensor,
                   consts: Optional[LynxConstants] = None) -> torch.Tensor:
    """Stage 2 on a paged-experts layer: the kept set [E] bool of lynx's ``residency`` mode.

    ``resident``: [E] bool, the experts in the layer's GPU slots before this step (the server derives it
    on the device from SGLang's ``DeviceResidency.expert_slot >= 0``). A resident pick costs no PCIe,
    so it is never moved. ``keep``: lynx's kept set | resident picks. ``prefer``: resident picks |
    lynx's mandatory experts (confident rows' best pick, picks the moved-weight cap holds), with lynx's
    kept set added back when fewer than ``min_keep`` experts remain (no host sync). ``prefer`` with a
    ``residency_page_budget`` first trims the non-resident experts kept beyond rows' best picks to the
    budget (``within_page_budget``; ``votes`` then carry ``page_votes``). With every expert resident
    both keep every pick: nothing moves. ``policy``: the paged layer's (``policy.paged``).
    """
    lynx_keep = keep_set(policy, router, votes, consts)
    resident_picked = (votes.picks > 0) & resident
    if policy.residency == "keep":
        return lynx_keep | resident_picked
    if policy.residency != "prefer":
        raise ValueError(f"residency_keep needs lynx residency keep or prefer, got {policy.residency!r}")
    keep = resident_picked | votes.mandatory
    if policy.residency_page_budget is not None:
        fixed = resident_picked if votes.row_best is None else resident_picked | votes.row_best
        keep = within_page_budget(policy.residency_page_budget, keep, fixed, resident, votes.demand)
    short = keep.sum() < policy.resolved_min_keep(router)
    return torch.where(short, keep | lynx_keep, keep)


def within_page_budget(budget: int, keep: torch.Tensor, fixed: torch.Tensor, resident: torch.Tensor,
                       demand: torch.Tensor) -> torch.Tensor:
    """``keep`` [E] bool trimmed so that at most ``budget`` non-resident experts are kept beyond ``fixed``'s:
    ``fixed`` (resident picks and rows' best picks) always stays; the other non-resident experts of ``keep``
    stay by ``demand`` (highest first, ties to the lower id) while the budget lasts. Fixed shapes, no sync."""
    extra = keep & ~fixed & ~resident
    room = (budget - (fixed & ~resident).sum()).clamp(min=0)
    score = torch.where(extra, demand, torch.full_like(demand, -1))
    order = torch.sort(score, descending=True, stable=True).indices  # stable: ties keep the lower id first
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return fixed | (extra & (position < room))


def reroute(
    router: RouterSpec,
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    sel: torch.Tensor,
    row_ok: torch.Tensor,
    keep: torch.Tensor,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ids_c: Optional[torch.Tensor] = None,
    refill_bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 3: rewrite the rows that lost a pick; returns (ids, weights, changed [T] bool).

    ``keep``: the batch's kept experts [E] bool, or a kept set per row [T, E] bool (peer rules
    whose allowed experts differ by token, ``peers``). ``out``: (ids, weights) buffers shaped like ``topk_ids`` / ``topk_weights`` to write
    the result into (a selector's planned outputs; None: new tensors). ``ids_c``: the picks clamped to
    [0, E) as int64 [T, k] where the caller has them (None: computed). ``refill_bias``: fp32 [E, E]
    (lynx's ``refill_similarity`` times the layer's expert similarity, made at plan time) or None: a
    freed slot that held expert d then takes, in slot order, the candidate maximising
    ``sel + refill_bias[d]`` not taken yet (ties to the lower id) instead of the j-th best by ``sel``.
    """
    T, E = logits.shape
    k = router.top_k
    if ids_c is None:
        ids_c = topk_ids[:, :k].long().clamp(0, E - 1)
    keep_rows = keep if keep.dim() == 2 else keep[None, :].expand(T, E)
    freed = ~keep_rows.gather(1, ids_c)
    changed = row_ok & freed.any(dim=1)

    # Candidates: kept experts the row does not hold yet, best score first, ties to the lower id.
    cand = keep_rows.clone().scatter_(1, ids_c, False)
    if refill_bias is not None:
        new_ids = _refill_by_similarity(sel, cand, freed, ids_c, refill_bias)
        return _finish(router, logits, topk_ids, topk_weights, new_ids, changed, out)
    cand_score = sel.masked_fill(~cand, float("-inf"))
    order = torch.sort(cand_score, dim=1, descending=True, stable=True).indices
    # The j-th freed slot (in slot order) takes the j-th best candidate, or -1 if none is left.
    free_rank = torch.cumsum(freed, dim=1) - 1  # int64 (cumsum promotes bool)
    fill = order.gather(1, free_rank.clamp(0, E - 1))
    fill = fill.masked_fill_(free_rank >= cand.sum(dim=1, keepdim=True), -1)
    new_ids = torch.where(freed, fill, ids_c)  # only changed rows (all ids in range) use it
    return _finish(router, logits, topk_ids, topk_weights, new_ids, changed, out)


def _refill_by_similarity(sel: torch.Tensor, cand: torch.Tensor, freed: torch.Tensor, ids_c: torch.Tensor,
                          refill_bias: torch.Tensor) -> torch.Tensor:
    """[T, k] new ids: freed slot j (in slot order) takes argmax over untaken candidates of
    ``sel + refill_bias[ids_c[:, j]]``, or -1 when none is left. k small steps of fixed shape."""
    new_ids = ids_c.clone()
    free = cand.clone()
    neg = torch.full_like(sel, float("-inf"))
    for j in range(ids_c.shape[1]):
        key = torch.where(free, sel + refill_bias.index_select(0, ids_c[:, j]), neg)
        best, tgt = key.max(dim=1)  # first maximal index: ties to the lower id
        take = freed[:, j] & (best > float("-inf"))
        new_ids[:, j] = torch.where(take, tgt, torch.where(freed[:, j], torch.full_like(tgt, -1), ids_c[:, j]))
        free.scatter_(1, tgt[:, None], free.gather(1, tgt[:, None]) & ~take[:, None])
    return new_ids


def _finish(router, logits, topk_ids, topk_weights, new_ids, changed, out):
    """Write the rewritten rows (gate weights from the logits, rescaled to each row's routed sum)."""
    k = router.top_k
    new_w = gate_weights(router, logits, new_ids, topk_weights)

    if out is None:
        out_ids, out_w = topk_ids.clone(), topk_weights.clone()
    else:
        out_ids, out_w = out
        if topk_ids.shape[1] > k:  # shared-expert slots as given
            out_ids[:, k:] = topk_ids[:, k:]
            out_w[:, k:] = topk_weights[:, k:]
    _where_into(out_ids[:, :k], changed[:, None], new_ids.to(topk_ids.dtype), topk_ids[:, :k])
    _where_into(out_w[:, :k], changed[:, None], new_w.to(topk_weights.dtype), topk_weights[:, :k])
    return out_ids, out_w, changed


def _where_into(dst: torch.Tensor, cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """dst[...] = where(cond, a, b): written straight into ``dst`` where the dtypes allow (one op, not two)."""
    # out= only into a contiguous view: torch.compile refuses a strided out= (ids[:, :k] with shared slots).
    if dst.dtype == a.dtype == b.dtype and dst.is_contiguous():
        torch.where(cond, a, b, out=dst)
    else:
        dst.copy_(torch.where(cond, a, b))


def select(
    policy: Policy,
    router: RouterSpec,
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_valid: Optional[int | torch.Tensor] = None,
    correction_bias: Optional[torch.Tensor] = None,
    vote_reduce: Optional[Callable[[Votes], Votes]] = None,
    consts: Optional[LynxConstants] = None,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    refill_bias: Optional[torch.Tensor] = None,
    resident: Optional[torch.Tensor] = None,
    pick_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, SelectionInfo]:
    """Run one policy on one batch; returns new (topk_ids, topk_weights) and the batch's facts.

    Inputs are not modified. ``num_valid`` (int or 0-d tensor) marks rows at and
    after it as padding: they pass through unchanged and do not vote.
    ``vote_reduce``, if given, maps this batch's votes to the votes the kept set
    is decided on (e.g. summed over the shards of a batch split across ranks);
    it must leave ``row_ok`` and ``rank`` as they are. ``experts_before`` then
    counts the experts picked by the reduced votes. ``consts``: lynx's
    ``lynx_constants`` (None: looked up). ``out``: (ids, weights) buffers shaped
    like the inputs to write the result into (None: new tensors); they are returned.
    ``resident``: [E] bool, the layer's resident experts before the step on a paged-experts layer
    (lynx with ``residency`` keep/prefer only): the kept set is then ``residency_keep``'s, under the
    paged cap (``LynxPolicy.paged``) and page budget. None: not a paged layer, the policy as it is.
    ``pick_scale``: [T, E] predicted expert output norms per row (``output_norms.pick_scale``), which the page
    budget then ranks by (``page_votes``); only with ``resident`` and a page budget.
    """
    T = logits.shape[0]
    if num_valid is None:
        num_valid = T
    if resident is not None:  # a paged-experts layer in lynx's residency mode: its cap, residency_keep
        if not (isinstance(policy, LynxPolicy) and policy.residency != "off"):
            raise ValueError(f"resident is an input of lynx with residency keep or prefer, not of {policy}")
        policy = policy.paged
    if pick_scale is not None and (resident is None or policy.residency_page_budget is None):
        raise ValueError("pick_scale ranks a paged layer's page budget: it needs resident and residency_page_budget")
    sel = selection_score(router, logits, correction_bias)
    votes, ids_c = _vote(policy, router, logits, topk_ids, topk_weights, num_valid, sel, consts)
    if resident is not None and policy.residency_page_budget is not None:
        page_votes(votes, topk_weights, ids_c, logits.shape[1], pick_scale)
    rows_voting = votes.row_ok.sum()
    if vote_reduce is not None:
        votes = vote_reduce(votes)
    elif votes.num_voting is None:
        votes.num_voting = rows_voting  # what voting_rows() would sum again
    keep = (keep_set(policy, router, votes, consts) if resident is None
            else residency_keep(policy, router, votes, resident, consts))
    out_ids, out_w, changed = reroute(router, logits, topk_ids, topk_weights, sel, votes.row_ok, keep, out, ids_c,
                                      refill_bias)
    info = SelectionInfo(
        keep=keep,
        experts_before=(votes.picks > 0).sum(),
        experts_after=keep.sum(),
        rows_changed=changed.sum(),
        rows_voting=rows_voting,
        moved_weight=moved_weight(router.top_k, topk_ids, topk_weights, out_ids, changed),
    )
    return out_ids, out_w, info
