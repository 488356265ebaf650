"""The kernels compile for Hopper (sm_90) without spilling, checked without a GPU.

The interpreter runs kernels as Python and accepts code the GPU compiler
rejects; this compiles every launch the launcher makes with Triton's own
compiler and ptxas, for the product's router shapes and for every padded
class the kernels are specialised on (E_PAD, K_PAD, KT_PAD, NB, BLOCK_T) up to
``aot_check.CHECKED_MAX_EXPERTS``.
"""

import json
import os
import subprocess
import sys

import pytest

from lynx_sglang.kernels.aot_check import CHECKED_MAX_EXPERTS, KERNELS
from lynx_sglang.runtime.selection.config import MAX_BETA, MAX_ROUTED_TOP_K


def _pow2_upto(n):
    out = [1]
    while out[-1] < n:
        out.append(2 * out[-1])
    return set(out)


#: (kernel, policy, E) variants known to spill: the budget keep kernel at E = 100 (E_PAD 128, E not a power
#: of two) keeps an 8-byte stack frame and stores 4 bytes to it (E = 60, 128 and 160 do not). Tracked by
#: test_known_spills_are_fixed below; not a correctness issue.
KNOWN_SPILLS = {("_keep_kernel", "budget", 100)}


@pytest.fixture(scope="module")
def compiled():
    """Every variant ``aot_check`` compiles (default coverage, E <= CHECKED_MAX_EXPERTS): its JSON rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "lynx_sglang.kernels.aot_check", "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=900)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    spills = any(r["spill_store_bytes"] for r in rows)
    assert out.returncode == (1 if spills else 0) and "compiled" in out.stdout, out.stderr[-3000:]
    return rows


def test_every_kernel_variant_compiles_for_sm90_without_spills(compiled):
    rows = compiled
    spilling = [r for r in rows
                if r["spill_store_bytes"] != 0 and (r["kernel"], r["policy"], r["E"]) not in KNOWN_SPILLS]
    assert not spilling, spilling
    assert {r["kernel"] for r in rows} == set(KERNELS)
    assert {r["policy"] for r in rows} == {"off", "lynx", "oea", "budget"}
    assert all(r["registers"] for r in rows)
    by = {name: [r for r in rows if r["kernel"] == name] for name in KERNELS}
    # Every padded expert class up to the checked maximum, in each kernel, and that maximum itself.
    for name in KERNELS:
        assert {r["E_PAD"] for r in by[name]} == _pow2_upto(CHECKED_MAX_EXPERTS), name
        assert max(r["E"] for r in by[name]) == CHECKED_MAX_EXPERTS
        assert {r["E"] for r in by[name]} - _pow2_upto(CHECKED_MAX_EXPERTS), "no E below its padded class"
    # Every padded top-k class up to the configuration's maximum (that maximum at the largest E too), and
    # both rows-per-program choices.
    assert {r["K_PAD"] for r in by["_vote_kernel"]} == _pow2_upto(MAX_ROUTED_TOP_K)
    assert any(r["k"] == MAX_ROUTED_TOP_K and r["E"] == CHECKED_MAX_EXPERTS for r in rows)
    assert {r["KT_PAD"] for r in by["_reroute_kernel"]} == _pow2_upto(MAX_ROUTED_TOP_K + 1)
    assert {r["BLOCK_T"] for r in by["_vote_kernel"]} == {r["BLOCK_T"] for r in by["_reroute_kernel"]} == {8, 16}
    # lynx at every depth up to what the configuration allows (NB = beta + 1 bins, MAX_BETA + 1 at most) at the
    # largest E, with and without the moved-weight cap; num_valid as a device tensor (CUDA-graph decode) and
    # as an int.
    lynx_vote = [r for r in by["_vote_kernel"] if r["policy"] == "lynx"]
    assert any(r["NB"] == MAX_BETA + 1 and r["E"] == CHECKED_MAX_EXPERTS for r in by["_keep_kernel"])
    assert max(r["NB"] for r in lynx_vote) == MAX_BETA + 1
    assert {r["CAP_MOVES"] for r in lynx_vote} == {True, False}
    # keep_top (K0 > 0 in lynx's vote kernel) in every padded expert class.
    assert {r["E_PAD"] for r in lynx_vote if r["K0"] > 0} == _pow2_upto(CHECKED_MAX_EXPERTS)
    assert {r["NV_FROM_PTR"] for r in by["_vote_kernel"]} == {True, False}
    # lynx's similarity refill (REFILL: one [E] bias-row load per freed slot) in every padded expert class.
    refill = [r for r in by["_reroute_kernel"] if r["REFILL"]]
    assert {r["E_PAD"] for r in refill} == _pow2_upto(CHECKED_MAX_EXPERTS)
    assert {r["scoring"] for r in refill} == {"softmax", "sigmoid"}
    assert any(not r["REFILL"] for r in by["_reroute_kernel"])


@pytest.mark.xfail(strict=True, reason="known spills (KNOWN_SPILLS): fix the kernel, then drop the entry and this "
                   "marker")
def test_known_spills_are_fixed(compiled):
    known = [r for r in compiled if (r["kernel"], r["policy"], r["E"]) in KNOWN_SPILLS]
    assert known and not any(r["spill_store_bytes"] for r in known), known
