"""The SGLang integration at layer level: flags, phase detection, the TopK stage (no server)."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest
import torch

from lynx_sglang import ConfigError, ExpertSelector, RouterSpec, make_policy
from lynx_sglang.runtime.sglang import hooks as hooks
from lynx_sglang.runtime.sglang.options import ENV_VAR, LynxOptions


@pytest.fixture(scope="module")
def sglang_layers():
    """World-size-1 process group and our hooks applied, as in a server worker."""
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.test.layer_ut_utils import init_single_process_dist

    init_single_process_dist(29653)
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
    prev = hooks.Phase.current
    yield hooks.Phase
    hooks.Phase.current = prev


def test_hook_is_applied_and_passes_through_without_a_stage(sglang_layers, phase):
    assert hooks._hooks_applied()
    t = _topk(sglang_layers, 0)
    x, z = torch.randn(20, 8), torch.randn(20, 16) * 3
    phase.current = ("decode",)
    out = t(x, z)  # a decode batch, but this layer has no stage: SGLang's own softmax top-k, renormalised
    w, ids = torch.softmax(z, -1).topk(4, -1)
    assert torch.equal(out.topk_ids.long(), ids)
    torch.testing.assert_close(out.topk_weights, w / w.sum(-1, keepdim=True))


def test_decode_batches_are_rewritten_like_the_selector(sglang_layers, phase):
    layers = [_topk(sglang_layers, i) for i in range(2)]
    stages = hooks.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    assert [s.layer_id for s in stages] == [0, 1]
    ref = _topk(sglang_layers, 0)
    x, z = torch.randn(32, 8), torch.randn(32, 16) * 3
    plain = ref(x, z)

    phase.current = None  # prefill / extend: untouched
    out = layers[0](x, z)
    assert torch.equal(out.topk_ids, plain.topk_ids) and torch.equal(out.topk_weights, plain.topk_weights)

    phase.current = ("decode",)
    out = layers[0](x, z)
    sel = ExpertSelector(RouterSpec(16, 4), make_policy("lynx", keep_level=0, min_votes=2, max_moved_weight=1.0), 64,
                         ids_dtype=plain.topk_ids.dtype)
    want_ids, want_w = sel.run(z, plain.topk_ids, plain.topk_weights)
    assert torch.equal(out.topk_ids, want_ids) and torch.equal(out.topk_weights, want_w)
    assert not torch.equal(out.topk_ids, plain.topk_ids)  # this batch really changes
    st = stages[0].selector.stats()
    assert st.steps == 1 and st.experts_after < st.experts_before


def test_mixed_batches_rewrite_only_the_trailing_decode_rows(sglang_layers, phase):
    layers = [_topk(sglang_layers, 0)]
    hooks.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    x, z = torch.randn(40, 8), torch.randn(40, 16) * 3
    plain = _topk(sglang_layers, 0)(x, z)
    phase.current = ("mixed", 24)
    out = layers[0](x, z)
    assert layers[0].__dict__[hooks._STAGE_ATTR].mixed_batches == 1
    assert torch.equal(out.topk_ids[:16], plain.topk_ids[:16])
    assert torch.equal(out.topk_weights[:16], plain.topk_weights[:16])
    sel = ExpertSelector(RouterSpec(16, 4), make_policy("lynx", keep_level=0, min_votes=2, max_moved_weight=1.0), 64,
                         ids_dtype=plain.topk_ids.dtype)
    want_ids, _ = sel.run(z[16:], plain.topk_ids[16:], plain.topk_weights[16:])
    assert torch.equal(out.topk_ids[16:], want_ids)


def test_layer_selection_and_batches_too_large_pass_through(sglang_layers, phase):
    layers = [_topk(sglang_layers, i) for i in range(3)]
    stages = hooks.build_stages(_Model(layers), SimpleNamespace(n_routed_experts=16), _opts(layers=[1], max_batch=8))
    assert [s.layer_id for s in stages] == [1]
    x, z = torch.randn(9, 8), torch.randn(9, 16) * 3
    phase.current = ("decode",)
    plain = _topk(sglang_layers, 1)(x, z)
    assert torch.equal(layers[1](x, z).topk_ids, plain.topk_ids)  # 9 > max_batch 8


def test_sigmoid_router_with_bias_keeps_its_ranking(sglang_layers, phase):
    bias = torch.randn(16) * 0.1
    layers = [_topk(sglang_layers, 0, bias=bias, scoring="sigmoid")]
    (stage,) = hooks.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    assert stage.router.has_correction_bias and stage.router.scoring_func == "sigmoid"
    x, z = torch.randn(16, 8), torch.randn(16, 16) * 3
    plain = _topk(sglang_layers, 0, bias=bias, scoring="sigmoid")(x, z)
    phase.current = ("decode",)
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


def test_runner_formats_we_cannot_rewrite_fail_at_start(sglang_layers):
    t = _topk(sglang_layers, 0)
    t.topk_config.output_format = sglang_layers.TopKOutputFormat.BYPASSED
    with pytest.raises(ConfigError, match="BYPASSED"):
        hooks.build_stages(_Model([t]), SimpleNamespace(num_experts=16), _opts())
    with pytest.raises(ConfigError, match="expert count"):
        hooks.build_stages(_Model([_topk(sglang_layers, 0)]), SimpleNamespace(), _opts())


@pytest.mark.parametrize("change,msg", [
    (lambda t: setattr(t, "forward", t.forward_native), "replaces TopK.forward"),  # what longcat_flash does
    (lambda t: setattr(t, "enable_waterfill", True), "waterfill"),
    (lambda t: setattr(t.topk_config, "fused_gate_packed_ids", True), "packed top-k ids"),
])
def test_layers_our_hook_cannot_serve_fail_at_start(sglang_layers, change, msg):
    t = _topk(sglang_layers, 0)
    change(t)
    with pytest.raises(ConfigError, match=msg):
        hooks.build_stages(_Model([t]), SimpleNamespace(num_experts=16), _opts())


def test_attention_dp_with_a_gathered_moe_input_fails_at_start(sglang_layers, monkeypatch):
    """With a2a none, attention DP gathers every DP rank's rows into each MoE, but the phase is per rank."""
    import sglang.srt.layers.moe.utils as moe_utils
    import sglang.srt.runtime_context as rc

    monkeypatch.setenv(ENV_VAR, json.dumps({"moe_backend": "lynx"}))
    monkeypatch.setattr(rc, "get_parallel", lambda: SimpleNamespace(attn_dp_size=2))
    model, cfg = _Model([_topk(sglang_layers, 0)]), SimpleNamespace(hf_config=SimpleNamespace(num_experts=16))
    monkeypatch.setattr(moe_utils, "is_moe_input_scattered_across_dp_ranks", lambda: False)
    with pytest.raises(ConfigError, match="attention DP"):
        hooks._prepare_moe_topk_after(None, model=model, model_config=cfg)
    assert hooks._moe_input_gathered_over_dp()
    monkeypatch.setattr(moe_utils, "is_moe_input_scattered_across_dp_ranks", lambda: True)  # DeepEP: local rows
    assert not hooks._moe_input_gathered_over_dp()


