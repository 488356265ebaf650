"""``lynx_ep``: Lynx selection that also cuts the ranks each token visits under expert parallelism.

Under expert parallelism a decode step costs what the all-to-all moves (a token
travels once to every rank other than its home that holds one of its picks,
``accounting.step_traffic``) and what the busiest rank runs. Plain lynx shrinks
the batch's expert set, but a token still visits about as many ranks. This
module is the spec (and the torch implementation) of the rank-aware variant,
``RankAwareLynxPolicy``; see docs/policies.md, "lynx_ep".

One batch, on top of ``reference``'s three stages:

a. ``reference.vote`` / ``reference.keep_set``: the lynx keep set, unchanged.
b. Busiest-rank bound (``rank_slack`` not None): a kept expert *sits* on the
   lowest rank holding it (with EPLB replicas the load of a replicated expert is
   not known before dispatch, so one fixed rank stands for it). A rank may keep
   at most ``ceil((1 + rank_slack) * |keep| / N)`` experts; over-full ranks drop
   their lowest-scoring non-mandatory kept experts (lynx score, ties: the higher
   id goes first) until within the bound or only mandatory ones remain, never
   below ``min_keep`` kept experts in total (the lowest-scoring drops go first).
c. Rank drops: a pick is *weak* if the moved-weight cap lets it move (exactly
   ``reference.vote``'s held computation) and its affinity level is above
   ``keep_level`` (lower than lynx keeps on). A rank other than the row's home
   that the row still reaches (through kept picks) only through weak picks is
   dropped: those picks are freed, together with the picks whose expert is not
   kept. A row drops ranks only if every slot it frees can be refilled with a
   kept expert it does not hold that has a replica on a rank it still visits
   (its home and the ranks of its remaining picks). So rank dropping never
   creates an empty (-1) slot and never sends the row to a rank it would not
   visit otherwise: a row that drops ranks visits strictly fewer remote ranks
   than it would without the drops.
d. Refill: freed slots, in slot order, take kept experts the row does not hold,
   first those with a replica on a rank the row still visits (its home and the
   ranks of its surviving picks), then the others; within each group the best
   selection score first, ties to the lower id; -1 when none is left. A filled
   slot goes to the lowest still-visited rank holding its expert, else to the
   lowest rank holding it.
e. Weights of rewritten rows exactly as ``reference.reroute``; every other row
   and every shared-expert slot bit for bit.

Every id-deciding comparison is an exact integer or fp32 comparison, as in
``reference``, so the result is deterministic and independent of the device.

GPUs run this torch code too (the Triton kernels do not implement lynx_ep), each op
a kernel launch per MoE layer and decode step, so it is written for few launches:
stage a's votes and keep set are computed here (bit for bit ``reference.vote`` /
``keep_set``, tested against them) so that stage c reuses the levels and held picks;
sorts replace the [E, E] and [T, k, k] comparisons; one matmul answers "near" for the
refill check and the refill; ``RankAwareSelector`` builds the index constants at plan
time and writes into its own buffers. Nothing derived from the rank mask is kept
between steps (EPLB rewrites it in place). tests/test_rank_aware.py holds the launch
budget (``OpAudit``: 185 per layer and step at E = 128, k = 8, T = 64, 340 before).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from lynx_sglang.runtime.selection import reference
from lynx_sglang.runtime.selection.config import WEIGHT_Q, ConfigError, LynxPolicy, RankAwareLynxPolicy, RouterSpec
from lynx_sglang.runtime.selection.reference import SelectionInfo
from lynx_sglang.runtime.selection.selector import ExpertSelector
from lynx_sglang.runtime.expert_parallel.accounting import visited_ranks


def lowest_rank(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dimension, -1 where there is none (int64)."""
    first = mask.long().argmax(dim=-1)  # argmax returns the first maximal index
    return torch.where(mask.any(dim=-1), first, torch.full_like(first, -1))


