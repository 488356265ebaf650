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


_LYNX_CONSTANTS: dict = {}


def lynx_constants(policy: LynxPolicy, device: torch.device | str) -> LynxConstants:
    """The ``LynxConstants`` of ``policy`` on ``device``: made on the first call, the same object after."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:  # "cuda" -> "cuda:0", as tensors report it
        device = torch.empty(0, device=device).device
    key = (float(policy.alpha), float(policy.margin), device)
    consts = _LYNX_CONSTANTS.get(key)
    if consts is None:
        # torch.full rounds the Python double to fp32 exactly as torch.tensor(x, dtype=float32) does.
        make = lambda x: torch.full((), x, dtype=torch.float32, device=device)  # noqa: E731
        consts = _LYNX_CONSTANTS.setdefault(key, LynxConstants(alpha=make(key[0]), margin=make(key[1])))
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
    T, E = logits.shape
    k = router.top_k
    dev = logits.device
    ids = topk_ids[:, :k].long()
    w = topk_weights[:, :k].float()
    z = logits.float()

    # A row votes only if it is real (not padding) and well formed; any other
    # row passes through unchanged (docs/policies.md, "The contract").
    rows = torch.arange(T, device=dev)
    in_range = ((ids >= 0) & (ids < E)).all(dim=1)
    same = ids[:, :, None] == ids[:, None, :]
    dup = (same & ~torch.eye(k, dtype=torch.bool, device=dev)).any(dim=(1, 2))
    row_ok = (
        (rows < num_valid)
        & in_range
        & ~dup
        & torch.isfinite(z).all(dim=1)
        & ((w >= 0) & (w <= MAX_GATE_WEIGHT)).all(dim=1)  # NaN fails both
    )
    ids_c = ids.clamp(0, E - 1)

    # rank[t, s] = number of picks of row t that beat pick s (higher score, then lower id).
    sel_p = sel.gather(1, ids_c)
    beats = (sel_p[:, None, :] > sel_p[:, :, None]) | (
        (sel_p[:, None, :] == sel_p[:, :, None]) & (ids_c[:, None, :] < ids_c[:, :, None])
    )
    rank = beats.sum(dim=-1)

    # Votes are scatter-adds of 0/1 (or integer weights) masked by row_ok: exact and sync-free.
    voting = row_ok[:, None].expand(T, k).long()
    out = Votes(row_ok=row_ok, rank=rank, picks=_count(ids_c, voting, E))

    if isinstance(policy, LynxPolicy):
        if consts is None:
            consts = lynx_constants(policy, dev)
        level = affinity_level(policy, z, ids_c, rank, voting > 0, consts)
        z_p = z.gather(1, ids_c)
        z_r0 = (z_p * (rank == 0)).sum(dim=1)
        nb = policy.beta + 1
        out.lynx_votes = _count(ids_c * nb + level, voting, E * nb).view(E, nb)

        if k >= 2:
            z_r1 = (z_p * (rank == 1)).sum(dim=1)
            confident = (z_r0 - z_r1) >= consts.margin
        else:
            confident = torch.ones(T, dtype=torch.bool, device=dev)
        r0 = ids_c.gather(1, rank.argmin(dim=1, keepdim=True))[:, 0]
        out.mandatory = _count(r0, (row_ok & confident).long(), E) > 0
        if policy.moved_weight_q < WEIGHT_Q:
            held = held_by_cap(policy, w, rank, voting > 0)
            out.mandatory |= _count(ids_c, voting * held, E) > 0
    elif isinstance(policy, OeaPolicy):
        core = voting * (rank < policy.resolved_k0(router))
        out.oea_core = _count(ids_c, core, E) > 0
    elif isinstance(policy, BudgetPolicy):
        q = quantized(w)
        out.budget_score = _count(ids_c, q * voting, E)
    return out


def quantized(w: torch.Tensor) -> torch.Tensor:
    """int64 weights in units of 1/WEIGHT_Q, rounded half up (as the kernels round)."""
    return torch.floor(w * WEIGHT_SCALE + 0.5).long()


def affinity_level(policy: LynxPolicy, z: torch.Tensor, ids_c: torch.Tensor, rank: torch.Tensor,
                   voting: torch.Tensor, consts: Optional[LynxConstants] = None) -> torch.Tensor:
    """[T, k] int64 lynx level of each pick: 0 = as close as the row's best expert, up to beta.

    Bins are floor((z_pick - z_best) * alpha) in fp32 (as the kernels compute them);
    rows that do not vote (``voting`` False; they may hold NaN) get level 0.
    ``consts``: ``lynx_constants(policy, z.device)`` (None: looked up).
    """
    if consts is None:
        consts = lynx_constants(policy, z.device)
    z_p = z.gather(1, ids_c)
    z_r0 = (z_p * (rank == 0)).sum(dim=1)
    affinity = (z_p - z_r0[:, None]).clamp(max=0.0)
    bins = torch.floor(affinity * consts.alpha).clamp(min=-policy.beta)
    return torch.where(voting, -bins, torch.zeros_like(bins)).long()


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


def gate_weights(router: RouterSpec, logits: torch.Tensor, new_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
    """fp32 [T, k] gate weights of a rewritten row's picks (-1: none), rescaled to its original routed sum."""
    k = router.top_k
    z = logits.float()
    held = new_ids >= 0
    z_new = z.gather(1, new_ids.clamp(min=0))
    if router.scoring_func != "softmax":  # log sigmoid: a sigmoid gate itself underflows to 0 below logit -88
        z_new = torch.nn.functional.logsigmoid(z_new)
    # Relative to the row's largest held gate (softmax: the normaliser cancels; sigmoid: no underflow).
    z_max = torch.where(held, z_new, torch.full_like(z_new, float("-inf"))).max(dim=1, keepdim=True).values
    gate = torch.where(held, torch.exp(z_new - z_max), torch.zeros_like(z_new))
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


