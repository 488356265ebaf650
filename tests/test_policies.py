"""Each policy's rule on small hand-made batches, and against a plain-Python oracle."""

from __future__ import annotations

import math
import random

import pytest
import torch

from lynx_sglang import ExpertSelector, RouterSpec, make_policy
from lynx_sglang.runtime.selection import reference
from lynx_sglang.synthetic import route

BACKENDS = ["torch", "triton"]


def run(policy, router, batch, backend, num_valid=None, device="cpu"):
    sel = ExpertSelector(router, policy, max(1, batch.logits.shape[0]), device, batch.topk_ids.dtype,
                         batch.topk_weights.dtype, correction_bias=batch.correction_bias, backend=backend)
    ids, w = sel.run(batch.logits.to(device), batch.topk_ids.to(device), batch.topk_weights.to(device), num_valid)
    return ids.cpu(), w.cpu(), sel.stats()


# The worked example of docs/policies.md.
WORKED_LOGITS = torch.tensor([
    [3.0, 0.0, 2.5, -5.0],   # t0: picks e0, e2 (gap 0.5: not confident)
    [2.0, 1.8, -5.0, -5.0],  # t1: picks e0, e1 (gap 0.2: not confident)
    [-5.0, 3.0, -5.0, 2.0],  # t2: picks e1, e3 (gap 1.0: confident)
])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lynx_worked_example(backend):
    router = RouterSpec(4, 2)
    policy = make_policy("lynx", alpha=1.0, beta=1, keep_level=0, min_votes=1, min_keep=2, max_moved_weight=1.0)
    batch = route(router, WORKED_LOGITS)
    ids, w, stats = run(policy, router, batch, backend)
    # scores (B = 3): e0 = 2*3 = 6, e1 = 1*3 + 1 = 4, e2 = 1, e3 = 1; threshold min(3, 4) = 3 -> keep {e0, e1}
    assert ids.tolist() == [[0, 1], [0, 1], [1, 0]]
    assert torch.equal(w[1], batch.topk_weights[1])  # t1 lost nothing: bit for bit
    e3 = math.exp(3.0)
    torch.testing.assert_close(w[0], torch.tensor([e3 / (e3 + 1), 1 / (e3 + 1)]))
    torch.testing.assert_close(w[2], torch.tensor([e3 / (e3 + math.exp(-5.0)), math.exp(-5.0) / (e3 + math.exp(-5.0))]))
    assert (stats.experts_before, stats.experts_after, stats.rows_changed) == (4, 2, 2)
    # The moved-weight statistic: t0's weight on e2 plus t2's on e3, in 1/65536 rounded half up.
    lost = [float(batch.topk_weights[0, 1]), float(batch.topk_weights[2, 1])]
    assert stats.moved_weight == sum(math.floor(x * 65536 + 0.5) for x in lost)
    assert stats.moved_per_rerouted_token == pytest.approx(sum(lost) / 2, abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lynx_confident_rank0_survives_a_strict_threshold(backend):
    router = RouterSpec(4, 2)
    # min_votes=2 at level 0 would drop e1 (one bin-0 vote), but t2 is confident in e1.
    policy = make_policy("lynx", alpha=1.0, beta=1, keep_level=0, min_votes=2, min_keep=1, max_moved_weight=1.0)
    ids, _, stats = run(policy, router, route(router, WORKED_LOGITS), backend)
    assert ids[2, 0].item() == 1
    assert stats.experts_after == 2  # e0 (two bin-0 votes) and the mandatory e1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cap", [0.0, 0.2, 0.45])
def test_lynx_moves_at_most_max_moved_weight_of_a_token(backend, cap):
    router = RouterSpec(32, 4)
    g = torch.Generator().manual_seed(11)
    batch = route(router, torch.randn(48, 32, generator=g) * 1.5)
    # alpha = 8: a window of 1/8 logit leaves nearly every pick movable, so the cap does the work.
    capped = run(make_policy("lynx", alpha=8.0, max_moved_weight=cap), router, batch, backend)
    free = run(make_policy("lynx", alpha=8.0, max_moved_weight=1.0), router, batch, backend)
    lost = []
    for row in range(48):
        old = batch.topk_ids[row].tolist()
        gone = [s for s, e in enumerate(old) if e not in capped[0][row].tolist()]
        lost.append(float(batch.topk_weights[row, gone].sum()) / float(batch.topk_weights[row].sum()))
    assert max(lost) <= cap + 4 / 65536  # weights are compared in units of 1/65536
    # What the lynx:moved_weight_total metric shows (renormalised rows: weight = share): within the cap.
    if cap == 0.0:
        assert torch.equal(capped[0], batch.topk_ids)  # nothing may move
        assert capped[2].moved_weight == 0
    assert capped[2].moved_weight == sum(math.floor(x * 65536 + 0.5) for row in range(48)
                                         for e, x in zip(batch.topk_ids[row].tolist(), batch.topk_weights[row].tolist())
                                         if e not in capped[0][row].tolist())
    assert capped[2].moved_per_rerouted_token <= cap + 4 / 65536
    assert capped[2].experts_after > free[2].experts_after  # the cap keeps experts the window alone would drop
    assert capped[2].rows_changed < free[2].rows_changed


@pytest.mark.parametrize("backend", BACKENDS)
def test_lynx_single_token_is_untouched(backend):
    # With B = 1 the score base is 1: every picked expert clears the threshold.
    router = RouterSpec(64, 8)
    batch = route(router, torch.randn(1, 64) * 3)
    ids, w, stats = run(make_policy("lynx"), router, batch, backend)
    assert torch.equal(ids, batch.topk_ids) and torch.equal(w, batch.topk_weights)
    assert stats.rows_changed == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_oea_keeps_top_k0_and_fills_from_the_union(backend):
    router = RouterSpec(6, 3)
    logits = torch.tensor([
        [5.0, 4.0, 3.0, 0.0, 0.0, 0.0],  # top-1 e0; picks e0 e1 e2
        [0.0, 0.0, 1.0, 5.0, 4.0, 0.0],  # top-1 e3; picks e3 e4 e2
    ])
    ids, w, stats = run(make_policy("oea", k0=1), router, route(router, logits), backend)
    # union of top-1 = {e0, e3}: each row keeps its top-1 and takes the other one as its only fill.
    assert ids.tolist() == [[0, 3, -1], [3, 0, -1]]
    assert (w[:, 2] == 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    assert stats.experts_after == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_budget_keeps_the_heaviest_experts(backend):
    router = RouterSpec(5, 2)
    logits = torch.tensor([
        [4.0, 3.0, 0.0, 0.0, 0.0],
        [4.0, 0.0, 3.5, 0.0, 0.0],
        [0.0, 0.0, 0.0, 4.0, 3.9],
    ])
    batch = route(router, logits)
    ids, _, stats = run(make_policy("budget", max_experts=2), router, batch, backend)
    total = torch.zeros(5).index_add_(0, batch.topk_ids.flatten().long(), batch.topk_weights.flatten())
    expected_keep = set(torch.argsort(total, descending=True, stable=True)[:2].tolist())
    assert {e for e in ids.flatten().tolist() if e >= 0} == expected_keep
    assert stats.experts_after == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_off_is_bit_for_bit(backend):
    router = RouterSpec(16, 4, num_shared_slots=1)
    batch = route(router, torch.randn(9, 16).to(torch.bfloat16), weights_dtype=torch.bfloat16)
    ids, w, stats = run(make_policy("off"), router, batch, backend, num_valid=7)
    assert torch.equal(ids, batch.topk_ids) and torch.equal(w.view(torch.int16), batch.topk_weights.view(torch.int16))
    assert stats.rows_voting == 7 and stats.rows_changed == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_shared_slots_and_bad_rows_pass_through(backend):
    router = RouterSpec(8, 2, num_shared_slots=1)
    logits = torch.randn(6, 8)
    batch = route(router, logits)
    batch.logits[1, 3] = float("nan")
    batch.topk_ids[2, :2] = -1  # SGLang masks padded rows like this
    ids, w, stats = run(make_policy("budget", max_experts=1), router, batch, backend, num_valid=5)
    for r in (1, 2, 5):
        assert torch.equal(ids[r], batch.topk_ids[r]) and torch.equal(w[r], batch.topk_weights[r])
    assert (ids[:, 2] == 8).all() and (w[:, 2] == 1).all()
    assert stats.rows_voting == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_ids_beyond_int32_are_out_of_range(backend):
    """2**32 + 7 is not expert 7: the row passes through and does not vote (the kernel checks before narrowing)."""
    router = RouterSpec(8, 2)
    batch = route(router, torch.randn(4, 8) * 3, ids_dtype=torch.int64)
    want_votes = run(make_policy("lynx", keep_level=0, min_votes=2), router, batch, backend)[2].rows_voting
    batch.topk_ids[1, 1] = 2**32 + 7
    ids, w, stats = run(make_policy("lynx", keep_level=0, min_votes=2), router, batch, backend)
    assert torch.equal(ids[1], batch.topk_ids[1]) and torch.equal(w[1], batch.topk_weights[1])
    assert stats.rows_voting == want_votes - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigmoid_rows_whose_gates_underflow_keep_finite_weights(backend):
    """A row re-routed onto experts it scores near -100 (sigmoid gates that round to 0 in fp32) gets the gates'
    ratios (computed in log space), not 0/0."""
    router = RouterSpec(8, 2, scoring_func="sigmoid")
    logits = torch.full((4, 8), -200.0)
    logits[:3, :2] = torch.tensor([5.0, 4.0])  # rows 0-2 pick e0, e1
    logits[3, [4, 5, 0, 1]] = torch.tensor([0.0, -1.0, -100.0, -101.0])  # row 3 picks e4, e5
    batch = route(router, logits)
    assert batch.topk_ids[3].tolist() == [4, 5] and torch.isfinite(batch.topk_weights).all()
    ids, w, stats = run(make_policy("budget", max_experts=2), router, batch, backend)  # keeps e0, e1
    assert ids[3].tolist() == [0, 1] and stats.rows_changed == 1
    assert torch.isfinite(w).all() and (w >= 0).all()
    g = torch.tensor([1.0, math.exp(-1.0)])  # sigmoid(-100) / sigmoid(-101) = e (to 1e-43)
    torch.testing.assert_close(w[3], batch.topk_weights[3].sum() * g / g.sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["off", "lynx", "oea"])
def test_all_equal_logits_follow_the_tie_rule(backend, name):
    # Every score ties: ranks, kept sets and fills all go to the lower expert id.
    router = RouterSpec(8, 2)
    batch = route(router, torch.zeros(4, 8))
    batch.topk_ids[:] = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]], dtype=torch.int32)
    batch.topk_weights[:] = 0.5
    ids, w, _ = run(make_policy(name), router, batch, backend)
    want = {"off": batch.topk_ids, "lynx": batch.topk_ids,  # all votes in bin 0, B=4: everything kept
            "oea": torch.tensor([[0, 2], [2, 0], [4, 0], [6, 0]], dtype=torch.int32)}[name]
    assert torch.equal(ids, want)
    torch.testing.assert_close(w.sum(1), torch.ones(4))


