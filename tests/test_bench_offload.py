"""benchmarks/bench_offload.py: we drive SGLang's paged-experts LRU right, and the residency rules do what they say."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import bench_offload as bo
from lynx_sglang.runtime.selection import reference
from lynx_sglang.runtime.selection.config import WEIGHT_Q, LynxPolicy, RouterSpec, make_policy
from lynx_sglang.runtime.selection.selector import ExpertSelector

ROOT = Path(__file__).resolve().parent.parent


def test_replay_matches_a_hand_computed_lru_sequence():
    # K = 2, slots start holding experts 0, 1 (LRU order 0, 1).
    costs = bo.replay(2, [[0, 1], [2], [0, 1], [2, 3, 4]])
    # step 0: both resident.                      order 0, 1
    # step 1: 2 evicts 0 (slot 0).                order 1, 2
    # step 2: residents first: wave [1, 0]; 0 evicts 2 (slot 0).   order 1, 0
    # step 3: waves [2, 3] (evict 1, then 0) and [4] (evicts 2).  order 3, 4
    assert [(c.distinct, c.waves, c.loads) for c in costs] == [(2, 1, 0), (1, 1, 1), (2, 1, 1), (3, 2, 3)]
    LRUPolicy, _ = bo.sglang_lru()
    policy = LRUPolicy(2)
    for step in [[0, 1], [2], [0, 1], [2, 3, 4]]:
        bo.replay_step(policy, step)
    assert list(policy.resident.items()) == [(3, 0), (4, 1)]


def test_a_step_pages_the_distinct_ids_of_its_topk_without_padding():
    LRUPolicy, _ = bo.sglang_lru()
    ids = torch.tensor([[5, -1], [5, 7], [-1, -1]])
    assert bo.distinct_experts(ids) == [5, 7]
    cost = bo.replay_step(LRUPolicy(4), ids)
    assert (cost.distinct, cost.waves, cost.loads) == (2, 1, 2)
    # An all-padding step still runs one (empty) wave and pages nothing.
    cost = bo.replay_step(LRUPolicy(4), torch.full((2, 2), -1))
    assert (cost.distinct, cost.waves, cost.loads) == (0, 1, 0)


def test_one_step_pages_exactly_its_non_resident_experts_so_a_subset_never_pages_more():
    LRUPolicy, _ = bo.sglang_lru()
    rng = random.Random(0)
    for _ in range(200):
        E, K = rng.choice([(8, 2), (16, 4), (32, 8), (32, 16)])
        policy = LRUPolicy(K)
        for _ in range(rng.randrange(4)):  # some history
            bo.replay_step(policy, rng.sample(range(E), rng.randint(1, E)))
        step = rng.sample(range(E), rng.randint(1, E))
        subset = rng.sample(step, rng.randint(0, len(step)))
        resident = set(policy.resident)
        clone = LRUPolicy(K)
        clone.resident = policy.resident.copy()
        full, sub = bo.replay_step(policy, sorted(step)), bo.replay_step(clone, sorted(subset))
        assert full.loads == len(set(step) - resident) and sub.loads == len(set(subset) - resident)
        assert sub.loads <= full.loads
        assert full.waves == max(1, -(-len(step) // K))


def test_steps_inside_a_fixed_set_of_k_experts_stop_paging():
    # Every step a subset of the same K experts: after they are in, nothing more is paged.
    costs = bo.replay(4, [[4, 5, 6, 7], [4, 5], [6, 7], [5, 6, 7], [4]])
    assert [c.loads for c in costs] == [4, 0, 0, 0, 0]


# ----------------------------------------------------------------------------- residency rules


def _routed(router: RouterSpec, T: int, seed: int, bias=None):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(T, router.num_experts, generator=gen) * 1.5
    score = reference.selection_score(router, z, bias)
    ids = score.topk(router.top_k, dim=1).indices
    gate = z.softmax(-1) if router.scoring_func == "softmax" else z.sigmoid()
    w = gate.gather(1, ids)
    return z, ids, (w / w.sum(1, keepdim=True)).float()


ROUTERS = [
    (RouterSpec(num_experts=32, top_k=4), None),
    (RouterSpec(num_experts=64, top_k=6, scoring_func="sigmoid", has_correction_bias=True),
     torch.linspace(-0.05, 0.05, 64)),
]


def _lynx(router, bias, z, ids, w, policy=None):
    sel = ExpertSelector(router, policy or make_policy("lynx"), z.shape[0], z.device, ids.dtype, torch.float32,
                         correction_bias=bias, backend="torch")
    out_ids, out_w = sel.run(z, ids, w)
    return out_ids.clone(), out_w.clone()


@pytest.mark.parametrize("router,bias", ROUTERS)
@pytest.mark.parametrize("T", [1, 16, 32])
def test_keep_mode_with_nothing_resident_is_lynx_bit_for_bit(router, bias, T):
    for seed in range(3):
        z, ids, w = _routed(router, T, seed, bias)
        resident = torch.zeros(router.num_experts, dtype=torch.bool)
        got_ids, got_w, _ = bo.residency_select(bo.ResidencyRule("keep", 8), router, z, ids, w, resident, bias)
        want_ids, want_w = _lynx(router, bias, z, ids, w)
        assert torch.equal(got_ids, want_ids) and torch.equal(got_w, want_w)


@pytest.mark.parametrize("router,bias", ROUTERS)
@pytest.mark.parametrize("mode", ["keep", "prefer"])
def test_everything_resident_changes_nothing(router, bias, mode):
    # K >= E: every expert is resident, nothing costs PCIe, so no pick moves.
    for seed in range(3):
        z, ids, w = _routed(router, 16, seed, bias)
        resident = torch.ones(router.num_experts, dtype=torch.bool)
        got_ids, got_w, changed = bo.residency_select(bo.ResidencyRule(mode, 8), router, z, ids, w, resident, bias)
        assert not changed.any() and torch.equal(got_ids, ids) and torch.equal(got_w, w)


def _moved(ids, new_ids):
    return [set(a.tolist()) - set(b.tolist()) for a, b in zip(ids, new_ids)]


@pytest.mark.parametrize("router,bias", ROUTERS)
@pytest.mark.parametrize("cap", [0.4, 0.6])
def test_residency_rules_keep_resident_picks_and_bound_the_moved_weight(router, bias, cap):
    policy = LynxPolicy(max_moved_weight=cap)
    for seed in range(5):
        z, ids, w = _routed(router, 16, seed, bias)
        resident = torch.rand(router.num_experts, generator=torch.Generator().manual_seed(seed)) < 0.3
        lynx_ids, _ = _lynx(router, bias, z, ids, w, policy)
        for mode in ("keep", "prefer"):
            rule = bo.ResidencyRule(mode, 8, policy)
            new_ids, new_w, _ = bo.residency_select(rule, router, z, ids, w, resident, bias)
            moved = _moved(ids, new_ids)
            for t, gone in enumerate(moved):
                assert not any(resident[e] for e in gone), "a resident pick moved"
                q = reference.quantized(w[t])
                lost = sum(int(q[s]) for s in range(router.top_k) if int(ids[t, s]) in gone)
                assert lost * WEIGHT_Q <= int(q.sum()) * policy.moved_weight_q
                assert (new_ids[t] >= 0).all() and len(set(new_ids[t].tolist())) == router.top_k
            if mode == "keep":  # moves a subset of what lynx moves
                for mine, lynx in zip(moved, _moved(ids, lynx_ids)):
                    assert mine <= lynx


@pytest.mark.parametrize("router,bias", ROUTERS)
@pytest.mark.parametrize("mode,cap", [("keep", None), ("prefer", None), ("prefer", 0.55)])
def test_replayed_rule_with_similarity_refill_is_the_served_selector(router, bias, mode, cap):
    """--refill-similarity: the replay decides as a paged layer's selector does when the server refills by
    expert similarity (its default where the model has the file): residency read from expert_slot, bias
    scaled at plan time; and the refill changes decisions (it is not ignored)."""
    E = router.num_experts
    g = torch.Generator().manual_seed(11)
    sim = torch.rand(E, E, generator=g)
    sim = (sim + sim.T) / 2
    params = {} if cap is None else {"residency_max_moved_weight": cap}
    policy = LynxPolicy(residency=mode, refill_similarity=8.0, **params)
    rule = bo.ResidencyRule(mode, 8, LynxPolicy(refill_similarity=8.0,
                                                **({} if cap is None else {"max_moved_weight": cap})))
    slot = torch.full((E,), -1, dtype=torch.int32)
    slot[torch.randperm(E, generator=g)[:8]] = torch.arange(8, dtype=torch.int32)
    sel = ExpertSelector(router, policy, 16, torch.device("cpu"), torch.int64, torch.float32, correction_bias=bias,
                         backend="torch", similarity=sim, residency=slot)
    differs = 0
    for seed in range(4):
        z, ids, w = _routed(router, 16, seed, bias)
        want_ids, want_w = (t.clone() for t in sel.run(z, ids, w))
        got_ids, got_w, _ = bo.residency_select(rule, router, z, ids, w, slot >= 0, bias, similarity=sim)
        assert torch.equal(got_ids, want_ids) and torch.equal(got_w, want_w)
        plain, _, _ = bo.residency_select(bo.ResidencyRule(mode, 8, replace(rule.policy, refill_similarity=0.0)),
                                          router, z, ids, w, slot >= 0, bias)
        differs += int((plain != got_ids).any())
    assert differs > 0
    with pytest.raises(ValueError, match="similarity matrix"):
        bo.residency_select(rule, router, z, ids, w, slot >= 0, bias)


def test_single_request_is_untouched():
    router, bias = ROUTERS[0]
    z, ids, w = _routed(router, 1, 0, bias)
    for mode in ("keep", "prefer"):
        for resident in (torch.zeros(32, dtype=torch.bool), torch.arange(32) < 8):
            new_ids, _, changed = bo.residency_select(bo.ResidencyRule(mode, 8), router, z, ids, w, resident, bias)
            assert not changed.any() and torch.equal(new_ids, ids)


# ----------------------------------------------------------------------------- through the harness


@pytest.mark.skipif(not (ROOT / "models/trained-qwen3-moe/config.json").exists(), reason="bundled model missing")
def test_patch_on_the_bundled_model_with_every_expert_resident():
    from lynx_sglang import accuracy

    model, tokenizer = accuracy.load_model(ROOT / "models/trained-qwen3-moe")
    E, k = accuracy.model_shape(model)
    batch = accuracy.make_batches(accuracy.domain_streams(tokenizer), 4, 1, 8 + 4 + 1, kinds=("mixed",))[0]
    with bo.recording([E, 8]):
        off = accuracy.off_reference(model, batch, 8, 0)
        off_patch = bo.OffloadPatch.last
        lynx_res = accuracy.measure(model, batch, make_policy("lynx"), off, 8, 0)[0]
        lynx_patch = bo.OffloadPatch.last
    layers = len(accuracy.moe_blocks(model))
    for patch in (off_patch, lynx_patch):
        assert [len(s) for s in patch.steps[E]] == [4] * layers  # 4 decode steps per layer
        assert all(c.loads == 0 for s in patch.steps[E] for c in s)  # K = E: nothing is ever paged
        assert all(len(p) == layers for p in patch.prefill.values())
    # The recorded page-ins are those of the ids the harness ran.
    mean_distinct = [sum(c.distinct for c in s) / len(s) for s in lynx_patch.steps[8]]
    assert mean_distinct == pytest.approx(lynx_res.experts_after)
    for mode in ("keep", "prefer"):
        with bo.recording([E]):
            res = accuracy.measure(model, batch, bo.ResidencyRule(mode, E), off, 8, 0)[0]
        assert res.kl == 0.0 and res.correct == res.correct_off  # everything resident: off exactly
    assert lynx_res.tokens == res.tokens


def _result(correct, tokens):
    from lynx_sglang.accuracy import BatchResult

    return BatchResult("mixed", len(tokens), sum(tokens), 0, sum(correct), 0.0, 0.0, 0.0, 0, 0.0, [], [],
                       per_sequence={"correct": list(correct), "tokens": list(tokens)})


def test_paired_difference_against_lynx_is_per_sequence_on_the_same_batches():
    lynx = bo.Series("lynx", 8, [], [], [_result([5, 7], [10, 10]), _result([3, 9], [10, 10])])
    rule = bo.Series("rule", 8, [], [], [_result([4, 7], [10, 10]), _result([3, 6], [10, 10])])
    paired = rule.paired_vs(lynx)
    # (4-5) + (7-7) + (3-3) + (6-9) = -4 correct over 40 tokens: -10 points.
    assert paired["points"] == pytest.approx(-10.0)
    lo, hi = paired["ci95"]
    assert -30.0 <= lo <= -10.0 <= hi <= 0.0  # every resampled sequence loses 0 to 3 of its 10 tokens
    other = bo.Series("x", 8, [], [], [_result([5, 7], [10, 9]), _result([3, 9], [10, 10])])
    with pytest.raises(ValueError, match="same batches"):
        rule.paired_vs(other)


@pytest.mark.skipif(not (ROOT / "models/trained-qwen3-moe/config.json").exists(), reason="bundled model missing")
def test_per_layer_caps_run_each_layer_at_its_own_cap():
    from lynx_sglang import accuracy

    model, tokenizer = accuracy.load_model(ROOT / "models/trained-qwen3-moe")
    E, k = accuracy.model_shape(model)
    layers = len(accuracy.moe_blocks(model))
    batch = accuracy.make_batches(accuracy.domain_streams(tokenizer), 8, 1, 8 + 6 + 1, kinds=("mixed",))[0]
    K = E // 4

    def run(rule):
        with bo.recording([K]):
            res = accuracy.measure(model, batch, rule, off, 8, 0)[0]
        return res, [[c.distinct for c in s] for s in bo.OffloadPatch.last.steps[K]]

    with bo.recording([K]):
        off = accuracy.off_reference(model, batch, 8, 0)
    low, high = 0.35, 1.0
    uniform_low = run(bo.ResidencyRule("prefer", K, LynxPolicy(max_moved_weight=low)))
    uniform_high = run(bo.ResidencyRule("prefer", K, LynxPolicy(max_moved_weight=high)))
    # Every layer at the same cap is the uniform rule exactly.
    same = run(bo.ResidencyRule("prefer", K, LynxPolicy(), (low,) * layers))
    assert same[1] == uniform_low[1] and same[0].kl == uniform_low[0].kl
    # Only the last layer at the high cap: the layers before it see the same inputs and decide as the
    # low cap does; the last decides differently (it moves more, so it touches fewer experts).
    mixed = run(bo.ResidencyRule("prefer", K, LynxPolicy(), (low,) * (layers - 1) + (high,)))
    assert mixed[1][:-1] == uniform_low[1][:-1]
    assert mixed[1][-1] != uniform_low[1][-1] and sum(mixed[1][-1]) < sum(uniform_low[1][-1])
    assert uniform_high[1][-1] != uniform_low[1][-1]
    assert bo.ResidencyRule("prefer", K, LynxPolicy(), (0.5, 0.7)).label == "resident-first layer caps 0.5/0.7"
    with pytest.raises(ValueError, match="2 layer caps for a model with 4 MoE layers"):
        run(bo.ResidencyRule("prefer", K, LynxPolicy(), (0.5, 0.7)))


def test_step_tail_sums_the_layers_of_each_decode_step():
    c = lambda loads: bo.StepCost(distinct=loads, waves=1, loads=loads)  # noqa: E731
    # Two batches, two layers, three and one decode steps: per-step totals 5, 7, 20 and 3.
    s = bo.Series("x", 8, [[[c(1), c(3), c(15)], [c(4), c(4), c(5)]], [[c(2)], [c(1)]]], [], [])
    tail = s.step_tail()
    assert tail["page_ins_per_decode_step_max"] == 20
    assert 7 < tail["page_ins_per_decode_step_p99"] <= 20  # the top of [3, 5, 7, 20], interpolated
    assert s.mean("loads") == pytest.approx((1 + 3 + 15 + 4 + 4 + 5 + 2 + 1) / 8)


def test_page_budget_rules_are_named_and_served_as_given():
    assert bo.parse_page_budgets("20@0.6, 18@0.65") == [(20, 0.6), (18, 0.65)]
    with pytest.raises(SystemExit, match="not BUDGET@CAP"):
        bo.parse_page_budgets("20")
    rule = bo.ResidencyRule("prefer", 16, LynxPolicy(max_moved_weight=0.6), page_budget=20)
    assert rule.label == "resident-first moved<=0.6 pages<=20"
    served = rule.runtime_policy
    assert (served.residency, served.residency_page_budget, served.max_moved_weight) == ("prefer", 20, 0.6)
    per_layer = bo.ResidencyRule("prefer", 16, LynxPolicy(), (0.4, 0.8), page_budget=12).at_layer(1)
    assert (per_layer.policy.max_moved_weight, per_layer.page_budget) == (0.8, 12)


def test_several_seeds_pool_their_batches_in_order():
    from lynx_sglang import accuracy

    _, tokenizer = accuracy.load_model(ROOT / "models/trained-qwen3-moe")
    streams = accuracy.domain_streams(tokenizer)
    one = [bo.held_out_batches(streams, 4, 1, 12, s) for s in (0, 1)]
    both = bo.held_out_batches(streams, 4, 1, 12, [0, 1])
    assert len(both) == 2 * len(one[0])
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(both, one[0] + one[1]))
    assert not torch.equal(one[0][0].tokens, one[1][0].tokens)  # another seed, other text


def test_output_norm_rules_rank_each_step_on_the_hidden_states_entering_its_block(monkeypatch):
    """The replay hands the served head the hidden states the MoE block receives at that decode step (checked
    against a forward pre-hook on the block), and decides as the served selector with that head decides."""
    from lynx_sglang import accuracy

    path = ROOT / "models/trained-glm4-moe"
    model, tokenizer = accuracy.load_model(path)
    E, k = accuracy.model_shape(model)
    K, prefix, steps = E // 4, 8, 3
    batch = accuracy.make_batches(accuracy.domain_streams(tokenizer), 4, 1, prefix + steps + 1, kinds=("mixed",))[0]
    bo.OffloadPatch.output_norms = heads = bo.model_output_norms(model, path)
    rule = bo.ResidencyRule("prefer", K, LynxPolicy(max_moved_weight=0.0), page_budget=3, output_norms=True)
    seen, entering = [], []
    real = bo.residency_select

    def spy(rule_, router, logits, ids, weights, resident, bias=None, sim=None, hidden=None, head=None):
        out = real(rule_, router, logits, ids, weights, resident, bias, sim, hidden, head)
        sel = ExpertSelector(router, rule_.runtime_policy, 8, ids_dtype=ids.dtype, correction_bias=bias,
                             residency=torch.where(resident, 0, -1).int(), output_norms=head)
        want, _ = sel.run(logits.float(), ids, weights.float(), None, hidden)
        assert torch.equal(out[0], want.long() if out[0].dtype == torch.int64 else want)
        seen.append(hidden.clone())
        return out

    monkeypatch.setattr(bo, "residency_select", spy)
    blocks = accuracy.moe_blocks(model)
    hook = blocks[0].register_forward_pre_hook(lambda m, a: entering.append(a[0].detach().float()))
    try:
        with bo.recording([K]):
            off = accuracy.off_reference(model, batch, prefix, 0)
            entering.clear()
            accuracy.measure(model, batch, rule, off, prefix, 0)
    finally:
        hook.remove()
        bo.OffloadPatch.output_norms = None
    layers = len(blocks)
    assert len(seen) == steps * layers and len(heads) == layers
    x = entering[0].reshape(batch.tokens.shape[0], -1, entering[0].shape[-1])  # the teacher-forced pass
    for t in range(steps):  # each layer selects its decode steps in order as its forward runs: layer 0 first
        assert torch.equal(seen[t], x[:, prefix + t])


def test_the_explore_scripts_batch_options_parse_to_ints():
    """add_batch_args (explore_paged_oracle, explore_paged_layer_caps) keeps --seed an int: make_batches seeds a
    torch generator with it (a string there fails only deep inside a run)."""
    import argparse

    ap = argparse.ArgumentParser()
    bo.add_batch_args(ap, batches=6)
    args = ap.parse_args(["--seed", "3", "--batch-size", "8"])
    assert (args.seed, args.batch_size, args.batches) == (3, 8, 6)
