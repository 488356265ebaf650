"""The SGLang integration at layer level: flags, phase detection, the TopK stage (no server)."""

from __future__ import annotations

import argparse
import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from lynx_sglang import ConfigError, ExpertSelector, RouterSpec, make_policy
from lynx_sglang.runtime.sglang import hooks, stage
from lynx_sglang.runtime.sglang.options import ENV_VAR, LynxOptions
from lynx_sglang.runtime.sglang.phase import DECODE, IDLE, current, mixed, phase_of, published


@pytest.fixture(scope="module")
def sglang_layers():
    """World-size-1 process group and our hooks applied, as in a server worker."""
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.test.layer_ut_utils import init_single_process_dist

    from lynx_sglang.server_process import free_port

    init_single_process_dist(free_port())  # not a fixed port: two test runs may share a machine
    hooks.register_hooks()
    HookRegistry.apply_hooks()
    from sglang.srt.layers.moe import topk

    return topk


def _topk(topk, layer_id, k=4, bias=None, scoring="softmax"):
    t = topk.TopK(top_k=k, renormalize=True, layer_id=layer_id, correction_bias=bias, scoring_func=scoring)
    t.topk_config.output_format = topk.TopKOutputFormat.STANDARD
    return t


class _Model(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self.w = torch.nn.Parameter(torch.zeros(1))


def _opts(**kw):
    base = dict(moe_backend="lynx", policy="lynx", params={"keep_level": 0, "min_votes": 2, "max_moved_weight": 1.0}, max_batch=64)
    base.update(kw)
    return LynxOptions(**base)


@pytest.fixture
def phase():
    """``phase(p)`` publishes ``p`` (a ``Phase`` or None) for the rest of the test, as SGLang's forward context
    does through our hook; the phase before the test is restored afterwards."""
    with contextlib.ExitStack() as scopes:
        yield lambda p: scopes.enter_context(published(p))


def _register(monkeypatch, stages):
    """Make ``stages`` this process's registered stages (what ``stage.prepare`` does in a worker)."""
    monkeypatch.setattr(stage, "_registry", stage.StageRegistry(stages))


def test_hook_is_applied_and_passes_through_without_a_stage(sglang_layers, phase):
    assert hooks._hooks_applied()
    t = _topk(sglang_layers, 0)
    x, z = torch.randn(20, 8), torch.randn(20, 16) * 3
    phase(DECODE)
    out = t(x, z)  # a decode batch, but this layer has no stage: SGLang's own softmax top-k, renormalised
    w, ids = torch.softmax(z, -1).topk(4, -1)
    assert torch.equal(out.topk_ids.long(), ids)
    torch.testing.assert_close(out.topk_weights, w / w.sum(-1, keepdim=True))


def test_decode_batches_are_rewritten_like_the_selector(sglang_layers, phase):
    layers = [_topk(sglang_layers, i) for i in range(2)]
    stages = stage.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    assert [s.layer_id for s in stages] == [0, 1]
    ref = _topk(sglang_layers, 0)
    x, z = torch.randn(32, 8), torch.randn(32, 16) * 3
    plain = ref(x, z)

    phase(None)  # prefill / extend: untouched
    out = layers[0](x, z)
    assert torch.equal(out.topk_ids, plain.topk_ids) and torch.equal(out.topk_weights, plain.topk_weights)

    phase(DECODE)
    out = layers[0](x, z)
    sel = ExpertSelector(RouterSpec(16, 4), make_policy("lynx", keep_level=0, min_votes=2, max_moved_weight=1.0), 64,
                         ids_dtype=plain.topk_ids.dtype)
    want_ids, want_w = sel.run(z, plain.topk_ids, plain.topk_weights)
    assert torch.equal(out.topk_ids, want_ids) and torch.equal(out.topk_weights, want_w)
    assert not torch.equal(out.topk_ids, plain.topk_ids)  # this batch really changes
    st = stages[0].selector.stats()
    assert st.steps == 1 and st.experts_after < st.experts_before


def test_a_lone_decode_token_skips_lynx_but_not_oea(sglang_layers, phase):
    """One decode token: lynx would change nothing (base B = 1), so the stage hands SGLang's output back
    untouched and counts no step; oea prunes single tokens, so it still selects."""
    x, z = torch.randn(1, 8), torch.randn(1, 16) * 3
    phase(DECODE)
    (lynx_layer,) = layers = [_topk(sglang_layers, 0)]
    (lynx_stage,) = stage.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    plain = _topk(sglang_layers, 0)(x, z)
    out = lynx_layer(x, z)
    assert torch.equal(out.topk_ids, plain.topk_ids) and lynx_stage.selector.stats().steps == 0
    lynx_layer(torch.randn(2, 8), torch.randn(2, 16))  # two tokens: selected on
    assert lynx_stage.selector.stats().steps == 1
    (oea_layer,) = layers = [_topk(sglang_layers, 0)]
    (oea_stage,) = stage.build_stages(_Model(layers), SimpleNamespace(num_experts=16),
                                      _opts(policy="oea", params={"k0": 1}))
    out = oea_layer(x, z)
    assert oea_stage.selector.stats().steps == 1 and not torch.equal(out.topk_ids, plain.topk_ids)


def test_batches_below_min_batch_pass_through(sglang_layers, phase):
    """--lynx-min-batch 4: batches of 2-3 decode tokens are SGLang's output untouched and count no step;
    4 tokens are selected on, exactly as the selector does."""
    (layer,) = layers = [_topk(sglang_layers, 0)]
    (st,) = stage.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts(min_batch=4))
    phase(DECODE)
    g = torch.Generator().manual_seed(5)
    for T in (2, 3):
        x, z = torch.randn(T, 8, generator=g), torch.randn(T, 16, generator=g) * 3
        plain = _topk(sglang_layers, 0)(x, z)
        out = layer(x, z)
        assert torch.equal(out.topk_ids, plain.topk_ids) and torch.equal(out.topk_weights, plain.topk_weights)
    assert st.selector.stats().steps == 0
    x, z = torch.randn(4, 8, generator=g), torch.randn(4, 16, generator=g) * 3
    plain = _topk(sglang_layers, 0)(x, z)
    out = layer(x, z)
    sel = ExpertSelector(RouterSpec(16, 4), make_policy("lynx", keep_level=0, min_votes=2, max_moved_weight=1.0), 64,
                         ids_dtype=plain.topk_ids.dtype)
    want_ids, want_w = sel.run(z, plain.topk_ids, plain.topk_weights)
    assert torch.equal(out.topk_ids, want_ids) and st.selector.stats().steps == 1


