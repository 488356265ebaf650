"""The peer rules (lynx_paper, xshare, sere) as served policies: configuration, flags, presets, the selector, the stage.

``tests/test_peers.py`` checks the rules against their oracles; here: that ``ExpertSelector`` runs them
bit for bit as ``peers.select_peer`` does and accumulates their statistics, that the server options and
the official Lynx presets parse and refuse what they should, and that the stage loads SERE's similarity
file once and refuses one that does not fit the model (the CPU-server tests are in test_lynx_server.py).
"""

from __future__ import annotations

import argparse
import random
from types import SimpleNamespace

import pytest
import torch

from lynx_sglang import ConfigError, ExpertSelector, RouterSpec, make_policy
from lynx_sglang.runtime.selection import peers
from lynx_sglang.runtime.selection.config import LYNX_PAPER_PRESETS, POLICIES, LynxPaperPolicy, SerePolicy, XSharePolicy
from lynx_sglang.runtime.selection.model_identity import model_identity
from lynx_sglang.runtime.selection.similarity import ExpertSimilarity, save_similarity
from lynx_sglang.runtime.selection.stats import SelectionStats
from lynx_sglang.runtime.sglang import stage
from lynx_sglang.runtime.sglang.options import LynxOptions, add_cli_args, options_from_args
from test_peers import _similarity, make_batch
from test_sglang_hooks import _Model, _topk, sglang_layers  # noqa: F401  (module fixture)

PEERS = {
    "lynx_paper": [{"alpha": 3.0, "beta": 2}, {"alpha": 1.0}, {"alpha": 0.7, "beta": 1}],
    "xshare": [{"expert_budget": 6}, {"budget_alpha": 0.25, "top_per_token": 1}, {"expert_budget": 4, "min_batch": 3,
                                                                                  "guarantee_topk": False}],
    "sere": [{"select_top_k": 1}, {"select_top_k": 2, "threshold": 0.5}, {"select_top_k": 1, "threshold": -0.5}],
}


# ---------------------------------------------------------------------------------------------- policies


def test_peer_policies_are_policies():
    assert {"lynx_paper", "xshare", "sere"} <= set(POLICIES)
    assert make_policy("xshare", expert_budget=20) == XSharePolicy(expert_budget=20)
    assert make_policy("lynx_paper", alpha=3.0, beta=2) == LynxPaperPolicy(3.0, 2)
    assert make_policy("sere", select_top_k=2, threshold=0.25) == SerePolicy(2, 0.25)
    assert peers.XSharePolicy is XSharePolicy and peers.PEER_POLICIES["sere"] is SerePolicy  # one definition
    with pytest.raises(ConfigError, match="no parameter"):
        make_policy("xshare", max_experts=4)


@pytest.mark.parametrize("name,params,msg", [
    ("xshare", {"expert_budget": 0}, r"xshare expert_budget must be an int in \[1, 64\], got 0"),
    ("xshare", {"expert_budget": 65}, "expert_budget"),
    ("xshare", {"budget_alpha": 1.5}, "budget_alpha"),
    ("xshare", {"top_per_token": -1}, "top_per_token"),
    ("xshare", {"guarantee_topk": 1}, "guarantee_topk must be a bool"),
    ("sere", {"threshold": 1.5}, r"sere threshold \(rho: similarities lie in \[-1, 1\]\) must be a finite number"),
    ("sere", {"threshold": -1.01}, "threshold"),
    ("sere", {"threshold": float("nan")}, "threshold"),
    ("sere", {"select_top_k": 9}, "select_top_k"),
    ("sere", {"select_top_k": 0}, "select_top_k"),
    ("lynx_paper", {"alpha": 0.0}, "lynx_paper alpha"),
    ("lynx_paper", {"beta": 7}, "overflows"),
    ("budget", {"max_experts": 0}, r"budget max_experts must be an int in \[1, 64\], got 0"),
])
def test_bad_peer_values_fail_at_plan_time(name, params, msg):
    sim = torch.eye(64) if name == "sere" else None
    with pytest.raises(ConfigError, match=msg):
        ExpertSelector(RouterSpec(64, 8), make_policy(name, **params), max_tokens=4096, similarity=sim)


