"""Compile every kernel variant for a GPU target on a machine without a GPU.

The Triton interpreter runs kernels as Python and accepts code the GPU
compiler rejects; this check closes that gap. It records the exact launches
``select_triton`` makes (so it can never drift from the launcher), compiles
each to a cubin for the chosen architecture with Triton's bundled ptxas, and
reports registers and spills per variant.

    python -m lynx_sglang.kernels.aot_check --arch 90
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lynx_sglang.runtime.selection.config import RouterSpec, make_policy
from lynx_sglang.kernels import expert_selection as ks

_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
                 torch.int64: "i64", torch.int8: "i8"}
KERNELS = ("_vote_kernel", "_keep_kernel", "_reroute_kernel")


class _Recorder:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((args, kw))


def recorded_launches(router: RouterSpec, policy, bias: bool, weights_dtype=torch.float32, block_t=None):
    """(kernel function, positional args, constexpr kwargs) for each launch of one call."""
    T, E = 64, router.num_experts
    recorders = {name: _Recorder(getattr(ks, name)) for name in KERNELS}
    saved = {name: getattr(ks, name) for name in KERNELS}
    try:
        for name, rec in recorders.items():
            setattr(ks, name, rec)
        ws = ks.Workspace.allocate(E, ks.num_bins(policy), T, "cpu")
        ids = torch.zeros(T, router.total_slots, dtype=torch.int32)
        ks.select_triton(policy, router, torch.zeros(T, E, dtype=torch.bfloat16), ids,
                         torch.zeros(T, router.total_slots, dtype=weights_dtype), torch.tensor(T, dtype=torch.int32),
                         torch.zeros(E) if bias else None, ws, torch.zeros(5, dtype=torch.int64),
                         torch.empty_like(ids), torch.zeros(T, router.total_slots, dtype=weights_dtype), block_t)
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
        out = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", f.name,
                              "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return {"registers": int(regs.group(1)) if regs else None, "spill_store_bytes": int(spill.group(1)) if spill else None}


def variants():
    """The router shapes and policies the kernels are built for."""
    for E, k, shared in ((8, 2, 0), (64, 6, 2), (128, 8, 0), (256, 8, 1)):
        for scoring, bias in (("softmax", False), ("sigmoid", True)):
            router = RouterSpec(E, k, shared, scoring, bias)
            for name, params in (("lynx", {}), ("lynx", {"max_moved_weight": 0.4}), ("oea", {}),
                                 ("budget", {"max_experts": k}), ("off", {})):
                yield router, make_policy(name, **params)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    if ks.interpreting():
        print("unset TRITON_INTERPRET: the interpreter has no compiler to check", file=sys.stderr)
        return 2
    seen, report = set(), []
    for router, policy in variants():
        for fn, launch_args, kw in recorded_launches(router, policy, router.has_correction_bias):
            key = (fn.__name__, tuple(sorted(kw.items())))
            if key in seen:
                continue
            seen.add(key)
            kernel = compile_launch(fn, launch_args, kw, args.arch)
            row = {"kernel": fn.__name__, "E": router.num_experts, "k": router.top_k, "policy": policy.name,
                   "scoring": router.scoring_func, "bias": router.has_correction_bias, **ptxas_usage(kernel, args.arch)}
            report.append(row)
            print(json.dumps(row), flush=True)
    print(f"compiled {len(report)} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