def test_min_batch_is_refused_with_global_selection(sglang_layers):
    """A rank that skipped a small local batch would leave the others waiting in the global vote."""
    with pytest.raises(ConfigError, match="--lynx-min-batch cannot go with global selection"):
        stage.TopKSelectionStage(0, RouterSpec(16, 4), _opts(min_batch=4), torch.device("cpu"), None,
                                 ep=stage.EpLayout(2, 0, None, global_votes=True))


def test_mixed_batches_rewrite_only_the_trailing_decode_rows(sglang_layers, phase):
    layers = [_topk(sglang_layers, 0)]
    stage.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    x, z = torch.randn(40, 8), torch.randn(40, 16) * 3
    plain = _topk(sglang_layers, 0)(x, z)
    phase(mixed(24))
    out = layers[0](x, z)
    assert layers[0].__dict__[stage.STAGE_ATTR].mixed_batches == 1
    assert torch.equal(out.topk_ids[:16], plain.topk_ids[:16])
    assert torch.equal(out.topk_weights[:16], plain.topk_weights[:16])
    sel = ExpertSelector(RouterSpec(16, 4), make_policy("lynx", keep_level=0, min_votes=2, max_moved_weight=1.0), 64,
                         ids_dtype=plain.topk_ids.dtype)
    want_ids, _ = sel.run(z[16:], plain.topk_ids[16:], plain.topk_weights[16:])
    assert torch.equal(out.topk_ids[16:], want_ids)


def test_layer_selection_and_batches_too_large_pass_through(sglang_layers, phase):
    layers = [_topk(sglang_layers, i) for i in range(3)]
    stages = stage.build_stages(_Model(layers), SimpleNamespace(n_routed_experts=16), _opts(layers=[1], max_batch=8))
    assert [s.layer_id for s in stages] == [1]
    x, z = torch.randn(9, 8), torch.randn(9, 16) * 3
    phase(DECODE)
    plain = _topk(sglang_layers, 1)(x, z)
    assert torch.equal(layers[1](x, z).topk_ids, plain.topk_ids)  # 9 > max_batch 8


def test_sigmoid_router_with_bias_keeps_its_ranking(sglang_layers, phase):
    bias = torch.randn(16) * 0.1
    layers = [_topk(sglang_layers, 0, bias=bias, scoring="sigmoid")]
    (st,) = stage.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    assert st.router.has_correction_bias and st.router.scoring_func == "sigmoid"
    x, z = torch.randn(16, 8), torch.randn(16, 16) * 3
    plain = _topk(sglang_layers, 0, bias=bias, scoring="sigmoid")(x, z)
    phase(DECODE)
    out = layers[0](x, z)
    # The stage ranks refills by sigmoid(logit) + bias, as the router does, and gets the bias from the layer.
    sel = ExpertSelector(RouterSpec(16, 4, scoring_func="sigmoid", has_correction_bias=True),
                         make_policy("lynx", keep_level=0, min_votes=2, max_moved_weight=1.0), 64,
                         ids_dtype=plain.topk_ids.dtype, correction_bias=bias)
    want_ids, want_w = sel.run(z, plain.topk_ids, plain.topk_weights)
    assert torch.equal(out.topk_ids, want_ids) and torch.equal(out.topk_weights, want_w)
    assert not torch.equal(out.topk_ids, plain.topk_ids)  # this batch really changes
    for row in out.topk_ids.tolist():
        real = [e for e in row if e >= 0]
        assert len(real) == len(set(real))


def test_grouped_router_with_bias_is_sigmoid_whatever_scoring_func_says(sglang_layers, phase):
    """glm4_moe's TopK keeps scoring_func "softmax", yet SGLang routes it with biased_grouped_topk (sigmoid):
    the stage must rank and weight as the router does."""
    bias = torch.randn(16) * 0.1
    t = sglang_layers.TopK(top_k=4, renormalize=True, layer_id=0, correction_bias=bias, use_grouped_topk=True,
                           num_expert_group=4, topk_group=2)
    t.topk_config.output_format = sglang_layers.TopKOutputFormat.STANDARD
    assert t.topk_config.scoring_func == "softmax"  # what glm4_moe passes (nothing)
    (st,) = stage.build_stages(_Model([t]), SimpleNamespace(num_experts=16), _opts())
    assert st.router.scoring_func == "sigmoid" and st.router.has_correction_bias
    x, z = torch.randn(16, 8), torch.randn(16, 16) * 3
    phase(DECODE)
    out = t(x, z)
    sigmoid_sel = ExpertSelector(RouterSpec(16, 4, scoring_func="sigmoid", has_correction_bias=True),
                                 make_policy("lynx", keep_level=0, min_votes=2, max_moved_weight=1.0), 64,
                                 ids_dtype=out.topk_ids.dtype, correction_bias=bias)
    with published(None):
        plain = t(x, z)
    want_ids, want_w = sigmoid_sel.run(z, plain.topk_ids, plain.topk_weights)
    assert torch.equal(out.topk_ids, want_ids) and torch.equal(out.topk_weights, want_w)


def test_runner_formats_we_cannot_rewrite_fail_at_start(sglang_layers):
    t = _topk(sglang_layers, 0)
    t.topk_config.output_format = sglang_layers.TopKOutputFormat.BYPASSED
    with pytest.raises(ConfigError, match="BYPASSED"):
        stage.build_stages(_Model([t]), SimpleNamespace(num_experts=16), _opts())
    with pytest.raises(ConfigError, match="expert count"):
        stage.build_stages(_Model([_topk(sglang_layers, 0)]), SimpleNamespace(), _opts())


