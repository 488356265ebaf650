"""Property-based tests: every policy, kernels and reference alike, over random shapes and values."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checks import assert_contract
from lynx_sglang import ExpertSelector, RouterSpec, make_policy
from lynx_sglang.synthetic import route


@st.composite
def cases(draw):
    E = draw(st.sampled_from([1, 2, 3, 7, 8, 16, 33, 64, 128, 256]))
    k = draw(st.integers(1, min(8, E)))
    ns = draw(st.integers(0, 2))
    T = draw(st.integers(0, 48))
    scoring = draw(st.sampled_from(["softmax", "sigmoid"]))
    bias = draw(st.booleans())
    router = RouterSpec(E, k, ns, scoring, bias)
    name = draw(st.sampled_from(["off", "lynx", "oea", "budget"]))
    if name == "lynx":
        beta = draw(st.integers(0, 4))
        params = dict(
            alpha=draw(st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0])),
            beta=beta,
            keep_level=draw(st.integers(0, beta)),
            min_votes=draw(st.integers(1, 3)),
            min_keep=draw(st.one_of(st.none(), st.integers(1, E))),
            confidence_margin=draw(st.one_of(st.none(), st.sampled_from([0.0, 0.5, 3.0]))),
            max_moved_weight=draw(st.sampled_from([1.0, 1.0, 0.0, 0.25, 0.5, 0.9])),
            refill_similarity=draw(st.sampled_from([0.0, 0.0, 4.0, 0.5])),
        )
    elif name == "oea":
        params = dict(k0=draw(st.one_of(st.none(), st.integers(1, k))))
    elif name == "budget":
        params = dict(max_experts=draw(st.integers(1, E)))
    else:
        params = {}
    policy = make_policy(name, **params)

    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["normal", "ties", "equal", "skewed"]))
    z = torch.randn(T, E, generator=g) * 2
    if kind == "ties":
        z = torch.round(z * 2) / 2  # many exactly equal logits: exercises every tie rule
    elif kind == "equal":
        z = torch.zeros(T, E)
    elif kind == "skewed":
        z = z + 3 * torch.randn(1, E, generator=g)
    b = torch.randn(E, generator=g) * 0.05 if bias else None
    sim = None
    if policy.name == "lynx" and policy.refill_similarity > 0:  # the layer's similarity; halves make exact ties
        sim = torch.round(torch.rand(E, E, generator=g) * 4 - 2) / 2
        sim = ((sim + sim.T) / 2).clamp(-1, 1).fill_diagonal_(1.0)
    ids_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    w_dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
    logits_dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    z = z.to(logits_dtype)
    batch = route(router, z, b, renormalize=draw(st.booleans()), scaling=draw(st.sampled_from([1.0, 2.5])),
                  ids_dtype=ids_dtype, weights_dtype=w_dtype)
    ids, w = batch.topk_ids.clone(), batch.topk_weights.clone()

    # Bad rows: NaN / inf logits, -1 slots, duplicates, out-of-range ids, negative weights.
    if T:
        for _ in range(draw(st.integers(0, 3))):
            r = draw(st.integers(0, T - 1))
            damage = draw(st.sampled_from(["nan", "inf", "minus1", "row_minus1", "dup", "range", "negw"]))
            if damage == "nan":
                z[r, draw(st.integers(0, E - 1))] = float("nan")
            elif damage == "inf":
                z[r, draw(st.integers(0, E - 1))] = float("inf")
            elif damage == "minus1":
                ids[r, draw(st.integers(0, k - 1))] = -1
            elif damage == "row_minus1":
                ids[r, :k] = -1
            elif damage == "dup" and k >= 2:
                ids[r, 1] = ids[r, 0]
            elif damage == "range":
                ids[r, 0] = E + 5
            elif damage == "negw":
                w[r, 0] = -0.5
    nv_kind = draw(st.sampled_from(["none", "int", "tensor"]))
    nv = None if nv_kind == "none" else draw(st.integers(0, T))
    return router, policy, z, ids, w, b, nv, nv_kind, sim


def _run(backend, router, policy, z, ids, w, b, nv, nv_kind, sim, device):
    sel = ExpertSelector(router, policy, max(1, z.shape[0]), device, ids.dtype, w.dtype, correction_bias=b,
                         backend=backend, block_t=16, similarity=None if sim is None else sim.to(device))
    num_valid = torch.tensor(nv, device=device) if nv_kind == "tensor" else nv
    out_ids, out_w = sel.run(z.to(device), ids.to(device), w.to(device), num_valid)
    return out_ids.cpu().clone(), out_w.cpu().clone(), sel.stats()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_reference_keeps_the_contract(case):
    router, policy, z, ids, w, b, nv, nv_kind, sim = case
    out_ids, out_w, stats = _run("torch", router, policy, z, ids, w, b, nv, nv_kind, sim, "cpu")
    assert_contract(router, policy, z, ids, w, nv, b, out_ids, out_w, stats)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_kernels_match_reference(case, device):
    router, policy, z, ids, w, b, nv, nv_kind, sim = case
    ref_ids, ref_w, ref_stats = _run("torch", router, policy, z, ids, w, b, nv, nv_kind, sim, "cpu")
    out_ids, out_w, stats = _run("triton", router, policy, z, ids, w, b, nv, nv_kind, sim, device)
    assert torch.equal(out_ids, ref_ids)
    tol = 1e-5 if w.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out_w.float(), ref_w.float(), rtol=tol, atol=tol, equal_nan=True)
    assert stats == ref_stats
    assert_contract(router, policy, z, ids, w, nv, b, out_ids, out_w, stats)