def default_pick_rank(topk_ids: torch.Tensor, rank_mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, k] int64: the lowest rank holding each routed pick (-1 for ids outside [0, E))."""
    E = rank_mask.shape[0]
    ids = topk_ids[:, :top_k].long()
    valid = (ids >= 0) & (ids < E)
    rank = lowest_rank(rank_mask)[ids.clamp(0, E - 1)]
    return torch.where(valid, rank, torch.full_like(rank, -1))


def physical_ids(ids: torch.Tensor, slot_rank: torch.Tensor, replica_on_rank: torch.Tensor) -> torch.Tensor:
    """Logical ids and their slot ranks -> physical ids (``ExpertPlacement.replica_on_rank`` table).

    The lowest physical slot of the expert on its slot's rank; -1 stays -1 (and
    so does a slot whose rank holds no replica of its expert).
    """
    k = slot_rank.shape[1]
    ids = ids[:, :k].long()
    ok = (ids >= 0) & (slot_rank >= 0)
    E, N = replica_on_rank.shape
    phys = replica_on_rank[ids.clamp(0, E - 1), slot_rank.clamp(0, N - 1)]
    return torch.where(ok, phys, torch.full_like(phys, -1))


def remote_ranks(slot_rank: torch.Tensor, home: Optional[torch.Tensor], num_ranks: int) -> torch.Tensor:
    """[T] int64: distinct ranks other than the row's home its slots go to (-1 slots go nowhere).

    For selection experiments; the byte counts of a step are ``accounting.step_traffic``.
    """
    dest = visited_ranks(slot_rank, num_ranks)
    if home is not None:
        dest &= torch.arange(num_ranks, device=dest.device)[None, :] != home.long()[:, None]
    return dest.sum(dim=1)


@dataclass
class _Constants:
    """Index and scalar tensors of one (policy, shape): built once at plan time by ``RankAwareSelector`` (per
    call by the plain functions), so a step builds no tensor from Python values."""

    rows: torch.Tensor  # [max_tokens] int64: 0, 1, ...
    slots: torch.Tensor  # [k] int64: 0 .. k-1
    ranks: torch.Tensor  # [N] int64: 0 .. N-1
    powers: torch.Tensor  # [beta + 1] int64: beta, ..., 0 (the lynx score's exponents of B)
    neg_alpha: torch.Tensor  # 0-d fp32: -alpha (bins per logit, negated)
    margin: torch.Tensor  # 0-d fp32: the confidence margin
    minus_one: torch.Tensor  # 0-d int64
    spare_expert: torch.Tensor  # 0-d int64: E, a slot past the experts for what must not count
    neg_inf: torch.Tensor  # 0-d fp32


def _constants(policy: LynxPolicy, max_tokens: int, num_experts: int, top_k: int, num_ranks: int, device
               ) -> _Constants:
    def full(x, dtype):
        return torch.full((), x, dtype=dtype, device=device)

    return _Constants(
        rows=torch.arange(max_tokens, device=device),
        slots=torch.arange(top_k, device=device),
        ranks=torch.arange(num_ranks, device=device),
        powers=torch.arange(policy.beta, -1, -1, device=device),
        # fp32 like the kernels and reference.affinity_level: -fp32(alpha) == fp32(-alpha), negation is exact.
        neg_alpha=full(-policy.alpha, torch.float32),
        margin=full(policy.margin, torch.float32),
        minus_one=full(-1, torch.int64),
        spare_expert=full(num_experts, torch.int64),
        neg_inf=full(float("-inf"), torch.float32),
    )


def _lynx_votes(policy: LynxPolicy, router: RouterSpec, z: torch.Tensor, sel: torch.Tensor, ids_c: torch.Tensor,
                in_range: torch.Tensor, w: torch.Tensor, num_valid, c: _Constants):
    """``reference.vote`` for a ``LynxPolicy`` with fewer launches, plus what stage c needs of it.

    Returns (votes, weak_level [T, k] bool: level above keep_level, held [T, k] bool or None: held by the
    cap). Bit for bit the same votes as ``reference.vote`` (tests/test_rank_aware.py compares them):
    rank by sorting the picks (ids ascending, then the selection score descending, stably) instead of a
    [T, k, k] count; level = ceil(-alpha * (z - z_best)) clamped to [0, beta], which is -floor(alpha *
    min(z - z_best, 0)) exactly; the per-expert pick counts are the row sums of the per-bin votes.
    """
    T, E = z.shape
    k = router.top_k
    dev = z.device
    sorted_ids, by_id = ids_c.sort(dim=1)
    row_ok = (
        (in_range & (w.clamp(0.0, reference.MAX_GATE_WEIGHT) == w)).all(dim=1)  # weights in [0, MAX]; NaN fails
        & (sorted_ids[:, 1:] != sorted_ids[:, :-1]).all(dim=1)  # no duplicate pick
        & ((z * 0.0).sum(dim=1) == 0)  # every logit finite (inf * 0 and NaN * 0 are NaN)
    )
    if not (num_valid is None or (isinstance(num_valid, int) and num_valid >= T)):
        row_ok &= c.rows[:T] < num_valid
    not_ok = ~row_ok[:, None]

    # The row's picks best first (selection score descending, ties to the lower id); rank = position.
    sel_p = sel.gather(1, ids_c)
    order = by_id.gather(1, sel_p.gather(1, by_id).sort(dim=1, descending=True, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, c.slots.expand(T, k))
    z_p = sel_p if sel is z else z.gather(1, ids_c)
    z_top = z_p.gather(1, order[:, :2])  # logits of the best two picks

    level_f = ((z_p - z_top[:, :1]) * c.neg_alpha).ceil_().clamp_(0, policy.beta).masked_fill_(not_ok, 0)
    level = level_f.long()
    nb = policy.beta + 1
    voting = row_ok[:, None].expand(T, k).long()
    lynx_votes = torch.zeros(E * nb, dtype=torch.int64, device=dev).scatter_add_(
        0, (ids_c * nb + level).view(-1), voting.view(-1)).view(E, nb)

    lead = row_ok & ((z_top[:, 0] - z_top[:, 1]) >= c.margin) if k >= 2 else row_ok  # confident rows
    flagged = (rank == 0) & lead[:, None]  # confident rows' best picks
    held = None
    if policy.moved_weight_q < WEIGHT_Q:
        q = reference.quantized(w.masked_fill(not_ok, 0.0))
        weaker = (q[:, None, :] * (rank[:, None, :] >= rank[:, :, None])).sum(dim=-1)
        held = weaker * WEIGHT_Q > q.sum(dim=1, keepdim=True) * policy.moved_weight_q
        flagged |= held
    # An expert is mandatory if some voting row's flagged pick is it (unflagged picks land on a spare slot).
    mandatory = torch.zeros(E + 1, dtype=torch.bool, device=dev).scatter_(
        0, torch.where(flagged, ids_c, c.spare_expert).view(-1), True)[:E]
    batch = row_ok.sum()
    votes = reference.Votes(row_ok=row_ok, rank=rank, picks=lynx_votes.sum(dim=1), lynx_votes=lynx_votes,
                            mandatory=mandatory, num_voting=batch)
    return votes, level_f > policy.keep_level, held


def _keep_set(policy: LynxPolicy, router: RouterSpec, votes: reference.Votes, c: _Constants
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``reference.keep_set`` for a ``LynxPolicy``: (keep [E] bool, lynx score [E] int64).

    The score sum_j votes[e, j] * B**(beta - j) as one product with the powers of B (the same exact
    integers as reference.lynx_scores' Horner loop: config.LynxPolicy.validate rules out overflow).
    """
    powers = votes.num_voting.pow(c.powers)
    score = (votes.lynx_votes * powers).sum(dim=1)
    theta = powers[policy.keep_level] if policy.min_votes == 1 else policy.min_votes * powers[policy.keep_level]
    m = policy.resolved_min_keep(router)
    theta = torch.minimum(theta, score.topk(m).values[m - 1]).clamp(min=1)
    return (score >= theta) | votes.mandatory, score


