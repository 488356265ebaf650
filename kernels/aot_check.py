"""Compile every kernel variant for a GPU target on a machine without a GPU.

The Triton interpreter runs kernels as Python and accepts code the GPU
compiler rejects; this check closes that gap. It records the exact launches
``select_triton`` makes (so it can never drift from the launcher), compiles
each to a cubin for the chosen architecture with Triton's bundled ptxas, and
reports registers and spills per variant.

    python -m lynx_sglang.kernels.aot_check --arch 90                      # up to CHECKED_MAX_EXPERTS
    python -m lynx_sglang.kernels.aot_check --arch 90 --max-experts 1024   # every class the config accepts

Variants: the product's router shapes, and one router per padded class the kernels are specialised on
(``E_PAD`` = next power of two of E, ``K_PAD`` / ``KT_PAD`` of k and k + shared slots, ``NB`` = beta + 1 affinity
bins, ``BLOCK_T`` by E), each class at its largest member, up to ``--max-experts`` (``MAX_EXPERTS`` covers every
class the configuration accepts), with the configuration's ``MAX_ROUTED_TOP_K`` and ``MAX_BETA``, both scorings,
every policy (lynx capped and uncapped, and with ``refill_similarity``: the reroute kernel's ``REFILL``),
``num_valid`` as a tensor and as an int. Exits 1 if a variant spills.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lynx_sglang.runtime.selection.config import (
    MAX_BETA,
    MAX_EXPERTS,
    MAX_KERNEL_EXPERTS,
    MAX_ROUTED_TOP_K,
    LynxPolicy,
    RouterSpec,
    make_policy,
)
from lynx_sglang.kernels import expert_selection as ks
from lynx_sglang.runtime.selection.stats import NUM_STATS

_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
                 torch.int64: "i64", torch.int8: "i8"}
KERNELS = ("_vote_kernel", "_keep_kernel", "_reroute_kernel")
#: Largest expert count whose every kernel variant is compiled and checked in CI (tests/test_kernels_compile.py).
#: The configuration accepts up to MAX_EXPERTS; above this the keep kernel spills on sm_90 (E_PAD 512) and takes
#: minutes per variant to compile (E_PAD 1024): run ``--max-experts 1024`` to see it.
CHECKED_MAX_EXPERTS = MAX_KERNEL_EXPERTS  # the selector refuses the kernels above it
#: The product's router shapes: (E, k, shared slots).
PRODUCT_SHAPES = ((8, 2, 0), (64, 6, 2), (128, 8, 0), (256, 8, 1))


class _Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((args, kw))


def recorded_launches(router: RouterSpec, policy, bias: bool, weights_dtype=torch.float32, block_t=None,
                      num_valid_tensor: bool = True):
    """(kernel function, positional args, constexpr kwargs) for each launch of one call (``num_valid`` a
    device tensor, as CUDA-graph decode passes it, or an int; lynx with ``refill_similarity`` > 0 passes an
    [E, E] refill bias, as the selector does)."""
    T, E = 64, router.num_experts
    refill = isinstance(policy, LynxPolicy) and policy.refill_similarity > 0
    recorders = {name: _Recorder(getattr(ks, name)) for name in KERNELS}
    saved = {name: getattr(ks, name) for name in KERNELS}
    try:
        for name, rec in recorders.items():
            setattr(ks, name, rec)
        ws = ks.Workspace.allocate(E, ks.num_bins(policy), T, "cpu")
        ids = torch.zeros(T, router.total_slots, dtype=torch.int32)
        ks.select_triton(policy, router, torch.zeros(T, E, dtype=torch.bfloat16), ids,
                         torch.zeros(T, router.total_slots, dtype=weights_dtype),
                         torch.tensor(T, dtype=torch.int32) if num_valid_tensor else T,
                         torch.zeros(E) if bias else None, ws, torch.zeros(NUM_STATS, dtype=torch.int64),
                         torch.empty_like(ids), torch.zeros(T, router.total_slots, dtype=weights_dtype), block_t,
                         torch.zeros(E, E) if refill else None)
    finally:
        for name, fn in saved.items():
            setattr(ks, name, fn)
    return [(saved[name], args, kw) for name, rec in recorders.items() for args, kw in rec.calls]


def compile_launch(fn, args, constexprs, arch: int):
    """Compile one recorded launch to a cubin; returns the CompiledKernel."""
    names = fn.arg_names
    sig = {}
    for name, value in zip(names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + _TRITON_TYPES[value.dtype]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    constexprs = dict(constexprs)
    options = {opt: constexprs.pop(opt) for opt in ("num_warps", "num_stages") if opt in constexprs}
    sig.update({n: "constexpr" for n in constexprs})
    order = list(sig)
    src = ASTSource(fn=fn, signature=sig, constexprs={(order.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_usage(kernel, arch: int) -> dict:
    """Registers and spill bytes from ptxas -v on the kernel's PTX."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        # The options Triton's own make_cubin passes (so the usage is that of the cubin it builds).
        out = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name=sm_{arch}a" if arch >= 90 else f"--gpu-name=sm_{arch}", f.name,
                              "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return {"registers": int(regs.group(1)) if regs else None, "spill_store_bytes": int(spill.group(1)) if spill else None}


