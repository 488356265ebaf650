"""Host-to-GPU copy bandwidth for paged experts, and HBM bandwidth beside it: the two rates of the
offload cost model in ``docs/offload.md`` (section 4), measured instead of assumed.

What is timed (CUDA events, median of ``--reps`` blocks, after warm-up):

* ``h2d``: copies of ``n`` experts' weights, one ``copy_`` per expert, from pinned host memory into
  GPU slots on one stream, as a paged-experts wave does; per expert size (Qwen3-30B-A3B's bf16 expert,
  9.44 MB; DeepSeek-V3's fp8 expert, 44 MB) and wave size n. Also from pageable (unpinned) memory once.
* ``hbm``: a device-to-device copy of 2 GiB, counting bytes read + written (the peak a weight read can
  approach), and the time to read ``n`` experts' weights once (a sum over them), the HBM side of a step.

    python -m benchmarks.bench_host_transfer              # on a GPU, about 20 s
Writes benchmarks/results/host_transfer_cuda.json (raw timings in microseconds).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from benchmarks.results_io import environment, save
from benchmarks.timing import time_cuda

#: (name, bytes of one routed expert): Qwen3-30B-A3B 3 x 2048 x 768 x 2 B; DeepSeek-V3 3 x 7168 x 2048 x 1 B.
EXPERTS = (("qwen3-30b-a3b-bf16", 3 * 2048 * 768 * 2), ("deepseek-v3-fp8", 3 * 7168 * 2048))
WAVES = (1, 4, 16)


def _times(fn, reps: int) -> list[float]:
    """Microseconds per call of ``fn``, CUDA events around each call (no graph: copies are what is timed)."""
    return time_cuda(fn, reps, per_block=1, graph=False)


def _row(kind: str, expert: str, nbytes: int, n: int, times: list[float], **extra) -> dict:
    med = statistics.median(times)
    row = {"kind": kind, "expert": expert, "expert_bytes": nbytes, "experts": n, "median_us": med,
           "GBps": n * nbytes / med / 1e3, "times_us": times, **extra}
    print(f"{kind:14s} {expert:20s} n={n:3d} {med:10.1f} us {row['GBps']:8.1f} GB/s", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_host_transfer needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    rows = []
    for name, nbytes in EXPERTS:
        n_max = max(WAVES)
        host = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8).pin_memory() for _ in range(n_max)]
        slots = [torch.empty(nbytes, dtype=torch.uint8, device=dev) for _ in range(n_max)]
        for n in WAVES:
            def wave(n=n):
                for i in range(n):
                    slots[i].copy_(host[i], non_blocking=True)
            rows.append(_row("h2d_pinned", name, nbytes, n, _times(wave, args.reps)))
        pageable = [h.clone() for h in host[:4]]  # clone of a pinned tensor is ordinary (pageable) memory
        def wave_pageable():
            for i in range(4):
                slots[i].copy_(pageable[i], non_blocking=True)
        rows.append(_row("h2d_pageable", name, nbytes, 4, _times(wave_pageable, args.reps)))
        # HBM side: read n experts once (a reduction touches every byte; bf16 view halves the element count).
        for n in WAVES:
            flat = [s.view(torch.bfloat16) for s in slots[:n]]
            acc = torch.zeros((), dtype=torch.float32, device=dev)
            def read(flat=flat, acc=acc):
                for t in flat:
                    acc.add_(t.sum(dtype=torch.float32))
            rows.append(_row("hbm_read", name, nbytes, n, _times(read, args.reps)))
        del host, slots, pageable
    big = 2 << 30
    src = torch.randint(0, 255, (big,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    times = _times(lambda: dst.copy_(src), args.reps)
    rows.append({"kind": "d2d_copy", "bytes": big, "median_us": statistics.median(times),
                 "GBps_read_plus_write": 2 * big / statistics.median(times) / 1e3, "times_us": times})
    print(f"d2d copy 2 GiB: {rows[-1]['GBps_read_plus_write']:.0f} GB/s (read + write)", flush=True)
    save("host_transfer_cuda", {"environment": environment(dev), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
