"""Load test of stock SGLang against SGLang with Lynx, through ``sglang.benchmark.serving``.

Every measurement is SGLang's own serving benchmark (``sglang.benchmark.serving``, the
module behind the deprecated ``sglang.bench_serving``): its request generator (Poisson
arrivals at ``--request-rates``, a cap of ``--max-concurrency`` requests in flight),
its streaming client and its metrics. This tool adds what a Lynx comparison needs
around it:

* an offline ShareGPT-like dataset: long-tailed input/output lengths (lognormal, see
  ``SHAREGPT_MIX``) with prompt text cut from the held-out corpus
  (``data/corpus/heldout.jsonl.gz``), written as a ShareGPT JSON file that
  bench_serving reads with ``--dataset-name sharegpt --dataset-path`` (nothing is
  downloaded);
* the same sweep (every request rate x every concurrency) against two servers, stock
  and Lynx, either already running (``--stock-url``, ``--lynx-url``) or started here
  one after the other (``--start``, through ``lynx_sglang.server_process``);
* goodput under several TPOT SLOs at once (bench_serving's ``--goodput`` takes one
  threshold per metric), computed with bench_serving's own ``calculate_goodput`` on its
  per-request outputs;
* a table per point (TTFT/TPOT/ITL p50 and p99, request and output-token throughput,
  goodput per SLO, Lynx/stock ratio), a JSON with the environment, the settings and the
  raw per-point metrics of both servers, and a PNG.

CPU-only machine, bundled model, tiny settings (about 2-3 minutes on 2 cores, most of it
the two server starts). It checks the plumbing, not performance: the tiny model decodes a
token faster than a streamed chunk travels, so short answers often arrive in one chunk
(TPOT near 0), and a busy machine dominates every timing::

    python -m benchmarks.load_test --start --model-path models/tiny-qwen3-moe \\
        --server-args "--dtype float32" --num-prompts 8 --max-concurrency 1,4 \\
        --length-scale 0.1 --tpot-slo-ms 100,200,400

GPU deployment, two servers already up (e.g. one per GPU; ``--model-path`` here only
names the tokenizer the dataset lengths are counted with)::

    CUDA_VISIBLE_DEVICES=0 MODEL=Qwen/Qwen3-30B-A3B launch/server.sh --port 30000 --enable-metrics &
    CUDA_VISIBLE_DEVICES=1 MODEL=Qwen/Qwen3-30B-A3B launch/server.sh --port 30001 --enable-metrics \\
        --moe-backend lynx --lynx-policy lynx &
    python -m benchmarks.load_test --stock-url http://127.0.0.1:30000 --lynx-url http://127.0.0.1:30001 \\
        --model-path Qwen/Qwen3-30B-A3B --num-prompts 500 --max-concurrency 1,8,32,64,128 \\
        --tpot-slo-ms 20,25,30

or one GPU, the two servers started in turn by this tool::

    python -m benchmarks.load_test --start --model-path Qwen/Qwen3-30B-A3B \\
        --lynx-args "--lynx-policy lynx" --num-prompts 500 --max-concurrency 1,8,32,64,128 \\
        --request-rates inf --tpot-slo-ms 20,25,30

Side by side with a noise floor (``--aa``): three servers started at once on their own ports --
stock, the same stock again (A/A) and Lynx, with the same flags -- and every point run ``--repeats``
times against all three, the order rotated by one server per repeat (and per point) so a drifting
machine cancels. Each point reports the Lynx/stock and the A/A (stock_aa/stock) throughput ratio per
repeat with median and min-max, TPOT/ITL p50/p99 per server and Lynx's distinct experts per step.
``--input-len``/``--output-len`` fix the lengths (steady decode) and ``--prompts-per-concurrency``
sizes each point by its cap. The recorded CPU run on the bandwidth twin (``docs/speed.md``, "End to
end"; one torch thread per server, the machine shared)::

    SGLANG_CPU_OMP_THREADS_BIND=1 python -m benchmarks.load_test --start --aa --repeats 3 \\
        --model-path build/twin-trained-qwen3-moe --server-args "--decode-log-interval 1" \\
        --input-len 64 --output-len 64 --prompts-per-concurrency 2 --max-concurrency 1,4,8,16,32 \\
        --tpot-slo-ms 200,400,800 --out benchmarks/results/load_test_twin_cpu --work-dir build/load_test_twin

Results: ``<out>.json`` and ``<out>.png`` (default ``benchmarks/results/load_test_<device>``);
the dataset and bench_serving's own JSONL log go to ``--work-dir`` (default ``build/load_test``).
Servers started here get ``--enable-metrics``, and each point records the change of Lynx's
counters (distinct experts per decode step before/after selection; None on stock, or before
the first publication). They are published every ``--decode-log-interval`` decode steps
(SGLang's default 40), so per-point
numbers lag; ``--server-args "--decode-log-interval 1"`` makes them exact on short runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.results_io import RESULTS_DIR, environment, pyplot
from lynx_sglang.corpus import HELDOUT, read_jsonl
from lynx_sglang.server_process import DEFAULT_MODEL, REPO, running_server, servers_side_by_side

DEFAULT_WORK_DIR = REPO / "build" / "load_test"
SERVERS = ("stock", "lynx")
AA_SERVERS = ("stock", "stock_aa", "lynx")  # --aa: stock, stock again (the noise floor), Lynx


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class LengthMix:
    """Lognormal input and output lengths (tokens), given by their means and log-space spreads.

    ``mu = ln(mean) - sigma**2 / 2`` so that the distribution has the stated mean; its
    median is ``mean * exp(-sigma**2 / 2)``. Lengths are rounded and clipped to
    ``[min_len, max_len]`` (both in unscaled tokens; ``max_len`` is scaled with the lengths).
    """

    input_mean: float
    output_mean: float
    input_sigma: float
    output_sigma: float
    min_len: int = 4
    max_len: int = 2048

    def median(self, which: str, length_scale: float = 1.0) -> float:
        """Median length of ``which`` ("input" or "output") before rounding and clipping."""
        mean, sigma = (self.input_mean, self.input_sigma) if which == "input" else (self.output_mean, self.output_sigma)
        return length_scale * mean * math.exp(-sigma**2 / 2)


# Means: ShareGPT as quoted in the vLLM paper (Kwon et al., "Efficient Memory Management for
# Large Language Model Serving with PagedAttention", SOSP 2023, Fig. 11: input 161.31, output
# 337.99 tokens on average, OPT tokenizer) -- quoted from memory, not re-derived from the data
# here. The spreads (sigma = 1.0 in log space, i.e. medians ~0.61x the means and a 99th
# percentile ~10x the median) are our assumption for a long tail, not fitted to the raw
# ShareGPT file, which this offline machine does not have. min_len 4: bench_serving drops
# requests under 2 tokens and a TPOT needs at least 2 output tokens. max_len 2048: the
# context of the bundled model, and the old vLLM ShareGPT sampler's ~1-2k token pruning.
SHAREGPT_MIX = LengthMix(input_mean=161.31, output_mean=337.99, input_sigma=1.0, output_sigma=1.0)


def sample_lengths(n: int, seed: int, length_scale: float = 1.0,
                   mix: LengthMix = SHAREGPT_MIX) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (input, output) token lengths from ``mix``, every length multiplied by ``length_scale``.

    Deterministic in ``seed``; the same seed at another scale gives the same draws,
    scaled (so a CPU run is a shrunken copy of the GPU workload, not a different one),
    and request i's lengths do not depend on ``n``.
    """
    if length_scale <= 0:
        raise ValueError(f"length_scale must be > 0, got {length_scale}")
    z = np.random.default_rng(seed).standard_normal((n, 2)).T  # row-major (n, 2): a prefix of the stream per n
    lo, hi = mix.min_len, max(mix.min_len, round(mix.max_len * length_scale))

    def lengths(mean: float, sigma: float, zs: np.ndarray) -> np.ndarray:
        raw = length_scale * np.exp(math.log(mean) - sigma**2 / 2 + sigma * zs)
        return np.clip(np.rint(raw), lo, hi).astype(int)

    return lengths(mix.input_mean, mix.input_sigma, z[0]), lengths(mix.output_mean, mix.output_sigma, z[1])


