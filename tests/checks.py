"""Contract checks shared by the tests: what every policy's output must satisfy.

Written from docs/policies.md, "The contract", without the reference's code: which rows vote and how each
row ranks its picks are computed here in plain Python, so a bug in ``reference.vote`` cannot hide itself.
"""

from __future__ import annotations

import math

import torch

from lynx_sglang.runtime.selection.config import BudgetPolicy, LynxPolicy, OeaPolicy, OffPolicy, RouterSpec

# The largest routed weight a voting row may hold (docs/policies.md, "The contract").
MAX_WEIGHT = 1.0e6


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's raw bits (so NaN == NaN and -0.0 != 0.0)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def voting_rows(router: RouterSpec, logits, ids, w, num_valid) -> torch.Tensor:
    """[T] bool: which rows vote, from docs/policies.md "The contract" in plain Python (not the reference's
    code): the row is below ``num_valid``, its k routed ids are in [0, E) and distinct, all its logits are
    finite and all its routed weights are in [0, 1e6] (NaN is not)."""
    T, E, k = logits.shape[0], router.num_experts, router.top_k
    nv = T if num_valid is None else int(num_valid)
    out = []
    for t in range(T):
        picks = [int(e) for e in ids[t, :k].tolist()]
        weights = [float(x) for x in w[t, :k].float().tolist()]
        out.append(t < nv and all(0 <= e < E for e in picks) and len(set(picks)) == k
                   and all(math.isfinite(float(z)) for z in logits[t].float().tolist())
                   and all(0.0 <= x <= MAX_WEIGHT for x in weights))
    return torch.tensor(out, dtype=torch.bool).reshape(T)


def selection_scores(router: RouterSpec, logits, bias) -> list:
    """Per row, the quantity the router ranks experts by (docs/policies.md, "Ranking and ties"): the logit
    without a correction bias; with one, softmax(z) or sigmoid(z) plus the bias, in fp32 as routers compute
    it (the kernels compare fp32 scores exactly)."""
    z = logits.detach().cpu().float()
    if bias is None:
        return z.tolist()
    gate = z.softmax(dim=-1) if router.scoring_func == "softmax" else z.sigmoid()
    return (gate + bias.detach().cpu().float()).tolist()


def pick_ranks(router: RouterSpec, logits, ids, bias, ok) -> torch.Tensor:
    """[T, k] int64 rank of each routed pick in its row (0 = best: highest score, ties to the lower id), in
    plain Python; rows that do not vote get -1."""
    k = router.top_k
    scores = selection_scores(router, logits, bias)
    ranks = []
    for t, row in enumerate(ids[:, :k].tolist()):
        if not ok[t]:
            ranks.append([-1] * k)
            continue
        order = sorted(range(k), key=lambda s: (-scores[t][row[s]], row[s]))
        r = [0] * k
        for position, s in enumerate(order):
            r[s] = position
        ranks.append(r)
    return torch.tensor(ranks, dtype=torch.int64).reshape(-1, k)


def distinct(ids: torch.Tensor, rows: torch.Tensor) -> set:
    """Distinct routed expert ids (>= 0) over the given rows."""
    sel = ids[rows]
    return set(sel[sel >= 0].tolist())


def assert_contract(router: RouterSpec, policy, logits, ids, w, num_valid, bias, out_ids, out_w, stats=None):
    """Every invariant of docs/policies.md that holds for any input."""
    T, E, k = logits.shape[0], router.num_experts, router.top_k
    assert out_ids.shape == ids.shape and out_ids.dtype == ids.dtype
    assert out_w.shape == w.shape and out_w.dtype == w.dtype
    ids, w, out_ids, out_w = ids.cpu(), w.cpu(), out_ids.cpu(), out_w.cpu()
    ok = voting_rows(router, logits, ids, w, num_valid)

    # Rows that do not vote (padding, malformed) and all shared slots are untouched, bit for bit.
    assert torch.equal(out_ids[~ok], ids[~ok])
    assert torch.equal(bits(out_w[~ok]), bits(w[~ok]))
    assert torch.equal(out_ids[:, k:], ids[:, k:]) and torch.equal(bits(out_w[:, k:]), bits(w[:, k:]))

    r_ids, r_w = out_ids[ok, :k].long(), out_w[ok, :k].float()
    o_ids, o_w = ids[ok, :k].long(), w[ok, :k].float()
    # Ids in range, -1 only with weight 0, no duplicate expert in a row.
    assert ((r_ids >= -1) & (r_ids < E)).all()
    assert (r_w[r_ids < 0] == 0).all()
    for row in r_ids.tolist():
        real = [e for e in row if e >= 0]
        assert len(real) == len(set(real)), f"duplicate expert in row {row}"
        assert len(real) >= 1
    # Weights non-negative, row sums kept.
    assert (r_w >= 0).all()
    tol = 1e-5 if w.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(r_w.sum(1), o_w.sum(1), rtol=tol, atol=tol)
    # A row either is unchanged (bit for bit) or keeps its surviving picks in their slots.
    unchanged = (r_ids == o_ids).all(1)
    assert torch.equal(bits(out_w[ok][unchanged]), bits(w[ok][unchanged]))
    keep = torch.zeros(E, dtype=torch.bool)
    after = distinct(out_ids[:, :k], ok)
    keep[list(after)] = True
    surv = keep[o_ids]
    assert torch.equal(r_ids[surv], o_ids[surv])
    # Selection only ever removes experts.
    before = distinct(ids[:, :k], ok)
    assert after <= before

    if isinstance(policy, OffPolicy):
        assert torch.equal(out_ids, ids) and torch.equal(bits(out_w), bits(w))
    if isinstance(policy, BudgetPolicy):
        assert len(after) <= policy.max_experts
    rank = pick_ranks(router, logits, ids, bias, ok)[ok]
    if isinstance(policy, OeaPolicy):
        core = rank < policy.resolved_k0(router)
        assert (r_ids[core] == o_ids[core]).all(), "oea dropped a top-k0 pick"
    if isinstance(policy, LynxPolicy):
        z = logits.cpu().float()[ok]
        zp = z.gather(1, o_ids.clamp(min=0))
        z0 = (zp * (rank == 0)).sum(1, keepdim=True)
        if k >= 2:
            z1 = (zp * (rank == 1)).sum(1)
            confident = (z0[:, 0] - z1) >= torch.tensor(policy.margin, dtype=torch.float32)
            assert (r_ids[rank == 0][confident] == o_ids[rank == 0][confident]).all(), "lost a confident rank-0"
        if policy.min_votes == 1:
            # No pick within keep_level/alpha logits of its row's best is ever lost.
            near = (zp - z0) * torch.tensor(policy.alpha, dtype=torch.float32) >= -policy.keep_level
            assert (r_ids[near] == o_ids[near]).all(), "lost a pick above the keep level"

    if stats is not None:
        assert stats.steps == (1 if T else 0)
        assert stats.rows_voting == int(ok.sum())
        assert stats.experts_before == len(before)
        assert stats.experts_after == len(after)
        assert stats.rows_changed == int((~unchanged).sum())
        # Moved weight, from plain Python: the weight (in 1/65536, rounded half up per pick) each row had on
        # experts it no longer holds, summed over rows.
        moved = 0
        for before_row, after_row, w_row in zip(o_ids.tolist(), r_ids.tolist(), o_w.tolist()):
            moved += sum(math.floor(x * 65536 + 0.5) for e, x in zip(before_row, w_row) if e not in after_row)
        assert stats.moved_weight == moved
