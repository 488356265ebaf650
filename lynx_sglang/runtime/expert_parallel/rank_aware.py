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
"""

from __future__ import annotations

from dataclasses import dataclass
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


def _weak_picks(policy: LynxPolicy, logits: torch.Tensor, topk_weights: torch.Tensor, ids_c: torch.Tensor,
                rank: torch.Tensor, row_ok: torch.Tensor, k: int) -> torch.Tensor:
    """[T, k] bool: picks the cap lets move and whose lynx level is above keep_level (as in the vote)."""
    below = (reference.affinity_level(policy, logits.float(), ids_c, rank, row_ok[:, None]) > policy.keep_level)
    below &= row_ok[:, None]
    if policy.moved_weight_q >= WEIGHT_Q:
        return below
    return below & ~reference.held_by_cap(policy, topk_weights[:, :k].float(), rank, row_ok[:, None])


def _bound_per_rank(policy: RankAwareLynxPolicy, router: RouterSpec, votes: reference.Votes,
                    keep: torch.Tensor, sit: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """Stage b: the keep set after the busiest-rank bound (a subset of ``keep``)."""
    E = keep.numel()
    dev = keep.device
    n_keep = keep.sum()
    # ceil((1 + slack) * |keep| / N) with slack in 1/WEIGHT_Q: exact integers, no float rounding.
    num = (WEIGHT_Q + policy.rank_slack_q) * n_keep
    bound = (num + WEIGHT_Q * num_ranks - 1) // (WEIGHT_Q * num_ranks)
    per_rank = torch.zeros(num_ranks, dtype=torch.int64, device=dev).scatter_add_(0, sit, keep.long())
    excess = (per_rank - bound).clamp(min=0)

    score = reference.lynx_scores(votes.lynx_votes, votes.voting_rows())
    movable = keep & ~votes.mandatory
    ids = torch.arange(E, device=dev)
    # before[e, f]: f goes before e in the drop order (lower score, then higher id).
    before = (score[None, :] < score[:, None]) | ((score[None, :] == score[:, None]) & (ids[None, :] > ids[:, None]))
    same_rank = sit[None, :] == sit[:, None]
    pos_in_rank = (before & same_rank & movable[None, :]).sum(dim=1)
    over = movable & (pos_in_rank < excess[sit])
    # Never below min_keep in total: of the drops, the lowest-scoring ones go first.
    allowance = (n_keep - policy.resolved_min_keep(router)).clamp(min=0)
    pos_all = (before & over[None, :]).sum(dim=1)
    return keep & ~(over & (pos_all < allowance))


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

    @property
    def droppable(self) -> torch.Tensor:
        """[T, k] bool: surviving picks of voting rows on a rank other than the row's home."""
        return self.survive & (self.pick_rank != self.home[:, None]) & self.votes.row_ok[:, None]

    def refillable(self, dropped: torch.Tensor) -> torch.Tensor:
        """``dropped`` ([T, k] bool) less the rows whose freed slots could not all be refilled on ranks the
        row still visits (refilling elsewhere would add the rank visits the drops were meant to save)."""
        ok = refill_stays_near(~self.survive | dropped, self.pick_rank, self.home, self.candidates, self.rank_mask)
        return dropped & ok[:, None]


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
) -> RankAwarePlan:
    """Stages a (the lynx keep set) and b (the busiest-rank bound), and which picks are weak."""
    T, E = logits.shape
    k = router.top_k
    N = rank_mask.shape[1]
    if num_valid is None:
        num_valid = T
    rank_mask = rank_mask.to(torch.bool)
    sit = lowest_rank(rank_mask).clamp(min=0)  # [E]: the rank a kept expert counts on
    if pick_rank is None:
        pick_rank = default_pick_rank(topk_ids, rank_mask, k)
    home_t = torch.full((T,), -1, dtype=torch.int64, device=logits.device) if home is None else home.long()

    # a. The lynx keep set (vote() and keep_set() dispatch on LynxPolicy, which this subclasses).
    sel = reference.selection_score(router, logits, correction_bias)
    votes = reference.vote(policy, router, logits, topk_ids, topk_weights, num_valid, sel)
    keep = reference.keep_set(policy, router, votes)
    # b. Busiest-rank bound.
    if policy.rank_slack is not None:
        keep = _bound_per_rank(policy, router, votes, keep, sit, N)
    ids_c = topk_ids[:, :k].long().clamp(0, E - 1)
    weak = _weak_picks(policy, logits, topk_weights, ids_c, votes.rank, votes.row_ok, k)
    in_row = torch.zeros(T, E, dtype=torch.bool, device=logits.device)
    in_row.scatter_(1, ids_c, True)
    return RankAwarePlan(policy, router, logits, topk_ids, topk_weights, rank_mask, votes, sel, keep, ids_c,
                         pick_rank.long(), home_t, keep[ids_c], weak, keep[None, :] & ~in_row)


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
    T, E = plan.logits.shape
    dev = plan.logits.device
    router, keep, ids_c, pick_rank, rank_mask = plan.router, plan.keep, plan.ids_c, plan.pick_rank, plan.rank_mask
    row_ok, survive, topk_ids, topk_weights = plan.votes.row_ok, plan.survive, plan.topk_ids, plan.topk_weights
    k = router.top_k
    cand = plan.candidates
    n_cand = cand.sum(dim=1)
    # Only where every freed slot can be refilled on a rank the row still visits: rank dropping never
    # leaves a slot (or a row) empty, and never adds a rank visit.
    dropped = plan.refillable(dropped & plan.droppable)
    freed = ~survive | dropped
    changed = row_ok & freed.any(dim=1)

    # d. Refill. visited[t, r]: the row's home and the ranks of its surviving picks; near[t, e]: e has a
    # replica on one of them.
    visited, near = near_experts(freed, pick_rank, plan.home, rank_mask)
    # Order: score (desc, ties to the lower id by the stable sort), then the group, stably.
    cand_score = torch.where(cand, plan.sel, torch.full_like(plan.sel, float("-inf")))
    by_score = torch.sort(cand_score, dim=1, descending=True, stable=True).indices
    group = (cand.long() + (cand & near).long()).gather(1, by_score)  # 2: near, 1: far, 0: not a candidate
    order = by_score.gather(1, torch.sort(group, dim=1, descending=True, stable=True).indices)
    free_rank = torch.cumsum(freed.long(), dim=1) - 1
    fill = order.gather(1, free_rank.clamp(0, E - 1))
    fill = torch.where(free_rank < n_cand[:, None], fill, torch.full_like(fill, -1))
    new_ids = torch.where(freed, fill, ids_c)  # only changed rows (all ids in range) use it

    holds = rank_mask[fill.clamp(min=0)]  # [T, k, N]
    fill_rank = torch.where((holds & visited[:, None, :]).any(dim=-1),
                            lowest_rank(holds & visited[:, None, :]), lowest_rank(holds))
    new_rank = torch.where(freed, torch.where(fill >= 0, fill_rank, torch.full_like(fill_rank, -1)), pick_rank)

    # e. Weights: reference.reroute's, so rows lynx and lynx_ep rewrite alike get the same bits.
    new_w = reference.gate_weights(router, plan.logits, new_ids, topk_weights)

    out_ids = topk_ids.clone()
    out_w = topk_weights.clone()
    out_ids[:, :k] = torch.where(changed[:, None], new_ids.to(topk_ids.dtype), topk_ids[:, :k])
    out_w[:, :k] = torch.where(changed[:, None], new_w.to(topk_weights.dtype), topk_weights[:, :k])
    slot_rank = torch.where(changed[:, None], new_rank, pick_rank)

    used = torch.zeros(E + 1, dtype=torch.bool, device=dev)
    out_k = out_ids[:, :k].long()
    used.scatter_(0, torch.where(row_ok[:, None] & (out_k >= 0), out_k, E).reshape(-1), True)
    info = SelectionInfo(
        keep=keep,
        experts_before=(plan.votes.picks > 0).sum(),
        experts_after=used[:E].sum(),
        rows_changed=changed.sum(),
        rows_voting=row_ok.sum(),
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
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, SelectionInfo]:
    """Run ``lynx_ep`` on one batch; returns (ids, weights, slot_rank, info). Inputs are not modified.

    logits: [T, E]; topk_ids / topk_weights: [T, k + shared], LOGICAL ids.
    rank_mask: [E, N] bool, logical expert e has a replica on rank r (every
        expert on at least one rank; ``ExpertPlacement.logical_on_rank``).
    pick_rank: [T, k] int rank each routed pick goes to (None: the lowest rank
        holding it); taken as given, it should hold the pick.
    home: [T] int rank that owns each row (None, or -1 in a row: no home).
    num_valid: rows at and after it are padding (int or 0-d tensor; None: all).

    slot_rank [T, k] int64 is the rank each output routed slot goes to: -1 for
    -1 slots, ``pick_rank`` for slots that did not change. ``info.keep`` is the
    kept set after the per-rank bound; ``info.experts_after`` counts the experts
    the voting rows actually use (a kept expert may lose all its rows to rank drops).
    """
    plan = plan_rank_aware(policy, router, logits, topk_ids, topk_weights, rank_mask, pick_rank, home,
                           num_valid, correction_bias)
    return finish_rank_aware(plan, weak_rank_drops(plan))


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
        ids, w, slot_rank, info = select_rank_aware(
            self.policy, self.router, router_logits, topk_ids, topk_weights, self.rank_mask,
            pick_rank, home, num_valid, self.correction_bias,
        )
        self.last_slot_rank.copy_(slot_rank)
        return ids, w, info