@pytest.mark.parametrize("change,msg", [
    (lambda t: setattr(t, "forward", t.forward_native), "replaces TopK.forward"),  # what longcat_flash does
    (lambda t: setattr(t, "enable_waterfill", True), "waterfill"),
    (lambda t: setattr(t.topk_config, "fused_gate_packed_ids", True), "packed top-k ids"),
])
def test_layers_our_hook_cannot_serve_fail_at_start(sglang_layers, change, msg):
    t = _topk(sglang_layers, 0)
    change(t)
    with pytest.raises(ConfigError, match=msg):
        stage.build_stages(_Model([t]), SimpleNamespace(num_experts=16), _opts())


def _server_args(**kw):
    """The server-arg fields ``stage.refusal`` reads, at SGLang's defaults."""
    base = dict(enable_two_batch_overlap=False, attn_dp_size=1, enable_dp_attention=False, dp_size=1,
                moe_a2a_backend="none", dwdp_size=1)
    base.update(kw)
    return SimpleNamespace(**base)


def test_attention_dp_with_a_gathered_moe_input_fails_at_start(sglang_layers, monkeypatch):
    """With a2a none, attention DP gathers every DP rank's rows into each MoE, but the phase is per rank:
    the worker decides from its (resolved) server args."""
    import sglang.srt.runtime_context as rc

    monkeypatch.setenv(ENV_VAR, json.dumps({"moe_backend": "lynx"}))
    monkeypatch.setattr(rc, "get_server_args", lambda: _server_args(attn_dp_size=2))
    model, cfg = _Model([_topk(sglang_layers, 0)]), SimpleNamespace(hf_config=SimpleNamespace(num_experts=16))
    with pytest.raises(ConfigError, match="attention DP"):
        hooks._prepare_moe_topk_after(None, model=model, model_config=cfg)
    assert "attention DP" in stage.refusal(_server_args(enable_dp_attention=True, dp_size=2))  # old spelling
    assert stage.refusal(_server_args(attn_dp_size=2, moe_a2a_backend="deepep")) is None  # DeepEP: local rows
    assert stage.refusal(_server_args(attn_dp_size=2, dwdp_size=2)) is None  # DWDP scatters the MoE input
    assert stage.refusal(_server_args()) is None


def test_two_batch_overlap_fails_at_start(sglang_layers, monkeypatch):
    import sglang.srt.runtime_context as rc

    monkeypatch.setenv(ENV_VAR, json.dumps({"moe_backend": "lynx"}))
    monkeypatch.setattr(rc, "get_server_args", lambda: _server_args(enable_two_batch_overlap=True))
    model, cfg = _Model([_topk(sglang_layers, 0)]), SimpleNamespace(hf_config=SimpleNamespace(num_experts=16))
    with pytest.raises(ConfigError, match="two-batch-overlap"):
        hooks._prepare_moe_topk_after(None, model=model, model_config=cfg)
    assert not stage.stages()  # refused before any stage was built


@pytest.mark.parametrize("args,msg", [
    (SimpleNamespace(attn_dp_size=1, enable_dp_attention=False, dp_size=1, moe_a2a_backend="none", dwdp_size=1),
     "no field 'enable_two_batch_overlap'"),  # an SGLang rename
    (_server_args(attn_dp_size="2"), "attn_dp_size is '2'"),  # an unexpected type
    (_server_args(enable_two_batch_overlap=None), "enable_two_batch_overlap is None"),
])
def test_an_unexpected_sglang_shape_is_a_refusal_not_an_admission(args, msg):
    with pytest.raises(ConfigError, match=msg):
        stage.check_supported(args)


def test_a_worker_without_server_args_refuses(sglang_layers, monkeypatch):
    import sglang.srt.runtime_context as rc

    monkeypatch.setattr(rc, "get_server_args", lambda: None)
    with pytest.raises(ConfigError, match="no server args"):
        stage.server_args_of_process()


