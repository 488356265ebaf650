"""--lynx-residency-output-norms: a paged layer's page budget ranked by predicted output share.

The file (format, identity and shape refusals), the head's arithmetic, the selection it changes (against
a row-by-row oracle on SGLang's own residency), the stage and TopK hook handing it the block's hidden
states, the refusals at every level, the no-sync contract, and the calibration tool's fit.
"""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import pytest
import torch

from lynx_sglang.op_audit import OpAudit
from lynx_sglang.output_norm_calibrate import fit_head, log_output_norms, r_squared
from lynx_sglang.runtime.selection import reference
from lynx_sglang.runtime.selection.config import ConfigError, LynxPolicy, RouterSpec, make_policy
from lynx_sglang.runtime.selection.model_identity import model_identity
from lynx_sglang.runtime.selection.output_norms import (
    FORMAT, LOG_LIMIT, OutputNorms, features, load_output_norms, pick_scale, save_output_norms,
)
from lynx_sglang.runtime.selection.selector import ExpertSelector
from lynx_sglang.runtime.sglang import stage as stage_mod
from lynx_sglang.runtime.sglang.options import LynxOptions, add_cli_args, options_from_args
from lynx_sglang.runtime.sglang.phase import DECODE, mixed, published
from test_residency_runtime import (  # noqa: F401  (module fixture ``paged``)
    ROUTER, E, T, TopKOutput, _batch, _budget_oracle, _eager_step, _options, _paged_layer, paged,
)
from test_sglang_hooks import _Model, _topk, sglang_layers  # noqa: F401  (module fixture)

H = 8
CAP, BUDGET = 0.35, 10  # the budget binds and leaves room to rank beyond the rows' best picks


def _head(seed=0, num_experts=E, hidden=H, spread=1.0):
    """A head's (weight [2H, E], bias [E])."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2 * hidden, num_experts, generator=g) * spread / math.sqrt(2 * hidden), \
        torch.randn(num_experts, generator=g) * spread


def _predicted(x, head):
    """The head's prediction written out: exp(x . w_lin + x^2 . w_sq + b)."""
    w, b = head
    return torch.exp(x @ w[:H] + (x * x) @ w[H:] + b)


def _hidden(seed, rows=T):
    return torch.randn(rows, H, generator=torch.Generator().manual_seed(1000 + seed))


def _budget_opts(**extra):
    return _options("prefer", residency_max_moved_weight=CAP, residency_page_budget=BUDGET, **extra)


def _stage(options, expert_slot, head, layer_id=0):
    return stage_mod.TopKSelectionStage(layer_id, ROUTER, options, torch.device("cpu"), None, output_type=TopKOutput,
                                        expert_slot=expert_slot, output_norms=head)


def _run(st, out, hidden, num_valid=None):
    with published(DECODE):
        got = st(out, num_valid, hidden)
    return got.topk_ids.clone(), got.topk_weights.clone()


# ----------------------------------------------------------------------------- the head's arithmetic


def test_pick_scale_is_exp_of_the_head_clamped_and_nan_safe():
    w, b = _head()
    x = _hidden(0)
    assert torch.allclose(pick_scale(x, w, b), _predicted(x, (w, b)), rtol=1e-5)
    huge = torch.stack([torch.full((H,), 1e6), torch.full((H,), -1e6)])
    lin_only = torch.cat([torch.ones(H, E), torch.zeros(H, E)])  # prediction sum(x): +8e6, then -8e6
    s = pick_scale(huge, lin_only, torch.zeros(E))
    assert torch.allclose(s[0], torch.full((E,), math.exp(LOG_LIMIT))) and torch.allclose(
        s[1], torch.full((E,), math.exp(-LOG_LIMIT)))
    nan = torch.full((1, H), float("nan"))
    assert torch.equal(pick_scale(nan, w, b), torch.ones(1, E))  # a NaN row counts its picks by weight


