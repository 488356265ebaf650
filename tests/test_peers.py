"""Peer rules (lynx_paper, xshare, sere) against their plain-Python oracles, on many random batches.

Each case draws a batch (E = 8..128, k = 1..8, T = 1..64, softmax or sigmoid router, some
with a correction bias, padding rows via ``num_valid`` as an int or a tensor, malformed rows,
shared-expert slots, tied logits) and checks, against ``tests/peer_oracles.py``: ids exactly,
weights to fp32 rounding, the batch's counts; and the contract: inputs unmodified, rows that
do not vote and shared slots bit for bit, no duplicate id in a row.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import peer_oracles as oracle
from lynx_sglang.op_audit import OpAudit
from lynx_sglang.runtime.selection import peers, reference
from lynx_sglang.runtime.selection.config import ConfigError, RouterSpec
from lynx_sglang.runtime.selection.peers import LynxPaperPolicy, SerePolicy, XSharePolicy

CASES = 60  # random batches per rule and parameter draw


def make_batch(rng: random.Random, device, E=None, k=None, T=None, scoring=None, bias=None, shared=None):
    """A random batch as the router would hand it over, with padding and malformed rows."""
    E = E or rng.choice([8, 16, 32, 64, 128])
    k = k or rng.randint(1, min(8, E))
    T = T or rng.randint(1, 64)
    scoring = scoring or rng.choice(["softmax", "sigmoid"])
    bias = rng.random() < 0.15 if bias is None else bias
    shared = rng.choice([0, 0, 1, 2]) if shared is None else shared
    router = RouterSpec(E, k, num_shared_slots=shared, scoring_func=scoring, has_correction_bias=bias)
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    logits = torch.randn(T, E, generator=g) * rng.choice([0.5, 1.0, 2.0, 4.0])
    if rng.random() < 0.4:  # ties inside rows and across rows
        logits = torch.round(logits * 2) / 2
    correction = (torch.randn(E, generator=g) * 0.05).to(device) if bias else None
    logits = logits.to(device)
    sel = reference.selection_score(router, logits, correction)
    order = torch.sort(sel, dim=1, descending=True, stable=True).indices
    ids = order[:, :k]
    gate = logits.float().softmax(dim=1) if scoring == "softmax" else logits.float().sigmoid()
    w = gate.gather(1, ids)
    if rng.random() < 0.6:
        w = w / w.sum(dim=1, keepdim=True)
    w = w * rng.choice([1.0, 1.0, 2.5])
    ids_dtype = rng.choice([torch.int32, torch.int64])
    if shared:
        ids = torch.cat([ids, torch.arange(E, E + shared, device=device).expand(T, shared)], dim=1)
        w = torch.cat([w, torch.full((T, shared), 0.75, device=device)], dim=1)
    ids = ids.to(ids_dtype).contiguous()
    w = w.float().contiguous()
    # Malformed rows: they must pass through and not vote.
    for t in range(T):
        if rng.random() < 0.08:
            kind = rng.randrange(5)
            if kind == 0:
                ids[t, 0] = -1
            elif kind == 1 and k >= 2:
                ids[t, 1] = ids[t, 0]
            elif kind == 2:
                logits[t, rng.randrange(E)] = float("nan")
            elif kind == 3:
                w[t, 0] = -0.5
            else:
                logits[t, rng.randrange(E)] = float("inf")
    num_valid = rng.choice([None, T, rng.randint(0, T), "tensor"])
    if num_valid == "tensor":
        num_valid = torch.tensor(rng.randint(0, T), dtype=rng.choice([torch.int32, torch.int64]), device=device)
    return router, logits, ids, w, num_valid, correction


def oracle_batch(router, logits, ids, w, num_valid, correction):
    score = reference.selection_score(router, logits, correction)  # the router's ranking (input of the rule)
    nv = int(num_valid) if isinstance(num_valid, torch.Tensor) else num_valid
    return oracle.Batch(router.num_experts, router.top_k, router.scoring_func, logits.float().cpu().tolist(),
                        score.cpu().tolist(), ids.cpu().tolist(), w.cpu().tolist(), nv)


def check_against(router, inputs, got, want):
    """Our result ``got`` against the oracle's ``want``, plus the contract."""
    logits, ids, w = inputs
    out_ids, out_w, info = got
    o_ids, o_w, o_info = want
    k = router.top_k
    assert out_ids.dtype == ids.dtype and out_w.dtype == w.dtype
    assert out_ids.shape == ids.shape and out_w.shape == w.shape
    assert out_ids.cpu().tolist() == o_ids
    torch.testing.assert_close(out_w.cpu(), torch.tensor(o_w, dtype=out_w.dtype), rtol=2e-5, atol=1e-6)
    assert torch.equal(out_ids[:, k:], ids[:, k:]) and torch.equal(out_w[:, k:], w[:, k:])
    # Unchanged rows are bit for bit (NaN-safe comparison on the raw bytes).
    same = (out_ids == ids).all(dim=1)
    assert torch.equal(out_w[same].view(torch.int32), w[same].view(torch.int32))
    for new, old in zip(out_ids[:, :k].cpu().tolist(), ids[:, :k].cpu().tolist()):
        if new != old:  # a rewritten row: no duplicate id, at least one expert
            held = [e for e in new if e >= 0]
            assert len(held) == len(set(held)) and held
    assert set(torch.nonzero(info.keep).flatten().tolist()) == o_info["keep"]
    assert int(info.experts_before) == o_info["experts_before"]
    assert int(info.experts_after) == o_info["experts_after"]
    assert int(info.rows_changed) == o_info["rows_changed"]
    assert int(info.rows_voting) == o_info["rows_voting"]