def test_the_launcher_refuses_from_the_parsed_flags(sglang_layers, monkeypatch):
    """ServerArgs.from_cli_args (our AROUND hook) refuses before any worker starts."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    from sglang.srt.server_args import ServerArgs

    with pytest.raises(ConfigError, match="two-batch-overlap"):
        ServerArgs.from_cli_args(_parse(["--moe-backend", "lynx", "--enable-two-batch-overlap"]))
    with pytest.raises(ConfigError, match="attention DP"):
        ServerArgs.from_cli_args(_parse(["--moe-backend", "lynx", "--tp", "2", "--attn-dp-size", "2"]))
    with pytest.raises(ConfigError, match="attention DP"):
        ServerArgs.from_cli_args(_parse(["--moe-backend", "lynx", "--tp", "2", "--dp-size", "2",
                                         "--enable-dp-attention"]))
    ServerArgs.from_cli_args(_parse(["--enable-two-batch-overlap"]))  # stock SGLang: not ours to refuse


def test_draft_model_layers_get_no_stage(sglang_layers):
    draft = _topk(sglang_layers, 1)
    draft.is_draft = True
    stages = stage.build_stages(_Model([_topk(sglang_layers, 0), draft]), SimpleNamespace(num_experts=16), _opts())
    assert [s.layer_id for s in stages] == [0] and stage.STAGE_ATTR not in draft.__dict__


def _fb(mode, **kw):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return SimpleNamespace(forward_mode=getattr(ForwardMode, mode), spec_info=None, **kw)


def test_phase_comes_from_the_forward_mode():
    assert phase_of(_fb("DECODE")) == DECODE
    assert phase_of(_fb("EXTEND")) is None
    assert phase_of(_fb("IDLE")) == IDLE  # no rows: only global selection acts on it
    assert phase_of(_fb("MIXED", _lynx_decode_tokens=5)) == mixed(5)
    assert phase_of(_fb("MIXED", _lynx_decode_tokens=5)).first_decode_row(12) == 7
    assert phase_of(_fb("MIXED")) is None  # decode rows unknown: leave the batch alone
    spec = _fb("DECODE")
    spec.spec_info = object()
    assert phase_of(spec) is None


def test_forward_context_scope_sets_and_restores_the_phase(sglang_layers, phase):
    from sglang.srt.model_executor import forward_context as fc

    ctx = fc.ForwardContext(attn_backend=None)
    phase(None)
    with fc.forward_context(ctx, forward_batch=_fb("DECODE", moe_num_token_non_padded=None)):
        assert current() == DECODE
        with fc.forward_context(ctx):  # nested override without a batch keeps the phase
            assert current() == DECODE
        with fc.forward_context(ctx, forward_batch=_fb("EXTEND", moe_num_token_non_padded=None)):
            assert current() is None
        assert current() == DECODE
    assert current() is None


def _parse(argv):
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser.parse_args(["--model-path", "dummy"] + argv)


def test_cli_flags_reach_workers_through_the_environment(sglang_layers, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    from sglang.srt.server_args import ServerArgs

    args = _parse(["--moe-backend", "lynx", "--lynx-policy", "oea", "--lynx-oea-k0", "2", "--lynx-layers", "0,3"])
    ServerArgs.from_cli_args(args)
    opts = LynxOptions.from_env()
    assert opts.enabled and opts.policy == "oea" and opts.params == {"k0": 2} and opts.layers == [0, 3]

    ServerArgs.from_cli_args(_parse([]))  # no flag: stock SGLang
    assert not LynxOptions.from_env().enabled


@pytest.mark.parametrize("argv,msg", [
    (["--moe-backend", "lynx", "--lynx-alpha", "-1"], "alpha"),
    (["--moe-backend", "lynx", "--lynx-oea-k0", "2"], "does not apply"),
    (["--moe-backend", "lynx", "--lynx-policy", "budget"], "needs max_experts"),
    (["--moe-backend", "lynx", "--lynx-layers", "a,b"], "comma-separated"),
    (["--moe-backend", "lynx", "--lynx-min-batch", "-1"], "--lynx-min-batch must be"),
    (["--moe-backend", "lynx", "--lynx-max-batch", "8", "--lynx-min-batch", "9"], "--lynx-min-batch must be"),
    (["--lynx-min-batch", "4"], "only take effect with --moe-backend lynx"),
    (["--lynx-policy", "oea"], "only take effect with --moe-backend lynx"),
    (["--tp", "2", "--ep-size", "2", "--moe-a2a-backend", "lynx", "--attn-dp-size", "2"], "attn-dp-size"),
    (["--tp", "2", "--ep-size", "2", "--moe-a2a-backend", "lynx", "--dp-size", "2", "--enable-dp-attention"],
     "enable-dp-attention"),
])
def test_bad_option_values_stop_start_up(sglang_layers, monkeypatch, argv, msg):
    monkeypatch.delenv(ENV_VAR, raising=False)
    from sglang.srt.server_args import ServerArgs

    with pytest.raises(ConfigError, match=msg):
        ServerArgs.from_cli_args(_parse(argv))


def test_unknown_backend_is_an_argparse_error(sglang_layers):
    with pytest.raises(SystemExit):
        _parse(["--moe-backend", "fast"])


def test_config_file_and_flags(tmp_path, sglang_layers, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    from sglang.srt.server_args import ServerArgs

    cfg = tmp_path / "lynx.json"
    cfg.write_text(json.dumps({"moe_backend": "lynx", "policy": "lynx", "params": {"alpha": 2.0}}))
    ServerArgs.from_cli_args(_parse(["--lynx-config", str(cfg), "--lynx-beta", "2"]))
    opts = LynxOptions.from_env()
    assert opts.enabled and opts.params == {"alpha": 2.0, "beta": 2}
    cfg.write_text(json.dumps({"moe_backend": "lynx", "gamma": 1}))
    with pytest.raises(ConfigError, match="unknown key"):
        ServerArgs.from_cli_args(_parse(["--lynx-config", str(cfg)]))


def _reporter(**kw):
    base = dict(enable_metrics=True, current_scheduler_metrics_enabled=True, decode_log_interval=2,
                forward_ct_decode=4, metrics_collector=SimpleNamespace(labels={"model_name": "t"}))
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture
def fresh_metrics(monkeypatch):
    """A fresh registry for Lynx's counters (prometheus refuses duplicate names in one registry)."""
    from prometheus_client import CollectorRegistry

    from lynx_sglang.runtime.sglang import metrics

    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "_metrics", None)
    monkeypatch.setattr(metrics, "_hook_failed", False)
    real = metrics.LynxMetrics
    monkeypatch.setattr(metrics, "LynxMetrics", lambda labels: real(labels, registry=registry))
    return lambda name, **labels: registry.get_sample_value(name, {"model_name": "t", **labels})


def test_metrics_publish_what_the_selectors_counted(sglang_layers, phase, monkeypatch, fresh_metrics):
    from lynx_sglang.runtime.sglang import metrics

    layers = [_topk(sglang_layers, 7)]
    stages = stage.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    _register(monkeypatch, stages)
    phase(DECODE)
    for _ in range(3):
        layers[0](torch.randn(32, 8), torch.randn(32, 16) * 3)
    st = stages[0].selector.stats()
    reporter = _reporter()
    metrics.report_decode_stats_after(None, reporter)
    sample = lambda name: fresh_metrics(name, layer="7")  # noqa: E731
    assert sample("lynx:decode_steps_total") == 3
    assert sample("lynx:experts_before_total") == st.experts_before
    assert sample("lynx:experts_after_total") == st.experts_after < st.experts_before
    assert sample("lynx:tokens_total") == 96
    layers[0](torch.randn(32, 8), torch.randn(32, 16) * 3)
    reporter.forward_ct_decode = 5  # off-interval: nothing read
    metrics.report_decode_stats_after(None, reporter)
    assert sample("lynx:decode_steps_total") == 3
    reporter.forward_ct_decode = 6
    metrics.report_decode_stats_after(None, reporter)
    assert sample("lynx:decode_steps_total") == 4