def test_draft_model_layers_get_no_stage(sglang_layers):
    draft = _topk(sglang_layers, 1)
    draft.is_draft = True
    stages = hooks.build_stages(_Model([_topk(sglang_layers, 0), draft]), SimpleNamespace(num_experts=16), _opts())
    assert [s.layer_id for s in stages] == [0] and hooks._STAGE_ATTR not in draft.__dict__


def _fb(mode, **kw):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return SimpleNamespace(forward_mode=getattr(ForwardMode, mode), spec_info=None, **kw)


def test_phase_comes_from_the_forward_mode():
    assert hooks.phase_of(_fb("DECODE")) == ("decode",)
    assert hooks.phase_of(_fb("EXTEND")) is None
    assert hooks.phase_of(_fb("IDLE")) == ("idle",)  # no rows: only global selection acts on it
    assert hooks.phase_of(_fb("MIXED", _lynx_decode_tokens=5)) == ("mixed", 5)
    assert hooks.phase_of(_fb("MIXED")) is None  # decode rows unknown: leave the batch alone
    spec = _fb("DECODE")
    spec.spec_info = object()
    assert hooks.phase_of(spec) is None


def test_forward_context_scope_sets_and_restores_the_phase(sglang_layers, phase):
    from sglang.srt.model_executor import forward_context as fc

    ctx = fc.ForwardContext(attn_backend=None)
    phase.current = None
    with fc.forward_context(ctx, forward_batch=_fb("DECODE", moe_num_token_non_padded=None)):
        assert hooks.Phase.current == ("decode",)
        with fc.forward_context(ctx):  # nested override without a batch keeps the phase
            assert hooks.Phase.current == ("decode",)
        with fc.forward_context(ctx, forward_batch=_fb("EXTEND", moe_num_token_non_padded=None)):
            assert hooks.Phase.current is None
        assert hooks.Phase.current == ("decode",)
    assert hooks.Phase.current is None


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


