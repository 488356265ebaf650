"""benchmarks.load_test: the ShareGPT-like dataset, TPOT goodput, and one real run on two CPU servers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import load_test
from benchmarks.load_test import SHAREGPT_MIX, LengthMix, sample_lengths, tpot_goodput, write_sharegpt_like_dataset
from lynx_sglang.server_process import REPO

TINY = REPO / "models" / "tiny-qwen3-moe"  # named explicitly: the repository's default model may change


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


# --------------------------------------------------------------------------- lengths


def test_lengths_are_deterministic_positive_and_clipped():
    a_in, a_out = sample_lengths(2000, seed=3)
    b_in, b_out = sample_lengths(2000, seed=3)
    c_in, _ = sample_lengths(2000, seed=4)
    assert np.array_equal(a_in, b_in) and np.array_equal(a_out, b_out)
    assert not np.array_equal(a_in, c_in)
    for lens in (a_in, a_out):
        assert lens.dtype.kind == "i"
        assert lens.min() >= SHAREGPT_MIX.min_len and lens.max() <= SHAREGPT_MIX.max_len


def test_lengths_follow_the_lognormal():
    unclipped = LengthMix(**{**SHAREGPT_MIX.__dict__, "max_len": 10**9})
    lens_in, lens_out = sample_lengths(40_000, seed=0, mix=unclipped)
    for lens, which, mean, sigma in ((lens_in, "input", unclipped.input_mean, unclipped.input_sigma),
                                     (lens_out, "output", unclipped.output_mean, unclipped.output_sigma)):
        assert np.median(lens) == pytest.approx(unclipped.median(which), rel=0.03)
        assert lens.mean() == pytest.approx(mean, rel=0.05)  # the quoted ShareGPT means
        assert np.log(lens).std() == pytest.approx(sigma, rel=0.05)
    # Long-tailed: the mean well above the median, a 99th percentile many medians out.
    assert lens_out.mean() > 1.4 * np.median(lens_out)
    assert np.percentile(lens_out, 99) > 8 * np.median(lens_out)


def test_length_scale_shrinks_the_same_draws():
    full_in, full_out = sample_lengths(5000, seed=1)
    small_in, small_out = sample_lengths(5000, seed=1, length_scale=0.1)
    assert np.median(small_out) == pytest.approx(SHAREGPT_MIX.median("output", 0.1), rel=0.05)
    # Same draws, scaled: off only by rounding and the min_len floor.
    free = (small_out > SHAREGPT_MIX.min_len) & (full_out < SHAREGPT_MIX.max_len)
    assert np.all(np.abs(small_out[free] - 0.1 * full_out[free]) <= 1.0)
    assert small_in.max() <= round(0.1 * SHAREGPT_MIX.max_len)
    with pytest.raises(ValueError):
        sample_lengths(3, seed=0, length_scale=0)


def test_dataset_file_is_deterministic_and_read_by_bench_serving(tmp_path, tokenizer):
    from sglang.benchmark.datasets.sharegpt import sample_sharegpt_requests

    a = write_sharegpt_like_dataset(tmp_path / "a.json", 12, tokenizer, seed=5, length_scale=0.1)
    b = write_sharegpt_like_dataset(tmp_path / "b.json", 12, tokenizer, seed=5, length_scale=0.1)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a["target_input_lens"] == b["target_input_lens"]
    expect_in, expect_out = sample_lengths(12, seed=5, length_scale=0.1)
    assert a["target_input_lens"] == expect_in.tolist() and a["target_output_lens"] == expect_out.tolist()
    # The tiny model's byte-level tokenizer: every cut has exactly the drawn length.
    assert a["exact_fraction"] == 1.0
    rows = json.loads((tmp_path / "a.json").read_text())
    assert [r["conversations"][0]["from"] for r in rows] == ["human"] * 12
    # bench_serving's own ShareGPT loader reads it offline, with the lengths we drew.
    loaded = sample_sharegpt_requests(str(tmp_path / "a.json"), 12, tokenizer)
    assert sorted((r.prompt_len, r.output_len) for r in loaded) == sorted(zip(a["input_lens"], a["output_lens"]))


# --------------------------------------------------------------------------- goodput


def _output(tpot_ms: float | None, n: int = 11, ttft: float = 0.05, success: bool = True):
    from sglang.benchmark.serving import RequestFuncOutput

    latency = ttft + (n - 1) * (tpot_ms or 0) / 1000
    return RequestFuncOutput(success=success, ttft=ttft, latency=latency, output_len=n if success else 0)


def test_tpot_goodput_on_hand_made_requests():
    outputs = [_output(10), _output(22), _output(28), _output(40), _output(None, success=False),
               _output(None, n=1)]  # a one-token answer has no TPOT: bench_serving counts it as 0
    g = tpot_goodput(outputs, [20, 25, 30], duration_s=2.0)
    assert list(g) == ["20", "25", "30"]
    # good: {10 ms, 1 token}, {.., 22}, {.., 28}; the 40 ms and the failed request never are.
    assert [g[k]["request_goodput"] for k in g] == pytest.approx([2 / 2.0, 3 / 2.0, 4 / 2.0])
    assert [g[k]["slo_attainment"] for k in g] == pytest.approx([2 / 6, 3 / 6, 4 / 6])


def test_bench_serving_args_come_from_its_own_parser():
    import sglang.benchmark.serving as serving

    real = serving.run_benchmark
    args = load_test.bench_serving_args(["--dataset-name", "sharegpt", "--max-concurrency", "3"])
    assert serving.run_benchmark is real
    assert args.max_concurrency == 3 and math.isinf(args.request_rate) and args.backend == "sglang"
    assert args.warmup_requests == 1 and args.goodput is None  # bench_serving's defaults


# --------------------------------------------------------------------------- end to end


def test_end_to_end_stock_and_lynx_on_cpu_servers(tmp_path):
    """Both servers started by the tool on the tiny model, 4 short requests at concurrency 2."""
    n = 4
    out = tmp_path / "load"
    payload = load_test.main([
        "--start", "--model-path", str(TINY),
        # every decode step published to /metrics, so even this short run shows Lynx's counters
        "--server-args", "--dtype float32 --decode-log-interval 1",
        "--num-prompts", str(n), "--max-concurrency", "2", "--length-scale", "0.05",
        "--tpot-slo-ms", "50,100,400", "--out", str(out), "--work-dir", str(tmp_path / "work"),
    ])
    assert (tmp_path / "load.json").stat().st_size > 0 and (tmp_path / "load.png").stat().st_size > 0
    saved = json.loads((tmp_path / "load.json").read_text())
    assert saved["environment"]["sglang"] and saved["settings"]["dataset"]["num_prompts"] == n
    targets = sorted(payload["settings"]["dataset"]["target_output_lens"])
    for name in ("stock", "lynx"):
        (point,) = saved["results"][name]
        assert point["point"] == {"request_rate": "inf", "max_concurrency": 2}
        assert point["metrics"]["completed"] == n
        assert all(r["success"] for r in point["requests"]) and len(point["requests"]) == n
        # ignore_eos (bench_serving's default): every request ran to its drawn length.
        assert sorted(r["output_len"] for r in point["requests"]) == targets
        # Our goodput at the first SLO is bench_serving's own --goodput result.
        assert point["goodput_tpot"]["50"]["request_goodput"] == pytest.approx(point["metrics"]["request_goodput"])
        assert point["metrics"]["median_tpot_ms"] > 0 and point["metrics"]["output_throughput"] > 0
    assert "--moe-backend" in saved["servers"]["lynx"]["launch_args"]
    assert "--moe-backend" not in saved["servers"]["stock"]["launch_args"]
    # Lynx's counters show selection ran on the Lynx server only.
    assert saved["results"]["stock"][0]["lynx_counters"] is None
    assert saved["results"]["lynx"][0]["lynx_counters"]["steps"] > 0
    # The comparison table against the raw per-request timings each server's point recorded: TPOT is
    # (latency - TTFT) / (tokens - 1) per request, its p50 their median; TTFT p99 the 99th percentile;
    # goodput the requests within the SLO per second of the point's duration.
    rows = {r["metric"]: r for r in saved["comparison"][0]["rows"]}
    raw = {}
    for name in ("stock", "lynx"):
        (point,) = saved["results"][name]
        reqs = point["requests"]
        tpots = [(r["latency_s"] - r["ttft_s"]) / (r["output_len"] - 1) for r in reqs if r["output_len"] > 1]
        assert len(tpots) >= 2  # a median of something
        good = sum(t <= 0.4 for t in tpots) + sum(r["output_len"] == 1 for r in reqs)  # 1 token: TPOT 0
        raw[name] = {"TPOT p50 (ms)": 1000 * float(np.median(tpots)),
                     "TTFT p99 (ms)": 1000 * float(np.percentile([r["ttft_s"] for r in reqs], 99)),
                     "goodput TPOT<=400 ms (req/s)": good / point["metrics"]["duration"]}
    assert {"TTFT p99 (ms)", "TPOT p50 (ms)", "ITL p99 (ms)", "goodput TPOT<=400 ms (req/s)"} <= set(rows)
    for metric in raw["stock"]:
        for name in ("stock", "lynx"):
            assert rows[metric][name] == pytest.approx(raw[name][metric], rel=1e-9), (metric, name)
        want = raw["lynx"][metric] / raw["stock"][metric] if raw["stock"][metric] else None  # None: undefined
        assert rows[metric]["lynx_over_stock"] == (want if want is None else pytest.approx(want, rel=1e-9))


# --------------------------------------------------------------------------- side by side with an A/A floor


def test_rotation_and_prompt_counts():
    names = list(load_test.AA_SERVERS)
    orders = [load_test.rotated(names, i) for i in range(3)]
    # every server runs first, middle and last once in three repeats
    for pos in range(3):
        assert sorted(o[pos] for o in orders) == sorted(names)
    p = load_test.Point(math.inf, 16)
    assert load_test.prompts_for(p, 2.0, 8) == 32 and load_test.prompts_for(p, None, 8) == 8
    assert load_test.prompts_for(load_test.Point(math.inf, 1), 1.0, 8) == 2  # at least 2
    assert load_test.prompts_for(load_test.Point(math.inf, None), 2.0, 8) == 8  # no cap: --num-prompts


def test_aa_summary_ratios_on_made_up_runs():
    def run(server, rep, tput, tpot, counters=None):
        m = {k: 1.0 for k in load_test.AA_METRICS} | {"output_throughput": tput, "median_tpot_ms": tpot,
                                                      "completed": 4}
        return {"point": {"request_rate": "inf", "max_concurrency": 4}, "server": server, "repeat": rep,
                "num_prompts": 4, "metrics": m, "lynx_counters": counters}

    c = {"steps": 10, "experts_before": 200, "experts_after": 100}
    runs = [run("stock", 0, 10.0, 100.0), run("stock_aa", 0, 11.0, 90.0), run("lynx", 0, 15.0, 70.0, c),
            run("stock", 1, 20.0, 50.0), run("stock_aa", 1, 19.0, 52.0), run("lynx", 1, 24.0, 40.0, c)]
    (row,) = load_test.aa_summary(runs)
    assert row["lynx_over_stock"]["per_repeat"] == pytest.approx([1.5, 1.2])
    assert row["lynx_over_stock"]["median"] == pytest.approx(1.35)
    assert (row["lynx_over_stock"]["min"], row["lynx_over_stock"]["max"]) == pytest.approx((1.2, 1.5))
    assert row["aa_over_stock"]["per_repeat"] == pytest.approx([1.1, 0.95])
    assert row["servers"]["lynx"]["output_throughput"]["median"] == pytest.approx(19.5)
    assert row["lynx_experts"] == {"steps": 20, "per_step_before": 20.0, "per_step_after": 10.0}
    assert "1.350 (1.200-1.500)" in load_test.format_aa_table([row])


def test_aa_needs_start():
    with pytest.raises(SystemExit):
        load_test.parse_args(["--stock-url", "http://x", "--lynx-url", "http://y", "--aa"])


def test_end_to_end_three_servers_side_by_side(tmp_path):
    """--aa on the tiny model: stock, stock again and Lynx up at once; 1 concurrency, 1 repeat, few tokens."""
    out = tmp_path / "aa"
    payload = load_test.main([
        "--start", "--aa", "--repeats", "1", "--model-path", str(TINY),
        "--server-args", "--dtype float32 --decode-log-interval 1",
        "--input-len", "8", "--output-len", "6", "--prompts-per-concurrency", "2", "--max-concurrency", "2",
        "--tpot-slo-ms", "400", "--out", str(out), "--work-dir", str(tmp_path / "work"),
    ])
    saved = json.loads((tmp_path / "aa.json").read_text())
    assert (tmp_path / "aa.png").stat().st_size > 0
    assert saved["environment"]["transformers"] and saved["environment"]["commit"] is not None
    assert saved["command"].startswith("python -m benchmarks.load_test --start --aa")
    urls = {s["url"] for s in saved["servers"].values()}
    assert len(urls) == 3  # side by side, each on its own port
    assert "--moe-backend" in saved["servers"]["lynx"]["launch_args"]
    assert saved["servers"]["stock"]["launch_args"] == saved["servers"]["stock_aa"]["launch_args"]
    assert "--moe-backend" not in saved["servers"]["stock"]["launch_args"]
    assert [r["server"] for r in saved["runs"]] == list(load_test.AA_SERVERS)  # point 0, repeat 0: not rotated
    for r in saved["runs"]:
        assert r["metrics"]["completed"] == 4 and r["num_prompts"] == 4
        assert sorted(q["output_len"] for q in r["requests"]) == [6] * 4  # fixed output length, ignore_eos
        assert (r["lynx_counters"] is not None) == (r["server"] == "lynx")
    (row,) = saved["summary"]
    by = {r["server"]: r["metrics"]["output_throughput"] for r in saved["runs"]}
    assert row["lynx_over_stock"]["median"] == pytest.approx(by["lynx"] / by["stock"])
    assert row["aa_over_stock"]["median"] == pytest.approx(by["stock_aa"] / by["stock"])
    assert row["lynx_experts"]["steps"] > 0
    assert row["lynx_experts"]["per_step_after"] <= row["lynx_experts"]["per_step_before"]
    assert payload["summary"][0]["repeats"] == 1