def test_one_device_to_host_copy_per_interval_feeds_counters_and_dump(sglang_layers, phase, monkeypatch, tmp_path,
                                                                       fresh_metrics):
    """All layers' statistics live in one [L, NUM_STATS] table, read once for the counters and the dump."""
    from lynx_sglang.runtime.sglang import metrics
    from lynx_sglang.runtime.selection.stats import NUM_STATS

    layers = [_topk(sglang_layers, i) for i in range(3)]
    stages = stage.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    table = stages[0].stats._base
    assert table.shape == (3, NUM_STATS) and all(s.stats._base is table for s in stages)
    assert all(s.selector._stats is s.stats for s in stages)  # each selector accumulates into its row
    _register(monkeypatch, stages)
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(tmp_path))
    phase(DECODE)
    for t in layers:
        t(torch.randn(16, 8), torch.randn(16, 16) * 3)
    copies = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: copies.append(tuple(self.shape)) or real_tolist(self))
    metrics.report_decode_stats_after(None, _reporter())
    assert copies == [(3, NUM_STATS)]
    dumped = json.loads((tmp_path / "tp0.json").read_text())
    for i in range(3):
        assert dumped[str(i)]["steps"] == 1 == fresh_metrics("lynx:decode_steps_total", layer=str(i))


def test_a_replanned_selector_keeps_counting_into_the_same_row(sglang_layers, phase, monkeypatch, fresh_metrics):
    """New top-k dtypes re-plan the selector; captured graphs still write the old row, so the new one must too."""
    from lynx_sglang.runtime.sglang import metrics

    layers = [_topk(sglang_layers, 0)]
    (st,) = stage.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    _register(monkeypatch, [st])
    phase(DECODE)
    x, z = torch.randn(16, 8), torch.randn(16, 16) * 3
    plain = _topk(sglang_layers, 0)(x, z)
    st(plain, None)
    row, first = st.stats, st.selector
    metrics.report_decode_stats_after(None, _reporter())
    st(sglang_layers.StandardTopKOutput(plain.topk_weights.half(), plain.topk_ids.long(), z), None)
    assert st.selector is not first and st.selector.ids_dtype == torch.int64
    assert st.stats is row and st.selector._stats is row and st.selector.stats().steps == 2
    reporter = _reporter(forward_ct_decode=6)
    metrics.report_decode_stats_after(None, reporter)
    assert fresh_metrics("lynx:decode_steps_total", layer="0") == 2


def test_counters_never_go_backwards_across_a_reset(sglang_layers, phase, monkeypatch, fresh_metrics):
    """The graph warm-up reset zeroes the device totals: the counters rebase instead of going down."""
    from lynx_sglang.runtime.sglang import metrics

    layers = [_topk(sglang_layers, 0)]
    stages = stage.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    _register(monkeypatch, stages)
    phase(DECODE)
    for _ in range(3):
        layers[0](torch.randn(16, 8), torch.randn(16, 16) * 3)
    metrics.report_decode_stats_after(None, _reporter())
    assert fresh_metrics("lynx:decode_steps_total", layer="0") == 3
    hooks._init_cuda_graphs_after(None)  # zeroes in place, counts the reset
    layers[0](torch.randn(16, 8), torch.randn(16, 16) * 3)
    metrics.report_decode_stats_after(None, _reporter(forward_ct_decode=6))
    assert fresh_metrics("lynx:decode_steps_total", layer="0") == 4  # 3 + the one step since the reset
    # A zeroing nobody counted (not ours): still never backwards, never an exception.
    stages[0].stats.zero_()
    metrics.report_decode_stats_after(None, _reporter(forward_ct_decode=8))
    assert fresh_metrics("lynx:decode_steps_total", layer="0") == 4
    for _ in range(2):
        layers[0](torch.randn(16, 8), torch.randn(16, 16) * 3)
    metrics.report_decode_stats_after(None, _reporter(forward_ct_decode=10))
    assert fresh_metrics("lynx:decode_steps_total", layer="0") == 6


def test_a2a_counters_rebase_across_a_reset_too():
    from prometheus_client import CollectorRegistry

    from lynx_sglang.runtime.sglang import metrics
    from lynx_sglang.runtime.sglang.a2a_dispatcher import A2ASnapshot

    registry = CollectorRegistry()
    m = metrics.LynxMetrics({"tp_rank": "0"}, registry=registry)

    def totals(steps, tokens):
        return {"steps": steps, "dispatch_bytes": 10 * steps, "combine_bytes": 5 * steps, "busiest_rank_experts": steps,
                "busiest_rank_tokens": steps, "mixed_steps": 0, "rank_experts": [steps, steps],
                "rank_tokens": [tokens, tokens]}

    sample = lambda name, **kw: registry.get_sample_value(name, {"tp_rank": "0", "layer": "0", **kw})  # noqa: E731
    m.publish_a2a(A2ASnapshot(0, {"0": totals(4, 8)}))
    m.publish_a2a(A2ASnapshot(1, {"0": totals(1, 2)}))  # reset since: counted from zero
    assert sample("lynx:a2a_decode_steps_total") == 5 and sample("lynx:a2a_rank_tokens_total", ep_rank="1") == 10
    m.publish_a2a(A2ASnapshot(1, {"0": totals(0, 0)}))  # an uncounted zeroing: no exception, no decrease
    m.publish_a2a(A2ASnapshot(1, {"0": totals(2, 3)}))
    assert sample("lynx:a2a_decode_steps_total") == 7 and sample("lynx:a2a_dispatch_bytes_total") == 70