def python_lynx(policy, z, ids, E, weights):
    """Plain-Python AffinityBinning on valid, well-formed rows (an independent oracle)."""
    B, k = len(ids), len(ids[0])
    nb = policy.beta + 1
    votes = [[0] * nb for _ in range(E)]
    mandatory = set()
    for zt, row, wt in zip(z, ids, weights):
        order = sorted(row, key=lambda e: (-zt[e], e))
        # Moved-weight cap: from the weakest pick up, movable while the running weight fits the cap.
        q = {e: math.floor(w * 65536 + 0.5) for e, w in zip(row, wt)}
        running = 0
        for e in reversed(order):
            running += q[e]
            if running * 65536 > sum(q.values()) * round(policy.max_moved_weight * 65536):
                mandatory.add(e)
        for e in row:
            bin_ = max(-policy.beta, math.floor(min(zt[e] - zt[order[0]], 0.0) * policy.alpha))
            votes[e][-bin_] += 1
        if k == 1 or zt[order[0]] - zt[order[1]] >= policy.margin:
            mandatory.add(order[0])
        # keep_top (None: a quarter of top-k): the row's best picks always stay.
        mandatory.update(order[:k // 4 if policy.keep_top is None else policy.keep_top])
    score = [sum(votes[e][j] * B ** (nb - 1 - j) for j in range(nb)) for e in range(E)]
    theta = policy.min_votes * B ** (policy.beta - policy.keep_level)
    m = policy.min_keep or k
    theta = max(1, min(theta, sorted(score, reverse=True)[m - 1]))
    keep = {e for e in range(E) if score[e] >= theta} | mandatory
    out = []
    for zt, row in zip(z, ids):
        cands = sorted((e for e in keep if e not in row), key=lambda e: (-zt[e], e))
        new = [e if e in keep else (cands.pop(0) if cands else -1) for e in row]
        out.append(new)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_lynx_reference_matches_python_oracle(seed):
    rng = random.Random(seed)
    E, k, B = rng.choice([8, 16, 32]), rng.choice([1, 2, 4, 8]), rng.choice([2, 3, 8, 16])
    beta = rng.randint(0, 3)
    policy = make_policy("lynx", alpha=rng.choice([0.5, 1.0, 2.0]), beta=beta, keep_level=rng.randint(0, beta),
                         min_votes=rng.randint(1, 3), min_keep=rng.choice([None, 1, 3]),
                         max_moved_weight=rng.choice([1.0, 0.4, 0.25, 0.0]), keep_top=rng.choice([None, 0, 3]))
    router = RouterSpec(E, k)
    # Quarter-logit grid: exact in fp32 and full of ties.
    z = (torch.randint(-12, 12, (B, E), generator=torch.Generator().manual_seed(seed)) / 4.0)
    batch = route(router, z)
    ids, _, _ = reference.select(policy, router, z, batch.topk_ids, batch.topk_weights)
    want = python_lynx(policy, z.tolist(), batch.topk_ids.tolist(), E, batch.topk_weights.tolist())
    assert ids.tolist() == want


def test_lynx_constants_are_fp32_made_once_and_leave_results_unchanged():
    # Plan-time 0-d fp32 constants (no tensor built from Python data per step) must equal what a per-call
    # torch.tensor(x, dtype=float32) gave, and select() into given buffers must equal select() into new ones.
    policy = make_policy("lynx", alpha=3.0, confidence_margin=0.1)
    consts = reference.lynx_constants(policy, "cpu")
    assert reference.lynx_constants(policy, torch.device("cpu")) is consts
    assert consts.alpha.dtype == consts.margin.dtype == torch.float32 and consts.margin.dim() == 0
    assert consts.margin.item() == torch.tensor(0.1, dtype=torch.float32).item()
    router = RouterSpec(32, 4, num_shared_slots=1)
    g = torch.Generator().manual_seed(5)
    batch = route(router, torch.randn(40, 32, generator=g) * 2)
    ids, w, info = reference.select(policy, router, batch.logits, batch.topk_ids, batch.topk_weights, 35)
    out = (torch.full_like(batch.topk_ids, -7), torch.full_like(batch.topk_weights, -7.0))
    ids2, w2, info2 = reference.select(policy, router, batch.logits, batch.topk_ids, batch.topk_weights, 35,
                                       consts=consts, out=out)
    assert ids2 is out[0] and w2 is out[1]
    assert torch.equal(ids, ids2) and torch.equal(w, w2) and int(info.rows_changed) == int(info2.rows_changed) > 0