class _CorpusSlicer:
    """Cuts texts of an exact token count out of corpus documents.

    A slice is taken on token boundaries (the fast tokenizer's offsets), then widened or
    narrowed until ``tokenizer.encode(text)`` -- what bench_serving counts, special tokens
    included -- has the wanted length; re-tokenizing a cut can merge or split at its ends.
    """

    def __init__(self, tokenizer, texts: list[str]):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("a fast (Rust) tokenizer is needed for token offsets")
        self.tokenizer = tokenizer
        self.texts = texts
        self._offsets: dict[int, list[tuple[int, int]]] = {}  # tokenized lazily: most documents are never used

    def _doc_offsets(self, i: int) -> list[tuple[int, int]]:
        if i not in self._offsets:
            enc = self.tokenizer(self.texts[i], add_special_tokens=False, return_offsets_mapping=True)
            self._offsets[i] = list(enc["offset_mapping"])
        return self._offsets[i]

    def count(self, text: str) -> int:
        """Tokens bench_serving counts for ``text``."""
        return len(self.tokenizer.encode(text))

    def cut(self, rng: np.random.Generator, n_tokens: int) -> tuple[str, int]:
        """A text of (as near as possible) ``n_tokens`` tokens from a random place; (text, its count)."""
        order = rng.permutation(len(self.texts))
        for i in order:  # the first random document long enough (nearly all are: the median is ~3.7k chars)
            offsets = self._doc_offsets(int(i))
            if len(offsets) >= n_tokens + 8:
                break
        else:
            raise ValueError(f"no corpus document has {n_tokens} tokens; lower --length-scale or --max-len")
        text_of = self.texts[int(i)]
        start = int(rng.integers(0, len(offsets) - n_tokens - 8 + 1))
        begin = offsets[start][0]
        k, text, got = n_tokens, "", -1
        for _ in range(8):
            k = min(max(k, 1), len(offsets) - start)
            text = text_of[begin:offsets[start + k - 1][1]]
            got = self.count(text)
            if got == n_tokens:
                break
            k += n_tokens - got
        # Token steps can jump over the target (a cut token re-encodes as two): trim characters instead.
        while got > n_tokens and len(text) > 1:
            text = text[:-1]
            got = self.count(text)
        return text, got


