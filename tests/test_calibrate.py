"""Calibration to a KL budget (lynx_sglang.calibrate): bad input, the search, the file, and serving it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lynx_sglang import ConfigError
from lynx_sglang import calibrate as C
from lynx_sglang.runtime.selection.model_identity import model_identity
from lynx_sglang.runtime.selection.config import LynxPolicy, make_policy
from lynx_sglang.runtime.sglang import stage
from lynx_sglang.runtime.sglang.options import ENV_VAR, LynxOptions
from test_sglang_hooks import _Model, _parse, _topk, sglang_layers  # noqa: F401  (module fixture)

MODEL = Path(__file__).resolve().parent.parent / "models" / "trained-qwen3-moe"
# A tiny real calibration: B=8, 8 decode steps, two knob values, one held-out batch per kind.
TINY = C.Settings(batch_sizes=(8,), batches_per_kind=1, heldout_batches_per_kind=1, prefix=8, decode_len=8,
                  grid=[0.2, 1.0])


def _quiet(_msg):
    pass


# ---------------------------------------------------------------------------------------------- bad input


def _model_copy(tmp_path) -> Path:
    """The bundled model outside models/ (so it is not 'bundled' and needs --data)."""
    dst = tmp_path / "model"
    shutil.copytree(MODEL, dst, ignore=shutil.ignore_patterns("*.png", "training_log.jsonl", "sere_*"))
    return dst


def _texts(path: Path, texts, gz=False):
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    path.write_text(lines)
    return path


@pytest.mark.parametrize("budget", ["0", "-0.01", "nan"])
def test_budget_must_be_positive_and_nothing_is_written(tmp_path, budget, capsys):
    out = tmp_path / "cal.json"
    rc = C.main(["--model-path", str(MODEL), "--budget-kl", budget, "--out", str(out)])
    assert rc == 2 and not out.exists() and not list(tmp_path.iterdir())
    assert "--budget-kl must be a positive number" in capsys.readouterr().err


def test_headroom_must_leave_a_budget():
    with pytest.raises(C.CalibrationError, match="--headroom"):
        C.run(MODEL, [0.01], headroom=1.0, log=_quiet)


def test_a_model_outside_models_needs_data(tmp_path, capsys):
    model = _model_copy(tmp_path)
    out = tmp_path / "cal.json"
    assert C.main(["--model-path", str(model), "--budget-kl", "0.01", "--out", str(out)]) == 2
    assert "give calibration text" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("case,msg", [
    ("empty", "holds no text"),
    ("blank lines", "holds no text"),
    ("not json", "not JSON"),
    ("no text key", "string 'text'"),
    ("too small", "too small"),
])
def test_bad_calibration_data_is_refused(tmp_path, case, msg):
    data = tmp_path / "data.jsonl"
    if case == "empty":
        data.write_text("")
    elif case == "blank lines":
        data.write_text("\n\n" + json.dumps({"text": "  "}) + "\n")
    elif case == "not json":
        data.write_text("{oops\n")
    elif case == "no text key":
        data.write_text(json.dumps({"body": "x"}) + "\n")
    else:
        _texts(data, ["def f(x):\n    return x + 1\n"] * 3)
    with pytest.raises(C.CalibrationError, match=msg):
        C.run(_model_copy(tmp_path), [0.01], data=data, settings=TINY, log=_quiet)


def test_own_data_calibrates_a_model_outside_models(tmp_path):
    """--data with its own domains: batches per domain and mixed; the last quarter of each stream is held out."""
    from lynx_sglang.corpus import read_jsonl, HELDOUT

    docs = read_jsonl(HELDOUT)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"domain": "code" if d.domain in ("python", "c") else "prose", "text": d.text})
                            + "\n" for d in docs[::6]))
    report = C.run(_model_copy(tmp_path), [0.01], data=data, settings=TINY, log=_quiet)
    cal = report["calibrations"][0]
    assert set(cal["data"]["calibration"]["tokens"]) == {"code", "prose"}
    assert cal["data"]["heldout"]["source"].startswith("the last 25%")
    assert cal["data"]["calibration"]["sha256"] == C.sha256_of(data)
    assert cal["heldout"]["8"]["sequences"] == 8 * 3  # one batch per domain and one mixed


def test_a_model_without_moe_layers_is_refused(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    dense = tmp_path / "dense"
    cfg = Qwen3Config(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    Qwen3ForCausalLM(cfg).save_pretrained(dense)
    for f in MODEL.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, dense / f.name)
    data = _texts(tmp_path / "data.jsonl", ["x = 1\n" * 2000])
    with pytest.raises(C.CalibrationError, match="no MoE layer"):
        C.run(dense, [0.01], data=data, settings=TINY, log=_quiet)


def test_an_unreadable_model_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    data = _texts(tmp_path / "data.jsonl", ["x = 1\n" * 2000])
    out = tmp_path / "cal.json"
    assert C.main(["--model-path", str(bad), "--budget-kl", "0.01", "--data", str(data), "--out", str(out)]) == 2
    assert "cannot load model" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("policy,refill,msg", [("oea", 8.0, "parameter of policy lynx"),
                                                ("lynx", -1.0, "finite number >= 0"),
                                                ("lynx", float("inf"), "finite number >= 0")])
def test_a_bad_refill_is_refused_before_the_model_loads(policy, refill, msg):
    with pytest.raises(C.CalibrationError, match=msg):
        C.run(MODEL, [0.01], policy=policy, refill_similarity=refill, settings=TINY, log=_quiet)


def test_the_refill_follows_the_similarity_file_unless_given(tmp_path):
    assert C._refill_for(MODEL, "lynx", None) == 8.0  # the file is beside the bundled model
    assert C._refill_for(tmp_path, "lynx", None) == 0.0  # no file: refill by router score, as the server
    assert C._refill_for(MODEL, "lynx", 0.0) == 0.0 and C._refill_for(MODEL, "oea", None) == 0.0


def test_unknown_policy_knob_is_refused():
    with pytest.raises(C.CalibrationError, match="no main knob"):
        C.knob_for("sere")


def test_write_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "cal.json"
    out.write_text("old")
    monkeypatch.setattr(C.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        C.write_atomic(out, {"a": 1})
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["cal.json"]


# ---------------------------------------------------------------------------------------------- the search

# Four layers, five knob values: (KL alone, experts removed per step); layer 2 costs the most.
CURVES = [
    [(0.001, 3.0), (0.003, 5.0), (0.006, 6.5), (0.010, 7.0), (0.020, 7.2)],
    [(0.0005, 2.0), (0.002, 4.5), (0.005, 6.0), (0.011, 7.5), (0.015, 7.6)],
    [(0.004, 2.0), (0.012, 4.0), (0.030, 5.0), (0.050, 5.5), (0.080, 5.6)],
    [(0.001, 2.5), (0.0012, 2.4), (0.004, 5.5), (0.009, 6.0), (0.012, 7.0)],  # a noisy, non-monotone point
]


def _measured(moves):
    """A stand-in for the calibration measurement: super-additive beyond a few moves, with some wobble."""
    def kl(p):
        est = moves[p - 1].est_kl if p else 0.0
        return est * (1.0 + 0.04 * p) + (0.0007 if p % 3 == 0 else 0.0)
    return kl


def test_the_search_is_deterministic_and_monotone_in_the_budget():
    moves = C.greedy_moves(CURVES)
    assert moves == C.greedy_moves(CURVES)
    assert all(b.est_kl >= a.est_kl and b.est_removed > a.est_removed for a, b in zip(moves, moves[1:]))
    kl = _measured(moves)
    removed_prev, p_prev = -1.0, -1
    for budget in [0.0005 * i for i in range(1, 200)]:
        p, _ = C.choose(moves, budget, kl)
        assert (p, _) == C.choose(moves, budget, kl)
        assert p == 0 or kl(p) <= budget  # the measured KL of the chosen plan fits
        removed = moves[p - 1].est_removed if p else 0.0
        assert p >= p_prev and removed >= removed_prev, f"budget {budget}: fewer experts removed"
        p_prev, removed_prev = p, removed


def test_the_search_backs_off_and_moves_on_from_the_estimate():
    moves = C.greedy_moves(CURVES)
    start = C.longest_fitting(moves, 0.02)
    over = lambda p: 1.0 if p >= start - 1 else 0.0  # noqa: E731  the estimate's last two prefixes are too costly
    assert C.choose(moves, 0.02, over) == (start - 2, -2)
    assert C.choose(moves, 0.02, lambda p: 0.0) == (len(moves), len(moves) - start)  # everything fits


def test_global_curve_interpolation():
    assert C.global_removed_at([0.01, 0.02], [10.0, 14.0], 0.015) == (12.0, True)
    assert C.global_removed_at([0.01, 0.02], [10.0, 14.0], 0.005) == (5.0, True)  # between off and the first
    assert C.global_removed_at([0.01, 0.02], [10.0, 14.0], 0.05) == (14.0, False)  # past the last point
    assert C.global_removed_at([0.02, 0.01], [9.0, 10.0], 0.015) == (10.0, False)  # dominated point skipped


# ---------------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def tiny_report():
    torch.set_num_threads(1)
    return C.run(MODEL, [0.002, 0.05], settings=TINY, compare_global=True, log=_quiet)


def test_the_tool_writes_a_servable_file_for_the_bundled_model(tiny_report, tmp_path):
    from transformers import AutoConfig

    small, big = tiny_report["calibrations"]
    for cal in (small, big):
        assert cal["format"] == "lynx-calibration/2" and cal["policy"] == "lynx"
        # The bundled model has its similarity file: calibrated with the refill the server applies by default.
        # Format 2 writes out every other parameter, so a later change of a default cannot change the file.
        assert cal["base_params"]["refill_similarity"] == 8.0 and cal["base_params"]["keep_level"] == 0
        assert "max_moved_weight" not in cal["base_params"] and "name" not in cal["base_params"]
        # keep_top written resolved for the model (top-4: 1), not as "the default of the day".
        assert make_policy("lynx", **cal["base_params"]) == make_policy("lynx", refill_similarity=8.0, keep_top=1)
        assert cal["data"]["similarity"]["path"].endswith("sere_similarity.safetensors")
        assert cal["identity"] == model_identity(AutoConfig.from_pretrained(MODEL))
        assert (cal["num_experts"], cal["top_k"], cal["scoring"]) == (32, 4, "softmax")
        assert sorted(cal["layer_params"]) == ["0", "1", "2", "3"] and cal["moe_layers"] == [0, 1, 2, 3]
        assert cal["data"]["calibration"]["path"].endswith("calibration.jsonl.gz")
        assert len(cal["data"]["calibration"]["sha256"]) == 64
        assert cal["data"]["heldout"]["source"].endswith("heldout.jsonl.gz")
        held = cal["heldout"]["8"]
        assert held["kl_ci"] is not None and held["delta_points_ci"] is not None
        assert set(held["per_layer"]) == {"0", "1", "2", "3"}
        # What the server's moved-weight metric should read per layer: a share of a renormalised row's weight,
        # bounded by the layer's calibrated cap wherever the layer re-routes.
        for lid, row in held["per_layer"].items():
            params = cal["layer_params"][lid]
            if params is None or row["experts_after"] == row["experts_before"]:
                continue
            cap = params["max_moved_weight"]
            assert 0 < row["moved_per_rerouted_token"] <= cap + 1e-4, (lid, row, params)
        assert "8" in cal["global_comparison"] and "gain_ci" in cal["global_comparison"]["8"]
        assert cal["search"]["measured_kl"] <= cal["budget_kl"]
    # A bigger budget never removes fewer experts (same moves, measured on the same calibration batches).
    assert big["search"]["moves_taken"] >= small["search"]["moves_taken"]
    assert (big["search"]["per_batch_size"]["8"]["removed_per_step"]
            >= small["search"]["per_batch_size"].get("8", {"removed_per_step": 0.0})["removed_per_step"])
    path = tmp_path / "cal.json"
    C.write_atomic(path, big)
    opts = LynxOptions.from_file(str(path))
    assert opts.enabled and opts.policy == "lynx" and sorted(opts.layer_params) == [0, 1, 2, 3]


def test_the_measurement_is_deterministic(tiny_report):
    again = C.run(MODEL, [0.05], settings=TINY, log=_quiet)["calibrations"][0]
    first = tiny_report["calibrations"][1]
    assert again["layer_params"] == first["layer_params"]
    assert again["search"]["curves"] == first["search"]["curves"]
    assert again["heldout"]["8"]["kl"] == first["heldout"]["8"]["kl"]


# ---------------------------------------------------------------------------------------------- serving the file

_CONFIG = SimpleNamespace(model_type="qwen3_moe", num_experts=16, num_hidden_layers=2, num_experts_per_tok=4,
                          hidden_size=32)


def _cal_file(path, layer_params, config=_CONFIG, **over):
    payload = {"format": "lynx-calibration/2", "policy": "lynx", "base_params": {}, "layer_params": layer_params,
               "budget_kl": 0.01, "identity": model_identity(config), "num_experts": config.num_experts,
               "top_k": config.num_experts_per_tok, "scoring": "softmax", **over}
    C.write_atomic(path, payload)
    return str(path)


def test_each_layer_gets_its_own_policy_and_a_null_layer_none(sglang_layers, tmp_path, caplog):
    layers = [_topk(sglang_layers, i) for i in range(3)]
    cfg = SimpleNamespace(**{**vars(_CONFIG), "num_hidden_layers": 3})
    path = _cal_file(tmp_path / "cal.json", {"0": {"max_moved_weight": 0.3}, "1": {"max_moved_weight": 0.9},
                                             "2": None}, config=cfg)
    opts = LynxOptions.from_file(path)
    opts = LynxOptions(**json.loads(json.dumps(dataclasses.asdict(opts))))  # through the environment's JSON
    with caplog.at_level("INFO"):
        stages = stage.build_stages(_Model(layers), cfg, opts)
    assert [s.layer_id for s in stages] == [0, 1]
    assert [s.selector.policy.max_moved_weight for s in stages] == [0.3, 0.9]
    assert "layer 2: selection off" in caplog.text and "max_moved_weight=0.9" in caplog.text


def test_a_format_1_file_keeps_the_defaults_it_was_made_with(tmp_path):
    """Format 1 files relied on the defaults of their time (lynx keep_level 1); read today they must run that,
    not the new default, while their own base parameters still win; an unknown format is refused."""
    old = LynxOptions.from_file(_cal_file(tmp_path / "v1.json", {"0": {"max_moved_weight": 0.3}},
                                          format="lynx-calibration/1"))
    assert old.make_policy(0).keep_level == 1 and old.make_policy(0).max_moved_weight == 0.3
    own = LynxOptions.from_file(_cal_file(tmp_path / "v1b.json", {"0": {"max_moved_weight": 0.3}},
                                          format="lynx-calibration/1", base_params={"keep_level": 0}))
    assert own.make_policy(0).keep_level == 0
    new = LynxOptions.from_file(_cal_file(tmp_path / "v2.json", {"0": {"max_moved_weight": 0.3}}))
    assert new.make_policy(0).keep_level == LynxPolicy().keep_level == 0
    with pytest.raises(ConfigError, match="unknown format 'lynx-calibration/3'"):
        LynxOptions.from_file(_cal_file(tmp_path / "v3.json", {"0": None}, format="lynx-calibration/3"))


@pytest.mark.parametrize("case,msg", [
    ("other model", "was made for another model: hidden_size is 64 there, 32 in the model being served"),
    ("missing layer", r"it has no setting for layer\(s\) \[1\]"),
    ("extra layer", r"settings for layer\(s\) \[5\] the model has no MoE on"),
    ("top_k", "top_k is 2 there, 4 on layer 0"),
    ("scoring", "scoring is 'sigmoid' there, 'softmax' on layer 0"),
])
def test_a_file_for_another_model_is_refused_at_start_up(sglang_layers, tmp_path, case, msg):
    plan = {"0": {"max_moved_weight": 0.3}, "1": {"max_moved_weight": 0.5}}
    over = {}
    config = _CONFIG
    if case == "other model":
        config = SimpleNamespace(**{**vars(_CONFIG), "hidden_size": 64})
    elif case == "missing layer":
        del plan["1"]
    elif case == "extra layer":
        plan["5"] = None
    elif case == "top_k":
        over = {"top_k": 2}
    else:
        over = {"scoring": "sigmoid"}
    opts = LynxOptions.from_file(_cal_file(tmp_path / "cal.json", plan, config=config, **over))
    layers = [_topk(sglang_layers, i) for i in range(2)]
    with pytest.raises(ConfigError, match=msg):
        stage.build_stages(_Model(layers), _CONFIG, opts)
    assert not any(hasattr(t, stage.STAGE_ATTR) for t in layers)


def test_flags_that_would_change_the_plan_are_refused_with_a_calibration_file(sglang_layers, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    from sglang.srt.server_args import ServerArgs

    path = _cal_file(tmp_path / "cal.json", {"0": {"max_moved_weight": 0.3}, "1": None})
    for flag in (["--lynx-max-moved-weight", "0.5"], ["--lynx-policy", "oea"], ["--lynx-layers", "0"]):
        with pytest.raises(ConfigError, match="is a calibration file"):
            ServerArgs.from_cli_args(_parse(["--lynx-config", path, *flag]))
    ServerArgs.from_cli_args(_parse(["--lynx-config", path, "--lynx-max-batch", "256"]))
    opts = LynxOptions.from_env()
    assert opts.enabled and opts.max_batch == 256 and opts.layer_params == {0: {"max_moved_weight": 0.3}, 1: None}
    assert opts.make_policy(0).max_moved_weight == 0.3 and not opts.layer_enabled(1)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "lynx-calibration/9"}))
    with pytest.raises(ConfigError, match="unknown format"):
        LynxOptions.from_file(str(bad))
    bad.write_text(json.dumps({"format": "lynx-calibration/1", "policy": "lynx", "layer_params": {"0": {"alpha": -1}},
                               "identity": {}, "num_experts": 16, "top_k": 4, "scoring": "softmax"}))
    with pytest.raises(ConfigError, match="layer 0 of the per-layer plan"):
        LynxOptions.from_file(str(bad)).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU server test (launch/cpu_server.sh)")
def test_a_cpu_server_applies_the_file_per_layer(tmp_path):
    """One real server on the bundled model: layer 0 off, layer 2 capped at 0 (nothing may move), layers 1 and 3
    uncapped; the lynx:* metrics must show exactly that pattern."""
    from transformers import AutoConfig

    from lynx_sglang.client import PROMPTS, complete, scrape_lynx_metrics
    from lynx_sglang.server_process import DEFAULT_MODEL, running_server

    config = AutoConfig.from_pretrained(DEFAULT_MODEL)
    payload = {"format": "lynx-calibration/2", "policy": "lynx", "base_params": {}, "budget_kl": 0.01,
               "layer_params": {"0": None, "1": {"max_moved_weight": 1.0}, "2": {"max_moved_weight": 0.0},
                                "3": {"max_moved_weight": 1.0}},
               "identity": model_identity(config), "num_experts": 32, "top_k": 4, "scoring": "softmax"}
    path = tmp_path / "cal.json"
    C.write_atomic(path, payload)
    with running_server("--dtype", "float32", "--lynx-config", str(path), "--enable-metrics",
                        "--decode-log-interval", "1", log_dir=tmp_path) as srv:
        answers = complete(srv.url, PROMPTS * 2, max_tokens=16, concurrency=16)
        layers = scrape_lynx_metrics(srv.url)
    assert len(answers) == 2 * len(PROMPTS)
    assert sorted(layers) == [1, 2, 3], "layer 0 is off in the file: it must have no stage"
    for layer in (1, 3):
        c = layers[layer]
        assert c.steps > 0 and c.mean_experts_after < c.mean_experts_before and c.rows_changed > 0
        assert 0 < c.moved_per_rerouted_token <= 1.0  # renormalised rows: at most their whole weight
    c = layers[2]
    assert c.steps > 0 and c.rows_changed == 0 and c.mean_experts_after == c.mean_experts_before
    assert c.moved_weight == 0