def run_case(fn, router, logits, ids, w, num_valid, correction, **kw):
    before = [t.clone() for t in (logits, ids, w)]
    got = fn(router=router, logits=logits, topk_ids=ids, topk_weights=w, num_valid=num_valid,
             correction_bias=correction, **kw)
    for a, b in zip(before, (logits, ids, w)):
        assert torch.equal(a.view(torch.int32) if a.is_floating_point() else a,
                           b.view(torch.int32) if b.is_floating_point() else b), "input modified"
    return got


# ---------------------------------------------------------------------------------------------
# lynx_paper
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha,beta", [(1.0, 1), (3.0, 2), (0.7, 1), (2.25, 4), (1.0, None), (3.0, None)])
def test_lynx_paper_matches_oracle(device, alpha, beta):
    rng = random.Random(f"lynx{alpha}{beta}")
    policy = LynxPaperPolicy(alpha=alpha, beta=beta)
    changed = 0
    for _ in range(CASES):
        router, logits, ids, w, nv, corr = make_batch(rng, device)
        policy.validate(router, 64)
        got = run_case(lambda **a: peers.lynx_paper_select(policy, **a), router, logits, ids, w, nv, corr)
        want = oracle.lynx_paper(oracle_batch(router, logits, ids, w, nv, corr), alpha, beta)
        check_against(router, (logits, ids, w), got, want)
        changed += want[2]["rows_changed"]
    assert changed > 0  # the draws exercise the rule


def test_lynx_paper_single_request_ties_go_to_lower_ids(device):
    """B = 1: no popularity, so the row keeps its top level and fills by the lower id (their rule)."""
    router = RouterSpec(8, 2)
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0, 0.0, 3.5, 0.0, 0.0]], device=device)
    ids = torch.tensor([[0, 5]], dtype=torch.int32, device=device)
    w = torch.tensor([[0.8, 0.2]], device=device)
    out_ids, out_w, info = peers.lynx_paper_select(LynxPaperPolicy(1.0, 1), router, logits, ids, w)
    # q: e0 = 0, e5 = ceil(-1.5) -> clamped -1, every other expert -1 as well: e1 wins the tie.
    assert out_ids.tolist() == [[0, 1]]
    assert int(info.experts_after) == 2 and int(info.rows_changed) == 1
    torch.testing.assert_close(out_w.sum(), torch.tensor(1.0, device=device))