def test_page_votes_count_weight_times_scale():
    """demand[e] = sum over voting rows picking e of quantised w * scale; a scale can reverse weight's order."""
    ids = torch.tensor([[0, 1], [1, 2]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    votes = reference.Votes(row_ok=torch.tensor([True, True]), rank=torch.tensor([[0, 1], [0, 1]]),
                            picks=torch.zeros(4, dtype=torch.int64))
    def q(x):  # each pick quantised on its own (fp32 product, 1/65536 units, half up), then summed
        return int(math.floor(float(torch.tensor(x, dtype=torch.float32)) * 65536 + 0.5))

    by_weight = reference.page_votes(votes, w, ids, 4).demand.clone()
    assert by_weight.tolist() == [q(0.7), q(0.3) + q(0.6), q(0.4), 0]
    scale = torch.tensor([[1.0, 0.5, 4.0, 1.0], [1.0, 0.5, 4.0, 1.0]])
    by_output = reference.page_votes(votes, w, ids, 4, scale).demand
    assert by_output.tolist() == [q(0.7), q(0.15) + q(0.3), q(1.6), 0]  # expert 2 now outranks 1
    # A row that does not vote adds nothing, scaled or not.
    votes.row_ok = torch.tensor([True, False])
    assert reference.page_votes(votes, w, ids, 4, scale).demand.tolist() == [q(0.7), q(0.15), 0, 0]


# ----------------------------------------------------------------------------- the served decisions


def test_budget_ranked_by_output_share_equals_the_row_by_row_oracle(paged):
    """16 steps in time order on SGLang's residency: the stage's ids and weights are the oracle's with each pick
    counted as w * exp(head(x)) and no best-pick guard; the ranking differs from routed weight's on some steps, and
    no step pages more than the budget (rows' best picks included)."""
    layer = _paged_layer(paged, 0)
    dr = layer.quant_method.device_executor.residency
    head = _head(spread=1.5)
    st = _stage(_budget_opts(), dr.expert_slot, head)
    by_weight = _stage(_budget_opts(), dr.expert_slot, None)
    differ = over = 0  # over: steps whose rows' best picks alone exceed the budget (the weight rule's bound)
    for step in range(16):
        out, x = _batch(200 + step), _hidden(step)
        resident = dr.expert_slot >= 0
        ids, w = _run(st, out, x)
        want_ids, want_w, _ = _budget_oracle(LynxPolicy(max_moved_weight=CAP), BUDGET, out.router_logits,
                                             out.topk_ids, out.topk_weights, resident, _predicted(x, head))
        assert torch.equal(ids, want_ids) and torch.equal(w, want_w.to(w.dtype)), step
        pages = {e for e in ids.flatten().tolist() if not resident[e]}
        assert len(pages) <= BUDGET, step
        over += len({int(row[0]) for row in out.topk_ids if not resident[int(row[0])]}) > BUDGET
        differ += not torch.equal(ids, _run(by_weight, out, None)[0])
        _eager_step(paged, layer, ids)
    assert differ >= 4, differ
    assert over >= 4, over  # the bound is the budget even where best picks alone would exceed it


def test_a_mixed_batch_reads_the_hidden_states_of_its_decode_rows(paged):
    layer = _paged_layer(paged, 0)
    dr = layer.quant_method.device_executor.residency
    _eager_step(paged, layer, torch.tensor([[9, 17, 30, 2]]))
    head = _head(1, spread=1.5)
    st = _stage(_budget_opts(), dr.expert_slot, head)
    out, x = _batch(7, rows=T + 5), _hidden(7, rows=T + 5)
    with published(mixed(T)):
        got = st(out, None, x)
    sel = ExpertSelector(ROUTER, _budget_opts().make_policy(), 64, residency=dr.expert_slot, output_norms=head)
    want_ids, want_w = sel.run(out.router_logits[5:], out.topk_ids[5:], out.topk_weights[5:], None, x[5:])
    assert torch.equal(got.topk_ids[5:], want_ids) and torch.equal(got.topk_weights[5:], want_w)
    assert torch.equal(got.topk_ids[:5], out.topk_ids[:5])  # extend rows untouched


# ----------------------------------------------------------------------------- refusals


def test_selector_refusals_and_run_checks():
    slot = torch.full((E,), -1, dtype=torch.int32)
    head = _head()
    budget = make_policy("lynx", residency="prefer", residency_page_budget=4)
    for policy, residency in ((make_policy("lynx", residency="prefer"), slot),  # no budget
                              (make_policy("lynx", residency="keep"), slot),
                              (budget, None)):  # not a paged layer
        with pytest.raises(ConfigError, match="output norms rank a paged layer's page budget"):
            ExpertSelector(ROUTER, policy, 8, residency=residency, output_norms=head)
    with pytest.raises(ConfigError, match=r"output_norms head has shapes \(16, 31\) / \(32,\)"):
        ExpertSelector(ROUTER, budget, 8, residency=slot, output_norms=(head[0][:, :-1], head[1]))
    with pytest.raises(ConfigError, match="output_norms head is for 31 experts, the model has 32"):
        ExpertSelector(ROUTER, budget, 8, residency=slot, output_norms=(head[0][:, :-1], head[1][:-1]))
    with pytest.raises(ConfigError, match="NaN or inf"):
        ExpertSelector(ROUTER, budget, 8, residency=slot, output_norms=(head[0], head[1] * float("nan")))
    sel = ExpertSelector(ROUTER, budget, 32, residency=slot, output_norms=head)
    out = _batch(0)
    with pytest.raises(ValueError, match=r"needs hidden_states \[16, 8\]"):
        sel.run(out.router_logits, out.topk_ids, out.topk_weights)
    with pytest.raises(ValueError, match=r"needs hidden_states \[16, 8\]"):
        sel.run(out.router_logits, out.topk_ids, out.topk_weights, None, _hidden(0)[:, :-1])
    plain = ExpertSelector(ROUTER, budget, 32, residency=slot)
    with pytest.raises(ValueError, match="planned with output_norms only"):
        plain.run(out.router_logits, out.topk_ids, out.topk_weights, None, _hidden(0))
    with pytest.raises(ValueError, match="pick_scale ranks a paged layer's page budget"):
        reference.select(make_policy("lynx"), ROUTER, out.router_logits, out.topk_ids, out.topk_weights,
                         pick_scale=torch.ones(T, E))


def test_stage_without_hidden_states_refuses(paged):
    layer = _paged_layer(paged, 0)
    st = _stage(_budget_opts(), layer.quant_method.device_executor.residency.expert_slot, _head())
    with pytest.raises(RuntimeError, match="need the MoE block's hidden states"):
        _run(st, _batch(0), None)


def test_flags(tmp_path):
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    base = ["--moe-backend", "lynx", "--lynx-residency", "prefer"]
    opts = options_from_args(parser.parse_args(base + ["--lynx-residency-page-budget", "8",
                                                       "--lynx-residency-output-norms", "heads.safetensors"]))
    assert opts.output_norms.endswith("/heads.safetensors") and opts.output_norms.startswith("/")
    with pytest.raises(ConfigError, match="needs --lynx-policy lynx with --lynx-residency prefer and "
                                          "--lynx-residency-page-budget"):
        options_from_args(parser.parse_args(base + ["--lynx-residency-output-norms", "h"]))
    with pytest.raises(ConfigError, match="only take effect with --moe-backend lynx"):
        options_from_args(parser.parse_args(["--lynx-residency-output-norms", "h"]))
    # A per-layer plan's budget is enough.
    LynxOptions(moe_backend="lynx", params={"residency": "prefer"}, layer_params={3: {"residency_page_budget": 4}},
                output_norms="h").validate()


# ----------------------------------------------------------------------------- the file


def _identity(num_experts=16, hidden_size=None):
    cfg = SimpleNamespace(num_experts=num_experts)
    if hidden_size is not None:
        cfg.hidden_size = hidden_size
    return model_identity(cfg)


def test_file_round_trip_and_refusals(tmp_path):
    heads = {0: _head(0, 16), 1: _head(1, 16)}
    path = tmp_path / "n.safetensors"
    save_output_norms(path, OutputNorms(heads, _identity(16, H), {"tokens": 64}))
    got = load_output_norms(path, _identity(16, H), [0, 1])
    assert all(torch.equal(got.heads[i][0], heads[i][0]) and torch.equal(got.heads[i][1], heads[i][1]) for i in heads)
    assert got.meta == {"tokens": 64}
    with pytest.raises(ConfigError, match="no head for MoE layer"):
        load_output_norms(path, _identity(16, H), [0, 1, 2])
    with pytest.raises(ConfigError, match="made for|differs|num_experts"):
        load_output_norms(path, _identity(32, H), [0])
    with pytest.raises(ConfigError, match="cannot read"):
        load_output_norms(tmp_path / "missing.safetensors", _identity(16, H), [0])
    # Shapes against the identity the file claims: a head of another width is refused at save and at load.
    with pytest.raises(ConfigError, match="reads 16 features, the model has hidden size 4"):
        save_output_norms(path, OutputNorms(heads, _identity(16, 4)))
    with pytest.raises(ConfigError, match="NaN or inf"):
        save_output_norms(path, OutputNorms({0: (heads[0][0] * float("inf"), heads[0][1])}, _identity(16, H)))
    from safetensors.torch import save_file

    import json
    bad = tmp_path / "bad.safetensors"
    meta = {"lynx": json.dumps({"format": FORMAT, "identity": _identity(16, H)})}
    save_file({"layer.0.weight": heads[0][0]}, str(bad), metadata=meta)
    with pytest.raises(ConfigError, match="layer 0 lacks its bias"):
        load_output_norms(bad, _identity(16, H), [0])
    save_file({"layer.0.weight": heads[0][0], "layer.0.bias": heads[0][1]}, str(bad),
              metadata={"lynx": json.dumps({"format": "lynx-sere-similarity/1", "identity": _identity(16, H)})})
    with pytest.raises(ConfigError, match="is not a lynx-output-norms/1 file"):
        load_output_norms(bad, _identity(16, H), [0])


def test_build_stages_loads_the_heads_and_the_topk_hook_hands_over_hidden_states(sglang_layers, paged, tmp_path):
    topks = [_topk(sglang_layers, i) for i in range(2)]
    moes = [_paged_layer(paged, i, num_experts=16, num_slots=4) for i in range(2)]
    heads = {0: _head(0, 16, spread=1.5), 1: _head(1, 16, spread=1.5)}
    path = tmp_path / "n.safetensors"
    cfg = SimpleNamespace(num_experts=16, model_type="qwen3_moe")
    save_output_norms(path, OutputNorms(heads, model_identity(cfg)))
    opts = LynxOptions(moe_backend="lynx", policy="lynx", params={"residency": "prefer", "residency_page_budget": 1},
                       max_batch=64, output_norms=str(path))
    stages = stage_mod.build_stages(_Model([*topks, *moes]), cfg, opts)
    assert all(torch.equal(st.selector.output_norms[0], heads[i][0]) for i, st in enumerate(stages))
    x, z = torch.randn(12, 8), torch.randn(12, 16) * 3
    with published(DECODE):
        got = topks[0](x, z)
    w, ids = torch.softmax(z, -1).topk(4, -1)
    policy = opts.make_policy()
    want_ids, _, _ = reference.select(policy, RouterSpec(16, 4), z, ids.to(torch.int32), w / w.sum(-1, keepdim=True),
                                      resident=torch.arange(16) < 4, pick_scale=_predicted(x, heads[0]))
    assert torch.equal(got.topk_ids, want_ids)
    # A file made for another model, or missing a paged layer, is refused at start-up.
    save_output_norms(path, OutputNorms(heads, model_identity(SimpleNamespace(num_experts=16, model_type="other"))))
    with pytest.raises(ConfigError, match="output-norm file .*model_type"):
        stage_mod.build_stages(_Model([*topks, *moes]), cfg, opts)
    save_output_norms(path, OutputNorms({0: heads[0]}, model_identity(cfg)))
    with pytest.raises(ConfigError, match=r"no head for MoE layer\(s\) \[1\]"):
        stage_mod.build_stages(_Model([*topks, *moes]), cfg, opts)


# ----------------------------------------------------------------------------- CUDA-graph safety


def test_decode_step_with_output_norms_needs_no_host(paged):
    layer = _paged_layer(paged, 0)
    dr = layer.quant_method.device_executor.residency
    _eager_step(paged, layer, torch.tensor([[9, 17, 30, 2]]))
    st = _stage(_budget_opts(), dr.expert_slot, _head())
    out, x, num_valid = _batch(3), _hidden(3), torch.tensor(T - 2)
    with published(DECODE):
        st(out, num_valid, x)  # warm-up (plan-time allocations)
        with OpAudit() as audit:
            got = st(out, num_valid, x)
    assert audit.findings == [], [(f.kind, f.op, f.where) for f in audit.findings]
    assert torch.equal(got.topk_ids[T - 2:], out.topk_ids[T - 2:])


# ----------------------------------------------------------------------------- the calibration tool


def test_fit_head_recovers_a_linear_log_norm_and_r_squared_measures_it():
    g = torch.Generator().manual_seed(0)
    f = features(torch.randn(400, H, generator=g))
    w, b = _head(3)
    y = (f @ w + b).T  # [E, N]
    fw, fb = fit_head(f, y, ridge=1e-6)
    assert torch.allclose(fw, w, atol=1e-3) and torch.allclose(fb, b, atol=1e-3)
    assert r_squared((fw, fb), f, y) > 0.999
    noise = torch.randn(E, 400, generator=g)
    assert r_squared(fit_head(f[:200], noise[:, :200]), f[200:], noise[:, 200:]) < 0.1


def test_the_shipped_glm4_heads_predict_expert_output_norms_on_held_out_text():
    """The file beside the bundled glm4 (made by the tool) loads for that model (identity checked) and explains
    over half of the variance of every expert's log output norm on held-out text, in every MoE layer."""
    from benchmarks.bench_offload import ROOT, model_output_norms
    from lynx_sglang import accuracy
    from lynx_sglang.sere_calibrate import block_inputs

    model, tokenizer = accuracy.load_model(ROOT / "models" / "trained-glm4-moe")
    heads = model_output_norms(model, ROOT / "models" / "trained-glm4-moe")
    windows = torch.stack([s[:64] for s in accuracy.domain_streams(tokenizer).values()])
    for head, block, x in zip(heads, accuracy.moe_blocks(model), block_inputs(model, windows)):
        assert r_squared(head, features(x), log_output_norms(block.experts, x)) > 0.5


def test_the_calibration_tool_writes_a_file_the_server_loads(tmp_path, capsys):
    """python -m lynx_sglang.output_norm_calibrate on a bundled model: a file for every MoE layer that loads for
    that model, whose held-out R^2 (metadata and printout) says the head explains part of the variance."""
    import json

    from lynx_sglang import accuracy, output_norm_calibrate
    from lynx_sglang.sere_calibrate import BUNDLED_MODELS

    model_dir = BUNDLED_MODELS / "trained-qwen3-moe"
    out = tmp_path / "heads.safetensors"
    output_norm_calibrate.main([str(model_dir), "--tokens", "2048", "--out", str(out)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, _ = accuracy.load_model(model_dir)
    loaded = load_output_norms(out, model_identity(model.config), accuracy.moe_layer_ids(model))
    assert sorted(loaded.heads) == accuracy.moe_layer_ids(model)
    assert loaded.meta["tokens"] == 2048 and set(loaded.meta["held_out_r2"]) == {str(i) for i in loaded.heads}
    assert all(0.2 < r < 1 for r in printed["held_out_r2"].values())
    with pytest.raises(SystemExit, match="not a bundled model"):
        output_norm_calibrate.run(tmp_path, out=out)
