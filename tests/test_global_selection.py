"""Global expert selection under expert parallelism: sharded runs equal one process on the whole batch.

Each spawned gloo world runs every case (policy x routing x split) in one go,
because starting processes is the slow part; the workers only compute and
save, and the assertions run here against ``reference.select`` on the whole batch.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from lynx_sglang import ConfigError, LynxPolicy, RouterSpec, make_policy
from lynx_sglang.runtime.selection import reference
from lynx_sglang.runtime.expert_parallel.global_selection import GlobalExpertSelector, all_reduce_votes
from lynx_sglang.local_group import run_group
from lynx_sglang.runtime.selection.selector import ExpertSelector
from lynx_sglang.synthetic import random_logits, route

GLOBAL_TOKENS = 23
PAD_ROWS = 2  # padding rows appended on the last rank (after num_valid): they pass through, never vote
BAD_ROW = 5  # a row of the global batch with a NaN logit: it passes through, never votes

ROUTERS = [RouterSpec(32, 4, num_shared_slots=1), RouterSpec(16, 4, scoring_func="sigmoid", has_correction_bias=True)]
POLICIES = [
    ("off", {}),
    ("lynx", {}),
    ("lynx", dict(alpha=1.0, max_moved_weight=1.0)),
    ("oea", {}),
    ("budget", dict(max_experts=5)),
]
SKEWS = {"skewed": 3.0, "uniform": 0.0}
# Per-rank shard sizes of the GLOBAL_TOKENS valid rows: ranks with 0 tokens, 1-token shards, uneven rest.
SPLITS = {
    2: [(0, 23), (1, 22), (14, 9)],
    4: [(7, 0, 1, 15), (0, 0, 23, 0), (5, 6, 6, 6)],
}


def _cases():
    """(label, router, policy, skew, seed) for every case; identical in every process."""
    out = []
    for r, router in enumerate(ROUTERS):
        for p, (name, params) in enumerate(POLICIES):
            for s, (routing, skew) in enumerate(SKEWS.items()):
                label = f"E{router.num_experts}-{name}{params or ''}-{routing}"
                out.append((label, router, make_policy(name, **params), skew, 1000 * r + 10 * p + s))
    return out


def _global_batch(router, skew, seed):
    """The whole batch: GLOBAL_TOKENS valid rows (one malformed) plus PAD_ROWS padding rows."""
    g = torch.Generator().manual_seed(seed)
    logits = random_logits(GLOBAL_TOKENS + PAD_ROWS, router.num_experts, skew=skew, generator=g)
    bias = torch.randn(router.num_experts, generator=g) * 0.05 if router.has_correction_bias else None
    batch = route(router, logits, bias)
    batch.logits[BAD_ROW, 1] = float("nan")
    return batch


def _shard(sizes, rank):
    """(lo, hi, num_valid): ``rank``'s rows of the global batch; the last rank also holds the padding."""
    lo = sum(sizes[:rank])
    hi = GLOBAL_TOKENS + PAD_ROWS if rank == len(sizes) - 1 else lo + sizes[rank]
    return lo, hi, sizes[rank]