def _bound_per_rank(policy: RankAwareLynxPolicy, router: RouterSpec, keep: torch.Tensor, mandatory: torch.Tensor,
                    score: torch.Tensor, sit: torch.Tensor, c: _Constants) -> torch.Tensor:
    """Stage b: the keep set after the busiest-rank bound (a subset of ``keep``).

    One sort of the E scores instead of an [E, E] comparison: experts strongest first (score descending,
    ties to the lower id), so the drop order (lowest score, ties: higher id first) is this order reversed,
    and "goes before e" is "comes after e" here: counts of what comes after are suffix counts.
    """
    N = c.ranks.numel()
    n_keep = keep.sum()
    # ceil((1 + slack) * |keep| / N) with slack in 1/WEIGHT_Q: exact integers, no float rounding.
    bound = ((WEIGHT_Q + policy.rank_slack_q) * n_keep + (WEIGHT_Q * N - 1)) // (WEIGHT_Q * N)
    order = torch.sort(score, descending=True, stable=True).indices
    on_rank = sit[order][:, None] == c.ranks  # [E, N]: the i-th strongest expert sits on rank r
    keep_s = keep[order]
    per_rank = (on_rank & keep_s[:, None]).sum(dim=0)  # kept experts per rank
    movable = on_rank & (keep_s & ~mandatory[order])[:, None]
    # Movable experts of the same rank that go before the i-th (come after it in this order).
    before = movable.sum(dim=0) - movable.cumsum(dim=0)
    over = (movable & (before < per_rank - bound)).any(dim=1)
    # Never below min_keep in total: of the drops, the lowest-scoring ones go first.
    allowance = (n_keep - policy.resolved_min_keep(router)).clamp(min=0)
    drop = over & (over.sum() - over.cumsum(dim=0) < allowance)
    return torch.empty_like(keep).scatter_(0, order, keep_s ^ drop)  # drop is a subset of keep