def write_sharegpt_like_dataset(path: str | Path, n: int, tokenizer, seed: int = 0, length_scale: float = 1.0,
                                mix: LengthMix = SHAREGPT_MIX, corpus_path: str | Path = HELDOUT) -> dict:
    """Write ``n`` ShareGPT-format conversations to ``path`` and return what was written.

    Lengths come from ``sample_lengths(n, seed, length_scale, mix)``; the human turn is a
    held-out corpus cut of the input length, the "gpt" turn one of the output length
    (bench_serving takes a request's output length from its token count; with its default
    ``ignore_eos`` the server generates exactly that many). The file is
    ``[{"id", "conversations": [{"from": "human", "value"}, {"from": "gpt", "value"}]}]``,
    read offline by ``--dataset-name sharegpt --dataset-path``. The return value holds the
    target and the actual (re-tokenized) lengths.
    """
    input_lens, output_lens = sample_lengths(n, seed, length_scale, mix)
    docs = read_jsonl(Path(corpus_path))
    slicer = _CorpusSlicer(tokenizer, [d.text for d in docs])
    text_rng = np.random.default_rng([seed, 1])  # its own stream: the lengths do not depend on the text
    rows, actual_in, actual_out = [], [], []
    for i, (li, lo) in enumerate(zip(input_lens.tolist(), output_lens.tolist())):
        prompt, got_in = slicer.cut(text_rng, li)
        completion, got_out = slicer.cut(text_rng, lo)
        rows.append({"id": f"lynx-load-{seed}-{i}",
                     "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": completion}]})
        actual_in.append(got_in)
        actual_out.append(got_out)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    exact = float(np.mean((np.array(actual_in) == input_lens) & (np.array(actual_out) == output_lens)))
    return {
        "path": str(path), "num_prompts": n, "seed": seed, "length_scale": length_scale, "mix": asdict(mix),
        "corpus": str(corpus_path),
        "target_input_lens": input_lens.tolist(), "target_output_lens": output_lens.tolist(),
        "input_lens": actual_in, "output_lens": actual_out, "exact_fraction": exact,
        "median_input": float(np.median(actual_in)), "median_output": float(np.median(actual_out)),
    }


# --------------------------------------------------------------------------- bench_serving


def _serving():
    # Imported on first use: it pulls in much of SGLang (~10 s), which --help and the dataset do not need.
    import sglang.benchmark.serving as serving

    return serving


def bench_serving_args(argv: list[str]) -> argparse.Namespace:
    """bench_serving's own command line parsed (its defaults and checks), without running it.

    Its parser is built inside ``cli_main``; we run ``cli_main`` with ``run_benchmark``
    swapped for a function that keeps the parsed arguments.
    """
    serving = _serving()
    kept: list[argparse.Namespace] = []
    real_run, real_argv = serving.run_benchmark, sys.argv
    serving.run_benchmark = kept.append
    sys.argv = ["sglang.benchmark.serving", *argv]
    try:
        serving.cli_main()
    finally:
        serving.run_benchmark, sys.argv = real_run, real_argv
    return kept[0]


@contextlib.contextmanager
def _keep_request_outputs(sink: list):
    """Record the per-request outputs bench_serving computes its metrics from.

    ``run_benchmark`` returns per-request TTFTs and ITLs but not each request's latency,
    which TPOT needs; ``calculate_metrics`` receives the full ``RequestFuncOutput`` list.
    """
    serving = _serving()
    real = serving.calculate_metrics

    def keeping(*args, **kwargs):
        sink.append(kwargs["outputs"] if "outputs" in kwargs else args[1])
        return real(*args, **kwargs)

    serving.calculate_metrics = keeping
    try:
        yield
    finally:
        serving.calculate_metrics = real


def tpot_goodput(outputs: list, slos_ms: list[float], duration_s: float) -> dict[str, dict]:
    """Goodput under each TPOT SLO: completed requests per second whose TPOT is within it.

    ``outputs`` are bench_serving ``RequestFuncOutput``s (``success``, ``ttft``, ``latency``,
    ``output_len``); each SLO goes through bench_serving's ``calculate_goodput`` (TPOT =
    (latency - TTFT) / (output tokens - 1); a one-token answer counts as TPOT 0). Returns
    ``{"<slo>": {"slo_ms", "request_goodput", "slo_attainment"}}``; attainment is over all
    requests sent, failed ones included.
    """
    from sglang.benchmark.goodput import calculate_goodput

    out = {}
    for slo in slos_ms:
        g = calculate_goodput(outputs, {"tpot": float(slo)}, duration_s)
        out[f"{slo:g}"] = {"slo_ms": float(slo), "request_goodput": g.request_goodput,
                           "slo_attainment": g.slo_attainment}
    return out


def _request_record(o) -> dict:
    tpot = (o.latency - o.ttft) / (o.output_len - 1) if o.success and o.output_len > 1 else None
    return {"success": o.success, "prompt_len": o.prompt_len, "output_len": o.output_len, "ttft_s": o.ttft,
            "latency_s": o.latency, "tpot_s": tpot, "error": o.error[-500:] if o.error else ""}


@dataclass(frozen=True)
class Point:
    """One point of a sweep: Poisson arrivals at ``request_rate`` (inf: all at once), at most
    ``max_concurrency`` requests in flight (None: no cap)."""

    request_rate: float
    max_concurrency: int | None

    @property
    def label(self) -> str:
        """Short name, e.g. ``rate=inf conc=4``."""
        return f"rate={self.request_rate:g} conc={self.max_concurrency or '-'}"

    def to_json(self) -> dict:
        """JSON-safe form (inf as the string "inf")."""
        rate = self.request_rate if math.isfinite(self.request_rate) else "inf"
        return {"request_rate": rate, "max_concurrency": self.max_concurrency}


def sweep_points(rates: list[float], concurrencies: list[int | None]) -> list[Point]:
    """Every request rate with every concurrency cap."""
    return [Point(r, c) for r in rates for c in concurrencies]


@dataclass(frozen=True)
class BenchSettings:
    """What every point of a run shares."""

    dataset_path: str
    tokenizer: str
    num_prompts: int
    tpot_slo_ms: tuple[float, ...]
    seed: int = 0
    backend: str = "sglang"
    warmup_requests: int = 1
    bench_args: tuple[str, ...] = ()  # passed through to bench_serving last (so they win)
    output_file: str = str(DEFAULT_WORK_DIR / "bench_serving.jsonl")