def _worker(rank, world):
    """One rank: every case and split through GlobalExpertSelector (run_group gives the gloo group)."""
    results = {}
    for label, router, policy, skew, seed in _cases():
        batch = _global_batch(router, skew, seed)
        sel = GlobalExpertSelector(router, policy, GLOBAL_TOKENS + PAD_ROWS, "cpu",
                                   correction_bias=batch.correction_bias, group=dist.group.WORLD)
        # One planned selector serves every split (steps with different local sizes, 0 included).
        for i, sizes in enumerate(SPLITS[world]):
            lo, hi, num_valid = _shard(sizes, rank)
            if rank == world - 1:
                num_valid = torch.tensor(num_valid)  # the int and the device-tensor form both work
            ids, w = sel.run(batch.logits[lo:hi], batch.topk_ids[lo:hi], batch.topk_weights[lo:hi], num_valid)
            st = sel.stats()
            results[(label, i)] = (ids.clone(), w.clone(), [st.steps, st.experts_before, st.experts_after,
                                                            st.rows_changed, st.rows_voting])
            sel.reset_stats()
    # The lynx score's base is the GLOBAL row count: the int64 bound must hold for world * max_tokens.
    router = RouterSpec(8, 2)
    make_policy("lynx", beta=7).validate(router, 200)  # fits for one rank's 200 tokens ...
    try:
        GlobalExpertSelector(router, make_policy("lynx", beta=7), 200, group=dist.group.WORLD)
        results["overflow_rejected"] = False
    except ConfigError:
        results["overflow_rejected"] = True  # ... but not for 200 * world
    return results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_selection_equals_whole_batch(world):
    ranks = run_group(_worker, world)
    assert all(res["overflow_rejected"] for res in ranks)
    exercised = set()

    for label, router, policy, skew, seed in _cases():
        batch = _global_batch(router, skew, seed)
        T = GLOBAL_TOKENS
        rows = (batch.logits[:T], batch.topk_ids[:T], batch.topk_weights[:T])
        want_ids, want_w, info = reference.select(policy, router, *rows, None, batch.correction_bias)
        unchanged = (want_ids == batch.topk_ids[:T]).all(dim=1)
        # The whole batch's votes, handed to each shard's reference run in place of its own.
        whole = reference.vote(policy, router, *rows, T,
                               reference.selection_score(router, rows[0], batch.correction_bias))

        def inject(v, whole=whole):
            return dataclasses.replace(whole, row_ok=v.row_ok, rank=v.rank, num_voting=whole.voting_rows())

        for i, sizes in enumerate(SPLITS[world]):
            got = [res[(label, i)] for res in ranks]
            where = f"{label} split={sizes}"
            # Each rank: exactly the single-process reference on its rows with the whole batch's votes.
            for r, (ids, w, _) in enumerate(got):
                lo, hi, num_valid = _shard(sizes, r)
                e_ids, e_w, _ = reference.select(policy, router, batch.logits[lo:hi], batch.topk_ids[lo:hi],
                                                 batch.topk_weights[lo:hi], num_valid, batch.correction_bias,
                                                 vote_reduce=inject)
                assert torch.equal(ids, e_ids) and torch.equal(w, e_w), (where, r)
            # All ranks together: the single-process reference on the whole batch. Ids and untouched
            # rows are exact; re-routed weights may differ in the last bit because torch's elementwise
            # exp/sigmoid round differently in its vectorised body and scalar tail, so a row's gate
            # depends on where it sits in the flattened batch (not on the selection).
            ids = torch.cat([g[0] for g in got])
            w = torch.cat([g[1] for g in got])
            assert torch.equal(ids[:T], want_ids), where
            assert torch.equal(w[:T][unchanged], want_w[unchanged]), where
            torch.testing.assert_close(w[:T], want_w, rtol=1e-6, atol=0.0, msg=where)
            # Padding rows on the last rank: unchanged.
            assert torch.equal(ids[T:], batch.topk_ids[T:]) and torch.equal(w[T:], batch.topk_weights[T:]), where
            stats = torch.tensor([g[2] for g in got])  # [world, 5]: steps, before, after, changed, voting
            assert (stats[:, 0] == 1).all(), where  # every rank counted the step, 0-token ranks too
            assert (stats[:, 1] == info.experts_before).all(), where  # global, the same on every rank
            assert (stats[:, 2] == info.experts_after).all(), where
            assert stats[:, 3].sum() == info.rows_changed and stats[:, 4].sum() == info.rows_voting, where
            assert info.rows_voting == T - 1  # the NaN row does not vote
        if info.rows_changed > 0:
            exercised.add((policy.name, str(policy)))
    # Every policy but off re-routes rows in some case: the equalities above are not vacuous.
    assert exercised == {(p.name, str(p)) for _, _, p, _, _ in _cases() if p.name != "off"}