def test_peers_run_on_the_torch_backend_only():
    router = RouterSpec(16, 4)
    for name in PEERS:
        sim = torch.eye(16) if name == "sere" else None
        with pytest.raises(ConfigError, match=f"policy {name} runs on the torch backend only"):
            ExpertSelector(router, make_policy(name), 8, backend="triton", similarity=sim)
        assert ExpertSelector(router, make_policy(name), 8, backend="auto", similarity=sim).backend == "torch"


def test_sere_similarity_is_checked_at_plan_time():
    router, policy = RouterSpec(8, 2), make_policy("sere")
    with pytest.raises(ConfigError, match="needs the layer's"):
        ExpertSelector(router, policy, 8)
    bad = {
        r"a \[8, 8\] tensor, got \(7, 7\)": torch.eye(7),
        "floating point": torch.eye(8, dtype=torch.int64),
        "NaN or inf": torch.eye(8).index_fill_(0, torch.tensor([3]), float("nan")),
        r"outside \[-1, 1\]": torch.eye(8) * 1.5,
    }
    for msg, sim in bad.items():
        with pytest.raises(ConfigError, match=msg):
            ExpertSelector(router, policy, 8, similarity=sim)
    with pytest.raises(ConfigError, match="input of policy sere and of lynx with refill_similarity"):
        ExpertSelector(router, make_policy("lynx"), 8, similarity=torch.eye(8))
    sel = ExpertSelector(router, policy, 8, similarity=torch.eye(8, dtype=torch.float64) * 0.5)
    assert sel.similarity.dtype == torch.float32 and sel.similarity.is_contiguous()


@pytest.mark.parametrize("name", list(PEERS))
def test_selector_equals_select_peer_bit_for_bit(name, device):
    """Random batches (padding, malformed rows, shared slots, biased routers): ``ExpertSelector.run`` writes
    exactly what ``peers.select_peer`` returns, and its statistics are the sum of the batches' facts."""
    rng = random.Random(f"served-{name}")
    checked = changed = 0
    for params in PEERS[name]:
        for _ in range(12):
            router, logits, ids, w, nv, corr = make_batch(rng, device)
            if name == "xshare" and "expert_budget" in params:
                params = {**params, "expert_budget": min(params["expert_budget"], router.num_experts)}
            if name == "sere":
                params = {**params, "select_top_k": min(params["select_top_k"], router.top_k)}
            policy = make_policy(name, **params)
            sim = _similarity(rng, router.num_experts, device) if name == "sere" else None
            sel = ExpertSelector(router, policy, 64, device, ids.dtype, w.dtype, corr, similarity=sim)
            want_total = [0] * 6
            for step in range(2):  # the statistics accumulate over steps
                out_ids, out_w = sel.run(logits, ids, w, nv)
                want_ids, want_w, info = peers.select_peer(policy, router, logits, ids, w, nv, corr, similarity=sim)
                assert torch.equal(out_ids, want_ids)
                assert torch.equal(out_w.view(torch.int32), want_w.view(torch.int32))
                facts = [1, info.experts_before, info.experts_after, info.rows_changed, info.rows_voting,
                         info.moved_weight]
                want_total = [a + int(b) for a, b in zip(want_total, facts)]
                changed += int(info.rows_changed)
            assert sel.stats() == SelectionStats.from_values(want_total)
            checked += 1
    assert checked == 36 and changed > 0


def test_peer_policies_refuse_global_and_rank_aware_selection():
    from lynx_sglang.runtime.expert_parallel.global_selection import GlobalExpertSelector

    from lynx_sglang.runtime.expert_parallel import ExpertPlacement, RankAwareSelector

    for name in PEERS:
        with pytest.raises(ConfigError, match=name):
            GlobalExpertSelector(RouterSpec(16, 4), make_policy(name), 8, "cpu", group=None)
        with pytest.raises(ConfigError, match=name):
            RankAwareSelector(RouterSpec(16, 4), make_policy(name), 8, "cpu",
                              rank_mask=ExpertPlacement.contiguous(16, 2, "cpu").logical_on_rank())


