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
from lynx_sglang.server_process import DEFAULT_MODEL, REPO, running_server

DEFAULT_WORK_DIR = REPO / "build" / "load_test"
SERVERS = ("stock", "lynx")


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


def run_point(url: str, point: Point, s: BenchSettings, tag: str = "") -> dict:
    """One bench_serving run against ``url``; its metrics, TPOT goodput and per-request records.

    The prefix cache is flushed after the warm-up request (``--flush-cache``), so a point
    does not profit from the prompts of the point before it.
    """
    argv = ["--backend", s.backend, "--base-url", url, "--dataset-name", "sharegpt", "--dataset-path", s.dataset_path,
            "--tokenizer", s.tokenizer, "--num-prompts", str(s.num_prompts), "--request-rate", str(point.request_rate),
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


def run_sweep(url: str, points: list[Point], s: BenchSettings, name: str) -> list[dict]:
    """Every point against one server, in order; Lynx's counters (if published) per point."""
    results = []
    for point in points:
        print(f"\n=== {name}: {point.label} against {url}", flush=True)
        before = _lynx_totals(url)
        r = run_point(url, point, s, tag=f"{name} {point.label}")
        r["lynx_counters"] = _lynx_delta(before, _lynx_totals(url))
        results.append(r)
    return results


def server_launch_args(model_path: str, server_args: list[str], lynx_args: list[str]) -> dict[str, list[str]]:
    """Launch arguments of the two servers: the same model and flags; Lynx adds ``--moe-backend lynx``."""
    common = ["--model-path", model_path, "--enable-metrics", *server_args]
    return {"stock": common, "lynx": [*common, "--moe-backend", "lynx", *lynx_args]}


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
    return args


def _device() -> "torch.device":  # noqa: F821 - torch imported lazily
    import torch

    from lynx_sglang.runtime.cpu.support import has_accelerator

    return torch.device("cuda" if has_accelerator() else "cpu")


def main(argv: list[str] | None = None) -> dict:
    """Run the load test; print a table per point, write ``<out>.json`` and ``<out>.png``; return the payload."""
    args = parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer_path = args.tokenizer or args.model_path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, trust_remote_code=True)
    mix = LengthMix(**{**asdict(SHAREGPT_MIX), "max_len": args.max_len})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dataset = write_sharegpt_like_dataset(args.work_dir / f"sharegpt_like_{args.seed}_{args.length_scale:g}.json",
                                          args.num_prompts, tokenizer, seed=args.seed,
                                          length_scale=args.length_scale, mix=mix)
    print(f"dataset: {dataset['path']} ({args.num_prompts} requests, median input {dataset['median_input']:g}, "
          f"median output {dataset['median_output']:g} tokens, exact lengths {dataset['exact_fraction']:.0%})")
    settings = BenchSettings(dataset_path=dataset["path"], tokenizer=str(tokenizer_path), num_prompts=args.num_prompts,
                             tpot_slo_ms=tuple(args.tpot_slo_ms), seed=args.seed, backend=args.backend,
                             warmup_requests=args.warmup_requests, bench_args=tuple(shlex.split(args.bench_args)),
                             output_file=str(args.work_dir / f"bench_serving_{stamp}.jsonl"))
    points = sweep_points(args.request_rates, args.max_concurrency)

    results: dict[str, list[dict]] = {}
    servers: dict[str, dict] = {}
    if args.start:
        launch = server_launch_args(args.model_path, shlex.split(args.server_args), shlex.split(args.lynx_args))
        for name in SERVERS:  # one after the other: on one GPU (or 2 CPU cores) both would not fit side by side
            print(f"\nstarting the {name} server: {' '.join(launch[name])}", flush=True)
            with running_server(*launch[name]) as srv:
                print(f"{name} server up in {srv.started_in_s:.0f} s at {srv.url}", flush=True)
                servers[name] = {"url": srv.url, "launch_args": launch[name], "started_in_s": srv.started_in_s}
                results[name] = run_sweep(srv.url, points, settings, name)
    else:
        for name, url in zip(SERVERS, (args.stock_url, args.lynx_url)):
            servers[name] = {"url": url, "launch_args": None}
            results[name] = run_sweep(url, points, settings, name)

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