def test_lynx_paper_popularity_breaks_level_ties(device):
    """Within a level, experts other rows hold at a higher level win, before the lower id."""
    router = RouterSpec(4, 2)
    logits = torch.tensor([[4.0, 0.0, 3.4, 3.4], [0.0, 0.0, 3.0, 4.0]], device=device)
    ids = torch.tensor([[0, 2], [3, 2]], dtype=torch.int32, device=device)
    w = torch.tensor([[0.6, 0.4], [0.6, 0.4]], device=device)
    out_ids, _, info = peers.lynx_paper_select(LynxPaperPolicy(1.0, 1), router, logits, ids, w)
    # q, row 0: e0, e2, e3 at level 0 (ceil(-0.6) = 0), e1 at -1; row 1: e3 at 0, the rest at -1.
    # B = 2: row 0's level-0 experts by popularity: e3 (row 1 has it at level 0) first, then e0
    # and e2 tie (row 1 has both at -1) -> e0. Row 1: e3, then e0 / e2 tie -> e0. Kept {e0, e3}.
    assert out_ids.tolist() == [[0, 3], [3, 0]]
    assert set(torch.nonzero(info.keep).flatten().tolist()) == {0, 3}


def test_lynx_paper_beta_overflow_is_refused():
    router = RouterSpec(16, 2)
    with pytest.raises(ConfigError):
        LynxPaperPolicy(1.0, 7).validate(router, 1024)
    LynxPaperPolicy(1.0, 4).validate(router, 1024)
    with pytest.raises(ConfigError):
        LynxPaperPolicy(0.0, 1).validate(router, 16)


# ---------------------------------------------------------------------------------------------
# xshare
# ---------------------------------------------------------------------------------------------


def _xshare_params(rng: random.Random, E: int, k: int) -> dict:
    return dict(
        expert_budget=rng.choice([None, rng.randint(1, E), max(1, min(E, k + rng.randint(0, 6)))]),
        budget_alpha=rng.choice([0.0, 0.25, 0.5]),
        top_per_token=rng.choice([0, 0, 1, 2, k]),
        min_batch=rng.choice([0, 0, 4]),
        max_batch=rng.choice([0, 0, 48]),
        guarantee_topk=rng.random() < 0.7,
    )


def test_xshare_matches_oracle(device):
    rng = random.Random("xshare")
    changed = 0
    for _ in range(4 * CASES):
        router, logits, ids, w, nv, corr = make_batch(rng, device)
        params = _xshare_params(rng, router.num_experts, router.top_k)
        policy = XSharePolicy(**params)
        policy.validate(router, 64)
        got = run_case(lambda **a: peers.xshare_select(policy, **a), router, logits, ids, w, nv, corr)
        want = oracle.xshare(oracle_batch(router, logits, ids, w, nv, corr), **params)
        check_against(router, (logits, ids, w), got, want)
        changed += want[2]["rows_changed"]
    assert changed > 0


def test_xshare_budget_below_topk_is_a_noop_with_the_guarantee(device):
    rng = random.Random("xshare-noop")
    router, logits, ids, w, nv, corr = make_batch(rng, device, E=32, k=6, T=16, bias=False)
    out_ids, out_w, info = peers.xshare_select(XSharePolicy(expert_budget=4), router, logits, ids, w, nv)
    assert torch.equal(out_ids, ids) and int(info.rows_changed) == 0
    out_ids, _, info = peers.xshare_select(XSharePolicy(expert_budget=4, guarantee_topk=False), router, logits, ids, w)
    assert int(info.experts_after) <= 4 and (out_ids[:, :6] == -1).any()


def test_xshare_batch_gate(device):
    router = RouterSpec(64, 4)
    logits = torch.randn(20, 64, generator=torch.Generator().manual_seed(5)).to(device)
    w, ids = logits.softmax(dim=1).topk(4, dim=1)
    ids = ids.to(torch.int32)
    on = XSharePolicy(expert_budget=8)
    assert int(peers.xshare_select(on, router, logits, ids, w)[2].rows_changed) > 0
    for policy in (XSharePolicy(expert_budget=8, min_batch=21), XSharePolicy(expert_budget=8, max_batch=19)):
        out_ids, out_w, info = peers.xshare_select(policy, router, logits, ids, w)
        assert torch.equal(out_ids, ids) and torch.equal(out_w, w) and int(info.rows_changed) == 0
    # The gate counts voting rows: 19 valid rows are within max_batch = 19.
    nv = torch.tensor(19, device=device)
    assert int(peers.xshare_select(XSharePolicy(expert_budget=8, max_batch=19), router, logits, ids, w, nv)[2]
               .rows_changed) > 0