_BULKY = ("server_info", "generated_texts", "itls", "ttfts", "input_lens", "output_lens", "errors")


def run_point(url: str, point: Point, s: BenchSettings, tag: str = "", num_prompts: int | None = None) -> dict:
    """One bench_serving run against ``url``; its metrics, TPOT goodput and per-request records.

    The prefix cache is flushed after the warm-up request (``--flush-cache``), so a point
    does not profit from the prompts of the point before it.
    """
    argv = ["--backend", s.backend, "--base-url", url, "--dataset-name", "sharegpt", "--dataset-path", s.dataset_path,
            "--tokenizer", s.tokenizer, "--num-prompts", str(num_prompts or s.num_prompts), "--request-rate", str(point.request_rate),
            "--seed", str(s.seed), "--warmup-requests", str(s.warmup_requests), "--flush-cache", "--disable-tqdm",
            "--goodput", f"tpot:{s.tpot_slo_ms[0]:g}", "--output-file", s.output_file, "--tag", tag or point.label]
    if point.max_concurrency:
        argv += ["--max-concurrency", str(point.max_concurrency)]
    args = bench_serving_args(argv + list(s.bench_args))
    Path(s.output_file).parent.mkdir(parents=True, exist_ok=True)
    outputs: list = []
    with _keep_request_outputs(outputs):
        result = _serving().run_benchmark(args)
    requests = outputs[-1]
    metrics = {k: v for k, v in result.items() if k not in _BULKY}
    return {
        "point": point.to_json(),
        "metrics": metrics,
        "goodput_tpot": tpot_goodput(requests, list(s.tpot_slo_ms), result["duration"]),
        "requests": [_request_record(o) for o in requests],
        "server_info": result.get("server_info"),
    }


def _lynx_totals(url: str) -> dict | None:
    """Lynx's counters summed over layers, or None (stock server, or no --enable-metrics)."""
    from lynx_sglang.client import scrape_lynx_metrics

    try:
        layers = scrape_lynx_metrics(url)
    except Exception:  # no /metrics endpoint: nothing to report, not an error of the load test
        return None
    if not layers:
        return None
    keys = ("steps", "experts_before", "experts_after", "rows_changed", "rows_voting")
    return {k: sum(getattr(c, k) for c in layers.values()) for k in keys} | {"layers": len(layers)}


def _lynx_delta(before: dict | None, after: dict | None) -> dict | None:
    # Counters are published every --decode-log-interval decode steps, so a delta lags a little.
    if not after:
        return None
    d = {k: after[k] - (before or {}).get(k, 0) for k in after if k != "layers"}
    steps = d["steps"]
    return d | {"experts_per_step_before": d["experts_before"] / steps if steps else None,
                "experts_per_step_after": d["experts_after"] / steps if steps else None}


def run_sweep(url: str, points: list[Point], s: BenchSettings, name: str,
              num_prompts: dict[Point, int] | None = None) -> list[dict]:
    """Every point against one server, in order; Lynx's counters (if published) per point."""
    results = []
    for point in points:
        print(f"\n=== {name}: {point.label} against {url}", flush=True)
        before = _lynx_totals(url)
        r = run_point(url, point, s, tag=f"{name} {point.label}", num_prompts=(num_prompts or {}).get(point))
        r["lynx_counters"] = _lynx_delta(before, _lynx_totals(url))
        results.append(r)
    return results


def server_launch_args(model_path: str, server_args: list[str], lynx_args: list[str]) -> dict[str, list[str]]:
    """Launch arguments of the two servers: the same model and flags; Lynx adds ``--moe-backend lynx``."""
    common = ["--model-path", model_path, "--enable-metrics", *server_args]
    return {"stock": common, "lynx": [*common, "--moe-backend", "lynx", *lynx_args]}


# --------------------------------------------------------------------------- side by side, with an A/A floor (--aa)


def aa_launch_args(model_path: str, server_args: list[str], lynx_args: list[str]) -> dict[str, list[str]]:
    """Launch arguments of the three --aa servers: stock, the same stock again, and Lynx."""
    two = server_launch_args(model_path, server_args, lynx_args)
    return {"stock": two["stock"], "stock_aa": list(two["stock"]), "lynx": two["lynx"]}


def rotated(names: list[str], shift: int) -> list[str]:
    """``names`` rotated left by ``shift``: the order the servers run in at one repeat."""
    shift %= len(names)
    return names[shift:] + names[:shift]


def prompts_for(point: Point, per_concurrency: float | None, default: int) -> int:
    """Requests of one point: ``per_concurrency`` x its cap (at least 2), else ``default``."""
    if per_concurrency is None or not point.max_concurrency:
        return default
    return max(2, round(per_concurrency * point.max_concurrency))


def run_interleaved(urls: dict[str, str], points: list[Point], s: BenchSettings, repeats: int,
                    num_prompts: dict[Point, int]) -> list[dict]:
    """Every point, ``repeats`` times, against every server in turn (the same prompts, bench_serving's seed).

    The order rotates by one server per repeat and per point, so at R = len(urls) repeats every server
    runs first, middle and last once per point and a slow drift of the machine cancels in the medians.
    Returns one record per (point, repeat, server), with ``server``, ``repeat``, ``order``, ``num_prompts``
    and the change of Lynx's counters.
    """
    runs = []
    names = list(urls)
    for pi, point in enumerate(points):
        for rep in range(repeats):
            order = rotated(names, pi + rep)
            for name in order:
                print(f"\n=== {point.label} repeat {rep + 1}/{repeats}: {name} ({' -> '.join(order)})", flush=True)
                before = _lynx_totals(urls[name])
                r = run_point(urls[name], point, s, tag=f"{name} {point.label} r{rep}", num_prompts=num_prompts[point])
                r["lynx_counters"] = _lynx_delta(before, _lynx_totals(urls[name]))
                r.update(server=name, repeat=rep, order=order, num_prompts=num_prompts[point])
                runs.append(r)
    return runs


