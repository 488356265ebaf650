"""Serve a calibration file on the CPU server and compare its lynx:* metrics with what the file predicts.

    .venv/bin/python -m benchmarks.calibration_roundtrip --file build/calibration_refill/trained-qwen3-moe_0.01.json \\
        --out benchmarks/results/calibration_roundtrip_cpu

Prompts are held-out documents (``data/corpus/heldout.jsonl.gz``) cut to ``--prompt-chars``; ``--concurrency``
requests of ``--max-tokens`` greedy tokens run at once, so decode batches are about that size. Per layer it
reports the server's distinct experts per step before and after selection and the routed weight moved per
re-routed token, beside the file's held-out prediction at the nearest calibrated batch size. The server's
batches are not the harness's (other prompts, ragged lengths, batches shrinking as requests finish), so
expect agreement in the pattern across layers and within a few experts, not to the decimal.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.results_io import RESULTS_DIR, environment, write_json
from lynx_sglang.client import complete, scrape_lynx_metrics
from lynx_sglang.corpus import HELDOUT, read_jsonl
from lynx_sglang.server_process import running_server


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, required=True, help="a calibration file (python -m lynx_sglang.calibrate)")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-chars", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "calibration_roundtrip_cpu")
    args = ap.parse_args(argv)
    cal = json.loads(args.file.read_text())
    docs = read_jsonl(HELDOUT)
    prompts = [d.text[: args.prompt_chars] for d in docs][: args.requests]
    with running_server("--model-path", cal["model_path"], "--dtype", "float32", "--lynx-config", str(args.file),
                        "--enable-metrics", "--decode-log-interval", "1", timeout=600) as srv:
        complete(srv.url, prompts, max_tokens=args.max_tokens, concurrency=args.concurrency)
        layers = scrape_lynx_metrics(srv.url)
    sizes = sorted(int(b) for b in cal["heldout"])
    B = min(sizes, key=lambda b: abs(b - args.concurrency))
    predicted = cal["heldout"][str(B)]["per_layer"]
    rows = []
    for layer, st in sorted(layers.items()):
        p = predicted.get(str(layer), {})
        rows.append({"layer": layer, "server_steps": st.steps,
                     "server_experts_before": round(st.mean_experts_before, 2),
                     "server_experts_after": round(st.mean_experts_after, 2),
                     "server_moved_per_rerouted_token": round(st.moved_per_rerouted_token, 4),
                     "file_experts_before": p.get("experts_before"), "file_experts_after": p.get("experts_after"),
                     "file_moved_per_rerouted_token": p.get("moved_per_rerouted_token"),
                     "setting": p.get("setting")})
        print(json.dumps(rows[-1]), flush=True)
    payload = {"benchmark": "calibration file served on the CPU server: lynx:* metrics vs the file's prediction",
               "file": str(args.file), "budget_kl": cal["budget_kl"], "file_batch_size": B,
               "settings": {k: str(v) for k, v in vars(args).items()},
               "environment": environment(torch.device("cpu")), "layers": rows}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
