"""The main job: a real SGLang server with Lynx, concurrent requests, and what Lynx did.

    python -m lynx_sglang.main_job                      # bundled model, CPU or GPU
    python -m lynx_sglang.main_job --model-path M --policy oea

It starts ``sglang.launch_server --moe-backend lynx --enable-metrics`` (through
``launch/cpu_server.sh`` on a CPU-only machine, ``launch/server.sh`` otherwise),
sends the prompts through the OpenAI-compatible API, reads Lynx's Prometheus
counters and prints, per MoE layer, the distinct experts per decode step
before and after selection, beside the answers.
"""

from __future__ import annotations

import argparse
import time

from lynx_sglang.client import PROMPTS, complete, scrape_lynx_metrics
from lynx_sglang.server_process import DEFAULT_MODEL, START_TIMEOUT_S, flag_value, running_server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=str(DEFAULT_MODEL))
    ap.add_argument("--policy", default="lynx", choices=["lynx", "oea", "budget", "off"])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--start-timeout", type=float, default=START_TIMEOUT_S,
                    help="seconds to wait for the server to serve (a large model on a GPU needs more)")
    ap.add_argument("server_args", nargs="*", help="extra sglang.launch_server arguments (after --)")
    args = ap.parse_args()

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    server_flags = ["--model-path", args.model_path, "--moe-backend", "lynx", "--lynx-policy", args.policy,
                    "--enable-metrics", "--decode-log-interval", "1", *args.server_args]
    if args.policy == "budget" and flag_value(args.server_args, "--lynx-budget-experts") is None:
        server_flags += ["--lynx-budget-experts", "4"]
    print(f"starting SGLang with: {' '.join(server_flags)}", flush=True)
    with running_server(*server_flags, timeout=args.start_timeout) as server:
        print(f"server up in {server.started_in_s:.0f} s at {server.url} (log: {server.log_path})", flush=True)
        t0 = time.monotonic()
        try:
            answers = complete(server.url, prompts, max_tokens=args.max_tokens, concurrency=args.requests)
            elapsed = time.monotonic() - t0
            layers = scrape_lynx_metrics(server.url)
        except Exception as e:
            raise RuntimeError(f"{e}\n--- server log (tail) ---\n{server.log_tail()}") from e

    print(f"\n{len(prompts)} concurrent requests, {args.max_tokens} tokens each, in {elapsed:.1f} s\n")
    print(f"Lynx ({args.policy}) per MoE layer over the decode steps of this run:")
    print(f"{'layer':>5} {'decode steps':>12} {'experts/step before':>20} {'after':>7} {'tokens re-routed':>17}")
    for layer, c in layers.items():
        moved = c.rows_changed / c.rows_voting if c.rows_voting else 0.0
        print(f"{layer:5d} {c.steps:12.0f} {c.mean_experts_before:20.2f} {c.mean_experts_after:7.2f}"
              f" {moved:16.0%}")
    if not layers:
        print("  (no Lynx metrics: no decode step reached the selection stage)")
    print("\nanswers:")
    for prompt, answer in zip(prompts, answers):
        print(f"  {prompt!r:48.48} -> {answer!r}")


if __name__ == "__main__":
    main()