AA_METRICS = ("output_throughput", "request_throughput", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms",
              "p99_itl_ms", "median_ttft_ms", "p99_ttft_ms")


def _spread(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"per_repeat": values, "median": None, "min": None, "max": None}
    return {"per_repeat": values, "median": float(np.median(vals)), "min": float(min(vals)), "max": float(max(vals))}


def aa_summary(runs: list[dict]) -> list[dict]:
    """Per point: each server's metrics (median over repeats), the Lynx/stock and the A/A (stock_aa/stock)
    output-throughput ratios per repeat with their median and min-max, and Lynx's distinct experts per
    layer and decode step before/after selection (counters summed over the repeats)."""
    out = []
    labels = list(dict.fromkeys(json.dumps(r["point"], sort_keys=True) for r in runs))
    for label in labels:
        mine = [r for r in runs if json.dumps(r["point"], sort_keys=True) == label]
        repeats = sorted({r["repeat"] for r in mine})
        by = {(r["server"], r["repeat"]): r for r in mine}
        servers = list(dict.fromkeys(r["server"] for r in mine))
        per_server = {}
        for name in servers:
            per_server[name] = {k: _spread([by[name, rep]["metrics"].get(k) for rep in repeats]) for k in AA_METRICS}
            per_server[name]["completed"] = [by[name, rep]["metrics"]["completed"] for rep in repeats]

        def ratios(num: str, den: str, key: str = "output_throughput") -> dict:
            if num not in servers or den not in servers:
                return _spread([])
            return _spread([ratio(by[num, rep]["metrics"][key], by[den, rep]["metrics"][key]) for rep in repeats])

        counters = [by[n, rep]["lynx_counters"] for n in servers for rep in repeats if by[n, rep]["lynx_counters"]]
        steps = sum(c["steps"] for c in counters)
        experts = None
        if steps:
            experts = {"steps": steps, "per_step_before": sum(c["experts_before"] for c in counters) / steps,
                       "per_step_after": sum(c["experts_after"] for c in counters) / steps}
        out.append({"point": mine[0]["point"], "num_prompts": mine[0]["num_prompts"], "repeats": len(repeats),
                    "servers": per_server,
                    "lynx_over_stock": ratios("lynx", "stock"), "aa_over_stock": ratios("stock_aa", "stock"),
                    "tpot_p50_stock_over_lynx": ratios("stock", "lynx", "median_tpot_ms"),
                    "lynx_experts": experts})
    return out


def _experts(ex: dict) -> str:
    return f"{ex['per_step_before']:.1f}->{ex['per_step_after']:.1f}"


def format_aa_table(summary: list[dict]) -> str:
    """The --aa result as text: one row per point (medians over repeats; ratios with their min-max)."""
    names = [n for n in AA_SERVERS if n in summary[0]["servers"]]

    def rng(d: dict) -> str:
        return "-" if d["median"] is None else f"{d['median']:.3f} ({d['min']:.3f}-{d['max']:.3f})"

    head = (f"{'conc':>4} {'n':>3} " + " ".join(f"{n + ' tok/s':>14}" for n in names)
            + f" {'lynx/stock (min-max)':>22} {'A/A (min-max)':>22} "
            + " ".join(f"{'TPOT50 ' + n:>15}" for n in names) + " " + " ".join(f"{'ITL99 ' + n:>15}" for n in names)
            + f" {'experts/step':>14}")
    lines = [head]
    for row in summary:
        sv = row["servers"]
        ex = row["lynx_experts"]
        lines.append(f"{row['point']['max_concurrency'] or '-':>4} {row['num_prompts']:>3} "
                     + " ".join(f"{sv[n]['output_throughput']['median']:14.1f}" for n in names)
                     + f" {rng(row['lynx_over_stock']):>22} {rng(row['aa_over_stock']):>22} "
                     + " ".join(f"{sv[n]['median_tpot_ms']['median']:15.1f}" for n in names) + " "
                     + " ".join(f"{sv[n]['p99_itl_ms']['median']:15.1f}" for n in names)
                     + f" {(_experts(ex) if ex else '-'):>14}")
    return "\n".join(lines)