def test_xshare_config_errors():
    router = RouterSpec(16, 2)
    for bad in (dict(expert_budget=0), dict(expert_budget=17), dict(budget_alpha=1.5), dict(top_per_token=-1),
                dict(min_batch=-1), dict(guarantee_topk=1)):
        with pytest.raises(ConfigError):
            XSharePolicy(**bad).validate(router, 64)


# ---------------------------------------------------------------------------------------------
# sere
# ---------------------------------------------------------------------------------------------


def _similarity(rng: random.Random, E: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    sim = torch.rand(E, E, generator=g)
    if rng.random() < 0.5:  # ties
        sim = torch.round(sim * 4) / 4
    sim = (sim + sim.T) / 2
    sim.fill_diagonal_(1.0)
    return sim.float().to(device)


@pytest.mark.parametrize("threshold", [0.0, 0.4, 0.7])
def test_sere_matches_oracle(device, threshold):
    rng = random.Random(f"sere{threshold}")
    changed = merged = 0
    for _ in range(CASES):
        router, logits, ids, w, nv, corr = make_batch(rng, device)
        S = rng.randint(1, router.top_k)
        policy = SerePolicy(select_top_k=S, threshold=threshold)
        policy.validate(router, 64)
        sim = _similarity(rng, router.num_experts, device)
        peers.check_similarity(sim, router.num_experts)
        got = run_case(lambda **a: peers.sere_select(policy, similarity=sim, **a), router, logits, ids, w, nv, corr)
        want = oracle.sere(oracle_batch(router, logits, ids, w, nv, corr), sim.cpu().tolist(), S, threshold)
        check_against(router, (logits, ids, w), got, want)
        changed += want[2]["rows_changed"]
        merged += sum(row.count(-1) for row in want[0])
    assert changed > 0 and merged > 0


def test_sere_merges_duplicates_into_the_first_slot(device):
    router = RouterSpec(6, 4)
    # Row 0 picks e0 > e1 > e4 > e5; row 1 picks e2 > e3 > ...; S = 1: primary {e0, e2}.
    logits = torch.tensor([[5.0, 4.0, -9, -9, 3.0, 2.0], [-9, -9, 5.0, 4.0, 3.0, 2.0]], device=device)
    ids = torch.tensor([[0, 1, 4, 5], [2, 3, 4, 5]], dtype=torch.int32, device=device)
    w = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]], device=device)
    sim = torch.eye(6, device=device)
    sim[1, 0] = sim[0, 1] = 0.9  # e1 ~ e0
    sim[4, 0] = sim[0, 4] = 0.8  # e4 ~ e0
    sim[5, 2] = sim[2, 5] = 0.2  # e5 ~ e2, weakly
    sim[3, 2] = sim[2, 3] = 0.6
    out_ids, out_w, info = peers.sere_select(SerePolicy(1, 0.5), router, sim, logits, ids, w)
    # Row 0: e1 -> e0, e4 -> e0 (merged into slot 0), e5 stays (0.2 < 0.5).
    # Row 1: e3 -> e2, e4 -> e0 (best primary for e4), e5 stays.
    assert out_ids.tolist() == [[0, -1, -1, 5], [2, -1, 0, 5]]
    torch.testing.assert_close(out_w, torch.tensor([[0.9, 0.0, 0.0, 0.1], [0.7, 0.0, 0.2, 0.1]], device=device))
    assert set(torch.nonzero(info.keep).flatten().tolist()) == {0, 2, 5}
    # rho = 0: every secondary pick outside the primary set moves, however dissimilar.
    out_ids, _, _ = peers.sere_select(SerePolicy(1, 0.0), router, sim, logits, ids, w)
    assert out_ids.tolist() == [[0, -1, -1, 2], [2, -1, 0, -1]]


def test_sere_select_top_k_equal_k_is_a_noop(device):
    rng = random.Random("sere-noop")
    router, logits, ids, w, nv, corr = make_batch(rng, device, k=4, bias=False)
    sim = _similarity(rng, router.num_experts, device)
    out_ids, out_w, info = peers.sere_select(SerePolicy(4, 0.0), router, sim, logits, ids, w, nv)
    assert torch.equal(out_ids, ids) and torch.equal(out_w, w) and int(info.rows_changed) == 0
    with pytest.raises(ConfigError):
        SerePolicy(5, 0.0).validate(router, 64)
    with pytest.raises(ValueError):
        peers.sere_select(SerePolicy(1, 0.0), router, sim.double(), logits, ids, w)