@dataclass
class RankAwarePlan:
    """Stages a-b of one batch and its picks' classification: what stage c decides on.

    Shapes: T rows, k routed slots, E experts, N ranks. ``select_rank_aware`` is
    ``finish(plan, weak_rank_drops(plan))``; the accuracy harness's rank-drop
    control swaps only stage c.
    """

    policy: RankAwareLynxPolicy
    router: RouterSpec
    logits: torch.Tensor  # [T, E]
    topk_ids: torch.Tensor  # [T, k + shared], as given
    topk_weights: torch.Tensor
    rank_mask: torch.Tensor  # [E, N] bool
    votes: reference.Votes
    sel: torch.Tensor  # [T, E] selection scores
    keep: torch.Tensor  # [E] bool, after the busiest-rank bound
    ids_c: torch.Tensor  # [T, k] routed ids clamped into [0, E)
    pick_rank: torch.Tensor  # [T, k] int64
    home: torch.Tensor  # [T] int64, -1: no home
    survive: torch.Tensor  # [T, k] bool: the pick's expert is kept
    weak: torch.Tensor  # [T, k] bool: the cap lets it move and its level is above keep_level
    candidates: torch.Tensor  # [T, E] bool: kept experts a row does not hold (what a freed slot can take)
    droppable: torch.Tensor  # [T, k] bool: surviving picks of voting rows on a rank other than the row's home
    # Per step, from the rank mask (EPLB may rewrite it in place between steps):
    mask_f: torch.Tensor = field(repr=False, default=None)  # [E, N] fp32 0/1
    replicas: torch.Tensor = field(repr=False, default=None)  # [E] fp32: ranks holding each expert

    def refillable(self, dropped: torch.Tensor) -> torch.Tensor:
        """``dropped`` ([T, k] bool) less the rows whose freed slots could not all be refilled on ranks the
        row still visits (refilling elsewhere would add the rank visits the drops were meant to save)."""
        freed = ~self.survive | dropped
        _, near = _visits(self, freed[None])
        ok = freed.sum(dim=1) <= (self.candidates & near[0]).sum(dim=1)
        return dropped & ok[:, None]