def test_metrics_publish_what_the_selectors_counted(sglang_layers, phase, monkeypatch):
    from prometheus_client import REGISTRY

    from lynx_sglang.runtime.sglang import metrics

    layers = [_topk(sglang_layers, 7)]
    stages = hooks.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    monkeypatch.setattr(hooks, "_stages", stages)
    phase.current = ("decode",)
    for _ in range(3):
        layers[0](torch.randn(32, 8), torch.randn(32, 16) * 3)
    st = stages[0].selector.stats()
    reporter = SimpleNamespace(enable_metrics=True, current_scheduler_metrics_enabled=True, decode_log_interval=2,
                               forward_ct_decode=4, metrics_collector=SimpleNamespace(labels={"model_name": "t"}))
    metrics._report_decode_stats_after(None, reporter)
    sample = lambda name: REGISTRY.get_sample_value(name, {"model_name": "t", "layer": "7"})  # noqa: E731
    assert sample("lynx:decode_steps_total") == 3
    assert sample("lynx:experts_before_total") == st.experts_before
    assert sample("lynx:experts_after_total") == st.experts_after < st.experts_before
    assert sample("lynx:tokens_total") == 96
    layers[0](torch.randn(32, 8), torch.randn(32, 16) * 3)
    reporter.forward_ct_decode = 5  # off-interval: nothing read
    metrics._report_decode_stats_after(None, reporter)
    assert sample("lynx:decode_steps_total") == 3
    reporter.forward_ct_decode = 6
    metrics._report_decode_stats_after(None, reporter)
    assert sample("lynx:decode_steps_total") == 4


def test_client_parses_the_metrics_exposition():
    from prometheus_client import CollectorRegistry, generate_latest

    from lynx_sglang import client
    from lynx_sglang.runtime.sglang import metrics

    class _Stage:
        def __init__(self, layer_id, stats):
            self.layer_id, self.selector = layer_id, SimpleNamespace(stats=lambda: stats)

    from lynx_sglang.runtime.selection.selector import SelectionStats

    registry = CollectorRegistry()
    m = metrics.LynxMetrics({"tp_rank": "0"}, registry=registry)
    m.publish([_Stage(0, SelectionStats(10, 120, 60, 30, 160)), _Stage(3, SelectionStats(10, 100, 90, 5, 160))])
    parsed = client.parse_lynx_metrics(generate_latest(registry).decode())
    assert list(parsed) == [0, 3]
    assert parsed[0].mean_experts_before == 12 and parsed[0].mean_experts_after == 6
    assert parsed[3].rows_changed == 5 and parsed[3].rows_voting == 160


def test_every_rank_can_dump_its_decisions(sglang_layers, phase, monkeypatch, tmp_path):
    from lynx_sglang.runtime.sglang import metrics

    layers = [_topk(sglang_layers, 2)]
    stages = hooks.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    monkeypatch.setattr(hooks, "_stages", stages)
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(tmp_path))
    phase.current = ("decode",)
    layers[0](torch.randn(32, 8), torch.randn(32, 16) * 3)
    reporter = SimpleNamespace(enable_metrics=False, decode_log_interval=1, forward_ct_decode=1)
    metrics._report_decode_stats_after(None, reporter)
    dumped = json.loads((tmp_path / "tp0.json").read_text())
    assert dumped["2"]["steps"] == 1 and dumped["2"]["rows_voting"] == 32 and dumped["2"]["mixed_batches"] == 0


def test_registering_twice_wraps_once(sglang_layers):
    from sglang.srt.plugins.hook_registry import HookRegistry

    hooks.register_hooks()
    hooks.register_hooks()
    assert len(HookRegistry._hooks[f"{hooks._TOPK}.forward"]) == 1


def test_every_hook_target_is_wrapped_in_the_installed_sglang(sglang_layers):
    """apply_hooks only logs a target it cannot find: check each of ours resolved and was replaced."""
    import pkgutil

    from sglang.srt.plugins.hook_registry import HookRegistry

    ours = [t for t, hs in HookRegistry._hooks.items() if any(h.__module__.startswith("lynx_sglang") for _, h, _ in hs)]
    assert {f"{hooks._TOPK}.forward", hooks._PADDING_COUNT, hooks._INIT_GRAPHS, hooks._PREFILL_GRAPHS_INIT} <= set(ours)
    for target in ours:
        owner, attr = target.rsplit(".", 1)
        obj = pkgutil.resolve_name(owner)
        fn = obj.__dict__[attr] if isinstance(obj, type) else getattr(obj, attr)
        fn = getattr(fn, "__func__", fn)  # classmethods
        assert getattr(fn, "__wrapped__", None) is not None or fn.__module__.startswith("sglang.srt.plugins"), target


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
    stages = hooks.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    monkeypatch.setattr(hooks, "_stages", stages)
    phase.current = ("decode",)
    layers[0](torch.randn(8, 8), torch.randn(8, 16) * 3)  # a warm-up decode step before capture
    assert stages[0].selector.stats().steps == 1
    buf = stages[0].selector._stats
    hooks._init_cuda_graphs_after(None, SimpleNamespace())
    assert stages[0].selector.stats().steps == 0 and stages[0].selector._stats is buf  # zeroed in place


