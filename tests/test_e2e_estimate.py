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


class _FakeCost:
    """A fake CPU clock (``bench_moe_layer.CPU_CLOCKS['cpu']``, which both benchmarks time with) that moves only
    by the known cost of the work done: the outermost costed call of a nest pays its own cost."""

    def __init__(self):
        self.us, self.depth = 0.0, 0

    def now(self) -> float:
        return self.us * 1e-6

    def costed(self, fn, cost):
        def wrapped(obj, *a, **kw):
            if self.depth == 0:
                self.us += cost(obj, *a)
            self.depth += 1
            try:
                return fn(obj, *a, **kw)
            finally:
                self.depth -= 1
        return wrapped


def test_tiny_cpu_benchmarks_feed_the_estimator(tmp_path, monkeypatch):
    """bench_decode_other and bench_moe_layer (tiny shapes, CPU) on a fake clock whose costs the test sets ->
    the estimator reads both -> every time, step and speedup is the one the known costs give."""
    from benchmarks import bench_moe_layer as bm

    clock = _FakeCost()
    monkeypatch.setitem(bm.CPU_CLOCKS, "cpu", clock.now)
    monkeypatch.setattr(bm, "measure_peak", lambda *a: {"peak_GBps": 50.0, "method": "fake", "copy_us": []})
    layer_us = lambda B: 40.0 + 10.0 * B  # noqa: E731
    step_us = lambda B: 300.0 + 5.0 * B  # noqa: E731
    part_us = {**{p: 3.0 + i for i, p in enumerate(bd.LAYER_PARTS)},
               **{p: 2.0 + i for i, p in enumerate(bd.STEP_PARTS)}}
    monkeypatch.setattr(bd.Layer, "layer_total",
                        clock.costed(bd.Layer.layer_total, lambda lay: layer_us(lay.x.shape[0])))
    monkeypatch.setattr(bd.Head, "step_total", clock.costed(bd.Head.step_total, lambda head: step_us(head.x.shape[0])))
    for cls, parts in ((bd.Layer, bd.LAYER_PARTS), (bd.Head, bd.STEP_PARTS)):
        for p in parts:
            monkeypatch.setattr(cls, p, clock.costed(getattr(cls, p), lambda obj, *a, p=p: part_us[p]))
    US_PER_EXPERT, SELECT_US = 10.0, 7.0
    real_prepare = bm.TorchLoopMoE.prepare

    def prepare(self, shape, B, dtype, device):
        fn = real_prepare(self, shape, B, dtype, device)

        def timed(x, w, ids, wts):  # costs its distinct experts, counted here from the ids it is handed
            clock.us += US_PER_EXPERT * len({e for e in ids[:, : shape.top_k].reshape(-1).tolist() if e >= 0})
            return fn(x, w, ids, wts)
        return timed
    monkeypatch.setattr(bm.TorchLoopMoE, "prepare", prepare)

    class TimedSelector(bm.ExpertSelector):
        def run(self, *a, **kw):
            clock.us += SELECT_US
            return super().run(*a, **kw)
    monkeypatch.setattr(bm, "ExpertSelector", TimedSelector)

    threads = torch.get_num_threads()
    bd.main(["--shape", "tiny", "--batches", "2,3", "--contexts", "8", "--reps", "2", "--out", str(tmp_path / "other")])
    saved = json.loads((tmp_path / "other.json").read_text())
    assert saved["relative_only"] is True and saved["label"] == bd.LABEL_CPU
    assert saved["model"]["layers"] == 2 and saved["environment"]["device_type"] == "cpu"
    assert torch.get_num_threads() == threads  # restored
    got = {(r["scope"], r["part"], r["B"], r["L"]): r for r in saved["results"]}
    want = {}
    for B in (2, 3):
        want[("per_layer", "layer_total", B, 8)] = layer_us(B)
        want[("per_step", "step_total", B, None)] = step_us(B)
        want.update({("per_layer", p, B, 8): part_us[p] for p in bd.LAYER_PARTS})
        want.update({("per_step", p, B, None): part_us[p] for p in bd.STEP_PARTS})
    assert set(got) == set(want)
    for key, us in want.items():
        assert got[key]["times_us"] == pytest.approx([us, us]) and got[key]["time_us"] == pytest.approx(us), key
    lt = got[("per_layer", "layer_total", 2, 8)]
    assert lt["achieved_GBps"] == pytest.approx(lt["bytes"] / (layer_us(2) * 1e-6) / 1e9)

    bm.main(["--shapes", "tiny", "--batches", "2,3", "--routing", "random", "--reps", "1", "--kernel", "torch_loop",
             "--peak-mib", "1", "--out", str(tmp_path / "moe"), "--no-plot"])
    moe = {(r["B"], r["policy"]): r for r in json.loads((tmp_path / "moe.json").read_text())["results"]}
    assert set(moe) == {(2, "off"), (2, "lynx"), (3, "off"), (3, "lynx")}
    est = ee.main(["--moe", str(tmp_path / "moe.json"), "--other", str(tmp_path / "other.json"), "--shape", "tiny",
                   "--batches", "2,3", "--out", str(tmp_path / "e2e")])
    assert est["relative_only"] is True and est["label"] == ee.LABEL_CPU and est["missing"] == []
    assert sorted((r["B"], r["policy"]) for r in est["results"]) == sorted(moe)

    def full_step(B, policy):  # the decode step the known costs give: 2 layers of (other + MoE) + once per step
        m = moe[(B, policy)]
        moe_us = US_PER_EXPERT * m["experts_after"] + (0.0 if policy == "off" else SELECT_US)
        return 2 * (layer_us(B) + moe_us) + step_us(B), moe_us

    for r in est["results"]:
        step, moe_us = full_step(r["B"], r["policy"])
        assert r["moe_layer_us"] == pytest.approx(moe_us) and r["step_us"] == pytest.approx(step)
        assert r["speedup"] == pytest.approx(full_step(r["B"], "off")[0] / step)
        assert r["tokens_per_s"] == pytest.approx(r["B"] / (step * 1e-6))
        assert r["moe_share"] == pytest.approx(2 * moe_us / step)
    assert json.loads((tmp_path / "e2e.json").read_text())["results"] == est["results"]
    assert (tmp_path / "e2e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same inputs with the device renamed are refused
    bad = copy.deepcopy(saved)
    bad["environment"]["device"] = "elsewhere"
    with pytest.raises(ee.DeviceMismatch):
        ee.estimate(json.loads((tmp_path / "moe.json").read_text()), bad, shape="tiny")
