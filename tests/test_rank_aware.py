"""lynx_ep: rank-aware Lynx selection under expert parallelism (lynx_sglang.runtime.expert_parallel.rank_aware)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from lynx_sglang import ConfigError, ExpertSelector, RouterSpec, make_policy
from lynx_sglang.op_audit import OpAudit
from lynx_sglang.runtime.selection import reference
from lynx_sglang.runtime.expert_parallel import ExpertPlacement, home_rank, step_traffic
from lynx_sglang.runtime.expert_parallel.rank_aware import (
    RankAwareSelector,
    default_pick_rank,
    physical_ids,
    remote_ranks,
    select_rank_aware,
)
from lynx_sglang.runtime.sglang.options import add_cli_args, options_from_args
from lynx_sglang.synthetic import random_logits, route


def ep(router, batch, mask, policy=None, **kw):
    policy = policy or make_policy("lynx_ep")
    return select_rank_aware(policy, router, batch.logits, batch.topk_ids, batch.topk_weights, mask,
                             correction_bias=batch.correction_bias, **kw)


def skewed(router, T, seed, skew=1.5):
    g = torch.Generator().manual_seed(seed)
    return route(router, random_logits(T, router.num_experts, scale=2.0, skew=skew, generator=g))


# ---------------------------------------------------------------------------------------------
# A hand-made batch: E = 8 on N = 4 ranks (rank r holds experts 2r, 2r+1), k = 3.
# t0 picks e0 (rank 0), e2 (rank 1, 0.5 below its best) and e4 (rank 2, 2 logits below: level 2,
# weak, movable under the 0.4 cap). Lynx keeps e4 (t1 wants it at level 0), so under lynx t0 still
# visits three ranks; lynx_ep drops rank 2 and refills from kept e1 on rank 0, which t0 visits,
# although kept e6 (rank 3) scores higher for t0.
HAND = torch.full((3, 8), -5.0)
HAND[0, [0, 2, 4, 6, 1]] = torch.tensor([4.0, 3.5, 2.0, 1.9, 1.8])
HAND[1, [4, 1, 5]] = torch.tensor([4.0, 3.9, 3.8])
HAND[2, [6, 2, 7]] = torch.tensor([4.0, 3.9, 3.8])
HAND_PARAMS = dict(alpha=1.0, beta=3, keep_level=1)


def test_hand_made_example_drops_a_weak_rank():
    router = RouterSpec(8, 3)
    batch = route(router, HAND)
    mask = ExpertPlacement.contiguous(8, 4).logical_on_rank()
    assert batch.topk_ids.tolist() == [[0, 2, 4], [4, 1, 5], [6, 2, 7]]

    lynx_ids, _, lynx_info = reference.select(make_policy("lynx", **HAND_PARAMS), router, batch.logits,
                                              batch.topk_ids, batch.topk_weights)
    assert torch.equal(lynx_ids, batch.topk_ids)  # lynx keeps e4: t0 visits ranks 0, 1, 2
    assert lynx_info.keep.nonzero().flatten().tolist() == [0, 1, 2, 4, 5, 6, 7]

    sel = RankAwareSelector(router, make_policy("lynx_ep", rank_slack=None, **HAND_PARAMS), 3, rank_mask=mask)
    home = torch.tensor([0, 2, 3])
    ids, w = sel.run(batch.logits, batch.topk_ids, batch.topk_weights, home=home)
    assert ids.tolist() == [[0, 2, 1], [4, 1, 5], [6, 2, 7]]
    assert sel.last_slot_rank.tolist() == [[0, 1, 0], [2, 0, 2], [3, 1, 3]]
    g = torch.tensor([math.exp(4.0), math.exp(3.5), math.exp(1.8)])
    torch.testing.assert_close(w[0], g / g.sum())
    assert torch.equal(w[1:], batch.topk_weights[1:])  # unchanged rows bit for bit
    assert remote_ranks(sel.last_slot_rank, home, 4).tolist() == [1, 1, 1]
    assert remote_ranks(default_pick_rank(batch.topk_ids, mask, 3), home, 4).tolist() == [2, 1, 1]
    s = sel.stats()
    assert (s.steps, s.rows_changed, s.rows_voting, s.experts_before, s.experts_after) == (1, 1, 3, 7, 7)

    # The same rank as the row's home is never dropped.
    ids_h, _, sr_h, _ = ep(router, batch, mask, make_policy("lynx_ep", rank_slack=None, **HAND_PARAMS),
                           home=torch.tensor([2, 2, 3]))
    assert torch.equal(ids_h, batch.topk_ids) and sr_h[0].tolist() == [0, 1, 2]


def test_single_request_is_untouched():
    # One row: the kept set is its own picks, so a dropped rank could not be refilled; the row stays.
    router = RouterSpec(32, 4)
    mask = ExpertPlacement.contiguous(32, 4).logical_on_rank()
    for seed in range(5):
        batch = skewed(router, 1, seed)
        ids, w, sr, _ = ep(router, batch, mask, make_policy("lynx_ep", alpha=8.0, max_moved_weight=1.0))
        assert torch.equal(ids, batch.topk_ids) and torch.equal(w, batch.topk_weights)
        assert torch.equal(sr, default_pick_rank(batch.topk_ids, mask, 4))


# ---------------------------------------------------------------------------------------------
# Per-token guarantees, checked with an independent plain-Python computation of the cap.

def held_slots(z, row, weights, cap):
    """Slots of picks the moved-weight cap holds (weights in 1/65536, from the weakest pick up)."""
    order = sorted(range(len(row)), key=lambda s: (-z[row[s]], row[s]))
    q = [math.floor(x * 65536 + 0.5) for x in weights]
    held, running = set(), 0
    for s in reversed(order):
        running += q[s]
        if running * 65536 > sum(q) * round(cap * 65536):
            held.add(s)
    return held


@pytest.mark.parametrize("cap", [0.0, 0.2, 0.4, 0.7])
@pytest.mark.parametrize("alpha", [2.0, 8.0])
def test_held_picks_stay_and_moved_weight_is_capped(cap, alpha):
    router = RouterSpec(32, 4)
    N = 4
    mask = ExpertPlacement.contiguous(32, N).logical_on_rank()
    policy = make_policy("lynx_ep", alpha=alpha, max_moved_weight=cap, rank_slack=0.0)
    moved_any = False
    for seed in range(4):
        batch = skewed(router, 48, seed)
        ids, w, sr, _ = ep(router, batch, mask, policy, home=home_rank(48, N))
        for t in range(48):
            old, new = batch.topk_ids[t].tolist(), ids[t].tolist()
            for s in held_slots(batch.logits[t].tolist(), old, batch.topk_weights[t].tolist(), cap):
                assert new[s] == old[s] and sr[t, s] == old[s] // 8
            gone = [s for s, e in enumerate(old) if e not in new]
            moved = float(batch.topk_weights[t, gone].sum()) / float(batch.topk_weights[t].sum())
            assert moved <= cap + 4 / 65536
            moved_any |= bool(gone)
    if cap == 0.0:
        assert not moved_any
    else:
        assert moved_any


def test_pass_through_rows_padding_and_shared_slots():
    router = RouterSpec(16, 4, num_shared_slots=1)
    N = 4
    mask = ExpertPlacement.contiguous(16, N).logical_on_rank()
    g = torch.Generator().manual_seed(3)
    batch = route(router, random_logits(12, 16, skew=1.0, generator=g))
    batch.logits[1, 3] = float("nan")
    batch.topk_ids[2, :4] = -1
    batch.topk_ids[3, 1] = batch.topk_ids[3, 0]  # duplicate
    batch.topk_weights[4, 0] = -0.5
    pick_rank = default_pick_rank(batch.topk_ids, mask, 4)
    ids, w, sr, info = ep(router, batch, mask, make_policy("lynx_ep", alpha=8.0), pick_rank=pick_rank,
                          home=home_rank(12, N), num_valid=torch.tensor(10))
    for t in (1, 2, 3, 4, 10, 11):  # malformed rows and padding
        assert torch.equal(ids[t], batch.topk_ids[t]) and torch.equal(w[t], batch.topk_weights[t])
        assert torch.equal(sr[t], pick_rank[t])
    assert sr[2].tolist() == [-1] * 4
    assert (ids[:, 4] == 16).all() and (w[:, 4] == 1).all()  # shared slots untouched
    unchanged = (ids == batch.topk_ids).all(dim=1)
    assert torch.equal(w[unchanged], batch.topk_weights[unchanged])  # bit for bit
    assert torch.equal(sr[unchanged], pick_rank[unchanged])
    assert int(info.rows_voting) == 6 and int(info.rows_changed) == int((~unchanged).sum()) > 0


# ---------------------------------------------------------------------------------------------
# The busiest-rank bound.

def test_bound_drops_the_weakest_and_the_higher_id_on_a_tie():
    # E = 8 on 2 ranks (e0..e3 | e4..e7), k = 2; every pick clears lynx's threshold and nothing is
    # mandatory (no confident row, no cap): keep {e0..e4}, 4 of them on rank 0, bound ceil(5 / 2) = 3.
    # Scores (B = 3): e0 = 6, e3 = 3, e1 = e2 = e4 = 1: rank 0 drops e2 (tied with e1, higher id).
    router = RouterSpec(8, 2)
    logits = torch.full((3, 8), -5.0)
    logits[0, [0, 1]] = torch.tensor([3.0, 2.5])
    logits[1, [0, 2]] = torch.tensor([3.0, 2.5])
    logits[2, [3, 4]] = torch.tensor([3.0, 2.9])
    batch = route(router, logits)
    mask = ExpertPlacement.contiguous(8, 2).logical_on_rank()
    params = dict(alpha=1.0, beta=1, keep_level=1, max_moved_weight=1.0, min_keep=2)
    ids, _, sr, info = ep(router, batch, mask, make_policy("lynx_ep", rank_slack=0.0, **params))
    assert info.keep.nonzero().flatten().tolist() == [0, 1, 3, 4]
    assert ids.tolist() == [[0, 1], [0, 1], [3, 4]] and sr.tolist() == [[0, 0], [0, 0], [0, 1]]
    # min_keep is a floor on the total: with min_keep = 5 nothing may go.
    _, _, _, info = ep(router, batch, mask, make_policy("lynx_ep", rank_slack=0.0, **{**params, "min_keep": 5}))
    assert info.keep.sum() == 5
    # Enough slack (ceil(1.5 * 5 / 2) = 4): nothing goes either.
    _, _, _, info = ep(router, batch, mask, make_policy("lynx_ep", rank_slack=0.5, **params))
    assert info.keep.sum() == 5

@pytest.mark.parametrize("N,slack", [(4, 0.0), (4, 0.25), (8, 0.0)])
def test_per_rank_kept_expert_bound(N, slack):
    router = RouterSpec(32, 4)
    per = 32 // N
    mask = ExpertPlacement.contiguous(32, N).logical_on_rank()
    lynx_ep = make_policy("lynx_ep", rank_slack=slack, max_moved_weight=0.4)  # fewer held experts: the bound binds
    lynx = make_policy("lynx", max_moved_weight=lynx_ep.max_moved_weight, keep_level=lynx_ep.keep_level,
                       keep_top=lynx_ep.keep_top)  # the keep set lynx_ep starts from
    dropped_some = False
    for seed in range(12):
        batch = skewed(router, 64, seed, skew=3.0)  # a strong shared preference crowds some ranks
        sel = reference.selection_score(router, batch.logits, None)
        votes = reference.vote(lynx, router, batch.logits, batch.topk_ids, batch.topk_weights, 64, sel)
        before = reference.keep_set(lynx, router, votes).tolist()
        mandatory = votes.mandatory.tolist()
        score = reference.lynx_scores(votes.lynx_votes, votes.row_ok.sum()).tolist()
        ids, _, _, info = ep(router, batch, mask, lynx_ep)
        after = info.keep.tolist()
        bound = math.ceil((1 + slack) * sum(before) / N)
        assert all(b or not a for a, b in zip(after, before))  # after is a subset
        gone = [e for e in range(32) if before[e] and not after[e]]
        assert not any(mandatory[e] for e in gone)
        dropped_some |= bool(gone)
        for r in range(N):
            kept = [e for e in range(r * per, (r + 1) * per) if after[e]]
            movable = [e for e in kept if not mandatory[e]]
            if sum(after) > lynx_ep.resolved_min_keep(router):
                assert len(kept) <= bound or not movable
            # The weakest go first: every dropped expert scores at most any movable survivor of its rank
            # (ties: the higher id goes first).
            for e in gone:
                if e // per == r:
                    assert all((score[e], -e) < (score[f], -f) for f in movable)
        assert sum(after) >= min(sum(before), lynx_ep.resolved_min_keep(router))
        used = {e for e in ids.flatten().tolist()}
        assert used <= {e for e in range(32) if after[e]}
    if slack == 0.0:
        assert dropped_some  # the check above was not vacuous (with slack 0.25 the bound rarely binds here)


# ---------------------------------------------------------------------------------------------
# Relations to lynx, determinism, the traffic it saves.

@pytest.mark.parametrize("params", [{}, dict(alpha=8.0), dict(alpha=1.0, max_moved_weight=1.0),
                                    dict(alpha=4.0, keep_level=0, max_moved_weight=0.7)])
@pytest.mark.parametrize("with_home", [False, True])
def test_one_rank_equals_lynx(params, with_home):
    router = RouterSpec(32, 4, num_shared_slots=1)
    mask = torch.ones(32, 1, dtype=torch.bool)
    for seed in range(4):
        batch = skewed(router, 40, seed)
        policy = make_policy("lynx_ep", rank_slack=None, **params)
        # The same cap, level and rank guarantee (lynx_ep's defaults differ from lynx's there).
        lynx = make_policy("lynx", **{**params, "max_moved_weight": policy.max_moved_weight,
                                      "keep_level": policy.keep_level, "keep_top": policy.keep_top})
        want_ids, want_w, want_info = reference.select(lynx, router, batch.logits,
                                                       batch.topk_ids, batch.topk_weights, num_valid=37)
        home = torch.zeros(40, dtype=torch.long) if with_home else None
        ids, w, sr, info = ep(router, batch, mask, policy, home=home, num_valid=37)
        assert torch.equal(ids, want_ids) and torch.equal(w, want_w)
        assert torch.equal(info.keep, want_info.keep) and int(info.rows_changed) == int(want_info.rows_changed)
        assert ((sr == 0) == (ids[:, :4] >= 0)).all()


def test_deterministic_and_selector_matches_function():
    router = RouterSpec(32, 4)
    N = 4
    mask = ExpertPlacement.contiguous(32, N).logical_on_rank()
    batch = skewed(router, 64, 7)
    home = home_rank(64, N)
    a = ep(router, batch, mask, home=home)
    b = ep(router, batch, mask, home=home)
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
    sel = RankAwareSelector(router, make_policy("lynx_ep"), 128, rank_mask=mask)
    for _ in range(2):
        ids, w = sel.run(batch.logits, batch.topk_ids, batch.topk_weights, home=home)
        assert torch.equal(ids, a[0]) and torch.equal(w, a[1]) and torch.equal(sel.last_slot_rank, a[2])
    s = sel.stats()
    assert s.steps == 2 and s.rows_changed == 2 * int(a[3].rows_changed) and s.rows_voting == 128
    assert sel.backend == "torch"
    ids0, _ = sel.run(batch.logits[:0], batch.topk_ids[:0], batch.topk_weights[:0])
    assert ids0.shape == (0, 4) and sel.last_slot_rank.shape == (0, 4)


def test_fewer_remote_ranks_than_lynx_and_off():
    router = RouterSpec(32, 4)
    N, B = 4, 64
    placement = ExpertPlacement.contiguous(32, N)
    mask = placement.logical_on_rank()
    home = home_rank(B, N)
    remote = {"off": [], "lynx": [], "lynx_ep": []}
    for seed in range(10):
        batch = skewed(router, B, 100 + seed)
        for name in ("off", "lynx"):
            ids, _, _ = reference.select(make_policy(name), router, batch.logits, batch.topk_ids, batch.topk_weights)
            remote[name].append(remote_ranks(default_pick_rank(ids, mask, 4), home, N).float().mean())
        ids, _, sr, _ = ep(router, batch, mask, home=home)
        assert (ids >= 0).all() and all(len(set(r)) == 4 for r in ids.tolist())  # k distinct valid ids
        assert torch.equal(sr, placement.rank_of[ids.long()])  # contiguous: the expert's only rank
        per_row = remote_ranks(sr, home, N)
        remote["lynx_ep"].append(per_row.float().mean())
        # accounting.step_traffic counts the same transfers from the ids alone.
        hidden = 8
        traffic = step_traffic(ids, placement, home, hidden, 1)
        assert int(traffic.combine_bytes) == int(per_row.sum()) * hidden
    mean = {k: float(torch.stack(v).mean()) for k, v in remote.items()}
    assert mean["lynx_ep"] < mean["lynx"] and mean["lynx_ep"] < mean["off"]


@pytest.mark.parametrize("E,N,k,T", [(16, 4, 4, 8), (32, 4, 4, 64), (128, 8, 8, 64)])
def test_rank_drops_never_add_a_rank_visit(E, N, k, T):
    """Per row: with its rank drops, a row visits strictly fewer remote ranks than the same kept set and refill
    without them (a drop whose freed slots could only be refilled on other ranks is not taken). Small
    batches are where this bites: seed 2 at E=16, N=4, T=8 once sent row 5 from one remote rank to two."""
    from lynx_sglang.runtime.expert_parallel.rank_aware import finish_rank_aware, plan_rank_aware, weak_rank_drops

    router, policy = RouterSpec(E, k), make_policy("lynx_ep")
    mask = ExpertPlacement.contiguous(E, N).logical_on_rank()
    home = home_rank(T, N)
    rows_with_drops = 0
    for seed in range(40):
        batch = skewed(router, T, seed)
        plan = plan_rank_aware(policy, router, batch.logits, batch.topk_ids, batch.topk_weights, mask, home=home)
        ids, _, sr, _ = finish_rank_aware(plan, weak_rank_drops(plan))
        ids0, _, sr0, _ = finish_rank_aware(plan, torch.zeros_like(plan.survive))
        with_drops = (ids != ids0).any(dim=1)
        rows_with_drops += int(with_drops.sum())
        r, r0 = remote_ranks(sr, home, N), remote_ranks(sr0, home, N)
        assert (r[with_drops] < r0[with_drops]).all(), (seed, with_drops.nonzero().flatten().tolist())
        assert torch.equal(ids, ep(router, batch, mask, home=home)[0])
    assert rows_with_drops > 0


def test_replicated_experts_go_to_ranks_that_hold_them():
    # EPLB-like: 8 experts, 12 physical slots on 4 ranks; e0..e3 have two replicas.
    p2l = torch.tensor([0, 1, 4, 2, 3, 5, 0, 6, 1, 7, 2, 3])
    placement = ExpertPlacement.from_physical_map(p2l, 4, 8)
    mask = placement.logical_on_rank()
    table = placement.replica_on_rank()
    router = RouterSpec(8, 2)
    g = torch.Generator().manual_seed(5)
    for seed in range(6):
        batch = skewed(router, 32, seed)
        ids = batch.topk_ids.long()
        # Each pick goes to a random rank holding it (not always the lowest one).
        choice = torch.rand(32, 2, 4, generator=g) * mask[ids].float()
        pick_rank = choice.argmax(dim=-1)
        assert mask[ids, pick_rank].all()
        home = home_rank(32, 4)
        out, _, sr, _ = ep(router, batch, mask, make_policy("lynx_ep", alpha=4.0), pick_rank=pick_rank, home=home)
        out = out.long()
        assert (out >= 0).all() and mask[out, sr].all()
        same = out == ids
        assert torch.equal(sr[same], pick_rank[same])  # unchanged slots keep their rank
        phys = physical_ids(out, sr, table)
        assert torch.equal(placement.logical_of[phys], out) and torch.equal(placement.rank_of[phys], sr)
        # A refilled expert goes to a rank the row already visits when one holds it.
        for t in range(32):
            for s in range(2):
                if out[t, s] != ids[t, s]:
                    visited = {int(home[t])} | {int(sr[t, o]) for o in range(2) if out[t, o] == ids[t, o]}
                    holders = [r for r in range(4) if mask[out[t, s], r]]
                    near = [r for r in holders if r in visited]
                    assert int(sr[t, s]) == (near or holders)[0]


# ---------------------------------------------------------------------------------------------
# The torch path is what GPUs run too (no kernels for lynx_ep): its launches per layer and step,
# and its own lean lynx votes against the spec (reference.vote / keep_set).

# Kernel launches of one RankAwareSelector.run (one MoE layer, one decode step), OpAudit's count. Measured
# 185 at E=128, k=8, T=64 (N=4 and 8) and 191 at the DeepSeek-V3 shape (E=256, sigmoid + bias, one shared
# slot), of which 4 are _check_ranks' CPU-only value check of home; 340 / 343 before the lean rewrite.
LAUNCH_BUDGET = 200


@pytest.mark.parametrize("E,N,shared,scoring", [(128, 4, 0, "softmax"), (128, 8, 0, "softmax"),
                                                (256, 8, 1, "sigmoid")])
def test_launches_per_layer_and_step_within_budget(E, N, shared, scoring):
    bias = scoring == "sigmoid"
    router = RouterSpec(E, 8, shared, scoring, bias)
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(E, generator=g) * 0.1 if bias else None
    T = 64
    batch = route(router, random_logits(T, E, scale=2.0, skew=1.5, generator=g), cb)
    mask = ExpertPlacement.contiguous(E, N).logical_on_rank()
    sel = RankAwareSelector(router, make_policy("lynx_ep"), T, rank_mask=mask, correction_bias=cb)
    home, nv = home_rank(T, N), torch.tensor(T - 2)
    args = (batch.logits, batch.topk_ids, batch.topk_weights, nv)
    sel.run(*args, home=home)  # first call out of the way
    with OpAudit() as audit:
        ids, _ = sel.run(*args, home=home)
    assert audit.launches <= LAUNCH_BUDGET, audit.ops.most_common(20)
    assert not (ids == batch.topk_ids).all()  # it did select
    ours = [f for f in audit.findings if "rank_aware.py" in f.where]
    # Only the value check of home / pick_rank, which runs on CPU tensors only (no device, nothing to sync).
    assert all("_check_ranks" in f.where for f in ours), ours
    with OpAudit() as audit:  # without per-step ranks: nothing of ours needs the host
        sel.run(*args)
    assert audit.launches <= LAUNCH_BUDGET
    assert not [f for f in audit.findings if "rank_aware.py" in f.where]


@pytest.mark.parametrize("params", [{}, dict(rank_slack=None, alpha=8.0, max_moved_weight=1.0),
                                    dict(alpha=3.0, keep_level=0, confidence_margin=0.3, max_moved_weight=0.0,
                                         min_votes=2)])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_votes_and_keep_set_are_the_references(params, scoring):
    """lynx_ep computes lynx's votes itself (fewer launches); they must stay the spec's, bit for bit."""
    from lynx_sglang.runtime.expert_parallel.rank_aware import plan_rank_aware

    bias = scoring == "sigmoid"
    router = RouterSpec(64, 6, 1, scoring, bias)
    policy = make_policy("lynx_ep", **{**params, "rank_slack": None})
    mask = ExpertPlacement.contiguous(64, 4).logical_on_rank()
    g = torch.Generator().manual_seed(11)
    for seed in range(6):
        T = (1, 5, 40)[seed % 3]
        cb = torch.randn(64, generator=g) * 0.1 if bias else None
        batch = route(router, random_logits(T, 64, scale=2.0, skew=1.5, generator=g), cb)
        if T > 3:  # malformed rows pass through and do not vote
            batch.logits[0, 3] = float("inf")
            batch.topk_ids[1, 2] = batch.topk_ids[1, 0]
            batch.topk_weights[2, 1] = float("nan")
        nv = T - seed % 2
        plan = plan_rank_aware(policy, router, batch.logits, batch.topk_ids, batch.topk_weights, mask,
                               num_valid=nv, correction_bias=cb)
        sel = reference.selection_score(router, batch.logits, cb)
        votes = reference.vote(policy, router, batch.logits, batch.topk_ids, batch.topk_weights, nv, sel)
        assert torch.equal(plan.votes.row_ok, votes.row_ok)
        ok = votes.row_ok
        assert torch.equal(plan.votes.rank[ok], votes.rank[ok])
        for name in ("picks", "lynx_votes", "mandatory"):
            assert torch.equal(getattr(plan.votes, name), getattr(votes, name)), name
        assert int(plan.votes.voting_rows()) == int(votes.voting_rows())
        assert torch.equal(plan.keep, reference.keep_set(policy, router, votes))


def test_selector_follows_a_rank_mask_rewritten_in_place():
    """EPLB rewrites the planned rank mask in place (placement.rank_tables): nothing derived from it is cached."""
    router = RouterSpec(32, 4)
    N = 4
    batch = skewed(router, 48, 3)
    home = home_rank(48, N)
    mask = ExpertPlacement.contiguous(32, N).logical_on_rank()
    sel = RankAwareSelector(router, make_policy("lynx_ep"), 64, rank_mask=mask.clone())  # the selector keeps it
    sel.run(batch.logits, batch.topk_ids, batch.topk_weights, home=home)
    p2l = torch.cat([torch.arange(32).roll(5), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])])
    moved = ExpertPlacement.from_physical_map(p2l, N, 32).logical_on_rank()
    sel.rank_mask.copy_(moved)
    ids, w = sel.run(batch.logits, batch.topk_ids, batch.topk_weights, home=home)
    want = ep(router, batch, moved, home=home)
    assert torch.equal(ids, want[0]) and torch.equal(w, want[1]) and torch.equal(sel.last_slot_rank, want[2])
    assert not torch.equal(want[2], ep(router, batch, mask, home=home)[2])  # the new mask mattered


# ---------------------------------------------------------------------------------------------
# Configuration.

@pytest.mark.parametrize("slack", [-0.1, 16.5, float("nan"), float("inf"), "0.5"])
def test_bad_rank_slack(slack):
    with pytest.raises(ConfigError, match="rank_slack"):
        RankAwareSelector(RouterSpec(8, 2), make_policy("lynx_ep", rank_slack=slack), 4,
                          rank_mask=torch.ones(8, 2, dtype=torch.bool))


def test_selector_configuration_errors():
    router = RouterSpec(8, 2)
    mask = ExpertPlacement.contiguous(8, 2).logical_on_rank()
    with pytest.raises(ConfigError, match="needs the expert placement"):
        ExpertSelector(router, make_policy("lynx_ep"), 4)
    with pytest.raises(ConfigError, match="needs rank_mask"):
        RankAwareSelector(router, make_policy("lynx_ep"), 4, rank_mask=None)
    with pytest.raises(ConfigError, match="rank_mask must be"):
        RankAwareSelector(router, make_policy("lynx_ep"), 4, rank_mask=torch.ones(7, 2, dtype=torch.bool))
    with pytest.raises(ConfigError, match="rank_mask must be"):
        RankAwareSelector(router, make_policy("lynx_ep"), 4, rank_mask=mask.long())
    lonely = mask.clone()
    lonely[3] = False
    with pytest.raises(ConfigError, match="at least one rank"):
        RankAwareSelector(router, make_policy("lynx_ep"), 4, rank_mask=lonely)
    with pytest.raises(ConfigError, match="torch backend only"):
        RankAwareSelector(router, make_policy("lynx_ep"), 4, rank_mask=mask, backend="triton")
    with pytest.raises(ConfigError, match="runs policy lynx_ep, not lynx"):
        RankAwareSelector(router, make_policy("lynx"), 4, rank_mask=mask)
    assert RankAwareSelector(router, make_policy("lynx_ep", rank_slack=None), 4, rank_mask=mask).backend == "torch"

    batch = route(router, torch.randn(3, 8))
    plain = ExpertSelector(router, make_policy("lynx"), 4, backend="torch")
    with pytest.raises(TypeError, match="home"):  # only RankAwareSelector.run takes ranks
        plain.run(batch.logits, batch.topk_ids, batch.topk_weights, home=torch.zeros(3, dtype=torch.long))
    sel = RankAwareSelector(router, make_policy("lynx_ep"), 4, rank_mask=mask)
    with pytest.raises(ValueError, match="pick_rank"):
        sel.run(batch.logits, batch.topk_ids, batch.topk_weights, pick_rank=torch.zeros(3, 1, dtype=torch.long))
    N = mask.shape[1]
    for name, bad in (("home", torch.tensor([0, N, 1])), ("pick_rank", torch.full((3, 2), -3))):
        with pytest.raises(ValueError, match=f"{name} holds ranks outside"):  # before they index a table
            sel.run(batch.logits, batch.topk_ids, batch.topk_weights, **{name: bad})
    sel.run(batch.logits, batch.topk_ids, batch.topk_weights, home=torch.tensor([-1, 0, N - 1]))  # -1: no home


def _options(argv):
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    return options_from_args(parser.parse_args(argv))


def test_rank_slack_flag():
    opts = _options(["--moe-backend", "lynx", "--lynx-policy", "lynx_ep", "--lynx-rank-slack", "0.5",
                     "--lynx-alpha", "4"])
    assert opts.policy == "lynx_ep" and opts.params == {"rank_slack": 0.5, "alpha": 4.0}
    policy = opts.make_policy()
    assert policy.name == "lynx_ep" and policy.rank_slack == 0.5 and policy.alpha == 4.0
    with pytest.raises(ConfigError, match="does not apply"):
        _options(["--moe-backend", "lynx", "--lynx-policy", "lynx", "--lynx-rank-slack", "0.5"])
    with pytest.raises(ConfigError, match="rank_slack"):
        _options(["--moe-backend", "lynx", "--lynx-policy", "lynx_ep", "--lynx-rank-slack", "-1"])