def test_mixed_batches_run_eager_only_with_stages(sglang_layers, monkeypatch):
    runner = SimpleNamespace(prefer_eager_mixed_prefill=False)
    monkeypatch.setattr(hooks, "_stages", [])
    hooks._prefill_graphs_init_after(None, runner)
    assert runner.prefer_eager_mixed_prefill is False  # stock SGLang: unchanged
    monkeypatch.setattr(hooks, "_stages", [object()])
    hooks._prefill_graphs_init_after(None, runner)
    assert runner.prefer_eager_mixed_prefill is True


def test_padded_rows_neither_vote_nor_change(sglang_layers, phase):
    layers = [_topk(sglang_layers, 0)]
    hooks.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts())
    x, z = torch.randn(32, 8), torch.randn(32, 16) * 3
    nv = torch.tensor(20)
    plain = _topk(sglang_layers, 0)(x, z, num_token_non_padded=nv)
    phase.current = ("decode",)
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

    monkeypatch.setattr(hooks, "_stages", [])
    assert fbi.enable_num_token_non_padded() is False  # stock answer at world size 1, no EP
    layers = [_topk(sglang_layers, 0)]
    monkeypatch.setattr(hooks, "_stages", hooks.build_stages(_Model(layers), SimpleNamespace(num_experts=16), _opts()))
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
    return physical_to_logical, logical_to_all, replicas


@pytest.mark.parametrize("policy", [{"policy": "lynx"}, {"policy": "budget", "params": {"max_experts": 2}}],
                         ids=["lynx", "budget-2"])
def test_eplb_selects_on_logical_ids_and_maps_back_to_replicas(sglang_layers, phase, monkeypatch, policy):
    E, P, k, T = 16, 24, 4, 32
    g = torch.Generator().manual_seed(5)
    # A placement with redundancy: 16 logical experts on 24 physical slots, 8 of them replicated.
    physical_to_logical, logical_to_all, replicas = _redundant_placement(E, g)
    monkeypatch.setattr(hooks, "eplb_maps", lambda layer: (physical_to_logical, logical_to_all, replicas))

    layers = [_topk(sglang_layers, 0)]
    opts = _opts(**policy) if "params" in policy else _opts(policy="lynx")
    (stage,) = hooks.build_stages(_Model(layers), SimpleNamespace(num_experts=E), opts, physical_ids=True)
    x, z = torch.randn(T, 8, generator=g), torch.randn(T, E, generator=g) * 3
    plain = _topk(sglang_layers, 0)(x, z)  # logical ids, as the router picked them
    # What EPLB would hand us: each pick on one of its expert's replicas (chosen at random).
    pick = torch.randint(0, 1 << 16, plain.topk_ids.shape, generator=g) % replicas[plain.topk_ids.long()]
    physical_in = logical_to_all[plain.topk_ids.long(), pick].to(plain.topk_ids.dtype)
    topk_in = sglang_layers.StandardTopKOutput(topk_weights=plain.topk_weights, topk_ids=physical_in,
                                               router_logits=z)
    phase.current = ("decode",)
    out = stage(topk_in, None)

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
    monkeypatch.setattr(hooks, "eplb_maps", lambda layer: (physical_to_logical, logical_to_all, replicas))
    opts = _opts(policy="lynx_ep", params={})
    ep = hooks.EpLayout(num_ranks=N, rank=0, a2a_home=True)
    (stage,) = hooks.build_stages(_Model([_topk(sglang_layers, 0)]), SimpleNamespace(num_experts=E), opts,
                                  physical_ids=True, ep=ep)
    phase.current = ("decode",)

    def check():
        placement = ExpertPlacement.from_physical_map(physical_to_logical, N, E)
        x, z = torch.randn(T, 8, generator=g), torch.randn(T, E, generator=g) * 3
        plain = _topk(sglang_layers, 0)(x, z)
        pick = torch.randint(0, 1 << 16, plain.topk_ids.shape, generator=g) % replicas[plain.topk_ids.long()]
        physical_in = logical_to_all[plain.topk_ids.long(), pick].to(plain.topk_ids.dtype)
        out = stage(sglang_layers.StandardTopKOutput(topk_weights=plain.topk_weights, topk_ids=physical_in,
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
        assert torch.equal(stage.selector.rank_mask, placement.logical_on_rank())

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
        hooks.build_stages(_Model([_topk(sglang_layers, 0)]), SimpleNamespace(num_experts=16),
                           _opts(policy="lynx_ep", params={}))
