"""The fused kernels against the reference over the shapes they are built for (E <= 256, k <= 8, T <= 512)."""

from __future__ import annotations

import pytest
import torch

from lynx_sglang import ExpertSelector, RouterSpec, make_policy
from lynx_sglang.synthetic import random_logits, route

POLICIES = [("lynx", {}), ("oea", {}), ("budget", {"max_experts": 5}), ("off", {})]


def both(router, policy, batch, num_valid, device, block_t=None):
    T = batch.logits.shape[0]
    outs = []
    for backend, dev in (("torch", "cpu"), ("triton", device)):
        sel = ExpertSelector(router, policy, T, dev, batch.topk_ids.dtype, batch.topk_weights.dtype,
                             correction_bias=None if batch.correction_bias is None else batch.correction_bias.to(dev),
                             backend=backend, block_t=block_t)
        nv = num_valid.to(dev) if isinstance(num_valid, torch.Tensor) else num_valid
        ids, w = sel.run(batch.logits.to(dev), batch.topk_ids.to(dev), batch.topk_weights.to(dev), nv)
        outs.append((ids.cpu(), w.cpu(), sel.stats()))
    return outs


@pytest.mark.parametrize("E", [8, 64, 128, 256])
@pytest.mark.parametrize("k,shared", [(2, 0), (8, 1)])
@pytest.mark.parametrize("T", [1, 512])
def test_kernel_shapes(E, k, shared, T, device):
    if k > E:
        pytest.skip("k > E")
    router = RouterSpec(E, k, shared)
    g = torch.Generator().manual_seed(E * 1000 + k * 10 + T)
    batch = route(router, random_logits(T, E, skew=1.0, generator=g))
    # At 512 tokens almost every expert has a near-top vote: ask for several to make it prune.
    policy = make_policy("lynx", keep_level=0, min_votes=max(1, T // 32), max_moved_weight=0.4,
                         keep_top=0)
    (ri, rw, rs), (ki, kw, ks) = both(router, policy, batch, None, device)
    assert torch.equal(ki, ri)
    torch.testing.assert_close(kw, rw, rtol=1e-5, atol=1e-6)
    assert ks == rs
    if T == 512 and E >= 64:
        assert rs.rows_changed > 0  # re-routes (with E = 8 every expert is some confident token's top-1)


@pytest.mark.parametrize("name,params", POLICIES)
@pytest.mark.parametrize("scoring,bias", [("softmax", False), ("sigmoid", True)])
def test_kernel_policies_with_device_num_valid(name, params, scoring, bias, device):
    E, k, T = 64, 6, 200
    router = RouterSpec(E, k, 2, scoring, bias)
    g = torch.Generator().manual_seed(7)
    b = torch.randn(E, generator=g) * 0.02 if bias else None
    batch = route(router, random_logits(T, E, generator=g).to(torch.bfloat16), b, scaling=2.5)
    (ri, rw, rs), (ki, kw, ks) = both(router, make_policy(name, **params), batch, torch.tensor(150), device)
    assert torch.equal(ki, ri)
    torch.testing.assert_close(kw, rw, rtol=1e-5, atol=1e-5)
    assert ks == rs and rs.rows_voting == 150


def test_repeated_runs_reuse_buffers_and_accumulate_stats(device):
    # The keep kernel zeroes its scratch for the next call: a second run must equal the first.
    router = RouterSpec(32, 4)
    sel = ExpertSelector(router, make_policy("lynx"), 64, device, backend="triton", block_t=16)
    outs = []
    for T in (64, 17, 64):
        g = torch.Generator().manual_seed(3)
        batch = route(router, random_logits(T, 32, generator=g))
        ids, w = sel.run(batch.logits.to(device), batch.topk_ids.to(device), batch.topk_weights.to(device))
        outs.append((ids.cpu().clone(), w.cpu().clone()))
    assert torch.equal(outs[0][0], outs[2][0]) and torch.equal(outs[0][1], outs[2][1])
    s = sel.stats()
    assert s.steps == 3 and s.rows_voting == 64 + 17 + 64
    sel.reset_stats()
    assert sel.stats().steps == 0


def test_block_size_does_not_change_results(device):
    router = RouterSpec(128, 8)
    batch = route(router, random_logits(100, 128, skew=2.0, generator=torch.Generator().manual_seed(1)))
    results = [both(router, make_policy("lynx"), batch, 90, device, block_t=bt)[1] for bt in (4, 16, 64)]
    for ids, w, s in results[1:]:
        assert torch.equal(ids, results[0][0]) and torch.equal(w, results[0][1]) and s == results[0][2]


@pytest.mark.parametrize("min_keep", [1, 2, 8, 16, 17, 40, 64])
@pytest.mark.parametrize("E", [64, 128])
@pytest.mark.parametrize("T,ties", [(4, True), (48, True), (48, False)])
def test_keep_threshold_at_every_min_keep(min_keep, E, T, ties, device):
    """The keep kernel's m-th largest score (a walk down the distinct values for m <= 16 from E = 128 up, a pairwise
    count otherwise)
    against the reference. min_votes is out of reach, so the threshold is the min_keep-th largest score itself;
    with integer-valued logits many picks share a level (tied scores)."""
    k = 4
    router = RouterSpec(E, k)
    g = torch.Generator().manual_seed(min_keep * 100 + T + E)
    logits = torch.randint(-3, 4, (T, E), generator=g).float() if ties else torch.randn(T, E, generator=g) * 3
    batch = route(router, logits)
    policy = make_policy("lynx", min_keep=min_keep, min_votes=1 << 16, keep_level=0)
    (ri, rw, rs), (ki, kw, ks) = both(router, policy, batch, None, device)
    assert torch.equal(ki, ri)
    torch.testing.assert_close(kw, rw, rtol=1e-5, atol=1e-6)
    assert ks == rs
    distinct = len(set(batch.topk_ids.reshape(-1).tolist()))
    assert rs.experts_after >= min(min_keep, distinct)  # the floor holds
    if not ties and min_keep < distinct:
        assert rs.experts_after < distinct  # the threshold really cut (else any m-th largest would pass)