@pytest.mark.timeout(120)
def test_world_of_one_is_the_identity():
    # Another module's fixture (test_sglang_hooks' world of one, shared by test_calibrate) may already hold
    # the default group for this process: use it then, and leave it to its owner.
    owner = not dist.is_initialized()
    assert owner or dist.get_world_size() == 1
    with tempfile.TemporaryDirectory() as tmp:
        if owner:
            dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0,
                                    world_size=1, timeout=timedelta(seconds=60))
        try:
            for label, router, policy, skew, seed in _cases():
                batch = _global_batch(router, skew, seed)
                args = (batch.logits, batch.topk_ids, batch.topk_weights)
                sel = reference.selection_score(router, batch.logits, batch.correction_bias)
                votes = reference.vote(policy, router, *args, GLOBAL_TOKENS, sel)
                reduced = all_reduce_votes(votes, None)
                for name in ("row_ok", "rank", "picks", "lynx_votes", "mandatory", "oea_core", "budget_score"):
                    a, b = getattr(votes, name), getattr(reduced, name)
                    assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), (label, name)
                assert reduced.num_voting == votes.row_ok.sum() == GLOBAL_TOKENS - 1, label

                plain = ExpertSelector(router, policy, 32, correction_bias=batch.correction_bias, backend="torch")
                glob = GlobalExpertSelector(router, policy, 32, correction_bias=batch.correction_bias, group=None)
                want = plain.run(*args, GLOBAL_TOKENS)
                got = glob.run(*args, GLOBAL_TOKENS)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), label
                assert glob.stats() == plain.stats(), label
                # A step with no tokens still runs (and would reduce); it counts as a step with no experts.
                empty = glob.run(*(t[:0] for t in args))
                assert empty[0].shape == (0, router.total_slots), label
                st = glob.stats()
                assert (st.steps, st.experts_after - plain.stats().experts_after) == (2, 0), label
        finally:
            if owner:
                dist.destroy_process_group()


def test_policies_with_more_stages_are_refused():
    # A policy subclass may add stages (e.g. rank-aware lynx) that reducing the votes does not make global.
    class Derived(LynxPolicy):
        pass

    with pytest.raises(ConfigError, match="not supported by global expert selection"):
        GlobalExpertSelector(RouterSpec(8, 2), Derived(), 8, group=None)


def _stage_worker(rank, world, rank1_rows=0):
    """The SGLang stage under a DeepEP-style layout: rank 0 decodes the whole batch; rank 1 is idle, or
    (``rank1_rows`` > 0) decodes a batch too large for --lynx-max-batch, which it passes through."""
    import sglang.srt.layers.dp_attention as dp_attention

    from lynx_sglang.runtime.sglang import stage as stage_mod
    from lynx_sglang.runtime.sglang.options import LynxOptions
    from lynx_sglang.runtime.sglang.phase import DECODE, IDLE, published

    dp_attention.get_is_extend_in_batch = lambda: False  # no extend anywhere this step
    router = ROUTERS[0]
    batch = _global_batch(router, 3.0, 11)
    opts = LynxOptions(moe_backend="lynx", policy="lynx", max_batch=64)
    stage = stage_mod.TopKSelectionStage(0, router, opts, torch.device("cpu"), None,
                                         ep=stage_mod.EpLayout(world, rank, None, global_votes=True))
    assert stage.selector._stats is stage.stats  # the global selector accumulates into the stage's row
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    if rank == 0:
        with published(DECODE):
            out = stage(StandardTopKOutput(batch.topk_weights[:GLOBAL_TOKENS], batch.topk_ids[:GLOBAL_TOKENS],
                                           batch.logits[:GLOBAL_TOKENS]), None)
        result = (out.topk_ids, out.topk_weights)
    elif rank1_rows:
        b = route(router, random_logits(rank1_rows, router.num_experts, generator=torch.Generator().manual_seed(12)))
        big = StandardTopKOutput(b.topk_weights, b.topk_ids, b.logits)
        with published(DECODE):
            out = stage(big, None)
        result = out is big
    else:
        with published(IDLE):
            stage.run_without_tokens()  # what the TopK.empty_topk_output hook does on a token-less rank
        result = None
    return result, stage.selector.stats().steps


