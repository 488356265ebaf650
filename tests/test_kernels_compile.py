"""The kernels compile for Hopper (sm_90) without spilling, checked without a GPU.

The interpreter runs kernels as Python and accepts code the GPU compiler
rejects; this compiles every launch the launcher makes with Triton's own
compiler and ptxas.
"""

import json
import os
import subprocess
import sys


def test_every_kernel_variant_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "lynx_sglang.kernels.aot_check", "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} == {"_vote_kernel", "_keep_kernel", "_reroute_kernel"}
    assert {r["policy"] for r in rows} == {"off", "lynx", "oea", "budget"}
    spilling = [r for r in rows if r["spill_store_bytes"] != 0]
    assert not spilling, spilling
    assert all(r["registers"] for r in rows)