def test_an_error_in_the_metrics_hook_is_logged_once_and_the_scheduler_continues(sglang_layers, phase, monkeypatch,
                                                                                  caplog, fresh_metrics):
    from lynx_sglang.runtime.sglang import metrics

    layers = [_topk(sglang_layers, 0)]
    _register(monkeypatch, stage.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts()))

    def broken(self):
        raise RuntimeError("device lost")

    monkeypatch.setattr(stage.StageRegistry, "snapshot", broken)
    for _ in range(3):
        assert metrics.report_decode_stats_after("result", _reporter()) == "result"
    assert sum("publishing Lynx's metrics failed" in r.getMessage() for r in caplog.records) == 1


def test_client_parses_the_metrics_exposition():
    from prometheus_client import CollectorRegistry, generate_latest

    from lynx_sglang import client
    from lynx_sglang.runtime.selection.stats import SelectionStats
    from lynx_sglang.runtime.sglang import metrics

    registry = CollectorRegistry()
    m = metrics.LynxMetrics({"tp_rank": "0"}, registry=registry)
    # moved weight is kept in 1/65536: 30 re-routed tokens that moved a quarter of a unit of weight each.
    m.publish(stage.StatsSnapshot(0, {0: SelectionStats(10, 120, 60, 30, 160, 30 * 16384),
                                      3: SelectionStats(10, 100, 90, 5, 160, 3)}, {0: 0, 3: 0}))
    text = generate_latest(registry).decode()
    assert 'lynx:moved_weight_total{layer="0",tp_rank="0"} 7.5' in text  # published in weight units
    parsed = client.parse_lynx_metrics(text)
    assert list(parsed) == [0, 3]
    assert parsed[0].mean_experts_before == 12 and parsed[0].mean_experts_after == 6
    assert parsed[3].rows_changed == 5 and parsed[3].rows_voting == 160
    assert parsed[0].moved_per_rerouted_token == 0.25 and parsed[3].moved_weight == 3  # round trip exact


def test_every_rank_can_dump_its_decisions(sglang_layers, phase, monkeypatch, tmp_path):
    from lynx_sglang.runtime.sglang import metrics

    layers = [_topk(sglang_layers, 2)]
    _register(monkeypatch, stage.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts()))
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(tmp_path))
    phase(DECODE)
    layers[0](torch.randn(32, 8), torch.randn(32, 16) * 3)
    reporter = SimpleNamespace(enable_metrics=False, decode_log_interval=1, forward_ct_decode=1)
    metrics.report_decode_stats_after(None, reporter)
    dumped = json.loads((tmp_path / "tp0.json").read_text())
    assert dumped["2"]["steps"] == 1 and dumped["2"]["rows_voting"] == 32 and dumped["2"]["mixed_batches"] == 0


def test_registering_twice_wraps_once(sglang_layers):
    from sglang.srt.plugins.hook_registry import HookRegistry

    hooks.register_hooks()
    hooks.register_hooks()
    for hook in hooks.HOOKS:
        assert [fn for _, fn, _ in HookRegistry._hooks[hook.target]].count(hook.fn) == 1, hook.target


def test_every_hook_target_is_wrapped_in_the_installed_sglang(sglang_layers):
    """apply_hooks only logs a target it cannot find: every entry of HOOKS must resolve in the installed
    SGLang and be wrapped (by our function) after registration."""
    import pkgutil

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    assert len({h.target for h in hooks.HOOKS}) == len(hooks.HOOKS)
    for hook in hooks.HOOKS:
        HookType[hook.kind]  # a kind HookRegistry knows
        assert any(fn is hook.fn for _, fn, _ in HookRegistry._hooks.get(hook.target, ())), hook.target
        owner, attr = hook.target.rsplit(".", 1)
        obj = pkgutil.resolve_name(owner)  # the target exists in the installed SGLang
        fn = obj.__dict__[attr] if isinstance(obj, type) else getattr(obj, attr)
        fn = getattr(fn, "__func__", fn)  # classmethods
        assert getattr(fn, "__wrapped__", None) is not None, f"{hook.target} was not wrapped"
        chain, found = fn, False
        while chain is not None and not found:  # our function sits in the wrapper chain
            found = any(getattr(c, "cell_contents", None) is hook.fn for c in getattr(chain, "__closure__", None) or ())
            chain = getattr(chain, "__wrapped__", None)
        assert found, f"{hook.target} is wrapped, but not by {hook.fn.__name__}"


def test_our_hook_is_found_under_another_plugins_wrapper(sglang_layers, monkeypatch):
    import functools

    from sglang.srt.layers.moe.topk import TopK

    ours = TopK.__dict__["forward"]

    @functools.wraps(ours)
    def outer(*args, **kwargs):  # what a second plugin's AROUND hook looks like
        return ours(*args, **kwargs)

    outer.__wrapped__ = ours
    monkeypatch.setattr(TopK, "forward", outer)
    assert hooks._hooks_applied()
    monkeypatch.setattr(TopK, "forward", ours.__wrapped__)  # SGLang's own, no hook
    assert not hooks._hooks_applied()


def test_graph_warm_up_steps_are_not_counted(sglang_layers, phase, monkeypatch):
    layers = [_topk(sglang_layers, 0)]
    stages = stage.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    _register(monkeypatch, stages)
    phase(DECODE)
    layers[0](torch.randn(8, 8), torch.randn(8, 16) * 3)  # a warm-up decode step before capture
    assert stages[0].selector.stats().steps == 1
    row = stages[0].stats
    hooks._init_cuda_graphs_after(None, SimpleNamespace())
    assert stages[0].selector.stats().steps == 0 and stages[0].selector._stats is row  # zeroed in place
    assert stage.registry().resets == 1


def test_mixed_batches_run_eager_only_with_stages(sglang_layers, monkeypatch):
    runner = SimpleNamespace(prefer_eager_mixed_prefill=False)
    _register(monkeypatch, [])
    hooks._prefill_graphs_init_after(None, runner)
    assert runner.prefer_eager_mixed_prefill is False  # stock SGLang: unchanged
    _register(monkeypatch, stage.build_stages(_Model([_topk(sglang_layers, 0)]), SimpleNamespace(num_experts=16),
                                              _opts()))
    hooks._prefill_graphs_init_after(None, runner)
    assert runner.prefer_eager_mixed_prefill is True