def plot_aa(summary: list[dict], png: Path, title: str) -> Path | None:
    """Lynx/stock output throughput vs concurrency (median, min-max bars) over the A/A band; throughputs."""
    plt = pyplot(png)
    if plt is None:
        return None
    conc = [row["point"]["max_concurrency"] or 0 for row in summary]
    x = np.arange(len(conc))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))

    def series(key: str, what: str) -> np.ndarray:
        return np.array([np.nan if row[key][what] is None else row[key][what] for row in summary], dtype=float)

    ax.fill_between(x, series("aa_over_stock", "min"), series("aa_over_stock", "max"), color="tab:gray", alpha=0.3,
                    label="A/A stock2/stock (min-max)")
    ax.plot(x, series("aa_over_stock", "median"), color="tab:gray", marker="o", ls="--", label="A/A median")
    med = series("lynx_over_stock", "median")
    ax.errorbar(x, med, yerr=[med - series("lynx_over_stock", "min"), series("lynx_over_stock", "max") - med],
                color="tab:red", marker="s", capsize=4, label="Lynx/stock (median, min-max)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("output throughput ratio")
    style = {"stock": dict(color="tab:gray", marker="o"), "stock_aa": dict(color="tab:blue", marker="^", ls="--"),
             "lynx": dict(color="tab:red", marker="s")}
    for name in [n for n in AA_SERVERS if n in summary[0]["servers"]]:
        ax2.plot(x, [row["servers"][name]["output_throughput"]["median"] for row in summary], label=name,
                 **style[name])
    ax2.set_ylabel("output throughput (tok/s, median over repeats)")
    for a in (ax, ax2):
        a.set_xticks(x, [str(c or "-") for c in conc])
        a.set_xlabel("max concurrency")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# --------------------------------------------------------------------------- report


def ratio(lynx: float | None, stock: float | None) -> float | None:
    """lynx / stock, or None where it is undefined."""
    if lynx is None or stock is None or stock == 0 or not math.isfinite(stock):
        return None
    return lynx / stock


TABLE_ROWS = [  # (label, key in bench_serving's metrics)
    ("TTFT p50 (ms)", "median_ttft_ms"), ("TTFT p99 (ms)", "p99_ttft_ms"),
    ("TPOT p50 (ms)", "median_tpot_ms"), ("TPOT p99 (ms)", "p99_tpot_ms"),
    ("ITL p50 (ms)", "median_itl_ms"), ("ITL p99 (ms)", "p99_itl_ms"),
    ("request throughput (req/s)", "request_throughput"), ("output throughput (tok/s)", "output_throughput"),
]


def table_rows(stock: dict, lynx: dict) -> list[tuple[str, float, float, float | None]]:
    """(label, stock, lynx, lynx/stock) for the metrics of one point, goodput per TPOT SLO last."""
    rows = [(label, stock["metrics"][k], lynx["metrics"][k]) for label, k in TABLE_ROWS]
    for slo, g in stock["goodput_tpot"].items():
        rows.append((f"goodput TPOT<={slo} ms (req/s)", g["request_goodput"],
                     lynx["goodput_tpot"][slo]["request_goodput"]))
    return [(label, a, b, ratio(b, a)) for label, a, b in rows]


def format_table(stock: dict, lynx: dict) -> str:
    """The comparison of one point as text (ratio < 1 is better for latencies, > 1 for throughput)."""
    p = stock["point"]

    def ok(r: dict) -> str:
        return f"{r['metrics']['completed']}/{len(r['requests'])}"

    lines = [f"rate={p['request_rate']} max_concurrency={p['max_concurrency']}  "
             f"(completed: stock {ok(stock)}, lynx {ok(lynx)})",
             f"{'':32} {'stock':>10} {'lynx':>10} {'lynx/stock':>11}"]
    for label, a, b, r in table_rows(stock, lynx):
        lines.append(f"{label:32} {a:10.2f} {b:10.2f} {('-' if r is None else f'{r:.3f}'):>11}")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], png: Path, title: str) -> Path | None:
    """Latency, throughput and goodput over the sweep, stock beside Lynx (None without matplotlib)."""
    plt = pyplot(png)
    if plt is None:
        return None

    points = [r["point"] for r in results["stock"]]
    labels = [f"rate={p['request_rate']}\nconc={p['max_concurrency'] or '-'}" for p in points]
    x = np.arange(len(labels))
    style = {"stock": dict(color="tab:gray", marker="o"), "lynx": dict(color="tab:red", marker="s")}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [(axes[0, 0], "TPOT (ms)", {"p50": "median_tpot_ms", "p99": "p99_tpot_ms"}),
              (axes[0, 1], "TTFT (ms)", {"p50": "median_ttft_ms", "p99": "p99_ttft_ms"}),
              (axes[1, 0], "output throughput (tok/s)", {"": "output_throughput"})]
    for ax, ylabel, keys in panels:
        for name in SERVERS:
            for (what, key), ls in zip(keys.items(), ["-", "--"]):
                ax.plot(x, [r["metrics"][key] for r in results[name]], ls=ls, label=f"{name} {what}".strip(),
                        markerfacecolor="none" if what == "p99" else None, **style[name])
        ax.set_ylabel(ylabel)
    ax = axes[1, 1]
    slos = list(results["stock"][0]["goodput_tpot"])
    for name in SERVERS:
        for j, slo in enumerate(slos):
            ax.plot(x, [r["goodput_tpot"][slo]["request_goodput"] for r in results[name]],
                    ls=["-", "--", ":", "-."][j % 4], label=f"{name} TPOT<={slo} ms", **style[name])
    ax.set_ylabel("goodput (req/s)")
    for ax in axes.flat:
        ax.set_xticks(x, labels)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _json_safe(obj):
    # inf/nan are not JSON: inf rates and undefined values become strings / null.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("inf" if obj == math.inf else None)
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