# ---------------------------------------------------------------------------------------------
# expert similarity (offline)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", peers.SIMILARITY_METHODS)
def test_expert_similarity_matches_oracle(method):
    g = torch.Generator().manual_seed(3)
    outputs = torch.randn(5, 7, 3, generator=g)
    outputs[1] = outputs[0] * 2 + 0.01 * torch.randn(7, 3, generator=g)  # a near-copy
    outputs[4, 2] = 0.0  # a zero output on one token
    got = peers.expert_similarity(outputs, method, chunk_elements=40)  # several Gram blocks
    want = torch.tensor(oracle.expert_similarity(outputs.double().tolist(), method), dtype=torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.dtype == torch.float32 and torch.equal(got, got.T) and bool((got.diagonal() == 1).all())
    assert torch.equal(peers.expert_similarity(list(outputs), method, chunk_elements=40), got)
    if method != "frobenius":  # scale-free measures: the near-copy is the closest pair
        assert int(got[0, 1:].argmax()) == 0
    with pytest.raises(ConfigError):
        peers.expert_similarity(outputs, "l2")


# ---------------------------------------------------------------------------------------------
# all rules: CUDA-graph safety, reroute, entry point
# ---------------------------------------------------------------------------------------------


def _audit_cases(device):
    rng = random.Random("audit")
    router, logits, ids, w, _, _ = make_batch(rng, device, E=128, k=8, T=64, scoring="softmax", bias=False, shared=1)
    nv = torch.tensor(50, device=device)
    sim = _similarity(rng, 128, device)
    return router, logits, ids, w, nv, [
        ("lynx_paper", LynxPaperPolicy(3.0, 2), None),
        ("lynx_paper (no beta)", LynxPaperPolicy(1.0, None), None),
        ("xshare", XSharePolicy(expert_budget=24, top_per_token=1, min_batch=1, max_batch=64), None),
        ("sere", SerePolicy(2, 0.5), sim),
    ]


def test_every_rule_needs_no_host(device):
    """No sync, no host-built tensor, no data-dependent shape: capturable in a CUDA graph."""
    router, logits, ids, w, nv, cases = _audit_cases(device)
    for name, policy, sim in cases:
        peers.select_peer(policy, router, logits, ids, w, nv, similarity=sim)  # warm caches
        with OpAudit() as audit:
            peers.select_peer(policy, router, logits, ids, w, nv, similarity=sim)
        assert audit.findings == [], (name, audit.findings)
        assert 0 < audit.launches < 200, (name, audit.launches)


def test_rules_are_deterministic_and_empty_batches_pass(device):
    router, logits, ids, w, nv, cases = _audit_cases(device)
    for name, policy, sim in cases:
        a = peers.select_peer(policy, router, logits, ids, w, nv, similarity=sim)
        b = peers.select_peer(policy, router, logits, ids, w, nv, similarity=sim)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), name
        out_ids, out_w, info = peers.select_peer(policy, router, logits[:0], ids[:0], w[:0], similarity=sim)
        assert out_ids.shape == (0, ids.shape[1]) and int(info.rows_voting) == 0
    with pytest.raises(ValueError):
        peers.select_peer(SerePolicy(1), router, logits, ids, w)


def test_reroute_per_row_kept_set_equals_the_batch_kept_set(device):
    rng = random.Random("reroute")
    for _ in range(20):
        router, logits, ids, w, nv, corr = make_batch(rng, device)
        E, T = router.num_experts, logits.shape[0]
        sel = reference.selection_score(router, logits, corr)
        row_ok = reference.vote(peers.OffPolicy(), router, logits, ids, w, T if nv is None else nv, sel).row_ok
        keep = torch.rand(E, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))).to(device) < 0.5
        want = reference.reroute(router, logits, ids, w, sel, row_ok, keep)
        got = reference.reroute(router, logits, ids, w, sel, row_ok, keep[None, :].expand(T, E))
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_peer_policies_registry():
    assert set(peers.PEER_POLICIES) == {"lynx_paper", "xshare", "sere"}
    assert math.isclose(XSharePolicy().budget(RouterSpec(128, 4)), 64)
