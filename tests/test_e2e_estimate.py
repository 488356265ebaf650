"""The end-to-end estimate (benchmarks/e2e_estimate.py) and its "other" benchmark (benchmarks/bench_decode_other.py):
the arithmetic on hand-made inputs, refusal of files from different devices or shapes, the decode attention
against a plain reference, and both benchmarks run in tiny CPU configurations feeding the estimator."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from benchmarks import bench_decode_other as bd
from benchmarks import e2e_estimate as ee

ENV = {"device_type": "cuda", "device": "NVIDIA H100 80GB HBM3", "commit": "abc", "date": "2026-01-01"}


def _moe(env=ENV):
    """A bench_moe_layer-shaped file: qwen3-30b-a3b, B = 16, trace routing, off / lynx / oea."""
    rows = [{"shape": "qwen3-30b-a3b", "B": 16, "routing": "trace", "policy": p, "time_us": t,
             "selection_us": s, "experts_before": 80.0, "experts_after": a}
            for p, t, s, a in (("off", 300.0, 0.0, 80.0), ("lynx", 200.0, 10.0, 30.0), ("oea", 250.0, 8.0, 50.0))]
    rows.append({"shape": "qwen3-30b-a3b", "B": 64, "routing": "trace", "error": "failed point"})  # ignored
    return {"dtype": "bfloat16", "relative_only": False, "environment": dict(env),
            "shapes": {"qwen3-30b-a3b": {"hidden": 2048, "experts": 128, "top_k": 8}}, "results": rows}


def _other(env=ENV, layers=2):
    """A bench_decode_other-shaped file: 2 layers, B = 16 at L = 1024, 100 us per layer, 500 us per step."""
    return {"dtype": "bfloat16", "relative_only": False, "environment": dict(env),
            "model": {"name": "qwen3-30b-a3b", "hidden": 2048, "experts": 128, "top_k": 8, "layers": layers},
            "results": [
                {"scope": "per_layer", "part": "layer_total", "B": 16, "L": 1024, "time_us": 100.0},
                {"scope": "per_layer", "part": "attention", "B": 16, "L": 1024, "time_us": 60.0},  # not used
                {"scope": "per_step", "part": "step_total", "B": 16, "L": None, "time_us": 500.0},
                {"scope": "per_step", "part": "lm_head", "B": 16, "L": None, "time_us": 450.0},  # not used
            ]}


def test_estimate_arithmetic_exact():
    est = ee.estimate(_moe(), _other(), batches=[16, 64])
    by = {r["policy"]: r for r in est["results"]}
    assert set(by) == {"off", "lynx", "oea"}
    # off: 2 * (100 + 300) + 500 = 1300; lynx: 2 * (100 + 200) + 500 = 1100; oea: 2 * (100 + 250) + 500 = 1200
    assert [by[p]["step_us"] for p in ("off", "lynx", "oea")] == [1300.0, 1100.0, 1200.0]
    assert by["lynx"]["speedup"] == pytest.approx(13 / 11, rel=1e-12)
    assert by["oea"]["speedup"] == pytest.approx(13 / 12, rel=1e-12)
    assert by["off"]["speedup"] == 1.0
    assert by["lynx"]["moe_layer_speedup"] == pytest.approx(1.5, rel=1e-12)
    assert by["lynx"]["other_step_us"] == 700.0 and by["lynx"]["moe_step_us"] == 400.0
    assert by["lynx"]["moe_share"] == pytest.approx(400 / 1100, rel=1e-12)
    assert by["lynx"]["tokens_per_s"] == pytest.approx(16 / 1100e-6, rel=1e-12)
    assert by["lynx"]["vs_paper"] == "within"  # 1.1818 in [1.14, 1.22]
    assert by["oea"]["vs_paper"] is None  # the paper's figure is Lynx's
    assert est["relative_only"] is False and est["label"] is None
    assert any("B=64" in m for m in est["missing"])  # asked for, measured in neither file
    assert any("selection included" in a for a in est["assumptions"])
    assert any("TP = 1" in a for a in est["assumptions"])


def test_paper_position_and_missing_policy():
    assert ee.paper_position(1.10) == "below" and ee.paper_position(1.30) == "above"
    moe = _moe()
    moe["results"] = [r for r in moe["results"] if r.get("policy") != "oea"]  # oea is optional
    est = ee.estimate(moe, _other(layers=48))
    lynx = next(r for r in est["results"] if r["policy"] == "lynx")
    assert lynx["step_us"] == 48 * 300.0 + 500.0
    assert not any("oea" in m for m in est["missing"])


@pytest.mark.parametrize("field,value", [("device", "NVIDIA H200"), ("device_type", "cpu")])
def test_refuses_different_devices(field, value, tmp_path):
    other_env = dict(ENV, **{field: value})
    with pytest.raises(ee.DeviceMismatch):
        ee.estimate(_moe(), _other(env=other_env))
    (tmp_path / "m.json").write_text(json.dumps(_moe()))
    (tmp_path / "o.json").write_text(json.dumps(_other(env=other_env)))
    with pytest.raises(ee.DeviceMismatch):
        ee.main(["--moe", str(tmp_path / "m.json"), "--other", str(tmp_path / "o.json"),
                 "--out", str(tmp_path / "e"), "--no-plot"])
    assert not (tmp_path / "e.json").exists()


def test_refuses_shape_mismatch_and_no_overlap():
    other = _other()
    other["model"]["hidden"] = 4096
    with pytest.raises(ValueError, match="shape mismatch"):
        ee.estimate(_moe(), other)
    other = _other()
    other["results"][0]["B"] = 32  # no (B, L) in common with the MoE file
    with pytest.raises(ValueError, match="no point"):
        ee.estimate(_moe(), other, batches=[16])


def test_decode_attention_matches_reference():
    s = bd.SHAPES["tiny"]
    cos, sin = bd.rope_tables(s, 8, torch.device("cpu"), torch.float32)
    lay = bd.Layer(s, 3, 8, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0), cos, sin)
    g = s.heads // s.kv_heads
    k, v = lay.k_cache.repeat_interleave(g, 1), lay.v_cache.repeat_interleave(g, 1)
    p = (torch.einsum("bhd,bhld->bhl", lay.q, k) / s.head_dim ** 0.5).softmax(-1)
    ref = torch.einsum("bhl,bhld->bhd", p, v).reshape(3, -1)
    for form in ("grouped", "gqa"):
        assert torch.allclose(lay.attention(form=form), ref, atol=1e-5)
    h2, r2, (w, ids) = lay.layer_total()
    assert h2.shape == (3, s.hidden) and ids.shape == (3, s.top_k)
    assert torch.allclose(w.sum(-1), torch.ones(3))
    assert torch.equal(lay.k_cache[:, :, -1], lay.qk_norm_rope(lay.qkv_proj(
        torch.nn.functional.rms_norm(lay.x + lay.residual, (s.hidden,), lay.w_in_norm, s.rms_eps)))[1])


def test_tiny_cpu_benchmarks_feed_the_estimator(tmp_path):
    """bench_decode_other and bench_moe_layer (tiny shapes, CPU) -> the estimator reads both -> JSON + PNG."""
    from benchmarks import bench_moe_layer as bm

    threads = torch.get_num_threads()
    other = bd.main(["--shape", "tiny", "--batches", "2,3", "--contexts", "8", "--reps", "2",
                     "--out", str(tmp_path / "other")])
    saved = json.loads((tmp_path / "other.json").read_text())
    assert saved["relative_only"] is True and saved["label"] == bd.LABEL_CPU
    assert saved["model"]["layers"] == 2 and saved["environment"]["device_type"] == "cpu"
    for k in ("date", "commit", "torch", "device"):
        assert k in saved["environment"]
    parts = {(r["scope"], r["part"], r["B"], r["L"]) for r in saved["results"]}
    for B in (2, 3):
        assert ("per_layer", "layer_total", B, 8) in parts and ("per_step", "step_total", B, None) in parts
        for p in bd.LAYER_PARTS:
            assert ("per_layer", p, B, 8) in parts
    for r in saved["results"]:
        assert r["time_us"] > 0 and len(r["times_us"]) == 2 and r["min_us"] <= r["time_us"]
    assert torch.get_num_threads() == threads  # restored

    bm.main(["--shapes", "tiny", "--batches", "2,3", "--routing", "random", "--reps", "1", "--kernel", "torch_loop",
             "--peak-mib", "1", "--out", str(tmp_path / "moe"), "--no-plot"])
    est = ee.main(["--moe", str(tmp_path / "moe.json"), "--other", str(tmp_path / "other.json"), "--shape", "tiny",
                   "--batches", "2,3", "--out", str(tmp_path / "e2e")])
    assert est["relative_only"] is True and est["label"] == ee.LABEL_CPU
    got = {(r["B"], r["policy"]) for r in est["results"]}
    assert {(2, "off"), (2, "lynx"), (3, "off"), (3, "lynx")} <= got
    o = {r["B"]: r for r in saved["results"] if r["part"] == "layer_total"}
    s = {r["B"]: r for r in saved["results"] if r["part"] == "step_total"}
    for r in est["results"]:
        assert r["step_us"] == pytest.approx(2 * (o[r["B"]]["time_us"] + r["moe_layer_us"]) + s[r["B"]]["time_us"])
    assert json.loads((tmp_path / "e2e.json").read_text())["results"] == est["results"]
    assert (tmp_path / "e2e.png").stat().st_size > 10_000
    # the same inputs with the device renamed are refused
    bad = copy.deepcopy(saved)
    bad["environment"]["device"] = "elsewhere"
    with pytest.raises(ee.DeviceMismatch):
        ee.estimate(json.loads((tmp_path / "moe.json").read_text()), bad, shape="tiny")