def test_padded_rows_neither_vote_nor_change(sglang_layers, phase):
    layers = [_topk(sglang_layers, 0)]
    stage.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    x, z = torch.randn(32, 8), torch.randn(32, 16) * 3
    nv = torch.tensor(20)
    plain = _topk(sglang_layers, 0)(x, z, num_token_non_padded=nv)
    phase(DECODE)
    out = layers[0](x, z, num_token_non_padded=nv)
    assert torch.equal(out.topk_ids[20:], plain.topk_ids[20:])
    sel = ExpertSelector(RouterSpec(16, 4), make_policy("lynx", keep_level=0, min_votes=2, max_moved_weight=1.0), 64,
                         ids_dtype=plain.topk_ids.dtype)
    want_ids, _ = sel.run(z[:20], plain.topk_ids[:20], plain.topk_weights[:20])
    assert torch.equal(out.topk_ids[:20], want_ids)


def test_cuda_graph_decode_carries_the_real_token_count_once_stages_exist(sglang_layers, monkeypatch):
    """Under plain TP SGLang leaves a replayed graph's padding rows unmarked; with our stages it must mark them."""
    from sglang.srt.model_executor import forward_batch_info as fbi
    from sglang.srt.model_executor.runner import decode_cuda_graph_runner as dcg

    _register(monkeypatch, [])
    assert fbi.enable_num_token_non_padded() is False  # stock answer at world size 1, no EP
    layers = [_topk(sglang_layers, 0)]
    _register(monkeypatch, stage.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts()))
    assert fbi.enable_num_token_non_padded() is True
    assert dcg.enable_num_token_non_padded() is True  # the graph runner's own import is the hooked one


def _redundant_placement(E: int, g: torch.Generator):
    """EPLB-style maps: E logical experts on E + 8 physical slots, 8 of them replicated (SGLang's layout)."""
    physical_to_logical = torch.cat([torch.randperm(E, generator=g), torch.randperm(E, generator=g)[:8]])
    replicas = torch.bincount(physical_to_logical, minlength=E)
    logical_to_all = torch.full((E, int(replicas.max())), -1, dtype=torch.int64)
    for e in range(E):
        where = (physical_to_logical == e).nonzero().flatten()
        logical_to_all[e, : where.numel()] = where
    return stage.EplbMaps(physical_to_logical, logical_to_all, replicas)


@pytest.mark.parametrize("policy", [{"policy": "lynx"}, {"policy": "budget", "params": {"max_experts": 2}}],
                         ids=["lynx", "budget-2"])
def test_eplb_selects_on_logical_ids_and_maps_back_to_replicas(sglang_layers, phase, monkeypatch, policy):
    E, P, k, T = 16, 24, 4, 32
    g = torch.Generator().manual_seed(5)
    # A placement with redundancy: 16 logical experts on 24 physical slots, 8 of them replicated.
    physical_to_logical, logical_to_all, replicas = _redundant_placement(E, g)
    monkeypatch.setattr(stage, "eplb_maps", lambda layer: stage.EplbMaps(physical_to_logical, logical_to_all, replicas))

    layers = [_topk(sglang_layers, 0)]
    opts = _opts(**policy) if "params" in policy else _opts(policy="lynx")
    (st,) = stage.build_stages(_Model(layers), SimpleNamespace(num_experts=E), opts, physical_ids=True)
    x, z = torch.randn(T, 8, generator=g), torch.randn(T, E, generator=g) * 3
    plain = _topk(sglang_layers, 0)(x, z)  # logical ids, as the router picked them
    # What EPLB would hand us: each pick on one of its expert's replicas (chosen at random).
    pick = torch.randint(0, 1 << 16, plain.topk_ids.shape, generator=g) % replicas[plain.topk_ids.long()]
    physical_in = logical_to_all[plain.topk_ids.long(), pick].to(plain.topk_ids.dtype)
    topk_in = sglang_layers.StandardTopKOutput(topk_weights=plain.topk_weights, topk_ids=physical_in,
                                               router_logits=z)
    phase(DECODE)
    out = st(topk_in, None)

    sel = ExpertSelector(RouterSpec(E, k), opts.make_policy(), 64, ids_dtype=plain.topk_ids.dtype)
    want_logical, want_w = sel.run(z, plain.topk_ids, plain.topk_weights)
    assert torch.equal(out.topk_weights, want_w)
    got = out.topk_ids
    empty = want_logical < 0
    assert torch.equal(got < 0, empty)  # empty slots stay -1 (the remap tables would alias them)
    got_logical = torch.where(empty, want_logical, physical_to_logical[got.clamp(min=0).long()].to(got.dtype))
    assert torch.equal(got_logical, want_logical)  # every slot holds a replica of the selected expert
    kept = want_logical == plain.topk_ids
    assert torch.equal(got[kept], physical_in[kept])  # untouched slots keep SGLang's replica
    assert not kept.all()  # the batch really changed