# --------------------------------------------------------------------------- command line


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _concurrencies(s: str) -> list[int | None]:
    return [None if x.strip().lower() in ("none", "0", "-") else int(x) for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The load test's command line (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.load_test", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--start", action="store_true",
                       help="start the stock and the Lynx server here, one after the other")
    where.add_argument("--stock-url", help="a running stock server (then --lynx-url too)")
    ap.add_argument("--lynx-url", help="a running server with --moe-backend lynx")
    ap.add_argument("--aa", action="store_true",
                    help="with --start: start stock, stock again (A/A) and Lynx side by side, each on its own port, "
                         "and run every point --repeats times against all three in rotating order")
    ap.add_argument("--repeats", type=int, default=3, help="--aa: repeats of every point (default 3)")
    ap.add_argument("--prompts-per-concurrency", type=float,
                    help="requests per point = this x the point's concurrency cap (at least 2) instead of --num-prompts")
    ap.add_argument("--input-len", type=int, help="every prompt this many tokens (instead of the ShareGPT-like mix)")
    ap.add_argument("--output-len", type=int,
                    help="every answer this many tokens (instead of the ShareGPT-like mix): steady decode")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds for the servers to become healthy")
    ap.add_argument("--model-path", default=str(DEFAULT_MODEL),
                    help="model to serve with --start; with URLs only its tokenizer is used (default: bundled model)")
    ap.add_argument("--tokenizer", help="tokenizer for the dataset lengths and bench_serving (default: --model-path)")
    ap.add_argument("--server-args", default="", help="extra sglang.launch_server flags for both servers (--start)")
    ap.add_argument("--lynx-args", default="",
                    help='extra flags for the Lynx server only, e.g. "--lynx-policy oea" (a single word: '
                         '--lynx-args=--flag, or argparse takes it for an option)')
    ap.add_argument("--request-rates", type=_floats, default=[math.inf], help="comma list, req/s; inf = all at once")
    ap.add_argument("--max-concurrency", type=_concurrencies, default=[1, 4],
                    help="comma list of caps on requests in flight; none = no cap")
    ap.add_argument("--num-prompts", type=int, default=8, help="requests per point")
    ap.add_argument("--length-scale", type=float, default=1.0, help="multiply every ShareGPT-like length by this")
    ap.add_argument("--max-len", type=int, default=SHAREGPT_MIX.max_len, help="clip lengths here (unscaled tokens)")
    ap.add_argument("--tpot-slo-ms", type=_floats, default=[20.0, 25.0, 30.0], help="comma list of TPOT SLOs (ms)")
    ap.add_argument("--seed", type=int, default=0, help="dataset, shuffling and Poisson arrivals")
    ap.add_argument("--backend", default="sglang", help="bench_serving --backend (sglang: native /generate)")
    ap.add_argument("--warmup-requests", type=int, default=1)
    ap.add_argument("--bench-args", default="", help="extra bench_serving flags, passed last")
    ap.add_argument("--out", type=Path,
                    help="prefix of the .json/.png results (default benchmarks/results/load_test_<device>)")
    ap.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="dataset and bench_serving's JSONL log")
    args = ap.parse_args(argv)
    if args.stock_url and not args.lynx_url:
        ap.error("--stock-url needs --lynx-url")
    if args.start and args.lynx_url:
        ap.error("--lynx-url is for running servers; --start starts its own")
    if args.aa and not args.start:
        ap.error("--aa starts its own three servers: use it with --start")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def _device() -> "torch.device":  # noqa: F821 - torch imported lazily
    import torch

    from lynx_sglang.runtime.cpu.support import has_accelerator

    return torch.device("cuda" if has_accelerator() else "cpu")


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _main_aa(args: argparse.Namespace, settings: BenchSettings, points: list[Point], num_prompts: dict,
             dataset: dict, tokenizer_path) -> dict:
    """--aa: three servers side by side, every point ``--repeats`` times in rotating order; report and save."""
    import os

    import transformers

    launch = aa_launch_args(args.model_path, shlex.split(args.server_args), shlex.split(args.lynx_args))
    t_start = time.monotonic()
    with servers_side_by_side(launch, timeout=args.start_timeout, log_dir=args.work_dir / "server_logs") as srvs:
        servers = {n: {"url": s.url, "launch_args": launch[n], "started_in_s": s.started_in_s,
                       "log": str(s.log_path)} for n, s in srvs.items()}
        print("servers up: " + ", ".join(f"{n} {s.url} ({s.started_in_s:.0f} s)" for n, s in srvs.items()), flush=True)
        runs = run_interleaved({n: s.url for n, s in srvs.items()}, points, settings, args.repeats, num_prompts)
    wall_s = time.monotonic() - t_start
    for name in servers:  # the same for every run: keep it once
        servers[name]["server_info"] = next((r.get("server_info") for r in runs if r["server"] == name), None)
    for r in runs:
        r.pop("server_info", None)
    summary = aa_summary(runs)
    print("\n" + format_aa_table(summary))

    device = _device()
    if args.out is None:
        args.out = RESULTS_DIR / f"load_test_aa_{device.type}"
    env = environment(device) | {"cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
                                 "transformers": transformers.__version__}
    with contextlib.suppress(OSError):
        env["loadavg_at_end"] = list(os.getloadavg())
    payload = {
        "environment": env,
        "command": "python -m benchmarks.load_test " + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
        "settings": {
            "mode": "aa", "model_path": args.model_path, "tokenizer": str(tokenizer_path),
            "points": [p.to_json() for p in points], "num_prompts": {p.label: n for p, n in num_prompts.items()},
            "repeats": args.repeats, "order": "rotated by one server per repeat and per point",
            "input_len": args.input_len, "output_len": args.output_len, "length_scale": args.length_scale,
            "tpot_slo_ms": args.tpot_slo_ms, "seed": args.seed, "backend": args.backend,
            "warmup_requests": args.warmup_requests, "bench_args": list(settings.bench_args),
            "server_args": args.server_args, "lynx_args": args.lynx_args, "bench_serving_log": settings.output_file,
            "dataset": dataset, "wall_s": wall_s,
            # inherited by the servers: SGLANG_CPU_OMP_THREADS_BIND pins each server's torch threads
            "server_env": {k: os.environ[k] for k in ("SGLANG_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS") if k in os.environ},
        },
        "servers": servers,
        "summary": summary,
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_name(out.name + ".json")
    json_path.write_text(json.dumps(_json_safe(payload), indent=1) + "\n")
    png = plot_aa(summary, out.with_name(out.name + ".png"),
                  f"Lynx vs stock, side by side with an A/A stock server: {Path(args.model_path).name}, "
                  f"{args.repeats} repeats, output {args.output_len or 'mix'} tokens, {env.get('cpu_model') or env['device']}"
                  f" ({env.get('cpu_count')} cores)")
    print(f"\nwrote {json_path}" + (f" and {png}" if png else "") + f" ({wall_s / 60:.1f} min)")
    return payload


def main(argv: list[str] | None = None) -> dict:
    """Run the load test; print a table per point, write ``<out>.json`` and ``<out>.png``; return the payload."""
    args = parse_args(argv)
    args.argv = argv
    from transformers import AutoTokenizer

    tokenizer_path = args.tokenizer or args.model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=True)
    mix = LengthMix(**{**asdict(SHAREGPT_MIX), "max_len": args.max_len})
    if args.input_len:  # sigma 0: every length is the mean exactly
        mix = dataclasses.replace(mix, input_mean=float(args.input_len), input_sigma=0.0)
    if args.output_len:
        mix = dataclasses.replace(mix, output_mean=float(args.output_len), output_sigma=0.0)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    points = sweep_points(args.request_rates, args.max_concurrency)
    num_prompts = {p: prompts_for(p, args.prompts_per_concurrency, args.num_prompts) for p in points}
    fixed = f"_in{args.input_len or 'mix'}_out{args.output_len or 'mix'}" if args.input_len or args.output_len else ""
    dataset = write_sharegpt_like_dataset(
        args.work_dir / f"sharegpt_like_{args.seed}_{args.length_scale:g}{fixed}_{max(num_prompts.values())}.json",
        max(num_prompts.values()), tokenizer, seed=args.seed, length_scale=args.length_scale, mix=mix)
    print(f"dataset: {dataset['path']} ({dataset['num_prompts']} requests, median input {dataset['median_input']:g}, "
          f"median output {dataset['median_output']:g} tokens, exact lengths {dataset['exact_fraction']:.0%})")
    settings = BenchSettings(dataset_path=dataset["path"], tokenizer=str(tokenizer_path), num_prompts=args.num_prompts,
                             tpot_slo_ms=tuple(args.tpot_slo_ms), seed=args.seed, backend=args.backend,
                             warmup_requests=args.warmup_requests, bench_args=tuple(shlex.split(args.bench_args)),
                             output_file=str(args.work_dir / f"bench_serving_{stamp}.jsonl"))
    if args.aa:
        return _main_aa(args, settings, points, num_prompts, dataset, tokenizer_path)

    results: dict[str, list[dict]] = {}
    servers: dict[str, dict] = {}
    if args.start:
        launch = server_launch_args(args.model_path, shlex.split(args.server_args), shlex.split(args.lynx_args))
        for name in SERVERS:  # one after the other: on one GPU (or 2 CPU cores) both would not fit side by side
            print(f"\nstarting the {name} server: {' '.join(launch[name])}", flush=True)
            with running_server(*launch[name]) as srv:
                print(f"{name} server up in {srv.started_in_s:.0f} s at {srv.url}", flush=True)
                servers[name] = {"url": srv.url, "launch_args": launch[name], "started_in_s": srv.started_in_s}
                results[name] = run_sweep(srv.url, points, settings, name, num_prompts)
    else:
        for name, url in zip(SERVERS, (args.stock_url, args.lynx_url)):
            servers[name] = {"url": url, "launch_args": None}
            results[name] = run_sweep(url, points, settings, name, num_prompts)

    for name in SERVERS:  # the same for every point: keep it once
        servers[name]["server_info"] = results[name][0].get("server_info")
        for r in results[name]:
            r.pop("server_info", None)

    print("\n" + "\n\n".join(format_table(s, ly) for s, ly in zip(results["stock"], results["lynx"])))

    device = _device()
    if args.out is None:
        info = servers["stock"]["server_info"] or {}
        args.out = RESULTS_DIR / f"load_test_{info.get('device') or device.type}"
    payload = {
        "environment": environment(device),
        "settings": {
            "mode": "start" if args.start else "urls", "model_path": args.model_path, "tokenizer": str(tokenizer_path),
            "points": [p.to_json() for p in points], "num_prompts": args.num_prompts,
            "length_scale": args.length_scale, "tpot_slo_ms": args.tpot_slo_ms, "seed": args.seed,
            "backend": args.backend, "warmup_requests": args.warmup_requests, "bench_args": list(settings.bench_args),
            "server_args": args.server_args, "lynx_args": args.lynx_args, "bench_serving_log": settings.output_file,
            "dataset": dataset,
        },
        "servers": servers,
        "results": results,
        "comparison": [
            {"point": s["point"], "rows": [{"metric": label, "stock": a, "lynx": b, "lynx_over_stock": r}
                                           for label, a, b, r in table_rows(s, ly)]}
            for s, ly in zip(results["stock"], results["lynx"])
        ],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_name(out.name + ".json")
    json_path.write_text(json.dumps(_json_safe(payload), indent=1) + "\n")
    png = plot(results, out.with_name(out.name + ".png"),
               f"stock vs Lynx, {Path(args.model_path).name}, {args.num_prompts} ShareGPT-like requests/point "
               f"(length x{args.length_scale:g}), {payload['environment']['device']}")
    print(f"\nwrote {json_path}" + (f" and {png}" if png else ""))
    return payload


if __name__ == "__main__":
    main()