def _visits(plan: RankAwarePlan, freed: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(visits [B, T, N] fp32, near [B, T, E] bool) of rows whose ``freed`` ([B, T, k] bool) slots are emptied.

    visits: 3 on a rank the row still visits (its home, the ranks of its remaining picks), 1 elsewhere;
    near: experts with a replica on a visited rank. With the mask's 0/1 entries the product counts
    replicas + 2 * visited replicas, so near is "above the expert's replica count": small integers,
    exact in fp32 and TF32, and no [T, E, N] temporary.
    """
    B, T, k = freed.shape
    N = plan.rank_mask.shape[1]
    dest = torch.cat([plan.pick_rank.expand(B, T, k).masked_fill(freed, -1), plan.home.expand(B, T)[:, :, None]],
                     dim=2) % (N + 1)  # -1 (none) -> spare column N
    visits = torch.ones(B, T, N + 1, device=freed.device).scatter_(2, dest, 3.0)[:, :, :N]
    return visits, (visits @ plan.mask_f.T) > plan.replicas


def near_experts(freed: torch.Tensor, pick_rank: torch.Tensor, home: torch.Tensor, rank_mask: torch.Tensor
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(visited [T, N], near [T, E]) of rows whose ``freed`` ([T, k] bool) slots are emptied.

    visited: the row's home and the ranks of its remaining picks; near: experts with a
    replica on a visited rank. A 0/1 matmul (counts <= N are exact in fp32 and in TF32)
    instead of a [T, E, N] temporary.
    """
    visited = visited_ranks(torch.cat([torch.where(freed, -1, pick_rank), home[:, None]], dim=1),
                            rank_mask.shape[1])
    return visited, (visited.float() @ rank_mask.float().T) > 0


def refill_stays_near(freed: torch.Tensor, pick_rank: torch.Tensor, home: torch.Tensor, candidates: torch.Tensor,
                      rank_mask: torch.Tensor) -> torch.Tensor:
    """[T] bool: every ``freed`` slot of the row can take a ``candidates`` expert on a rank the row still visits."""
    _, near = near_experts(freed, pick_rank, home, rank_mask)
    return freed.sum(dim=1) <= (candidates & near).sum(dim=1)


def plan_rank_aware(
    policy: RankAwareLynxPolicy,
    router: RouterSpec,
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    rank_mask: torch.Tensor,
    pick_rank: Optional[torch.Tensor] = None,
    home: Optional[torch.Tensor] = None,
    num_valid: Optional[int | torch.Tensor] = None,
    correction_bias: Optional[torch.Tensor] = None,
    *,
    constants: Optional[_Constants] = None,
) -> RankAwarePlan:
    """Stages a (the lynx keep set) and b (the busiest-rank bound), and which picks are weak.

    ``constants``: the selector's plan-time tensors (None: built here).
    """
    T, E = logits.shape
    k = router.top_k
    N = rank_mask.shape[1]
    c = constants if constants is not None else _constants(policy, T, E, k, N, logits.device)
    rank_mask = rank_mask.to(torch.bool)
    # Derived from the mask every step: EPLB rewrites it in place (placement.rank_tables), also inside a
    # CUDA graph, so nothing derived from it may be cached across steps.
    mask_f = rank_mask.float()
    sit = mask_f.argmax(dim=1)  # [E]: the rank a kept expert counts on, the lowest holding it (first maximum)
    ids = topk_ids[:, :k].long()
    ids_c = ids.clamp(0, E - 1)
    in_range = ids == ids_c
    # Default: the lowest rank holding the pick (every expert is on some rank: the selector checks it).
    pick_rank = torch.where(in_range, sit[ids_c], c.minus_one) if pick_rank is None else pick_rank.long()
    home_t = c.minus_one.expand(T) if home is None else home.long()

    # a. The lynx keep set.
    z = logits.float()
    sel = z if correction_bias is None else reference.selection_score(router, logits, correction_bias)
    votes, weak, held = _lynx_votes(policy, router, z, sel, ids_c, in_range, topk_weights[:, :k].float(),
                                    num_valid, c)
    keep, score = _keep_set(policy, router, votes, c)
    # b. Busiest-rank bound.
    if policy.rank_slack is not None:
        keep = _bound_per_rank(policy, router, keep, votes.mandatory, score, sit, c)
    # c's inputs. weak: the cap lets the pick move and its level is above keep_level (level 0 if not voting).
    if held is not None:
        weak = weak & ~held
    survive = keep[ids_c]
    candidates = keep.expand(T, E).clone().scatter_(1, ids_c, False)
    droppable = survive & (pick_rank != home_t[:, None]) & votes.row_ok[:, None]
    return RankAwarePlan(policy, router, logits, topk_ids, topk_weights, rank_mask, votes, sel, keep, ids_c,
                         pick_rank, home_t, survive, weak, candidates, droppable, mask_f, mask_f.sum(dim=1))


def weak_rank_drops(plan: RankAwarePlan) -> torch.Tensor:
    """Stage c: [T, k] bool, the picks freed with their rank.

    A surviving pick moves with its rank when the rank is not the row's home and
    holds no strong (not weak) surviving pick of the row.
    """
    strong = plan.survive & ~plan.weak
    same_rank = plan.pick_rank[:, :, None] == plan.pick_rank[:, None, :]
    rank_has_strong = (same_rank & strong[:, None, :]).any(dim=-1)
    return plan.droppable & plan.weak & ~rank_has_strong


def finish_rank_aware(plan: RankAwarePlan, dropped: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, SelectionInfo]:
    """Stages d-e given stage c's drops (a subset of ``plan.droppable``): refill, weights, outputs.

    A row drops its picks only if every slot it frees can be refilled on a rank it still visits
    (``RankAwarePlan.refillable``).
    """
    return _finish(plan, dropped & plan.droppable)


def _finish(plan: RankAwarePlan, dropped: torch.Tensor, constants: Optional[_Constants] = None,
            out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, SelectionInfo]:
    """``finish_rank_aware`` for drops known to be droppable; ``out``: (ids, weights, slot_rank) to write into."""
    T, E = plan.logits.shape
    dev = plan.logits.device
    router, keep, ids_c, pick_rank, cand = plan.router, plan.keep, plan.ids_c, plan.pick_rank, plan.candidates
    row_ok, topk_ids, topk_weights = plan.votes.row_ok, plan.topk_ids, plan.topk_weights
    k = router.top_k
    neg_inf = constants.neg_inf if constants is not None else torch.full((), float("-inf"), device=dev)

    # Only where every freed slot can be refilled on a rank the row still visits: rank dropping never
    # leaves a slot (or a row) empty, and never adds a rank visit. The ranks a row visits with its drops
    # (to check that) and without them (for rows that fail it) in one go.
    unkept = ~plan.survive
    freed2 = torch.stack([unkept | dropped, unkept])
    visits2, near2 = _visits(plan, freed2)
    near_cand2 = near2 & cand
    ok = (freed2[0].sum(dim=1) <= near_cand2[0].sum(dim=1))[:, None]
    freed = torch.where(ok, freed2[0], freed2[1])
    changed = row_ok & freed.any(dim=1)
    near_cand = torch.where(ok, near_cand2[0], near_cand2[1])  # kept experts the row lacks on ranks it visits
    visits = torch.where(ok, visits2[0], visits2[1])

    # d. Refill. Order: score (desc, ties to the lower id by the stable sort), then near before far, stably.
    by_score = torch.where(cand, plan.sel, neg_inf).sort(dim=1, descending=True, stable=True).indices
    near_first = near_cand.gather(1, by_score).sort(dim=1, descending=True, stable=True).indices
    nth = torch.cumsum(freed, dim=1) - freed.long()  # a freed slot is the row's nth (from 0)
    fill = by_score.gather(1, near_first.gather(1, nth))
    fill = fill.masked_fill(nth >= cand.sum(dim=1, keepdim=True), -1)
    new_ids = torch.where(freed, fill, ids_c)  # only changed rows (all ids in range) use it
    empty = new_ids < 0
    new_c = new_ids.clamp(min=0)
    # A filled slot goes to the lowest visited rank holding its expert (visits 3), else the lowest holding it.
    fill_rank = (plan.mask_f[new_c] * visits[:, None, :]).argmax(dim=-1)
    new_rank = torch.where(freed, fill_rank, pick_rank).masked_fill(empty, -1)

    # e. Weights: reference.gate_weights', so rows lynx and lynx_ep rewrite alike get the same bits
    # (an empty slot's gate is exp(-inf) = 0 as there; every changed row keeps a slot).
    z_new = plan.logits.float().gather(1, new_c)
    if router.scoring_func != "softmax":  # log sigmoid: a sigmoid gate itself underflows to 0 below logit -88
        z_new = torch.nn.functional.logsigmoid(z_new)
    z_new = z_new.masked_fill(empty, float("-inf"))
    gate = torch.exp(z_new - z_new.amax(dim=1, keepdim=True))
    new_w = topk_weights[:, :k].float().sum(dim=1, keepdim=True) * gate / gate.sum(dim=1, keepdim=True)

    ch = changed[:, None]
    if out is None:
        out_ids, out_w = torch.empty_like(topk_ids), torch.empty_like(topk_weights)
        slot_rank = torch.empty_like(pick_rank)
    else:
        out_ids, out_w, slot_rank = out
    if topk_ids.shape[1] > k:  # shared-expert slots: as given
        out_ids[:, k:] = topk_ids[:, k:]
        out_w[:, k:] = topk_weights[:, k:]
    torch.where(ch, new_ids.to(topk_ids.dtype), topk_ids[:, :k], out=out_ids[:, :k])
    torch.where(ch, new_w.to(topk_weights.dtype), topk_weights[:, :k], out=out_w[:, :k])
    torch.where(ch, new_rank, pick_rank, out=slot_rank)

    # Experts the voting rows use (new_ids is every voting row's output; -1 slots and other rows land on a
    # spare slot).
    used_ids = (new_ids % (E + 1)).masked_fill_(~row_ok[:, None], E)
    used = torch.zeros(E + 1, dtype=torch.bool, device=dev).scatter_(0, used_ids.view(-1), True)
    info = SelectionInfo(
        keep=keep,
        experts_before=(plan.votes.picks > 0).sum(),
        experts_after=used[:E].sum(),
        rows_changed=changed.sum(),
        rows_voting=plan.votes.voting_rows(),
        moved_weight=reference.moved_weight(k, topk_ids, topk_weights, new_ids, changed),
    )
    return out_ids, out_w, slot_rank, info


def select_rank_aware(
    policy: RankAwareLynxPolicy,
    router: RouterSpec,
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    rank_mask: torch.Tensor,
    pick_rank: Optional[torch.Tensor] = None,
    home: Optional[torch.Tensor] = None,
    num_valid: Optional[int | torch.Tensor] = None,
    correction_bias: Optional[torch.Tensor] = None,
    *,
    constants: Optional[_Constants] = None,
    out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, SelectionInfo]:
    """Run ``lynx_ep`` on one batch; returns (ids, weights, slot_rank, info). Inputs are not modified.

    logits: [T, E]; topk_ids / topk_weights: [T, k + shared], LOGICAL ids.
    rank_mask: [E, N] bool, logical expert e has a replica on rank r (every
        expert on at least one rank; ``ExpertPlacement.logical_on_rank``).
    pick_rank: [T, k] int rank each routed pick goes to (None: the lowest rank
        holding it); taken as given, it should hold the pick.
    home: [T] int rank that owns each row (None, or -1 in a row: no home).
    num_valid: rows at and after it are padding (int or 0-d tensor; None: all).
    constants: ``RankAwareSelector``'s plan-time tensors (None: built here).
    out: (ids, weights, slot_rank) tensors shaped like topk_ids, topk_weights and
        [T, k] int64 to write the results into (a selector's buffers; None: new ones).

    slot_rank [T, k] int64 is the rank each output routed slot goes to: -1 for
    -1 slots, ``pick_rank`` for slots that did not change. ``info.keep`` is the
    kept set after the per-rank bound; ``info.experts_after`` counts the experts
    the voting rows actually use (a kept expert may lose all its rows to rank drops).
    """
    plan = plan_rank_aware(policy, router, logits, topk_ids, topk_weights, rank_mask, pick_rank, home,
                           num_valid, correction_bias, constants=constants)
    return _finish(plan, weak_rank_drops(plan), constants, out)  # weak_rank_drops is a subset of droppable


class RankAwareSelector(ExpertSelector):
    """``ExpertSelector`` for policy ``lynx_ep``: knows which ranks hold each expert.

    Same plan/run contract as ``ExpertSelector`` (torch backend only: the kernels do
    not implement ``lynx_ep``). ``rank_mask`` [E, N] bool says that logical expert e
    has a replica on expert-parallel rank r (``ExpertPlacement.logical_on_rank``); it
    is kept as given, so a caller may rewrite it in place when EPLB rebalances.
    After each ``run`` the rank of every output routed slot is in ``last_slot_rank``.
    """

    _rank_aware = True

    def __init__(self, router: RouterSpec, policy: RankAwareLynxPolicy, max_tokens: int,
                 device: torch.device | str = "cpu", ids_dtype: torch.dtype = torch.int32,
                 weights_dtype: torch.dtype = torch.float32, correction_bias: Optional[torch.Tensor] = None,
                 backend: str = "auto", *, rank_mask: torch.Tensor, stats: Optional[torch.Tensor] = None):
        if not isinstance(policy, RankAwareLynxPolicy):
            raise ConfigError(f"RankAwareSelector runs policy lynx_ep, not {policy.name}")
        super().__init__(router, policy, max_tokens, device, ids_dtype, weights_dtype, correction_bias,
                         backend, stats=stats)
        self.rank_mask = self._plan_rank_mask(router, rank_mask, self.device)
        self._constants = _constants(policy, max_tokens, router.num_experts, router.top_k, self.rank_mask.shape[1],
                                     self.device)
        self._slot_rank = torch.empty(max_tokens, router.top_k, dtype=torch.int64, device=self.device)
        self.last_slot_rank: Optional[torch.Tensor] = None

    @staticmethod
    def _plan_rank_mask(router: RouterSpec, rank_mask: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        E = router.num_experts
        if rank_mask is None:
            raise ConfigError("policy lynx_ep needs rank_mask ([E, N] bool: which ranks hold each expert)")
        if rank_mask.dim() != 2 or rank_mask.shape[0] != E or rank_mask.shape[1] < 1 or rank_mask.dtype != torch.bool:
            raise ConfigError(f"rank_mask must be a [{E}, N] bool tensor, got {rank_mask.dtype} {tuple(rank_mask.shape)}")
        if not bool(rank_mask.any(dim=1).all()):  # one sync, at plan time
            raise ConfigError("rank_mask: every expert needs a replica on at least one rank")
        return rank_mask.to(device).contiguous()

    def _check_ranks(self, T: int, pick_rank, home) -> None:
        for name, t, shape in (("pick_rank", pick_rank, (T, self.router.top_k)), ("home", home, (T,))):
            if t is None:
                continue
            if tuple(t.shape) != shape or t.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{name} must be an int32/int64 tensor of shape {shape}, got {t.dtype} {tuple(t.shape)}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, selector planned for {self.device}")
            # Values only where checking costs no device sync (and not while torch.compile traces: a
            # data-dependent branch would break the graph); on GPUs our hook derives them from the placement.
            if t.device.type == "cpu" and not torch.compiler.is_compiling():
                N = self.rank_mask.shape[1]
                if t.numel() and bool(((t < -1) | (t >= N)).any()):
                    raise ValueError(f"{name} holds ranks outside [-1, {N}) (the rank mask has {N} ranks; -1: none)")

    def run(self, router_logits: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
            num_valid: Optional[int | torch.Tensor] = None, pick_rank: Optional[torch.Tensor] = None,
            home: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``ExpertSelector.run`` plus ``pick_rank`` [T, k] (rank each routed pick goes to; None: the lowest
        rank holding it) and ``home`` [T] (rank owning each row; None or -1: none); the output slots'
        ranks are then in ``last_slot_rank`` [T, k] (-1 for empty slots)."""
        self._check(router_logits, topk_ids, topk_weights, num_valid)
        T = router_logits.shape[0]
        self._check_ranks(T, pick_rank, home)
        self.last_slot_rank = self._slot_rank[:T]
        return self._run(router_logits, topk_ids, topk_weights, num_valid, pick_rank=pick_rank, home=home)

    def _select_torch(self, router_logits, topk_ids, topk_weights, num_valid, pick_rank=None, home=None):
        T = router_logits.shape[0]
        ids, w, _, info = select_rank_aware(
            self.policy, self.router, router_logits, topk_ids, topk_weights, self.rank_mask,
            pick_rank, home, num_valid, self.correction_bias, constants=self._constants,
            out=(self._out_ids[:T], self._out_weights[:T], self.last_slot_rank),
        )
        return ids, w, info

    # The results are written straight into this selector's buffers (ExpertSelector._run need not copy them).
    _select_torch.writes_outputs = True
