"""Where a CPU server's decode time goes, stock against Lynx: py-spy samples of the scheduler process.

    .venv/bin/python -m benchmarks.profile_server --model-path build/twin-trained-qwen3-moe \\
        --out benchmarks/results/profile_twin_cpu

Starts a stock server, then a Lynx one (``--lynx-args``, default the recommended rule compiled), drives
``--concurrency`` requests of ``--max-tokens`` decode tokens, and samples the scheduler (which runs the
model) with py-spy for ``--seconds``. Each sample's stack is put in the first matching category
(``CATEGORIES``, innermost frame first). Shares are within one server: py-spy's sample count varies, so
compare the two servers' shares, and turn them into milliseconds with a TPOT measured by load_test.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import threading
import time
from pathlib import Path

import torch

from benchmarks.results_io import RESULTS_DIR, environment, pyplot, write_json
from lynx_sglang.client import PROMPTS, complete
from lynx_sglang.server_process import running_server

#: (category, substrings of a frame): the first category one of whose substrings is in any frame wins.
CATEGORIES = (
    ("selection (lynx stage)", ("lynx_sglang/runtime/sglang/stage.py", "lynx_sglang/runtime/selection",
                                "torch/_dynamo", "torch/_inductor")),
    ("MoE experts", ("fused_moe_native", "moe_forward_skipping_unused_slots", "moe_forward_native")),
    ("router top-k", ("layers/moe/topk.py",)),
    ("attention", ("torch_native_backend", "radix_attention", "attention")),
    ("dense layers (projections, norms, LM head)", ("layers/linear.py", "layernorm", "logits_processor",
                                                    "vocab_parallel")),
)
OTHER = "scheduler, sampling, I/O, idle"


def classify(frames: list[str]) -> str:
    """The category of one sampled stack (outermost frame first, as py-spy's raw format lists them)."""
    for name, keys in CATEGORIES:
        if any(k in fr for fr in frames for k in keys):
            return name
    return OTHER


def profile_one(model: str, extra: list[str], concurrency: int, max_tokens: int, seconds: int, work: Path) -> dict:
    """Sample one server's scheduler under load; returns {category: share} and the sample count."""
    with running_server("--model-path", model, *extra, timeout=900, log_dir=work) as srv:
        pid = subprocess.run(["pgrep", "-g", str(srv.proc.pid), "-f", "sglang::scheduler"],
                             capture_output=True, text=True).stdout.split()[0]
        complete(srv.url, PROMPTS[:4], max_tokens=8, concurrency=4)  # warm-up
        prompts = (PROMPTS * (3 * concurrency))[: 3 * concurrency]
        load = threading.Thread(target=complete, args=(srv.url, prompts),
                                kwargs=dict(max_tokens=max_tokens, concurrency=concurrency))
        load.start()
        time.sleep(3)  # past the first prefills
        raw = work / "pyspy.txt"
        subprocess.run([shutil.which("py-spy") or str(Path(__import__("sys").executable).with_name("py-spy")),
                        "record", "-p", pid, "-d", str(seconds), "-r", "100", "-f", "raw", "-o", str(raw),
                        "--nonblocking"], check=True, capture_output=True)
        load.join()
    counts: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[classify(stack.split(";"))] += int(n)
    total = sum(counts.values())
    return {"samples": total, "shares": {k: v / total for k, v in counts.most_common()}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default="build/twin-trained-qwen3-moe")
    ap.add_argument("--lynx-args", default="--moe-backend lynx --lynx-torch-compile")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--work-dir", type=Path, default=Path("build/profile_server"))
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "profile_twin_cpu")
    args = ap.parse_args(argv)
    servers = {"stock": [], "lynx": args.lynx_args.split()}
    results = {name: profile_one(args.model_path, extra, args.concurrency, args.max_tokens, args.seconds,
                                 args.work_dir / name) for name, extra in servers.items()}
    for name, r in results.items():
        print(name, r["samples"], {k: round(100 * v, 1) for k, v in r["shares"].items()}, flush=True)
    payload = {"benchmark": "py-spy samples of the scheduler process under load, by category",
               "model": args.model_path, "servers": {n: ["--model-path", args.model_path, *e] for n, e in servers.items()},
               "categories": [c for c, _ in CATEGORIES] + [OTHER],
               "settings": {k: str(v) for k, v in vars(args).items()},
               "environment": environment(torch.device("cpu")), "results": results}
    write_json(args.out, payload)
    plt = pyplot(args.out)
    if plt is not None:
        fig, ax = plt.subplots(figsize=(8, 3))
        left = {n: 0.0 for n in results}
        for cat in payload["categories"]:
            vals = [100 * results[n]["shares"].get(cat, 0.0) for n in results]
            ax.barh(list(results), vals, left=[left[n] for n in results], label=cat)
            for n, v in zip(results, vals):
                left[n] += v
        ax.set_xlabel("share of scheduler samples (%)")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3)
        fig.tight_layout()
        fig.savefig(args.out.with_name(args.out.name + ".png"), dpi=110)
    return payload


if __name__ == "__main__":
    main()