def test_rank_aware_policy_under_eplb_follows_the_live_placement(sglang_layers, phase, monkeypatch):
    """lynx_ep with replicas: slots land on replicas of the ranks it chose, and a rebalanced map is re-read."""
    from lynx_sglang.runtime.expert_parallel import ExpertPlacement, home_rank
    from lynx_sglang.runtime.expert_parallel.rank_aware import select_rank_aware

    E, k, T, N = 16, 4, 32, 2
    g = torch.Generator().manual_seed(7)
    physical_to_logical, logical_to_all, replicas = _redundant_placement(E, g)
    monkeypatch.setattr(stage, "eplb_maps", lambda layer: stage.EplbMaps(physical_to_logical, logical_to_all, replicas))
    opts = _opts(policy="lynx_ep", params={})
    ep = stage.EpLayout(num_ranks=N, rank=0, a2a_home=True)
    (st,) = stage.build_stages(_Model([_topk(sglang_layers, 0)]), SimpleNamespace(num_experts=E), opts,
                                  physical_ids=True, ep=ep)
    phase(DECODE)

    def check():
        placement = ExpertPlacement.from_physical_map(physical_to_logical, N, E)
        x, z = torch.randn(T, 8, generator=g), torch.randn(T, E, generator=g) * 3
        plain = _topk(sglang_layers, 0)(x, z)
        pick = torch.randint(0, 1 << 16, plain.topk_ids.shape, generator=g) % replicas[plain.topk_ids.long()]
        physical_in = logical_to_all[plain.topk_ids.long(), pick].to(plain.topk_ids.dtype)
        out = st(sglang_layers.StandardTopKOutput(topk_weights=plain.topk_weights, topk_ids=physical_in,
                                                     router_logits=z), None)
        want, want_w, want_rank, _ = select_rank_aware(
            opts.make_policy(), RouterSpec(E, k), z, plain.topk_ids, plain.topk_weights,
            placement.logical_on_rank(), pick_rank=placement.rank_of[physical_in.long()], home=home_rank(T, N))
        assert torch.equal(out.topk_weights, want_w)
        got = out.topk_ids.long()
        assert torch.equal(placement.logical_of[got], want.long())  # every slot holds its selected expert
        assert torch.equal(placement.rank_of[got], want_rank)  # on the rank lynx_ep chose for it
        kept = want == plain.topk_ids
        assert torch.equal(got[kept], physical_in[kept].long()) and not kept.all()
        assert torch.equal(st.selector.rank_mask, placement.logical_on_rank())

    check()
    # Rebalancing rewrites the map in place: swap which experts two slots on different ranks hold.
    a, b = 0, 12
    physical_to_logical[a], physical_to_logical[b] = physical_to_logical[b].clone(), physical_to_logical[a].clone()
    for e in range(E):
        where = (physical_to_logical == e).nonzero().flatten()
        logical_to_all[e] = -1
        logical_to_all[e, : where.numel()] = where
    check()


def test_rank_aware_policy_needs_expert_parallel_ranks(sglang_layers):
    with pytest.raises(ConfigError, match="lynx_ep needs expert parallelism"):
        stage.build_stages(_Model([_topk(sglang_layers, 0)]), SimpleNamespace(num_experts=16),
                           _opts(policy="lynx_ep", params={}))


def test_a2a_accounting_runs_only_when_someone_reads_it(monkeypatch):
    """Decided once per dispatcher at start-up: --enable-metrics or LYNX_SGLANG_STATS_DIR."""
    from lynx_sglang.runtime.sglang import a2a_dispatcher as a2a

    monkeypatch.delenv(a2a.STATS_DIR_ENV, raising=False)
    assert a2a.accounting_wanted(SimpleNamespace(enable_metrics=False)) is False
    assert a2a.accounting_wanted(SimpleNamespace(enable_metrics=True)) is True
    assert a2a.accounting_wanted(SimpleNamespace()) is True  # cannot tell: on (costs kernels, never results)
    monkeypatch.setenv(a2a.STATS_DIR_ENV, "/nonexistent")
    assert a2a.accounting_wanted(SimpleNamespace(enable_metrics=False)) is True


def test_a2a_totals_are_rows_of_one_table_read_with_one_copy(monkeypatch):
    from lynx_sglang.runtime.expert_parallel import ExpertPlacement
    from lynx_sglang.runtime.expert_parallel.accounting import A2ATotals
    from lynx_sglang.runtime.sglang import a2a_dispatcher as a2a

    def disp(layer, accounting=True):
        return SimpleNamespace(layer_id=layer, moe_ep_size=2, accounting=accounting,
                               totals=torch.zeros(A2ATotals.size(2), dtype=torch.int64))

    reg = a2a.DispatcherRegistry()
    ds = [disp(0), disp(1), disp(2), disp(3, accounting=False)]
    for d in ds:
        reg.add(d)
    ds[1].totals[A2ATotals.Field.STEPS] = 5  # accounted before the model finished loading: kept
    reg.seal()
    table = ds[0].totals._base
    assert table.shape == (3, A2ATotals.size(2)) and all(d.totals._base is table for d in ds[:3])
    reg.seal()  # a second model load (draft) leaves the table captured graphs write to alone
    assert ds[0].totals._base is table
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]])
    a2a.account(ds[0].totals, DECODE, ids, ExpertPlacement.contiguous(8, 2), 4, 2)
    copies = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: copies.append(tuple(self.shape)) or real_tolist(self))
    snap = reg.snapshot()
    assert copies == [tuple(table.shape)]  # one copy for every layer
    assert set(snap.layers) == {"0", "1", "2"} and snap.resets == 0  # the non-accounting one is not read
    assert snap.layers["0"]["steps"] == 1 and snap.layers["1"]["steps"] == 5
    reg.reset_stats()
    snap = reg.snapshot()
    assert snap.resets == 1 and all(v["steps"] == 0 for v in snap.layers.values())
    assert ds[0].totals._base is table  # zeroed in place


def test_the_sglang_fields_our_hooks_read_exist(sglang_layers):
    """What the hooks read per forward with a safe default (a missing field would silently pass batches
    through or, for spec_info, treat speculative batches as decode): they must exist in the installed SGLang."""
    import dataclasses

    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    fields = {f.name for f in dataclasses.fields(ForwardBatch)}
    assert {"forward_mode", "spec_info"} <= fields
    assert "decoding_reqs" in {f.name for f in dataclasses.fields(ScheduleBatch)}
    for mode in ("is_decode", "is_idle", "is_mixed"):
        assert callable(getattr(ForwardMode.DECODE, mode))


def test_a_topk_without_the_attributes_we_check_is_refused(sglang_layers):
    t = _topk(sglang_layers, 0)
    del t.enable_waterfill  # what an SGLang rename looks like to us
    with pytest.raises(ConfigError, match="no 'enable_waterfill'"):
        stage.build_stages(_Model([t]), SimpleNamespace(num_experts=16), _opts())
