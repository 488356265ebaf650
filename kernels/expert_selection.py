"""Fused Triton kernels for batch-aware expert selection: three launches per MoE layer.

Read top to bottom beside its spec, ``lynx_sglang/runtime/selection/reference.py`` (same three
stages, same names):

1. ``_vote_kernel``    (T / BLOCK_T programs): validate rows, rank each row's picks,
                       atomically add integer votes into E-long scratch buffers.
2. ``_keep_kernel``    (1 program): votes -> kept-expert mask; adds the batch's
                       statistics; zeroes the scratch buffers for the next call.
3. ``_reroute_kernel`` (T / BLOCK_T programs): rows that lost a pick take their best
                       kept experts (by router score, or with lynx's ``refill_similarity``
                       by score + the dropped expert's row of the [E, E] refill bias);
                       weights from the logits, rescaled to the row sum.

Static shapes, no host synchronisation (the valid-row count may be a device
tensor), no allocation per call: safe under CUDA-graph capture. All
id-deciding arithmetic is integer or exact fp32 comparisons, so ids match the
reference exactly; weights match to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from lynx_sglang.runtime.selection.config import POLICY_IDS, WEIGHT_Q, BudgetPolicy, LynxPolicy, OeaPolicy, Policy, RouterSpec
from lynx_sglang.runtime.selection.reference import MAX_GATE_WEIGHT, WEIGHT_SCALE
from lynx_sglang.runtime.selection.stats import StatField

_OFF, _LYNX, _OEA, _BUDGET = (tl.constexpr(POLICY_IDS[n]) for n in ("off", "lynx", "oea", "budget"))
_MAX_W = tl.constexpr(MAX_GATE_WEIGHT)
_Q_SCALE = tl.constexpr(WEIGHT_SCALE)
_Q_INT = tl.constexpr(WEIGHT_Q)
_FP32_MAX = tl.constexpr(3.4028234663852886e38)
# Offsets of the statistics vector (one layout: lynx_sglang.runtime.selection.stats.StatField).
_STEPS, _BEFORE, _AFTER, _CHANGED, _VOTING, _MOVED = (tl.constexpr(int(f)) for f in (
    StatField.STEPS, StatField.EXPERTS_BEFORE, StatField.EXPERTS_AFTER, StatField.ROWS_CHANGED, StatField.ROWS_VOTING,
    StatField.MOVED_WEIGHT))


@triton.jit
def _score_at(z, zmax, zsum, bias, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr):
    """fp32 score the router ranks by, elementwise (reference.selection_score).

    ``zmax``/``zsum`` are the row's max logit and sum of exp(z - zmax) (used by
    softmax routers with a bias only); ``bias`` the correction bias at each element.
    """
    if HAS_BIAS:
        if SOFTMAX:
            s = tl.exp(z - zmax) / zsum
        else:
            s = 1.0 / (1.0 + tl.exp(-z))
        return s + bias
    else:
        return z


@triton.jit
def _load_rows(logits_ptr, stride_l, rows, in_t, E: tl.constexpr, E_PAD: tl.constexpr):
    """Load a block of logit rows as fp32 [BT, E_PAD]: returns (z, zmax, zsum, row_finite).

    Padded columns hold -inf; non-finite entries are zeroed (such rows never vote
    and pass through unchanged, so their values only need to stay quiet).
    """
    eidx = tl.arange(0, E_PAD)
    emask = eidx < E
    m2 = in_t[:, None] & emask[None, :]
    z = tl.load(logits_ptr + rows[:, None] * stride_l + eidx[None, :], mask=m2, other=0.0).to(tl.float32)
    fin = (z == z) & (tl.abs(z) <= _FP32_MAX)
    row_finite = tl.min(tl.where(emask[None, :], fin.to(tl.int32), 1), axis=1) == 1
    z = tl.where(fin, z, 0.0)
    z = tl.where(emask[None, :], z, float("-inf"))
    zmax = tl.max(z, axis=1)
    zsum = tl.sum(tl.exp(z - zmax[:, None]), axis=1)
    return z, zmax, zsum, row_finite


@triton.jit
def _vote_kernel(
    logits_ptr, stride_l, ids_ptr, stride_i, w_ptr, stride_w, bias_ptr,
    num_valid_ptr, num_valid, T,
    row_ok_ptr, picks_ptr, votes_ptr, flags_ptr, bscore_ptr, voters_ptr,
    alpha, margin, move_q,
    E: tl.constexpr, K: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
    NB: tl.constexpr, K0: tl.constexpr, POLICY: tl.constexpr, CAP_MOVES: tl.constexpr,
    SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, NV_FROM_PTR: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = rows < T
    nv = tl.load(num_valid_ptr) if NV_FROM_PTR else num_valid
    kidx = tl.arange(0, K_PAD)
    kmask = kidx < K
    m2 = in_t[:, None] & kmask[None, :]

    _, zmax, zsum, row_finite = _load_rows(logits_ptr, stride_l, rows, in_t, E, E_PAD)
    ids = tl.load(ids_ptr + rows[:, None] * stride_i + kidx[None, :], mask=m2, other=0)
    w = tl.load(w_ptr + rows[:, None] * stride_w + kidx[None, :], mask=m2, other=0.0).to(tl.float32)

    # Row checks (reference.vote): in range, no duplicate ids, sane weights, real row. The range check is on
    # the ids as given: narrowing int64 first would let 2**32 + e pass as e.
    ok_id = (ids >= 0) & (ids < E)
    ids = ids.to(tl.int32)
    ok_w = (w >= 0.0) & (w <= _MAX_W)  # NaN fails both
    same = (ids[:, :, None] == ids[:, None, :]) & (kidx[:, None] != kidx[None, :])[None, :, :]
    same = same & kmask[None, :, None] & kmask[None, None, :]
    n_bad = tl.sum(tl.where(kmask[None, :], (~(ok_id & ok_w)).to(tl.int32), 0), axis=1)
    n_bad += tl.sum(tl.sum(same.to(tl.int32), axis=2), axis=1)
    row_ok = in_t & (rows < nv) & row_finite & (n_bad == 0)
    tl.store(row_ok_ptr + rows, row_ok.to(tl.int8), mask=in_t)

    # Rank of each pick inside its row: higher score first, ties to the lower id.
    ids_c = tl.minimum(tl.maximum(ids, 0), E - 1)
    z_p = tl.load(logits_ptr + rows[:, None] * stride_l + ids_c, mask=m2, other=0.0).to(tl.float32)
    z_p = tl.where(row_finite[:, None], z_p, 0.0)  # rows with NaN/inf do not vote; keep their math quiet
    b_p = tl.load(bias_ptr + ids_c, mask=m2, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    sel_p = _score_at(z_p, zmax[:, None], zsum[:, None], b_p, SOFTMAX, HAS_BIAS)
    a = sel_p[:, None, :]  # other pick s'
    b = sel_p[:, :, None]  # this pick s
    beats = (a > b) | ((a == b) & (ids_c[:, None, :] < ids_c[:, :, None]))
    beats = beats & kmask[None, None, :]
    rank = tl.sum(beats.to(tl.int32), axis=2)

    vmask = row_ok[:, None] & kmask[None, :]
    tl.atomic_add(picks_ptr + ids_c, tl.full(ids_c.shape, 1, tl.int32), mask=vmask)
    tl.atomic_add(voters_ptr, tl.sum(row_ok.to(tl.int32), axis=0))

    if POLICY == _LYNX:
        z_r0 = tl.sum(tl.where((rank == 0) & kmask[None, :], z_p, 0.0), axis=1)
        affinity = tl.minimum(z_p - z_r0[:, None], 0.0)
        level = tl.minimum(-tl.floor(affinity * alpha), NB - 1.0)
        level = tl.where(vmask, level, 0.0).to(tl.int32)
        tl.atomic_add(votes_ptr + ids_c * NB + level, tl.full(ids_c.shape, 1, tl.int32), mask=vmask)
        if K >= 2:
            z_r1 = tl.sum(tl.where((rank == 1) & kmask[None, :], z_p, 0.0), axis=1)
            confident = (z_r0 - z_r1) >= margin
        else:
            confident = row_ok
        r0 = tl.sum(tl.where((rank == 0) & kmask[None, :], ids_c, 0), axis=1)
        tl.atomic_add(flags_ptr + r0, tl.full(r0.shape, 1, tl.int32), mask=row_ok & confident)
        if CAP_MOVES:  # max_moved_weight < 1: a pick is held once it and the weaker picks outweigh the cap
            q = tl.where(vmask, tl.floor(w * _Q_SCALE + 0.5), 0.0).to(tl.int64)
            weaker_or_self = (rank[:, None, :] >= rank[:, :, None]) & kmask[None, None, :]
            weaker = tl.sum(tl.where(weaker_or_self, q[:, None, :], 0), axis=2)
            held = weaker * _Q_INT > tl.sum(q, axis=1)[:, None] * move_q
            tl.atomic_add(flags_ptr + ids_c, tl.full(ids_c.shape, 1, tl.int32), mask=vmask & held)
    elif POLICY == _BUDGET:
        q = tl.floor(w * _Q_SCALE + 0.5).to(tl.int64)
        tl.atomic_add(bscore_ptr + ids_c, q, mask=vmask)
    if K0 > 0:  # oea's k0 and lynx's keep_top (0 for the other policies): every voting row keeps its K0 best picks
        tl.atomic_add(flags_ptr + ids_c, tl.full(ids_c.shape, 1, tl.int32), mask=vmask & (rank < K0))


@triton.jit
def _lynx_score(votes_ptr, idx, mask, batch, NB: tl.constexpr):
    """Exact integer score sum_j votes[e, j] * B**(NB-1-j) (reference.lynx_scores)."""
    s = tl.zeros(idx.shape, tl.int64)
    for j in tl.static_range(NB):
        s = s * batch + tl.load(votes_ptr + idx * NB + j, mask=mask, other=0).to(tl.int64)
    return s


@triton.jit
def _keep_kernel(
    picks_ptr, votes_ptr, flags_ptr, bscore_ptr, voters_ptr, keep_ptr, stats_ptr,
    E: tl.constexpr, E_PAD: tl.constexpr, NB: tl.constexpr, CHUNK: tl.constexpr, POLICY: tl.constexpr,
    LEVEL_POW: tl.constexpr, MIN_VOTES: tl.constexpr, MIN_KEEP: tl.constexpr, BUDGET: tl.constexpr,
):
    eidx = tl.arange(0, E_PAD)
    emask = eidx < E
    active = tl.load(picks_ptr + eidx, mask=emask, other=0) > 0
    voters = tl.load(voters_ptr)

    if POLICY == _OFF:
        keep = active
    elif POLICY == _OEA:
        keep = tl.load(flags_ptr + eidx, mask=emask, other=0) > 0
    elif POLICY == _BUDGET:  # rank = picked experts that beat e (more weight, or equal and lower id)
        score = tl.load(bscore_ptr + eidx, mask=emask, other=0)
        rank = tl.zeros([E_PAD], tl.int32)
        for c in tl.static_range(0, E_PAD, CHUNK):
            jidx = c + tl.arange(0, CHUNK)
            jm = jidx < E
            sj = tl.load(bscore_ptr + jidx, mask=jm, other=0)
            aj = (tl.load(picks_ptr + jidx, mask=jm, other=0) > 0) & jm
            beats = (sj[:, None] > score[None, :]) | ((sj[:, None] == score[None, :]) & (jidx[:, None] < eidx[None, :]))
            rank += tl.sum((beats & aj[:, None]).to(tl.int32), axis=0)
        keep = active & (rank < BUDGET)
    else:  # lynx
        batch = voters.to(tl.int64)
        score = _lynx_score(votes_ptr, eidx, emask, batch, NB)
        theta = tl.full([], MIN_VOTES, tl.int64)
        for _ in tl.static_range(LEVEL_POW):
            theta = theta * batch
        # m-th largest score = largest S_j with #{e : S_e >= S_j} >= m (0 if fewer are picked).
        if MIN_KEEP <= 16 and E_PAD >= 128:
            # Step down the distinct values from the top until m scores are at or above: at most m - 1 steps,
            # 2 reductions over E each. The pairwise count below costs E^2 / CHUNK: on an H200 (Triton 3.6)
            # the kernel took 19.4 us that way at E = 256 and 4.7 this way; 5.9 and 4.3 at E = 128; but 3.0
            # against 4.0 at E = 64, where the pairwise count stays (benchmarks/results/profile_selection_*).
            t = tl.max(score, axis=0)
            n_ge = tl.sum((score >= t).to(tl.int32), axis=0)
            for _ in tl.static_range(MIN_KEEP - 1):
                below = tl.max(tl.where(score < t, score, 0), axis=0)
                t = tl.where(n_ge < MIN_KEEP, below, t)
                n_ge = tl.sum(((score >= t) & emask).to(tl.int32), axis=0)
            theta_m = tl.where((n_ge >= MIN_KEEP) & (t > 0), t, 0)
        else:
            theta_m = tl.full([], 0, tl.int64)
            for c in tl.static_range(0, E_PAD, CHUNK):
                jidx = c + tl.arange(0, CHUNK)
                jm = jidx < E
                sj = _lynx_score(votes_ptr, jidx, jm, batch, NB)
                n_ge = tl.sum(((score[None, :] >= sj[:, None]) & emask[None, :]).to(tl.int32), axis=1)
                cand = tl.where(jm & (sj > 0) & (n_ge >= MIN_KEEP), sj, 0)
                theta_m = tl.maximum(theta_m, tl.max(cand, axis=0))
        theta = tl.minimum(theta, theta_m)
        theta = tl.maximum(theta, 1)
        mandatory = tl.load(flags_ptr + eidx, mask=emask, other=0) > 0
        keep = ((score >= theta) & emask) | mandatory

    tl.store(keep_ptr + eidx, keep.to(tl.int8), mask=emask)
    # Statistics: steps, distinct experts before / after, (rows changed: reroute), rows voting.
    tl.store(stats_ptr + _STEPS, tl.load(stats_ptr + _STEPS) + 1)
    tl.store(stats_ptr + _BEFORE, tl.load(stats_ptr + _BEFORE) + tl.sum(active.to(tl.int64), axis=0))
    tl.store(stats_ptr + _AFTER, tl.load(stats_ptr + _AFTER) + tl.sum(keep.to(tl.int64), axis=0))
    tl.store(stats_ptr + _VOTING, tl.load(stats_ptr + _VOTING) + voters.to(tl.int64))

    # Leave the scratch buffers zeroed for the next call (saves a memset launch).
    tl.debug_barrier()
    tl.store(picks_ptr + eidx, tl.zeros([E_PAD], tl.int32), mask=emask)
    tl.store(voters_ptr, 0)
    if POLICY == _LYNX:
        for j in tl.static_range(NB):
            tl.store(votes_ptr + eidx * NB + j, tl.zeros([E_PAD], tl.int32), mask=emask)
    if POLICY == _LYNX or POLICY == _OEA:
        tl.store(flags_ptr + eidx, tl.zeros([E_PAD], tl.int32), mask=emask)
    if POLICY == _BUDGET:
        tl.store(bscore_ptr + eidx, tl.zeros([E_PAD], tl.int64), mask=emask)


@triton.jit
def _reroute_kernel(
    logits_ptr, stride_l, ids_ptr, stride_i, w_ptr, stride_w, bias_ptr,
    out_ids_ptr, stride_oi, out_w_ptr, stride_ow,
    row_ok_ptr, keep_ptr, stats_ptr, refill_ptr, T,
    E: tl.constexpr, K: tl.constexpr, KT: tl.constexpr, E_PAD: tl.constexpr, KT_PAD: tl.constexpr,
    SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, REFILL: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = rows < T
    eidx = tl.arange(0, E_PAD)
    emask = eidx < E
    kidx = tl.arange(0, KT_PAD)
    routed = kidx < K
    m_all = in_t[:, None] & (kidx < KT)[None, :]

    ids = tl.load(ids_ptr + rows[:, None] * stride_i + kidx[None, :], mask=m_all, other=0)
    w = tl.load(w_ptr + rows[:, None] * stride_w + kidx[None, :], mask=m_all, other=0.0)
    row_ok = tl.load(row_ok_ptr + rows, mask=in_t, other=0) != 0
    keep_e = (tl.load(keep_ptr + eidx, mask=emask, other=0) != 0) & emask

    ids_c = tl.minimum(tl.maximum(ids, 0), E - 1).to(tl.int32)  # clamp before narrowing, as in the vote
    rmask = row_ok[:, None] & routed[None, :]
    survive = tl.load(keep_ptr + ids_c, mask=rmask, other=1) != 0
    changed = row_ok & (tl.min(survive.to(tl.int32), axis=1) == 0)
    tl.atomic_add(stats_ptr + _CHANGED, tl.sum(changed.to(tl.int64), axis=0))
    # Routed weight on the picks changed rows lose, exact in 1/WEIGHT_Q (reference.moved_weight).
    gone = changed[:, None] & rmask & ~survive
    q = tl.where(gone, tl.floor(w.to(tl.float32) * _Q_SCALE + 0.5), 0.0).to(tl.int64)
    tl.atomic_add(stats_ptr + _MOVED, tl.sum(tl.sum(q, axis=1), axis=0))

    # Candidates: kept experts the row does not already hold.
    z, zmax, zsum, _ = _load_rows(logits_ptr, stride_l, rows, in_t & changed, E, E_PAD)
    bias = tl.load(bias_ptr + eidx, mask=emask, other=0.0).to(tl.float32) if HAS_BIAS else 0.0
    sel = _score_at(z, zmax[:, None], zsum[:, None], bias[None, :], SOFTMAX, HAS_BIAS)
    in_row = tl.zeros([BLOCK_T, E_PAD], tl.int32)
    for s in tl.static_range(K):
        id_s = tl.sum(tl.where(kidx[None, :] == s, ids_c, 0), axis=1)
        in_row = tl.maximum(in_row, (eidx[None, :] == id_s[:, None]).to(tl.int32))
    cand = keep_e[None, :] & (in_row == 0)

    # Freed slots, in slot order, take the best remaining candidate (ties to the lower id) or -1. Best by
    # ``sel``; with REFILL by ``sel + refill[d]``, d the expert the slot held (reference._refill_by_similarity).
    new_ids = ids_c
    for s in tl.static_range(K):
        surv_s = tl.sum(tl.where(kidx[None, :] == s, survive.to(tl.int32), 0), axis=1) != 0
        if REFILL:  # one [E] row of the [E, E] bias per freed slot (contiguous: row d starts at d * E)
            # Slot s's dropped id, read from the loop-carried new_ids (slot s still holds it there). Read from
            # ids_c, the K rows' addresses are loop-invariant and get computed ahead of the loop, all live at
            # once: 255 registers and spills at k = 16, E = 256 on sm_90 (aot_check), 89 this way.
            d_s = tl.sum(tl.where(kidx[None, :] == s, new_ids, 0), axis=1)
            m_s = cand & (changed & ~surv_s)[:, None]  # the untaken candidates: the others never compete
            key = sel + tl.load(refill_ptr + d_s[:, None] * E + eidx[None, :], mask=m_s, other=0.0)
        else:
            key = sel
        best = tl.max(tl.where(cand, key, float("-inf")), axis=1)
        has = tl.max(cand.to(tl.int32), axis=1) > 0
        pick = tl.min(tl.where(cand & (key == best[:, None]), eidx[None, :], E_PAD), axis=1)
        take = (~surv_s) & has
        new_s = tl.where(surv_s, 0, tl.where(has, pick, -1))
        new_ids = tl.where((kidx[None, :] == s) & (~surv_s[:, None]), new_s[:, None], new_ids)
        cand = cand & ~((eidx[None, :] == pick[:, None]) & take[:, None])

    # Gate weights of the new set, rescaled to the row's original routed sum.
    held = (new_ids >= 0) & routed[None, :] & changed[:, None]
    z_new = tl.load(logits_ptr + rows[:, None] * stride_l + tl.maximum(new_ids, 0), mask=held, other=0.0).to(tl.float32)
    if not SOFTMAX:  # log sigmoid, stably: a sigmoid gate itself underflows to 0 below logit -88
        z_new = tl.minimum(z_new, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z_new)))
    # Relative to the row's largest held gate (softmax: the normaliser cancels; sigmoid: no underflow).
    z_max = tl.max(tl.where(held, z_new, float("-inf")), axis=1)
    gate = tl.where(held, tl.exp(z_new - z_max[:, None]), 0.0)
    row_sum = tl.sum(tl.where(routed[None, :], w.to(tl.float32), 0.0), axis=1)
    # Every changed row holds >= 1 expert (the kept set is never empty) and its largest gate is 1: sum >= 1.
    gate_sum = tl.where(changed, tl.sum(gate, axis=1), 1.0)
    new_w = row_sum[:, None] * gate / gate_sum[:, None]

    rewrite = changed[:, None] & routed[None, :]
    out_ids = tl.where(rewrite, new_ids.to(ids.dtype), ids)
    out_w = tl.where(rewrite, new_w.to(w.dtype), w)
    tl.store(out_ids_ptr + rows[:, None] * stride_oi + kidx[None, :], out_ids, mask=m_all)
    tl.store(out_w_ptr + rows[:, None] * stride_ow + kidx[None, :], out_w, mask=m_all)


@dataclass
class Workspace:
    """Per-layer device buffers, allocated once (plan) and reused by every call (run)."""

    row_ok: torch.Tensor  # int8 [max_tokens]
    picks: torch.Tensor  # int32 [E]
    votes: torch.Tensor  # int32 [E * NB]
    flags: torch.Tensor  # int32 [E]
    budget_score: torch.Tensor  # int64 [E]
    voters: torch.Tensor  # int32 [1]
    keep: torch.Tensor  # int8 [E]

    @classmethod
    def allocate(cls, num_experts: int, num_bins: int, max_tokens: int, device) -> "Workspace":
        """Zeroed buffers; the keep kernel re-zeroes the scratch part after each use."""
        z = lambda n, dt: torch.zeros(n, dtype=dt, device=device)  # noqa: E731
        return cls(
            row_ok=z(max(1, max_tokens), torch.int8),
            picks=z(num_experts, torch.int32),
            votes=z(num_experts * num_bins, torch.int32),
            flags=z(num_experts, torch.int32),
            budget_score=z(num_experts, torch.int64),
            voters=z(1, torch.int32),
            keep=z(num_experts, torch.int8),
        )


def interpreting() -> bool:
    """True when these kernels run in Triton's CPU interpreter.

    Triton decides at decoration time (``TRITON_INTERPRET=1`` when this module
    was first imported), so ask the kernel object rather than the environment.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a Triton without the interpreter cannot be interpreting
        return False
    return isinstance(_vote_kernel, InterpretedFunction)