def keep_set(policy: Policy, router: RouterSpec, votes: Votes) -> torch.Tensor:
    """Stage 2: the batch's kept experts, [E] bool (always a subset of the picked ones)."""
    active = votes.picks > 0
    if isinstance(policy, OffPolicy):
        return active
    if isinstance(policy, OeaPolicy):
        return votes.oea_core
    if isinstance(policy, BudgetPolicy):
        # Greedy by total gate weight, ties to the lower id (stable sort), only picked experts.
        score = torch.where(active, votes.budget_score, torch.full_like(votes.budget_score, -1))
        order = torch.sort(score, descending=True, stable=True).indices
        position = torch.empty_like(order)
        position[order] = torch.arange(order.numel(), device=order.device)
        return active & (position < policy.max_experts)
    assert isinstance(policy, LynxPolicy)
    batch = votes.voting_rows()
    score = lynx_scores(votes.lynx_votes, batch)
    # Level threshold: min_votes votes at bin >= -keep_level, in the same integer units.
    theta = policy.min_votes * batch.pow(policy.beta - policy.keep_level)
    # Dynamic part: lower the threshold to the min_keep-th largest score.
    m = policy.resolved_min_keep(router)
    theta = torch.minimum(theta, torch.sort(score, descending=True).values[m - 1])
    theta = theta.clamp(min=1)  # never keep an expert nobody picked
    return (score >= theta) | votes.mandatory


def reroute(
    router: RouterSpec,
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    sel: torch.Tensor,
    row_ok: torch.Tensor,
    keep: torch.Tensor,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 3: rewrite the rows that lost a pick; returns (ids, weights, changed [T] bool).

    ``keep``: the batch's kept experts [E] bool, or a kept set per row [T, E] bool (peer rules
    whose allowed experts differ by token, ``peers``). ``out``: (ids, weights) buffers shaped like ``topk_ids`` / ``topk_weights`` to write
    the result into (a selector's planned outputs; None: new tensors).
    """
    T, E = logits.shape
    k = router.top_k
    ids = topk_ids[:, :k].long()
    ids_c = ids.clamp(0, E - 1)
    per_row = keep.dim() == 2
    survive = keep.gather(1, ids_c) if per_row else keep[ids_c]
    changed = row_ok & ~survive.all(dim=1)
    freed = ~survive

    # Candidates: kept experts the row does not hold yet, best score first, ties to the lower id.
    in_row = torch.zeros(T, E, dtype=torch.bool, device=logits.device)
    in_row.scatter_(1, ids_c, True)
    cand = (keep if per_row else keep[None, :]) & ~in_row
    cand_score = torch.where(cand, sel, torch.full_like(sel, float("-inf")))
    order = torch.sort(cand_score, dim=1, descending=True, stable=True).indices
    # The j-th freed slot (in slot order) takes the j-th best candidate, or -1 if none is left.
    free_rank = torch.cumsum(freed.long(), dim=1) - 1
    fill = order.gather(1, free_rank.clamp(0, E - 1))
    fill = torch.where(free_rank < cand.sum(dim=1, keepdim=True), fill, torch.full_like(fill, -1))
    new_ids = torch.where(freed, fill, ids_c)  # only changed rows (all ids in range) use it

    # Gate weights of the new set from the logits, rescaled to the row's original sum.
    new_w = gate_weights(router, logits, new_ids, topk_weights)

    if out is None:
        out_ids, out_w = topk_ids.clone(), topk_weights.clone()
    else:
        out_ids, out_w = out
        if topk_ids.shape[1] > k:  # shared-expert slots as given
            out_ids[:, k:] = topk_ids[:, k:]
            out_w[:, k:] = topk_weights[:, k:]
    out_ids[:, :k] = torch.where(changed[:, None], new_ids.to(topk_ids.dtype), topk_ids[:, :k])
    out_w[:, :k] = torch.where(changed[:, None], new_w.to(topk_weights.dtype), topk_weights[:, :k])
    return out_ids, out_w, changed


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
    """
    T = logits.shape[0]
    if num_valid is None:
        num_valid = T
    sel = selection_score(router, logits, correction_bias)
    votes = vote(policy, router, logits, topk_ids, topk_weights, num_valid, sel, consts)
    rows_voting = votes.row_ok.sum()
    if vote_reduce is not None:
        votes = vote_reduce(votes)
    keep = keep_set(policy, router, votes)
    out_ids, out_w, changed = reroute(router, logits, topk_ids, topk_weights, sel, votes.row_ok, keep, out)
    info = SelectionInfo(
        keep=keep,
        experts_before=(votes.picks > 0).sum(),
        experts_after=keep.sum(),
        rows_changed=changed.sum(),
        rows_voting=rows_voting,
    )
    return out_ids, out_w, info
