"""Bad configuration and bad calls fail early with a clear message."""

from __future__ import annotations

import pytest
import torch

from lynx_sglang import ConfigError, ExpertSelector, RouterSpec, make_policy


@pytest.mark.parametrize("kwargs,msg", [
    (dict(num_experts=8, top_k=9), "exceeds num_experts"),
    (dict(num_experts=0, top_k=1), "num_experts"),
    (dict(num_experts=8, top_k=0), "top_k"),
    (dict(num_experts=64, top_k=32), "supported maximum"),
    (dict(num_experts=8, top_k=2, num_shared_slots=-1), "num_shared_slots"),
    (dict(num_experts=8, top_k=2, scoring_func="sqrtsoftplus"), "not supported"),
])
def test_bad_router(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        RouterSpec(**kwargs)


@pytest.mark.parametrize("name,params,msg", [
    ("nope", {}, "unknown expert-selection policy"),
    ("lynx", {"gamma": 1}, "no parameter"),
    ("off", {"alpha": 1}, "takes none"),
])
def test_bad_policy_name_or_parameter(name, params, msg):
    with pytest.raises(ConfigError, match=msg):
        make_policy(name, **params)


@pytest.mark.parametrize("name,params,msg", [
    ("lynx", {"alpha": 0.0}, "alpha"),
    ("lynx", {"alpha": float("nan")}, "alpha"),
    ("lynx", {"beta": 9}, "beta"),
    ("lynx", {"beta": 2, "keep_level": 3}, "keep_level"),
    ("lynx", {"min_votes": 0}, "min_votes"),
    ("lynx", {"min_keep": 0}, "min_keep"),
    ("lynx", {"min_keep": 65}, "min_keep"),
    ("lynx", {"confidence_margin": -1.0}, "confidence_margin"),
    ("lynx", {"beta": 7}, "overflows"),  # 8 bins of base 4096 do not fit in int64
    ("oea", {"k0": 9}, "k0"),
    ("budget", {}, "needs max_experts"),
    ("budget", {"max_experts": 0}, "max_experts"),
])
def test_bad_policy_values_fail_at_plan_time(name, params, msg):
    with pytest.raises(ConfigError, match=msg):
        ExpertSelector(RouterSpec(64, 8), make_policy(name, **params), max_tokens=4096)


def test_bias_must_match_the_router():
    with pytest.raises(ConfigError, match="exactly when"):
        ExpertSelector(RouterSpec(8, 2, has_correction_bias=True), make_policy("lynx"), 4)
    with pytest.raises(ConfigError, match="NaN or inf"):
        ExpertSelector(RouterSpec(8, 2, has_correction_bias=True), make_policy("lynx"), 4,
                       correction_bias=torch.tensor([float("nan")] * 8))
    with pytest.raises(ConfigError, match="shape"):
        ExpertSelector(RouterSpec(8, 2, has_correction_bias=True), make_policy("lynx"), 4,
                       correction_bias=torch.zeros(7))


@pytest.mark.parametrize("block_t", [0, 3, 2048, 16.0])
def test_bad_block_size_fails_at_plan_time(block_t):
    with pytest.raises(ConfigError, match="block_t"):
        ExpertSelector(RouterSpec(8, 2), make_policy("lynx"), 4, block_t=block_t)


def test_triton_backend_refuses_plain_cpu(monkeypatch):
    import lynx_sglang.kernels.expert_selection as ks

    monkeypatch.setattr(ks, "interpreting", lambda: False)
    with pytest.raises(ConfigError, match="CUDA"):
        ExpertSelector(RouterSpec(8, 2), make_policy("lynx"), 4, "cpu", backend="triton")


def test_bad_calls_are_rejected_before_any_kernel():
    sel = ExpertSelector(RouterSpec(8, 2, 1), make_policy("lynx"), 4)
    z, ids, w = torch.zeros(3, 8), torch.zeros(3, 3, dtype=torch.int32), torch.zeros(3, 3)
    with pytest.raises(ValueError, match="router_logits"):
        sel.run(torch.zeros(3, 9), ids, w)
    with pytest.raises(ValueError, match="topk_ids/topk_weights"):
        sel.run(z, ids[:, :2], w)
    with pytest.raises(ValueError, match="planned for ids"):
        sel.run(z, ids.long(), w)
    with pytest.raises(ValueError, match="exceeds the planned"):
        sel.run(torch.zeros(5, 8), torch.zeros(5, 3, dtype=torch.int32), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="num_valid"):
        sel.run(z, ids, w, num_valid=-1)
    with pytest.raises(ValueError, match="num_valid"):
        sel.run(z, ids, w, num_valid=torch.tensor([1.0]))


def test_empty_batch_returns_empty_views():
    sel = ExpertSelector(RouterSpec(8, 2), make_policy("lynx"), 4)
    ids, w = sel.run(torch.zeros(0, 8), torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 2))
    assert ids.shape == (0, 2) and w.shape == (0, 2)
    assert sel.stats().steps == 0


def test_kernels_only_where_compiled_and_checked():
    """Above MAX_KERNEL_EXPERTS the fused kernels are refused by name and 'auto' picks the torch backend."""
    from lynx_sglang.runtime.selection.config import MAX_KERNEL_EXPERTS
    from lynx_sglang.runtime.selection.selector import default_backend

    big, small = RouterSpec(MAX_KERNEL_EXPERTS + 128, 8), RouterSpec(MAX_KERNEL_EXPERTS, 8)
    cuda = torch.device("cuda", 0)
    assert default_backend(cuda, small) == "triton"
    assert default_backend(cuda, big) == "torch"
    assert default_backend(torch.device("cpu"), small) == "torch"
    with pytest.raises(ConfigError, match=f"up to {MAX_KERNEL_EXPERTS} experts"):
        ExpertSelector(big, make_policy("lynx"), 8, backend="triton")
    assert ExpertSelector(big, make_policy("lynx"), 8).backend == "torch"