# ---------------------------------------------------------------------------------------------- options


def _parse(*argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default=None)
    add_cli_args(parser)
    return options_from_args(parser.parse_args(["--moe-backend", "lynx", *argv]))


def test_peer_flags_map_to_parameters():
    opts = _parse("--lynx-policy", "lynx_paper", "--lynx-alpha", "3", "--lynx-beta", "2")
    assert opts.make_policy() == LynxPaperPolicy(3.0, 2)
    opts = _parse("--lynx-policy", "xshare", "--lynx-xshare-budget", "20", "--lynx-xshare-budget-alpha", "0.25",
                  "--lynx-xshare-top-per-token", "1", "--lynx-xshare-min-batch", "2", "--lynx-xshare-max-batch", "48",
                  "--lynx-xshare-guarantee-topk", "false")
    assert opts.make_policy() == XSharePolicy(20, 0.25, 1, 2, 48, False)
    opts = _parse("--lynx-policy", "sere", "--lynx-sere-top-s", "2", "--lynx-sere-threshold", "-0.25",
                  "--lynx-sere-similarity", "/x/sim.safetensors")
    assert opts.make_policy() == SerePolicy(2, -0.25) and opts.similarity == "/x/sim.safetensors"
    opts.to_env()
    assert LynxOptions.from_env() == opts  # what every worker reads


def test_sere_similarity_defaults_beside_a_local_model(tmp_path):
    assert _parse("--model-path", str(tmp_path), "--lynx-policy", "sere").similarity == \
        str(tmp_path / "sere_similarity.safetensors")
    assert _parse("--model-path", "Qwen/Qwen3-30B-A3B", "--lynx-policy", "sere").similarity is None  # a hub id