def default_block_t(num_experts: int) -> int:
    """Rows per program: small on GPUs (more programs, fewer registers), large in the interpreter."""
    if interpreting():
        return 128
    return 16 if num_experts <= 128 else 8


def num_bins(policy: Policy) -> int:
    """Affinity bins the workspace needs for ``policy``."""
    return policy.beta + 1 if isinstance(policy, LynxPolicy) else 1


def select_triton(
    policy: Policy,
    router: RouterSpec,
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_valid: Optional[int | torch.Tensor],
    correction_bias: Optional[torch.Tensor],
    ws: Workspace,
    stats: torch.Tensor,
    out_ids: torch.Tensor,
    out_weights: torch.Tensor,
    block_t: Optional[int] = None,
    refill_bias: Optional[torch.Tensor] = None,
) -> None:
    """Launch the three kernels; writes ``out_ids``/``out_weights`` and adds to ``stats``.

    ``refill_bias``: lynx's contiguous fp32 [E, E] refill bias (``refill_similarity`` times the layer's
    expert similarity, made at plan time; reference.reroute) or None (freed slots refill by score).
    Shapes and dtypes are assumed checked by the caller (``ExpertSelector``).
    """
    T, E = logits.shape
    if T == 0:
        return
    K, KT = router.top_k, router.total_slots
    E_PAD = triton.next_power_of_2(E)
    BT = block_t or default_block_t(E)
    grid = (triton.cdiv(T, BT),)
    nv_from_ptr = isinstance(num_valid, torch.Tensor)
    nv_ptr = num_valid if nv_from_ptr else ws.voters  # any int32 pointer when unused
    nv_int = 0 if nv_from_ptr else (T if num_valid is None else int(num_valid))
    has_bias = correction_bias is not None
    bias = correction_bias if has_bias else logits
    softmax = router.scoring_func == "softmax"
    pid = POLICY_IDS[policy.name]
    nb = num_bins(policy)
    lynx = policy if isinstance(policy, LynxPolicy) else None
    refill = refill_bias is not None
    # Picks every voting row keeps by rank: oea's k0, lynx's keep_top; 0 for the other policies.
    k0 = (policy.resolved_k0(router) if isinstance(policy, OeaPolicy)
          else lynx.resolved_keep_top(router) if lynx else 0)

    _vote_kernel[grid](
        logits, logits.stride(0), topk_ids, topk_ids.stride(0), topk_weights, topk_weights.stride(0), bias,
        nv_ptr, nv_int, T,
        ws.row_ok, ws.picks, ws.votes, ws.flags, ws.budget_score, ws.voters,
        float(lynx.alpha) if lynx else 1.0, float(lynx.margin) if lynx else 0.0,
        lynx.moved_weight_q if lynx else WEIGHT_Q,
        E=E, K=K, E_PAD=E_PAD, K_PAD=triton.next_power_of_2(K), NB=nb,
        K0=k0,
        POLICY=pid, CAP_MOVES=bool(lynx and lynx.moved_weight_q < WEIGHT_Q), SOFTMAX=softmax, HAS_BIAS=has_bias, NV_FROM_PTR=nv_from_ptr, BLOCK_T=BT,
    )
    _keep_kernel[(1,)](
        ws.picks, ws.votes, ws.flags, ws.budget_score, ws.voters, ws.keep, stats,
        E=E, E_PAD=E_PAD, NB=nb, CHUNK=min(E_PAD, 32), POLICY=pid,
        LEVEL_POW=(lynx.beta - lynx.keep_level) if lynx else 0,
        MIN_VOTES=lynx.min_votes if lynx else 1,
        MIN_KEEP=lynx.resolved_min_keep(router) if lynx else 0,
        BUDGET=policy.max_experts if isinstance(policy, BudgetPolicy) else 0,
        num_warps=8,  # one program: more threads keep the [CHUNK, E] comparison tile out of local memory
    )
    _reroute_kernel[grid](
        logits, logits.stride(0), topk_ids, topk_ids.stride(0), topk_weights, topk_weights.stride(0), bias,
        out_ids, out_ids.stride(0), out_weights, out_weights.stride(0),
        ws.row_ok, ws.keep, stats, refill_bias if refill else bias, T,  # any pointer when unused
        E=E, K=K, KT=KT, E_PAD=E_PAD, KT_PAD=triton.next_power_of_2(KT),
        SOFTMAX=softmax, HAS_BIAS=has_bias, REFILL=refill, BLOCK_T=BT,
        num_warps=4 if E_PAD <= 64 else 8,
    )