def _pow2_upto(n: int):
    p = 1
    while p < n:
        yield p
        p *= 2
    yield p


def class_routers(max_experts: int = MAX_EXPERTS):
    """(E, k, shared slots) covering every padded class up to ``max_experts``: each E_PAD at its largest
    member (E = E_PAD; the largest, ``max_experts``, is the configuration's maximum when it allows), one shared
    slot (KT_PAD a class up where k + 1 crosses a power of two). k is the largest allowed (every K_PAD up to
    MAX_ROUTED_TOP_K's) at the small classes and at the largest one, the extremes register use grows towards;
    k = 4 between them (the product shapes add k = 6 and 8 there). Plus k = 1 at a large E and masked E and k
    (neither a power of two)."""
    top = min(max_experts, MAX_EXPERTS)
    out = []
    for e_pad in _pow2_upto(top):
        E = min(e_pad, top)
        k = min(MAX_ROUTED_TOP_K, E) if E <= MAX_ROUTED_TOP_K or E == top else 4
        out.append((E, k, 1 if E > 1 else 0))
    out += [(3, 3, 0), (min(100, top), 1, 0), (min(33, top), 5, 2)]
    return list(dict.fromkeys(out))


def variants(max_experts: int = CHECKED_MAX_EXPERTS):
    """(router, policy, num_valid as a tensor) for every variant compiled: the product's router shapes with
    every policy (lynx also with its similarity refill), then one router per padded class up to ``max_experts``
    with lynx at the deepest binning (MAX_BETA), with the refill and with ``keep_top``, and the default one
    uncapped, oea, budget and off."""
    for E, k, shared in PRODUCT_SHAPES:
        if E > max_experts:
            continue
        for scoring, bias in (("softmax", False), ("sigmoid", True)):
            router = RouterSpec(E, k, shared, scoring, bias)
            for name, params in (("lynx", {}), ("lynx", {"max_moved_weight": 1.0}),
                                 ("lynx", {"refill_similarity": 2.0}), ("oea", {}),
                                 ("budget", {"max_experts": k}), ("off", {})):
                yield router, make_policy(name, **params), True
    for E, k, shared in class_routers(max_experts):
        for scoring, bias in (("sigmoid", True), ("softmax", False)):
            router = RouterSpec(E, k, shared, scoring, bias)
            deep = make_policy("lynx", beta=MAX_BETA, max_moved_weight=0.4)
            yield router, deep, True
            # The refill changes the reroute kernel only (REFILL): its vote and keep launches are deep's.
            yield router, make_policy("lynx", beta=MAX_BETA, max_moved_weight=0.4, refill_similarity=2.0), True
            if scoring == "softmax":
                # keep_top changes the vote kernel only (K0 > 0 for lynx): one more atomic per pick.
                yield router, make_policy("lynx", beta=MAX_BETA, max_moved_weight=0.4, keep_top=min(2, k)), True
                continue  # the rest differ from sigmoid only in the shared scoring code
            yield router, make_policy("lynx", max_moved_weight=1.0), False  # uncapped; num_valid an int
            for name, params in (("oea", {}), ("budget", {"max_experts": k}), ("off", {})):
                yield router, make_policy(name, **params), True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--max-experts", type=int, default=CHECKED_MAX_EXPERTS,
                    help=f"largest E compiled (default %(default)s; the configuration accepts {MAX_EXPERTS})")
    args = ap.parse_args()
    if ks.interpreting():
        print("unset TRITON_INTERPRET: the interpreter has no compiler to check", file=sys.stderr)
        return 2
    seen, report = set(), []
    for router, policy, nv_tensor in variants(args.max_experts):
        for fn, launch_args, kw in recorded_launches(router, policy, router.has_correction_bias,
                                                     num_valid_tensor=nv_tensor):
            key = (fn.__name__, tuple(sorted(kw.items())))
            if key in seen:
                continue
            seen.add(key)
            t0 = time.perf_counter()
            kernel = compile_launch(fn, launch_args, kw, args.arch)
            row = {"kernel": fn.__name__, "E": router.num_experts, "k": router.top_k,
                   "shared": router.num_shared_slots, "policy": policy.name, "scoring": router.scoring_func,
                   "bias": router.has_correction_bias,
                   **{c: kw[c] for c in ("E_PAD", "K_PAD", "KT_PAD", "NB", "BLOCK_T", "NV_FROM_PTR", "CHUNK",
                                         "CAP_MOVES", "REFILL", "K0", "num_warps") if c in kw},
                   **ptxas_usage(kernel, args.arch), "compile_s": round(time.perf_counter() - t0, 2)}
            report.append(row)
            print(json.dumps(row), flush=True)
    spilling = [r for r in report if r["spill_store_bytes"]]
    print(f"compiled {len(report)} kernel variants for sm_{args.arch} (E <= {args.max_experts}); "
          f"{len(spilling)} spill")
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