@pytest.mark.parametrize("argv,msg", [
    (("--lynx-policy", "xshare", "--lynx-xshare-budget", "0"), "expert_budget must be an int in"),
    (("--lynx-policy", "sere", "--lynx-sere-threshold", "2"), r"similarities lie in \[-1, 1\]"),
    (("--lynx-policy", "budget", "--lynx-budget-experts", "0"), "max_experts"),
    (("--lynx-policy", "lynx", "--lynx-xshare-budget", "4"), "does not apply to --lynx-policy lynx"),
    (("--lynx-policy", "xshare", "--lynx-sere-top-s", "2"), "does not apply to --lynx-policy xshare"),
    (("--lynx-policy", "lynx_paper", "--lynx-sere-similarity", "x"), "does not apply to --lynx-policy lynx_paper"),
    (("--lynx-preset", "qwen3-235b", "--lynx-policy", "lynx"), "cannot go with --lynx-policy lynx"),
    (("--lynx-preset", "qwen3-235b", "--lynx-max-moved-weight", "0.3"), "does not apply to --lynx-policy lynx_paper"),
])
def test_bad_peer_flags_are_refused(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        _parse(*argv)


def test_unknown_preset_is_refused():
    with pytest.raises(SystemExit):  # argparse's choices
        _parse("--lynx-preset", "qwen9")
    with pytest.raises(ConfigError, match="unknown --lynx-preset"):
        LynxOptions(moe_backend="lynx", policy="lynx_paper", preset="qwen9").validate()


@pytest.mark.parametrize("preset,alpha,beta", [
    ("qwen3-235b-thinking", 1.0, 2), ("qwen3-235b", 3.0, 2), ("qwen3-30b-a3b", 3.0, 2), ("qwen2-57b", 3.0, 4),
    ("mixtral-8x22b", 1.0, 1), ("mixtral-8x7b", 0.7, 1), ("deepseek-coder-v2", 1.0, 2), ("gpt-oss-120b", 3.0, 2),
    ("llama-4", 1.0, None),
])
def test_official_presets(preset, alpha, beta):
    opts = _parse("--lynx-preset", preset)  # implies lynx_paper
    assert opts.policy == "lynx_paper" and opts.make_policy() == LynxPaperPolicy(alpha, beta)
    assert _parse("--lynx-policy", "lynx_paper", "--lynx-preset", preset).make_policy() == LynxPaperPolicy(alpha, beta)
    # Explicit flags override the preset.
    assert _parse("--lynx-preset", preset, "--lynx-beta", "3").make_policy() == LynxPaperPolicy(alpha, 3)
    assert _parse("--lynx-preset", preset, "--lynx-alpha", "2").make_policy() == LynxPaperPolicy(2.0, beta)


def test_every_preset_is_tested():
    assert set(LYNX_PAPER_PRESETS) == {"qwen3-235b-thinking", "qwen3-235b", "qwen3-30b-a3b", "qwen2-57b",
                                       "mixtral-8x22b", "mixtral-8x7b", "deepseek-coder-v2", "gpt-oss-120b", "llama-4"}


# ---------------------------------------------------------------------------------------------- the stage


_CONFIG = SimpleNamespace(model_type="qwen3_moe", num_experts=16, num_hidden_layers=2, num_experts_per_tok=4,
                          hidden_size=32)


def _write(path, matrices, config=_CONFIG):
    save_similarity(path, ExpertSimilarity(matrices, model_identity(config), "cosine", {"test": True}))
    return str(path)


def _sim(E, seed):
    return peers.expert_similarity(torch.randn(E, 6, 4, generator=torch.Generator().manual_seed(seed)), "cosine")


def _sere_opts(path):
    return LynxOptions(moe_backend="lynx", policy="sere", params={"select_top_k": 1}, max_batch=64, similarity=path)


def test_stage_loads_each_layers_similarity_once(sglang_layers, tmp_path, monkeypatch):
    mats = {0: _sim(16, 0), 1: _sim(16, 1)}
    path = _write(tmp_path / "sim.safetensors", mats)
    calls = []
    real = stage.load_similarity
    monkeypatch.setattr(stage, "load_similarity", lambda *a: calls.append(a) or real(*a))
    layers = [_topk(sglang_layers, i) for i in range(2)]
    stages = stage.build_stages(_Model(layers), _CONFIG, _sere_opts(path))
    assert len(calls) == 1 and list(calls[0][2]) == [0, 1]
    for st in stages:
        assert torch.equal(st.selector.similarity, mats[st.layer_id])
        assert st.selector.backend == "torch" and isinstance(st.selector.policy, SerePolicy)


@pytest.mark.parametrize("case,msg", [
    ("missing", "cannot read SERE similarity file"),
    ("other model", "was made for another model: hidden_size is 64 there, 32 in the model being served"),
    ("other E", "was made for another model: num_experts is 8 there, 16"),
    ("missing layer", r"has no matrix for MoE layer\(s\) \[1\]"),
    ("no path", "needs an expert-similarity file"),
])
def test_stage_refuses_a_similarity_file_that_does_not_fit(sglang_layers, tmp_path, case, msg):
    path = str(tmp_path / "sim.safetensors")
    if case == "other model":
        _write(path, {0: _sim(16, 0), 1: _sim(16, 1)}, SimpleNamespace(**{**vars(_CONFIG), "hidden_size": 64}))
    elif case == "other E":
        _write(path, {0: _sim(8, 0), 1: _sim(8, 1)}, SimpleNamespace(**{**vars(_CONFIG), "num_experts": 8}))
    elif case == "missing layer":
        _write(path, {0: _sim(16, 0)})
    elif case == "no path":
        path = None
    layers = [_topk(sglang_layers, i) for i in range(2)]
    with pytest.raises(ConfigError, match=msg):
        stage.build_stages(_Model(layers), _CONFIG, _sere_opts(path))


def test_stage_refuses_peers_under_global_selection(sglang_layers):
    opts = LynxOptions(moe_backend="lynx", policy="xshare", max_batch=64)
    with pytest.raises(ConfigError, match="DeepEP-family"):
        stage.build_stages(_Model([_topk(sglang_layers, 0)]), _CONFIG, opts,
                           ep=stage.EpLayout(num_ranks=2, global_votes=True))