@pytest.mark.timeout(300)
def test_idle_ranks_join_the_global_selection_of_the_stage():
    (got, steps0), (_, steps1) = run_group(_stage_worker, 2)
    router = ROUTERS[0]
    batch = _global_batch(router, 3.0, 11)
    T = GLOBAL_TOKENS
    want_ids, want_w, info = reference.select(make_policy("lynx"), router, batch.logits[:T], batch.topk_ids[:T],
                                              batch.topk_weights[:T])
    assert info.rows_changed > 0
    assert torch.equal(got[0], want_ids) and torch.equal(got[1], want_w)
    assert steps0 == steps1 == 1  # both ranks ran the step's collective


@pytest.mark.timeout(300)
def test_a_rank_passing_an_oversized_batch_through_still_joins_the_vote():
    """Rank 1's batch exceeds --lynx-max-batch (64): it passes through unchanged, but must still join the
    all-reduce rank 0 is waiting in (before, it returned early and rank 0 hung)."""
    (got, steps0), (passed, steps1) = run_group(_stage_worker, 2, 65)
    router = ROUTERS[0]
    batch = _global_batch(router, 3.0, 11)
    T = GLOBAL_TOKENS
    want_ids, want_w, _ = reference.select(make_policy("lynx"), router, batch.logits[:T], batch.topk_ids[:T],
                                           batch.topk_weights[:T])
    assert passed is True  # rank 1: the very object SGLang made
    assert torch.equal(got[0], want_ids) and torch.equal(got[1], want_w)  # rank 1 added no votes
    assert steps0 == steps1 == 1


def _refill_worker(rank, world):
    """lynx with the similarity-aware refill under global selection: each rank's rows on the global kept set."""
    router = ROUTERS[0]
    batch = _global_batch(router, 3.0, 7)
    sim = torch.rand(router.num_experts, router.num_experts, generator=torch.Generator().manual_seed(3))
    sim = ((sim + sim.T) / 2).fill_diagonal_(1.0)
    pol = make_policy("lynx", max_moved_weight=1.0, refill_similarity=8.0)
    sel = GlobalExpertSelector(router, pol, GLOBAL_TOKENS + PAD_ROWS, "cpu", group=dist.group.WORLD, similarity=sim)
    lo, hi, num_valid = _shard(SPLITS[2][2], rank)
    ids, w = sel.run(batch.logits[lo:hi], batch.topk_ids[lo:hi], batch.topk_weights[lo:hi], num_valid)
    return ids.clone(), w.clone(), sim


@pytest.mark.timeout(300)
def test_refill_similarity_under_global_selection_is_the_reference_on_each_shard():
    ranks = run_group(_refill_worker, 2)
    router = ROUTERS[0]
    batch = _global_batch(router, 3.0, 7)
    pol = make_policy("lynx", max_moved_weight=1.0, refill_similarity=8.0)
    T = GLOBAL_TOKENS
    rows = (batch.logits[:T], batch.topk_ids[:T], batch.topk_weights[:T])
    whole = reference.vote(pol, router, *rows, T, reference.selection_score(router, rows[0], None))

    def inject(v):
        return dataclasses.replace(whole, row_ok=v.row_ok, rank=v.rank, num_voting=whole.voting_rows())

    moved = 0
    for r, (ids, w, sim) in enumerate(ranks):
        lo, hi, num_valid = _shard(SPLITS[2][2], r)
        e_ids, e_w, _ = reference.select(pol, router, batch.logits[lo:hi], batch.topk_ids[lo:hi],
                                         batch.topk_weights[lo:hi], num_valid, None, vote_reduce=inject,
                                         refill_bias=(sim * 8.0).float())
        assert torch.equal(ids, e_ids) and torch.equal(w, e_w), r
        moved += int((ids != batch.topk_ids[lo:hi]).any(dim=1).sum())
    assert moved > 0
