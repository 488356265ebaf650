"""Time of one MoE layer's decode step, stock (``off``) and with expert selection in front.

What is measured, per model shape, decode batch size B, routing and policy:

* ``time_us``: median time of one MoE layer's decode step: the selection stage
  (``ExpertSelector.run``; absent for ``off``, which is stock SGLang), the routed
  experts, and the model's dense shared expert where it has one. Router logits
  and top-k are inputs (the same for every policy), not timed.
  GPU: the whole step is captured in a CUDA graph and replayed, timed with CUDA
  events; the graph runs ``copies`` layers, each with its own weights and its
  own routing batch, so weights are streamed from HBM as in a real model rather
  than served from L2, and one number averages several routing samples.
  CPU: eager calls, one torch thread, the policies taking turns, timed by the
  process's CPU time (``--cpu-clock wall`` for wall time): on a shared machine
  other jobs' time slices then do not land in the numbers. *Relative numbers
  only*; defaults are small (Qwen3-30B-A3B, B = 1, 8, 32, 7 calls each).
* ``experts_before`` / ``experts_after``: distinct routed experts per layer and
  step as the router picked them / after selection (mean over the copies).
* ``weight_bytes`` and ``achieved_GBps``: expert weights the step must read
  (distinct experts after selection x bytes per expert, plus the shared
  expert) over the measured time, against ``peak_GBps``, measured with a large
  device-to-device copy (bytes read + written per second).
* ``selection_us`` / ``selection_share``: the selection kernels alone (same
  timing method) and their share of the layer's time; ``align_us``: the
  expert-sorting step (``moe_align_block_size``) alone, since on the GPU
  machine it is a stand-in (below).
* ``speedup``: time of ``off`` over time of the policy, same shape, B, routing.

Routing: ``random`` (Gaussian logits, scale 2, plus a per-batch skew shared by
all tokens, as in bench_selection) or ``trace`` (router logits recorded from our
trained model, ``--trace``, replayed at the shape's expert count with
``lynx_sglang.routing_stats.scaled_logits``; shapes with fewer experts than the
trace are skipped). Each copy of the layer replays a different recorded layer.
A row's ``routing_source`` says which trace replay it is: ``recorded`` (the shape
has the trace's E and k: the recorded rows as the model routed them) or
``extrapolated (what-if)`` (another E or k: the recorded profile stretched by
``scaled_logits``, an assumption about how a bigger router would behave).

``--model DIR`` adds the bandwidth-realistic twin of a bundled model as a shape
(``lynx_sglang.twin``: its E, k and hidden size, experts ``--twin-factor`` times
wider; weights random, as for every shape): with ``--routing trace`` and the
model's own trace that is the model's real decode routing at its real E and k.
``--aa`` adds ``off_aa``, stock again, timed interleaved with the others: its
speedup over ``off`` is the noise floor (A/A) a speedup must beat. On CPU every
row also has the paired speedups (``speedup_paired``: off's time over this
policy's in the same round) and their 10-90 % range, and ``roofline_speedup``:
off's expert bytes over this policy's (the speedup if time were the bytes read).

What runs (the JSON's ``kernel`` says it again, with file hashes):

* GPU, ``--kernel sglang_triton``: SGLang's own Triton fused-MoE kernel,
  ``fused_moe_kernel`` through ``invoke_fused_moe_kernel``, for both GEMMs, from
  SGLang's unmodified file ``sglang/kernels/ops/moe/fused_moe_triton_kernels.py``,
  with SGLang's tuned block configs (same lookup: device name, Triton version,
  E, N = d_ff, nearest batch size; SGLang's default config where none exists).
  The GPU machine has neither SGLang nor sgl-kernel, so the kernel files (two
  .py files and the config JSONs, ~150 KB) are exported here from the installed
  wheel and carried; their few imports of SGLang internals (device checks,
  quantisation helpers the bf16 path never calls) are answered by small shims
  without touching ``sys.modules['sglang']``. The orchestration mirrors SGLang's
  ``_prepare_fused_moe_run`` + ``_fused_moe_kernel_sequence`` for the decode
  case that matters here: bf16, unquantised, no expert-parallel filter, no TMA
  (of the tuned configs for these shapes, only M = 4096 asks for it; a request
  is recorded as ``tma_requested_not_used``), out of place (SGLang: in place).
  Where SGLang calls sgl-kernel/JIT CUDA kernels, this runs:
  - SiLU-and-mul: SGLang's own ``act_and_mul_triton`` (same file) for the JIT
    CUDA ``silu_and_mul``;
  - ``moe_align_block_size``: SGLang's ``moe_align_small_numel`` Triton kernel
    where SGLang uses it (B*k <= 64 and E + 1 > 64), otherwise a single-launch
    Triton stand-in written here for sgl-kernel's CUDA kernel (same contract;
    its own time is reported as ``align_us``);
  - top-k sum: ``torch.add`` for k = 2 (as SGLang), SGLang's
    ``moe_sum_reduce_triton`` otherwise (SGLang's own choice for B <= 32 on
    sm90+, a stand-in for sgl-kernel's ``moe_sum_reduce`` above that).
  Shared experts (Qwen2-57B-A14B, DeepSeek-V2-Lite) are a dense MLP in torch
  (cuBLAS), as SGLang runs them beside the fused MoE.
* CPU, ``--kernel sglang_native`` (default there): SGLang's CPU MoE,
  ``fused_moe_native.moe_forward_native`` (per-expert loop, reads only experts in
  use), through ``lynx_sglang.runtime.cpu.support.moe_forward_skipping_unused_slots``:
  exactly what our CPU server runs. ``--kernel torch_loop``: a plain torch
  per-expert loop (no SGLang import). Selection uses the torch backend there.

Commands:

    # CPU (under a minute; relative numbers only; --trace PATH for trace routing,
    # default data/routing/trained-qwen3-moe.pt when present):
    nice -n 19 .venv/bin/python -m benchmarks.bench_moe_layer
    # CPU, the twin of the bundled model (E=32, k=4, experts 32x wider: 4.5 MiB in bf16) on its recorded
    # decode routing, one weight set per model layer, with the A/A noise floor (~3 min):
    .venv/bin/python -m benchmarks.bench_moe_layer --model models/trained-qwen3-moe --routing trace --aa \
        --copies 4 --batches 1,4,8,16,32,64 --reps 15 --out benchmarks/results/moe_layer_twin_cpu
    # CPU logic check of the GPU path: SGLang's Triton kernels in Triton's interpreter (float16: the
    # interpreter computes bf16 dots on raw bits), tiny shapes:
    TRITON_INTERPRET=1 .venv/bin/python -m benchmarks.bench_moe_layer --kernel sglang_triton \
        --dtype float16 --shapes tiny --batches 1,5 --reps 2 --out /tmp/moe_layer_interp
    # GPU: export SGLang's kernel files here (build/ is git-ignored), then on the GPU machine
    # (no sglang there; the call carries build/sglang_moe_files):
    .venv/bin/python -m benchmarks.bench_moe_layer --export-sglang-files build/sglang_moe_files
    python -m benchmarks.bench_moe_layer --device cuda --sglang-files build/sglang_moe_files
    # or, on the GPU machine, all GPU checks and benchmarks, or this benchmark only:
    benchmarks/run_gpu.sh            # benchmarks/run_gpu.sh moe

Results: ``benchmarks/results/moe_layer_<device>.json`` (environment, kernel,
settings, one row per point with raw timings) and ``.png``.
"""

from __future__ import annotations

import argparse
import builtins
import hashlib
import importlib.util
import json
import os
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from benchmarks.timing import time_cuda
from benchmarks.results_io import RESULTS_DIR, cpu_threads, environment, pyplot, write_json
from lynx_sglang import ExpertSelector, RouterSpec, make_policy
from lynx_sglang.synthetic import random_logits, random_similarity, route

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = REPO / "data" / "routing" / "trained-qwen3-moe.pt"
DEFAULT_EXPORT = REPO / "build" / "sglang_moe_files"


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class MoEShape:
    """One MoE layer (per rank, TP = 1) as its HF config gives it."""

    name: str
    experts: int
    top_k: int
    hidden: int
    ff: int  # routed expert intermediate size (SGLang's N for config lookup)
    shared_ff: int = 0  # dense shared-expert MLP intermediate size; 0: none
    shared_gate: bool = False  # Qwen2-MoE: the shared expert is scaled by sigmoid(x @ w_gate)
    renormalize: bool = True  # norm_topk_prob

    def router(self) -> RouterSpec:
        return RouterSpec(self.experts, self.top_k)

    def expert_bytes(self, elem: int) -> int:
        """Bytes of one routed expert's weights (gate+up and down)."""
        return 3 * self.hidden * self.ff * elem

    def shared_bytes(self, elem: int) -> int:
        return (3 * self.hidden * self.shared_ff + (self.hidden if self.shared_gate else 0)) * elem


SHAPES: Dict[str, MoEShape] = {
    s.name: s
    for s in (
        MoEShape("qwen3-30b-a3b", 128, 8, 2048, 768, renormalize=True),
        # Qwen2-57B-A14B: shared_expert_intermediate_size 20480 with a sigmoid gate.
        MoEShape("qwen2-57b-a14b", 64, 8, 3584, 2560, shared_ff=20480, shared_gate=True, renormalize=False),
        MoEShape("mixtral-8x7b", 8, 2, 4096, 14336, renormalize=True),
        # DeepSeek-V2-Lite: 2 shared experts of 1408 = one dense MLP of 2816 (not fused into the MoE by SGLang).
        MoEShape("deepseek-v2-lite", 64, 6, 2048, 1408, shared_ff=2 * 1408, renormalize=False),
        MoEShape("olmoe", 64, 8, 2048, 1024, renormalize=False),
        # Small shapes for tests and smoke runs (E, k of the bundled tiny model).
        MoEShape("tiny", 16, 4, 64, 32, renormalize=True),
        MoEShape("tiny-shared", 16, 4, 64, 32, shared_ff=48, shared_gate=True, renormalize=False),
    )
}
MODEL_SHAPES = ("qwen3-30b-a3b", "qwen2-57b-a14b", "mixtral-8x7b", "deepseek-v2-lite", "olmoe")


def register_twin_shape(model_dir: Path, factor: Optional[int] = None) -> MoEShape:
    """The MoE layer of ``model_dir``'s bandwidth-realistic twin (``lynx_sglang.twin``), added to SHAPES.

    E, k, hidden size and norm_topk_prob from its config.json; routed experts ``factor`` times wider
    (default: the twin tool's, one expert >= 4 MiB in bf16). Shared experts are not modelled: refused.
    """
    from lynx_sglang.twin import check_factor, default_factor, moe_config

    config = json.loads((Path(model_dir) / "config.json").read_text())
    mc = moe_config(config)
    if config.get("n_shared_experts") or config.get("shared_expert_intermediate_size"):
        raise SystemExit(f"{model_dir}: shared experts are not modelled by --model (use a qwen3_moe model)")
    r = check_factor(factor if factor is not None else default_factor(mc["hidden"], mc["ff"]))
    shape = MoEShape(f"{Path(model_dir).name}-twin-r{r}", mc["experts"], mc["top_k"], mc["hidden"], mc["ff"] * r,
                     renormalize=bool(config.get("norm_topk_prob", True)))
    SHAPES[shape.name] = shape
    return shape


@dataclass
class LayerWeights:
    w13: torch.Tensor  # [E, 2*ff, d], gate rows first (SGLang's w13_weight)
    w2: torch.Tensor  # [E, d, ff]
    shared13: Optional[torch.Tensor] = None  # [2*shared_ff, d]
    shared2: Optional[torch.Tensor] = None  # [d, shared_ff]
    shared_gate: Optional[torch.Tensor] = None  # [1, d]


def make_weights(shape: MoEShape, dtype, device, gen: torch.Generator) -> LayerWeights:
    """Random weights (std 0.02; values do not affect timing)."""

    def rnd(*size):
        t = torch.empty(*size, dtype=dtype, device=device)
        if device.type == "cpu":
            return t.normal_(0.0, 0.02, generator=gen)
        return t.normal_(0.0, 0.02)

    d, f, E = shape.hidden, shape.ff, shape.experts
    w = LayerWeights(rnd(E, 2 * f, d), rnd(E, d, f))
    if shape.shared_ff:
        w.shared13, w.shared2 = rnd(2 * shape.shared_ff, d), rnd(d, shape.shared_ff)
        if shape.shared_gate:
            w.shared_gate = rnd(1, d)
    return w


# --------------------------------------------------------------------------- reference and accounting


def distinct_experts(ids: torch.Tensor, num_experts: int) -> int:
    """Distinct routed experts in a batch's ``topk_ids`` (ids outside [0, E), shared slots or -1, not counted)."""
    v = ids.reshape(-1)
    v = v[(v >= 0) & (v < num_experts)]
    return int(torch.unique(v).numel())


def moe_reference(x, w13, w2, ids, weights) -> torch.Tensor:
    """Routed experts, one (token, slot) at a time in float32: sum_j w[t,j] * W2[e] (silu(gate) * up)."""
    T, d = x.shape
    f = w2.shape[2]
    out = torch.zeros(T, d, dtype=torch.float32)
    for t in range(T):
        xt = x[t].float().cpu()
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            h = w13[e].float().cpu() @ xt
            y = w2[e].float().cpu() @ (F.silu(h[:f]) * h[f:])
            out[t] += float(weights[t, j]) * y
    return out


def shared_forward(x: torch.Tensor, w: LayerWeights) -> Optional[torch.Tensor]:
    """The dense shared expert (SGLang runs it beside the fused MoE; here plain torch / cuBLAS)."""
    if w.shared13 is None:
        return None
    h = F.linear(x, w.shared13)
    f = w.shared2.shape[1]
    y = F.linear(F.silu(h[:, :f]) * h[:, f:], w.shared2)
    if w.shared_gate is not None:
        y = torch.sigmoid(F.linear(x, w.shared_gate)) * y
    return y


def shared_reference(x, w: LayerWeights) -> Optional[torch.Tensor]:
    if w.shared13 is None:
        return None
    xf = x.float().cpu()
    h = xf @ w.shared13.float().cpu().T
    f = w.shared2.shape[1]
    y = (F.silu(h[:, :f]) * h[:, f:]) @ w.shared2.float().cpu().T
    if w.shared_gate is not None:
        y = torch.sigmoid(xf @ w.shared_gate.float().cpu().T) * y
    return y


# --------------------------------------------------------------------------- SGLang's kernel files

#: Files of the SGLang wheel this benchmark runs on the GPU (paths inside site-packages).
SGLANG_KERNEL_FILES = (
    "sglang/kernels/ops/moe/fused_moe_triton_kernels.py",
    "sglang/kernels/ops/moe/moe_align_small_numel.py",
)
SGLANG_CONFIG_DIR = "sglang/srt/layers/moe/moe_runner/triton_utils/configs"
MANIFEST = "lynx_sglang_files.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class SGLangFiles:
    """Where SGLang's kernel files are read from: the installed wheel, or a copy exported from it."""

    def __init__(self, root: Path, version: Optional[str], source: str):
        self.root, self.version, self.source = Path(root), version, source

    @classmethod
    def installed(cls) -> Optional["SGLangFiles"]:
        """The installed wheel, found without importing it (None when absent)."""
        try:
            spec = importlib.util.find_spec("sglang")
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            return None
        root = Path(list(spec.submodule_search_locations)[0]).parent
        if not all((root / f).is_file() for f in SGLANG_KERNEL_FILES):
            return None
        try:
            from importlib.metadata import version

            ver = version("sglang")
        except Exception:
            ver = None
        return cls(root, ver, f"installed sglang package at {root}")

    @classmethod
    def exported(cls, root: Path) -> "SGLangFiles":
        root = Path(root)
        manifest = json.loads((root / MANIFEST).read_text())
        files = cls(root, manifest.get("sglang_version"), f"copy exported from the sglang wheel, at {root}")
        for rel, digest in manifest["files"].items():
            if _sha256(root / rel) != digest:
                raise RuntimeError(f"{root / rel} does not match its exported hash")
        return files

    @classmethod
    def resolve(cls, path: Optional[str]) -> "SGLangFiles":
        """``--sglang-files`` / ``$LYNX_SGLANG_FILES``, else the installed wheel, else build/sglang_moe_files."""
        path = path or os.environ.get("LYNX_SGLANG_FILES")
        if path:
            return cls.exported(Path(path))
        inst = cls.installed()
        if inst is not None:
            return inst
        if (DEFAULT_EXPORT / MANIFEST).is_file():
            return cls.exported(DEFAULT_EXPORT)
        raise RuntimeError(
            "SGLang's kernel files were not found: no sglang installed and no exported copy. On a machine with "
            "sglang: python -m benchmarks.bench_moe_layer --export-sglang-files build/sglang_moe_files, and carry "
            "that folder (--sglang-files build/sglang_moe_files)"
        )

    def path(self, rel: str) -> Path:
        return self.root / rel

    def describe(self) -> dict:
        return {
            "sglang_version": self.version,
            "source": self.source,
            "files_sha256": {f: _sha256(self.path(f)) for f in SGLANG_KERNEL_FILES},
        }


def export_sglang_files(dest: Path, shapes: Sequence[MoEShape]) -> Path:
    """Copy SGLang's kernel files and the shapes' tuned configs (every device, every Triton version) to ``dest``."""
    src = SGLangFiles.installed()
    if src is None:
        raise RuntimeError("sglang is not installed here: nothing to export")
    dest = Path(dest)
    files = list(SGLANG_KERNEL_FILES)
    cfg_root = src.path(SGLANG_CONFIG_DIR)
    for d in sorted(p for p in cfg_root.iterdir() if p.is_dir() and p.name.startswith("triton_")):
        for s in shapes:
            for p in sorted(d.glob(f"E={s.experts},N={s.ff},device_name=*.json")):
                if ",dtype=" not in p.name and ",block_shape=" not in p.name:
                    files.append(str(p.relative_to(src.root)))
    digests = {}
    for rel in files:
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(src.path(rel).read_bytes())
        digests[rel] = _sha256(out)
    (dest / MANIFEST).write_text(json.dumps({"sglang_version": src.version, "from": str(src.root),
                                             "files": digests}, indent=1) + "\n")
    return dest


class _Env:
    """Answers the device checks SGLang's kernel files import (mirrors sglang.srt.utils / jit.utils)."""

    def __init__(self):
        self.pdl = True  # set False to fall back if this Triton cannot launch with PDL

    @staticmethod
    def is_cuda() -> bool:
        return torch.cuda.is_available() and torch.version.cuda is not None

    @staticmethod
    def is_hip() -> bool:
        return torch.version.hip is not None

    @staticmethod
    def capability():
        try:
            return torch.cuda.get_device_capability(torch.cuda.current_device())
        except Exception:
            return (0, 0)

    def is_arch_support_pdl(self) -> bool:
        # sglang.kernels.jit.utils.arch.is_arch_support_pdl: CUDA arch major >= 9 (not HIP/MUSA).
        return self.pdl and self.is_cuda() and not self.is_hip() and self.capability()[0] >= 9

    def is_sm90_supported(self) -> bool:
        cuda = tuple(int(x) for x in (torch.version.cuda or "0.0").split(".")[:2])
        return self.is_cuda() and self.capability()[0] == 9 and cuda >= (12, 3)


def _not_on_this_path(name: str):
    def stub(*args, **kwargs):
        raise NotImplementedError(f"{name}: quantised MoE paths are not part of this benchmark")

    stub.__name__ = name
    return stub


def _shim_modules(env: _Env) -> Dict[str, types.ModuleType]:
    def mod(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        return m

    class _Flag:
        def __init__(self, var):
            self.var = var

        def get(self):
            return os.environ.get(self.var, "0").lower() in ("1", "true")

    fp8 = ("per_token_group_quant_fp8", "scaled_fp8_quant", "sglang_per_token_group_quant_fp8")
    int8 = ("per_token_group_quant_int8", "per_token_quant_int8", "sglang_per_token_group_quant_int8")
    return {
        "sglang.kernels.jit.utils": mod("sglang.kernels.jit.utils", is_arch_support_pdl=env.is_arch_support_pdl),
        "sglang.kernels.ops.quantization.fp8_kernel": mod(
            "fp8_kernel", **{n: _not_on_this_path(n) for n in fp8}),
        "sglang.kernels.ops.quantization.int8_kernel": mod(
            "int8_kernel", **{n: _not_on_this_path(n) for n in int8}),
        "sglang.srt.batch_invariant_ops": mod("batch_invariant_ops", is_batch_invariant_mode_enabled=lambda: False),
        "sglang.srt.environ": mod("environ", envs=types.SimpleNamespace(SGLANG_USE_AITER=_Flag("SGLANG_USE_AITER"))),
        # sglang.srt.layers.moe.utils.get_moe_padding_size: 0 unless SGLANG_MOE_PADDING (fp8 only).
        "sglang.srt.layers.moe.utils": mod("moe_utils", get_moe_padding_size=lambda aiter: 0),
        "sglang.srt.utils": mod(
            "srt_utils", cpu_has_amx_support=lambda: False, is_cpu=lambda: False, is_cuda=env.is_cuda,
            is_hip=env.is_hip, is_sm90_supported=env.is_sm90_supported),
    }


def load_sglang_module(files: SGLangFiles, rel: str, env: _Env) -> types.ModuleType:
    """Execute one of SGLang's files, unmodified, as a private module; its ``sglang.*`` imports get the shims."""
    shims = _shim_modules(env)
    real_import = builtins.__import__

    def _import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and (name == "sglang" or name.startswith("sglang.")):
            if name in shims and fromlist:
                return shims[name]
            raise ImportError(f"{name} is not provided to SGLang's kernel file {rel} by this benchmark")
        return real_import(name, globals, locals, fromlist, level)

    path = files.path(rel)
    modname = "lynx_bench_sglang_" + Path(rel).stem
    module = types.ModuleType(modname)
    module.__file__ = str(path)
    module.__dict__["__builtins__"] = {**builtins.__dict__, "__import__": _import}
    sys.modules[modname] = module  # Triton and functools look modules up by name
    exec(compile(path.read_text(), str(path), "exec", dont_inherit=True), module.__dict__)
    return module


# --------------------------------------------------------------------------- moe_align_block_size stand-in


def align_buffers(numel: int, num_experts: int, block_size: int, device):
    """SGLang's buffer sizes for ``moe_align_block_size`` (triton_utils/moe_align_block_size.py)."""
    if numel < num_experts + 1:
        max_padded = numel * block_size
    else:
        max_padded = numel + (num_experts + 1) * (block_size - 1)
    max_padded = (max_padded + 3) // 4 * 4
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    expert_ids = torch.empty(triton.cdiv(max_padded, block_size), dtype=torch.int32, device=device)
    ntpp = torch.empty(1, dtype=torch.int32, device=device)
    return sorted_ids, expert_ids, ntpp


@triton.jit
def _align_standin_kernel(
    ids_ptr, sorted_ptr, expert_ids_ptr, ntpp_ptr,
    numel, block_size, max_padded, max_blocks,
    CH: tl.constexpr, NBK: tl.constexpr,
):
    """sgl-kernel's moe_align_block_size contract ("+1 offset": expert e -> bucket e + 1, -1 -> bucket 0 and
    expert id -1), in one launch without atomics: every program counts the buckets, then scatters its own
    chunks of (token, slot) pairs (stable order), writes the pad slots and the block expert ids of its share."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs = tl.arange(0, CH)
    bk = tl.arange(0, NBK)
    cnt = tl.zeros([NBK], dtype=tl.int32)
    for s in range(0, numel, CH):
        o = s + offs
        m = o < numel
        b = tl.where(m, tl.load(ids_ptr + o, mask=m, other=0).to(tl.int32) + 1, NBK)
        cnt += tl.sum((b[:, None] == bk[None, :]).to(tl.int32), axis=0)
    padded = (cnt + block_size - 1) // block_size * block_size
    end = tl.cumsum(padded, axis=0)
    start = end - padded
    total = tl.sum(padded, axis=0)
    if pid == 0:
        tl.store(ntpp_ptr, total)
    # Pairs: rank inside the bucket = earlier pairs with the same bucket.
    for c in range(pid * CH, numel, nprog * CH):
        o = c + offs
        m = o < numel
        b = tl.where(m, tl.load(ids_ptr + o, mask=m, other=0).to(tl.int32) + 1, NBK)
        rank = tl.zeros([CH], dtype=tl.int32)
        for s in range(0, c + CH, CH):
            o2 = s + offs
            m2 = o2 < numel
            b2 = tl.where(m2, tl.load(ids_ptr + o2, mask=m2, other=0).to(tl.int32) + 1, NBK + 1)
            hit = (b[:, None] == b2[None, :]) & (o2[None, :] < o[:, None])
            rank += tl.sum(hit.to(tl.int32), axis=1)
        base = tl.sum(tl.where(b[:, None] == bk[None, :], start[None, :], 0), axis=1)
        tl.store(sorted_ptr + base + rank, o.to(tl.int32), mask=m)
    # Pad slots of the used region hold numel (disjoint from the pair slots above: no ordering needed).
    for q0 in range(pid * CH, max_padded, nprog * CH):
        q = q0 + offs
        inb = (q[:, None] >= start[None, :]) & (q[:, None] < end[None, :])
        q_start = tl.sum(tl.where(inb, start[None, :], 0), axis=1)
        q_cnt = tl.sum(tl.where(inb, cnt[None, :], 0), axis=1)
        pad = (q < total) & (q - q_start >= q_cnt)
        tl.store(sorted_ptr + q, tl.zeros([CH], dtype=tl.int32) + numel, mask=pad)
    for j0 in range(pid * CH, max_blocks, nprog * CH):
        j = j0 + offs
        first = j * block_size
        inb = (first[:, None] >= start[None, :]) & (first[:, None] < end[None, :])
        eid = tl.sum(tl.where(inb, bk[None, :] - 1, 0), axis=1)
        tl.store(expert_ids_ptr + j, eid, mask=first < total)


def align_standin(topk_ids, num_buckets: int, block_size: int, sorted_ids, expert_ids, ntpp) -> None:
    """Stand-in for ``sgl_kernel.moe_align_block_size(topk_ids, E + 1, block_size, ...)`` (one Triton launch)."""
    numel = topk_ids.numel()
    nbk = triton.next_power_of_2(num_buckets + 1)  # one spare lane: masked pairs use bucket NBK
    ch = max(16, min(64, 8192 // nbk))
    grid = (max(1, min(triton.cdiv(numel, ch), 64)),)
    _align_standin_kernel[grid](
        topk_ids.reshape(-1), sorted_ids, expert_ids, ntpp, numel, block_size,
        sorted_ids.numel(), expert_ids.numel(), CH=ch, NBK=nbk, num_warps=4,
    )


def align_reference(topk_ids: torch.Tensor, num_experts: int, block_size: int):
    """The contract in torch: (sorted ids [total], block expert ids [total / block_size], total); stable order."""
    flat = topk_ids.reshape(-1).long().cpu()
    numel = flat.numel()
    bucket = flat + 1
    cnt = torch.bincount(bucket, minlength=num_experts + 1)
    padded = (cnt + block_size - 1) // block_size * block_size
    start = padded.cumsum(0) - padded
    total = int(padded.sum())
    order = torch.argsort(bucket, stable=True)
    first = cnt.cumsum(0) - cnt
    rank = torch.arange(numel) - first[bucket[order]]
    out = torch.full((total,), numel, dtype=torch.int32)
    out[start[bucket[order]] + rank] = order.to(torch.int32)
    eids = torch.repeat_interleave(torch.arange(num_experts + 1) - 1, padded // block_size).to(torch.int32)
    return out, eids, total


# --------------------------------------------------------------------------- MoE kernels


class MoEKernel:
    """``prepare(shape, B, x)`` -> ``fn(x, w, ids, weights) -> routed output``; ``info`` goes to the JSON."""

    name = ""
    capturable = False  # CUDA-graph capturable (no host syncs)

    def describe(self) -> dict:
        raise NotImplementedError

    def prepare(self, shape: MoEShape, B: int, dtype, device) -> Callable:
        raise NotImplementedError

    def point_info(self) -> dict:
        return {}


class TorchLoopMoE(MoEKernel):
    """Plain torch: one F.linear pair per expert in use (host sync to find them)."""

    name = "torch_loop"

    def describe(self) -> dict:
        return {"name": self.name, "runs": "plain torch per-expert loop over the experts in use (F.linear, "
                "SiLU-and-mul, index_add), reading only those experts; eager"}

    def prepare(self, shape, B, dtype, device):
        def fn(x, w: LayerWeights, ids, weights):
            T, k = ids.shape
            f = w.w2.shape[2]
            out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
            flat = ids.reshape(-1).long()
            for e in torch.unique(flat[flat >= 0]).tolist():
                slots = (flat == e).nonzero().squeeze(1)
                tok = slots // k
                h = F.linear(x[tok], w.w13[e])
                y = F.linear(F.silu(h[:, :f]) * h[:, f:], w.w2[e])
                out.index_add_(0, tok, y.float() * weights.reshape(-1)[slots, None].float())
            return out.to(x.dtype)

        return fn


class SGLangNativeMoE(MoEKernel):
    """SGLang's CPU MoE (``moe_forward_native``) through our CPU server's hook."""

    name = "sglang_native"

    def __init__(self):
        # Imported as tests/test_cpu_server.py does, without cpu_support.install() (process-wide changes): this
        # import path needs no sgl_kernel on CPU, and without AMX the CPU engine's SiLU is the native one anyway.
        from lynx_sglang.runtime.cpu import support as cpu_support
        from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
        from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig

        self._native, self._hook = moe_forward_native, cpu_support.moe_forward_skipping_unused_slots
        self._config = MoeRunnerConfig(activation="silu")

    def describe(self) -> dict:
        import sglang

        return {"name": self.name, "sglang_version": sglang.__version__,
                "runs": "SGLang's CPU MoE sglang.srt.layers.moe.fused_moe_native.moe_forward_native (per-expert "
                        "loop, reads only experts in use) through lynx_sglang.runtime.cpu.support."
                        "moe_forward_skipping_unused_slots, as the CPU server runs it; eager"}

    def prepare(self, shape, B, dtype, device):
        def fn(x, w: LayerWeights, ids, weights):
            layer = types.SimpleNamespace(num_experts=shape.experts, w13_weight=w.w13, w2_weight=w.w2)
            return self._hook(self._native, layer, x, (weights, ids, None), self._config)

        return fn


class SGLangTritonMoE(MoEKernel):
    """SGLang's Triton fused-MoE kernels, run from SGLang's own files (see the module docstring)."""

    name = "sglang_triton"
    capturable = True

    def __init__(self, files: SGLangFiles):
        self.files, self.env = files, _Env()
        self.k = load_sglang_module(files, SGLANG_KERNEL_FILES[0], self.env)
        self.small = load_sglang_module(files, SGLANG_KERNEL_FILES[1], self.env)
        self.pdl_error: Optional[str] = None
        self._info: dict = {}
        if torch.cuda.is_available():
            self._probe_pdl()

    def _probe_pdl(self) -> None:
        """SGLang launches with PDL on sm90+; if this Triton cannot, run without it (recorded in the JSON)."""
        dev = torch.device("cuda")
        # B*k = 16 with E = 16: the align stand-in; B*k = 8 with E = 128: SGLang's small-numel align.
        probes = [(SHAPES["tiny"], 4), (MoEShape("probe-128", 128, 8, 64, 32), 1)]
        for attempt in range(2):
            try:
                for shape, B in probes:
                    w = make_weights(shape, torch.bfloat16, dev, torch.Generator().manual_seed(0))
                    b = make_batches(shape, B, "random", 1, 0, dev)[0]
                    x = torch.randn(B, shape.hidden, device=dev, dtype=torch.bfloat16)
                    self.prepare(shape, B, torch.bfloat16, dev)(x, w, b.ids, b.weights)
                torch.cuda.synchronize()
                return
            except Exception as e:
                if attempt or not self.env.is_arch_support_pdl():
                    raise
                self.env.pdl, self.pdl_error = False, f"{type(e).__name__}: {e}"
                print(f"SGLang's kernels failed to launch with PDL ({self.pdl_error}); running without PDL")

    def describe(self) -> dict:
        d = {"name": self.name, **self.files.describe(),
             "runs": {
                 "gemms": "SGLang fused_moe_kernel (Triton) via invoke_fused_moe_kernel, up (w13) and down (w2, "
                          "router weight applied), from fused_moe_triton_kernels.py, unmodified",
                 "activation": "SGLang act_and_mul_triton (same file), standing in for the JIT CUDA silu_and_mul",
                 "align": "SGLang moe_align_small_numel (Triton) where SGLang uses it (numel <= 64, E + 1 > 64); "
                          "else this benchmark's single-launch Triton stand-in for sgl_kernel.moe_align_block_size",
                 "combine": "torch.add for k = 2 (as SGLang); SGLang moe_sum_reduce_triton for k > 2 (SGLang's "
                            "choice at M <= 32 on sm90+, stand-in for sgl_kernel.moe_sum_reduce above)",
                 "orchestration": "mirror of SGLang _prepare_fused_moe_run + _fused_moe_kernel_sequence: bf16, "
                                  "unquantised, filter_expert=False (no EP), no TMA, no hooks, out of place",
                 "configs": "SGLang's tuned JSON configs, same lookup (device name, Triton version with SGLang's "
                            "fallback order, E, N, nearest M; _down file for the down GEMM); else SGLang's default",
                 "shared_experts": "dense torch MLP (cuBLAS) beside the fused MoE, as SGLang runs it",
             },
             "pdl": self.env.is_arch_support_pdl()}
        if self.pdl_error:
            d["pdl_fallback_error"] = self.pdl_error
        return d

    # -- SGLang's config lookup (fused_moe_triton_config.get_moe_configs / get_default_config) --

    @staticmethod
    def device_name() -> str:
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    @staticmethod
    def triton_version() -> str:
        return triton.__version__

    def _config_file(self, E: int, N: int, down: bool):
        name = self.device_name().replace(" ", "_")
        fname = f"E={E},N={N},device_name={name}{'_down' if down else ''}.json"
        root = self.files.path(SGLANG_CONFIG_DIR)
        exact = root / f"triton_{self.triton_version().replace('.', '_')}" / fname
        if exact.is_file():
            return exact
        if not root.is_dir():
            return None
        versions = sorted((d.name.removeprefix("triton_").replace("_", ".") for d in root.iterdir()
                           if d.name.startswith("triton_")), key=lambda v: tuple(int(x) for x in v.split(".")),
                          reverse=True)
        for v in versions:
            p = root / f"triton_{v.replace('.', '_')}" / fname
            if p.is_file():
                return p
        return None

    def configs(self, E: int, N: int, K: int, M: int):
        """(up config, down config or None, where they came from), as try_get_optimal_moe_config returns them."""
        up_file = self._config_file(E, N, down=False)
        if up_file is not None:
            table = {int(k): v for k, v in json.loads(up_file.read_text()).items()}
            config = dict(table[min(table, key=lambda x: abs(x - M))])
            source = str(up_file.relative_to(self.files.root))
        else:
            config = ({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1} if M <= E
                      else {"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 8})
            source = "sglang default config (no tuned file for this device)"
        down = None
        down_file = self._config_file(E, N, down=True) or up_file
        if down_file is not None:
            table = {int(k): v for k, v in json.loads(down_file.read_text()).items()}
            down = dict(table[min(table, key=lambda x: abs(x - M))])
            down["BLOCK_SIZE_M"] = config["BLOCK_SIZE_M"]  # one align for both GEMMs
        tma = bool(config.pop("USE_TMA", False)) or bool(down and down.pop("USE_TMA", False))
        return config, down, {"config_source": source, "tma_requested_not_used": tma}

    def align(self, topk_ids, E: int, block_size: int):
        sorted_ids, expert_ids, ntpp = align_buffers(topk_ids.numel(), E, block_size, topk_ids.device)
        if topk_ids.numel() <= self.small.SMALL_NUMEL_LIMIT and E + 1 > 64:
            self.small.moe_align_small_numel(topk_ids, E + 1, block_size, sorted_ids, expert_ids, ntpp)
        else:
            align_standin(topk_ids, E + 1, block_size, sorted_ids, expert_ids, ntpp)
        return sorted_ids, expert_ids, ntpp

    def prepare(self, shape, B, dtype, device):
        E, N, K, k = shape.experts, shape.ff, shape.hidden, shape.top_k
        config, down_config, info = self.configs(E, N, K, B)
        km = self.k
        compute_type = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
        use_small = B * k <= self.small.SMALL_NUMEL_LIMIT and E + 1 > 64
        self._info = {**info, "config": config, "down_config": down_config,
                      "align": "sglang moe_align_small_numel" if use_small else "stand-in (Triton)",
                      "combine": "torch.add" if k == 2 else "sglang moe_sum_reduce_triton"}
        quant = dict(use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False, use_int4_w4a16=False,
                     per_channel_quant=False, block_shape=None)

        def fn(x, w: LayerWeights, ids, weights):
            M = x.shape[0]
            sorted_ids, expert_ids, ntpp = self.align(ids, E, config["BLOCK_SIZE_M"])
            cache1 = torch.empty(M * k, 2 * N, device=x.device, dtype=x.dtype)
            km.invoke_fused_moe_kernel(x, w.w13, None, cache1, None, None, None, weights, ids, sorted_ids,
                                       expert_ids, ntpp, False, k, config, compute_type=compute_type,
                                       filter_expert=False, **quant)
            cache2 = torch.empty(M * k, N, device=x.device, dtype=x.dtype)
            km.act_and_mul_triton(cache1.view(-1, 2 * N), cache2, config, None, None, False, "silu")
            out = torch.empty_like(x)
            cache3 = torch.empty(M, k, K, device=x.device, dtype=x.dtype) if k != 1 else None
            km.invoke_fused_moe_kernel(cache2, w.w2, None, cache3 if k != 1 else out.unsqueeze(0), None, None,
                                       None, weights, ids, sorted_ids, expert_ids, ntpp, True, 1,
                                       down_config or config, compute_type=compute_type, filter_expert=False,
                                       router_topk=k, **quant)
            if k == 2:
                torch.add(cache3[:, 0], cache3[:, 1], out=out)
            elif k > 2:
                km.moe_sum_reduce_triton(cache3, out, 1.0)
            return out

        return fn

    def point_info(self) -> dict:
        return dict(self._info)


def make_kernel(name: str, device: torch.device, sglang_files: Optional[str]) -> MoEKernel:
    if name == "auto":
        name = "sglang_triton" if device.type == "cuda" else "sglang_native"
    if name == "sglang_triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--kernel sglang_triton needs CUDA (or TRITON_INTERPRET=1 on CPU, a logic check only)")
        return SGLangTritonMoE(SGLangFiles.resolve(sglang_files))
    if name == "sglang_native":
        if device.type != "cpu":
            raise SystemExit("--kernel sglang_native is SGLang's CPU path: use it with --device cpu")
        return SGLangNativeMoE()
    if name == "torch_loop":
        return TorchLoopMoE()
    raise SystemExit(f"unknown kernel {name!r}")


# --------------------------------------------------------------------------- routing


@dataclass
class Batch:
    logits: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor


def make_batches(shape: MoEShape, B: int, routing: str, copies: int, seed: int, device,
                 trace: Optional[dict] = None, trace_kind: str = "independent_mixed", skew: float = 1.0) -> List[Batch]:
    """One router batch per layer copy: random logits, or trace rows replayed at the shape's E (copy c: layer c)."""
    router = shape.router()
    out = []
    for c in range(copies):
        g = torch.Generator().manual_seed(seed * 1_000_003 + B * 7919 + c * 104729 + shape.experts)
        if routing == "random":
            logits = random_logits(B, shape.experts, scale=2.0, skew=skew, generator=g)
        else:
            from lynx_sglang.routing_stats import scaled_logits

            logits = scaled_logits(trace, c % int(trace["num_layers"]), shape.experts, shape.top_k, B,
                                   generator=g, kind=trace_kind)
        rb = route(router, logits.to(device), renormalize=shape.renormalize)
        out.append(Batch(rb.logits, rb.topk_ids, rb.topk_weights))
    return out


def trace_skip_reason(shape: MoEShape, trace: dict) -> Optional[str]:
    E = int(trace["num_experts"])
    if shape.experts < E:
        return f"the trace has {E} experts; it cannot be replayed at {shape.experts}"
    if shape.experts != E and shape.top_k >= E:
        return f"top_k={shape.top_k} is not below the trace's {E} experts"
    return None


# --------------------------------------------------------------------------- timing


#: CPU clocks: wall time, or CPU time of this process (immune to time slicing on a shared machine).
CPU_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_cpu(fn, reps: int, warmup: int = 1, clock: str = "wall") -> List[float]:
    """Time of each call on ``clock``, microseconds."""
    return time_interleaved([fn], reps, warmup, clock)[0]


def time_interleaved(fns: List[Callable], reps: int, warmup: int = 1, clock: str = "wall") -> List[List[float]]:
    """Time of each call of each function on ``clock``, microseconds; the functions take turns (rotating order)."""
    now = CPU_CLOCKS[clock]
    for f in fns:
        for _ in range(warmup):
            f()
    out: List[List[float]] = [[] for _ in fns]
    for r in range(reps):
        for i in [(r + j) % len(fns) for j in range(len(fns))]:
            t0 = now()
            fns[i]()
            out[i].append((now() - t0) * 1e6)
    return out


def measure_peak(device: torch.device, nbytes: int, clock: str = "wall") -> dict:
    """Copy bandwidth (bytes read + written per second) of one large buffer copy."""
    n = nbytes // 2
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        times = time_cuda(lambda: dst.copy_(src), reps=10, per_block=5, graph=False)
    else:
        times = time_cpu(lambda: dst.copy_(src), reps=5, clock=clock)
    t = statistics.median(times) * 1e-6
    del src, dst
    return {"peak_GBps": 2 * nbytes / t / 1e9, "method": f"{nbytes / 2**20:.0f} MiB copy, read + write bytes",
            "copy_us": times}


# --------------------------------------------------------------------------- one shape


STOCK = ("off", "off_aa")  # off_aa: stock again, the A/A noise floor


def _policy(name: str, shape: MoEShape, budget: Optional[int]):
    if name == "off_aa":
        return make_policy("off")
    if name == "lynx+sim":  # the recommended rule: lynx with the similarity-aware refill
        return make_policy("lynx", refill_similarity=8.0)
    if name == "budget":
        return make_policy("budget", max_experts=budget or max(shape.top_k, shape.experts // 4))
    return make_policy(name)


def _iqr(times: List[float]) -> float:
    """Interquartile range of the per-block times (the spread a median's difference should exceed)."""
    if len(times) < 2:
        return 0.0
    q = statistics.quantiles(times, n=4)
    return q[2] - q[0]


def run_shape(shape: MoEShape, kernel: MoEKernel, args, device, dtype, peak: float,
              trace: Optional[dict]) -> List[dict]:
    """Every (routing, B, policy) point of one shape."""
    elem = torch.tensor([], dtype=dtype).element_size()
    layer_bytes = shape.experts * shape.expert_bytes(elem) + shape.shared_bytes(elem)
    cuda = device.type == "cuda"
    copies = args.copies or (max(2, min(8, int(args.gpu_weight_gib * 2**30 // layer_bytes))) if cuda else 1)
    gen = torch.Generator().manual_seed(args.seed)
    layers = [make_weights(shape, dtype, device, gen) for _ in range(copies)]
    graph = cuda and kernel.capturable

    def per_layer(times):
        return [t / copies for t in times]

    def timed(fns: List[Callable]) -> List[List[float]]:
        """Per function, its times per layer. GPU: one after another (graph replays); CPU: interleaved
        round-robin, so that load from other processes falls on every policy alike."""
        if cuda:
            return [per_layer(time_cuda(f, args.reps, args.per_block, graph=graph)) for f in fns]
        return [per_layer(t) for t in time_interleaved(fns, args.reps, clock=args.cpu_clock)]

    rows = []
    for routing in args.routing:
        if routing == "trace":
            if trace is None:
                print(f"{shape.name}: no trace file, trace routing skipped", flush=True)
                continue
            why = trace_skip_reason(shape, trace)
            if why:
                print(f"{shape.name}: trace routing skipped: {why}", flush=True)
                rows.append({"shape": shape.name, "routing": "trace", "skipped": why})
                continue
        for B in args.batches:
            batches = make_batches(shape, B, routing, copies, args.seed, device, trace, args.trace_kind, args.skew)
            xs = [torch.randn(B, shape.hidden, generator=gen).to(dtype=dtype, device=device) for _ in range(copies)]
            moe = kernel.prepare(shape, B, dtype, device)
            info = kernel.point_info()
            cases = []
            for pname in args.policies:
                policy = _policy(pname, shape, args.budget_experts)
                sels = [] if pname in STOCK else [
                    ExpertSelector(shape.router(), policy, B, device, backend=args.selection_backend,
                                   similarity=(random_similarity(shape.experts, device)
                                               if getattr(policy, "refill_similarity", 0) > 0 else None))
                    for _ in range(copies)]

                def select(c, sels=sels):
                    b = batches[c]
                    return (b.ids, b.weights) if not sels else sels[c].run(b.logits, b.ids, b.weights)

                def step(select=select):
                    outs = []
                    for c in range(copies):
                        ids, wts = select(c)
                        y = moe(xs[c], layers[c], ids, wts)
                        sh = shared_forward(xs[c], layers[c])
                        outs.append(y if sh is None else y + sh)
                    return outs

                def select_all(select=select):
                    return [select(c) for c in range(copies)]

                cases.append({"policy": pname, "params": asdict(policy), "sels": sels, "step": step,
                              "select_all": select_all,
                              "before": [distinct_experts(b.ids, shape.experts) for b in batches],
                              "after": [distinct_experts(select(c)[0], shape.experts) for c in range(copies)]})
            try:
                # GPU: the policies are timed one after another, so "off" is timed again at the end; the drift
                # between its two medians is the noise a speedup near 1 must beat.
                steps = [c["step"] for c in cases] + ([cases[0]["step"]] if cuda else [])
                step_times = timed(steps)
                if cuda:
                    off_again = step_times.pop()
                    extra_noise = {"off_again_us": statistics.median(off_again),
                                   "off_drift": statistics.median(off_again) / statistics.median(step_times[0]) - 1}
                else:
                    extra_noise = {}
                with_sel = [c for c in cases if c["sels"]]
                sel_times = dict(zip([c["policy"] for c in with_sel], timed([c["select_all"] for c in with_sel])))
                extra = {}
                if shape.shared_ff:  # the shared expert alone (the same for every policy)
                    extra["shared_us"] = statistics.median(timed(
                        [lambda: [shared_forward(xs[c], layers[c]) for c in range(copies)]])[0])
                if isinstance(kernel, SGLangTritonMoE):  # the align step alone (a stand-in where B*k > 64)
                    bm = info["config"]["BLOCK_SIZE_M"]
                    extra["align_us"] = statistics.median(timed(
                        [lambda: [kernel.align(batches[c].ids, shape.experts, bm) for c in range(copies)]])[0])
            except Exception as e:  # on the GPU one failing point must not lose the others
                if not cuda:
                    raise
                print(f"{shape.name} {routing} B={B}: FAILED {type(e).__name__}: {e}", flush=True)
                rows.append({"shape": shape.name, "B": B, "routing": routing, "error": f"{type(e).__name__}: {e}"})
                continue
            base = statistics.median(step_times[0])  # "off" comes first
            off_bytes = statistics.mean(cases[0]["after"]) * shape.expert_bytes(elem) + shape.shared_bytes(elem)
            if routing == "trace":
                src = ("recorded" if (shape.experts, shape.top_k) == (int(trace["num_experts"]), int(trace["top_k"]))
                       else "extrapolated (what-if)")
            else:
                src = "synthetic"
            for c, times in zip(cases, step_times):
                t_med = statistics.median(times)
                sel = sel_times.get(c["policy"], [])
                sel_med = statistics.median(sel) if sel else 0.0
                e_after = statistics.mean(c["after"])
                wbytes = e_after * shape.expert_bytes(elem) + shape.shared_bytes(elem)
                gbps = wbytes / (t_med * 1e-6) / 1e9
                r = {
                    "shape": shape.name, "E": shape.experts, "k": shape.top_k, "d": shape.hidden, "d_ff": shape.ff,
                    "shared_ff": shape.shared_ff, "B": B, "routing": routing, "policy": c["policy"],
                    "policy_params": c["params"], "copies": copies,
                    "time_us": t_med, "min_us": min(times), "times_us": times,
                    "experts_before": statistics.mean(c["before"]), "experts_after": e_after,
                    "experts_before_per_copy": c["before"], "experts_after_per_copy": c["after"],
                    "weight_bytes": wbytes, "achieved_GBps": gbps, "bw_fraction_of_peak": gbps / peak,
                    "selection_us": sel_med, "selection_times_us": sel,
                    "selection_share": sel_med / t_med if t_med else 0.0,
                    "selection_backend": c["sels"][0].backend if c["sels"] else None,
                    "speedup": base / t_med if t_med else float("nan"),
                    "iqr_us": _iqr(times),
                    "routing_source": src,
                    "roofline_speedup": off_bytes / wbytes,
                    **extra, **extra_noise, **info,
                }
                if not cuda:  # interleaved: round i of every case ran back to back
                    paired = [a / b for a, b in zip(step_times[0], times) if b > 0]
                    r["speedup_paired"] = paired
                    if len(paired) >= 2:
                        dec = statistics.quantiles(paired, n=10)
                        r["speedup_paired_median"] = statistics.median(paired)
                        r["speedup_paired_q10"], r["speedup_paired_q90"] = dec[0], dec[-1]
                rows.append(r)
                print(f"{shape.name:16s} {routing:6s} B={B:4d} {r['policy']:8s} {t_med:10.1f} us  "
                      f"experts {r['experts_before']:6.1f} -> {e_after:6.1f}  {gbps:8.1f} GB/s "
                      f"({100 * r['bw_fraction_of_peak']:5.1f}% of peak)  sel {sel_med:8.1f} us  "
                      f"x{r['speedup']:.3f}", flush=True)
    del layers
    if cuda:
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- CLI, results, plot


def _csv(s: str) -> List[str]:
    return [x for x in s.split(",") if x]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kernel", default="auto", choices=("auto", "sglang_triton", "sglang_native", "torch_loop"),
                    help="auto: sglang_triton on CUDA, sglang_native on CPU")
    ap.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)} "
                    "(default: all five models on GPU, qwen3-30b-a3b on CPU)")
    ap.add_argument("--batches", default=None, help="default: 1,4,8,16,32,64,128 on GPU, 1,8,32 on CPU")
    ap.add_argument("--routing", default="random,trace", help="random and/or trace")
    ap.add_argument("--trace", type=Path, default=None, help=f"routing trace (default: {DEFAULT_TRACE} if present)")
    ap.add_argument("--trace-kind", default="independent_mixed", choices=("independent_mixed", "independent_domain"))
    ap.add_argument("--skew", type=float, default=1.0, help="random routing: per-batch skew added to the logits")
    ap.add_argument("--policies", default=None, help="default: off,lynx,oea on GPU, off,lynx on CPU (budget, "
                    "lynx+sim too: lynx with the similarity refill on a random similarity, for timing)")
    ap.add_argument("--budget-experts", type=int, default=None, help="budget policy m (default max(k, E/4))")
    ap.add_argument("--selection-backend", default="auto", choices=("auto", "triton", "torch"))
    ap.add_argument("--reps", type=int, default=None, help="timed blocks (GPU, default 20) / calls (CPU, default 5)")
    ap.add_argument("--per-block", type=int, default=10, help="GPU: graph replays per timed block")
    ap.add_argument("--copies", type=int, default=0,
                    help="layer copies per step (own weights and routing each; default: GPU enough for "
                         "--gpu-weight-gib of weights, 2..8; CPU 1)")
    ap.add_argument("--gpu-weight-gib", type=float, default=8.0)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--peak-mib", type=int, default=None, help="copy size for the peak (default GPU 2048, CPU 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-clock", default="cpu", choices=tuple(CPU_CLOCKS),
                    help="CPU timing: process CPU time (default; immune to time slicing by other jobs) or wall")
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default 1, so CPU time = work)")
    ap.add_argument("--sglang-files", default=None, help="exported SGLang kernel files (default: installed sglang, "
                    f"else {DEFAULT_EXPORT.relative_to(REPO)})")
    ap.add_argument("--out", type=Path, default=None,
                    help="output prefix (default benchmarks/results/moe_layer_<device>)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--model", type=Path, default=None, metavar="DIR",
                    help="add the bandwidth-realistic twin of this MoE model as a shape (lynx_sglang.twin; replaces "
                         "the default shapes unless --shapes is given)")
    ap.add_argument("--twin-factor", type=int, default=None,
                    help="expert width factor of --model's twin (default: lynx_sglang.twin's, experts >= 4 MiB)")
    ap.add_argument("--aa", action="store_true", help="also time stock again (off_aa): the A/A noise floor")
    ap.add_argument("--export-sglang-files", type=Path, default=None, metavar="DIR",
                    help="copy SGLang's kernel files and tuned configs to DIR (for the GPU machine) and exit")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    twin = [register_twin_shape(args.model, args.twin_factor).name] if args.model else []
    args.shapes = (_csv(args.shapes) + twin if args.shapes else
                   twin or (list(MODEL_SHAPES) if cuda else ["qwen3-30b-a3b"]))
    for s in args.shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}")
    args.batches = [int(b) for b in _csv(args.batches)] if args.batches else (
        [1, 4, 8, 16, 32, 64, 128] if cuda else [1, 8, 32])
    args.routing = _csv(args.routing)
    for r in args.routing:
        if r not in ("random", "trace"):
            ap.error(f"unknown routing {r!r}")
    args.policies = _csv(args.policies) if args.policies else (["off", "lynx", "oea"] if cuda else ["off", "lynx"])
    if "off" not in args.policies:
        args.policies = ["off"] + args.policies  # speedups need the stock time
    if args.aa and "off_aa" not in args.policies:
        args.policies.append("off_aa")
    args.reps = args.reps or (20 if cuda else 7)
    args.peak_mib = args.peak_mib or (2048 if cuda else 256)
    if args.trace is None and DEFAULT_TRACE.is_file():
        args.trace = DEFAULT_TRACE
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.export_sglang_files:
        dest = export_sglang_files(args.export_sglang_files, [SHAPES[s] for s in MODEL_SHAPES])
        n = len(json.loads((dest / MANIFEST).read_text())["files"])
        print(f"exported {n} SGLang files to {dest}")
        return {}
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    kernel = make_kernel(args.kernel, device, args.sglang_files)
    trace = None
    if "trace" in args.routing and args.trace is not None:
        from lynx_sglang.routing_stats import load_trace

        trace = load_trace(args.trace)
    with cpu_threads(device, args.threads):
        payload = measure(args, device, dtype, kernel, trace)
    prefix = args.out or RESULTS_DIR / f"moe_layer_{device.type}"
    write_json(prefix, payload)
    if not args.no_plot:
        plot(payload, prefix.with_name(prefix.name + ".png"))
    return payload


def measure(args, device, dtype, kernel: MoEKernel, trace: Optional[dict]) -> dict:
    """Every point of every shape, with provenance: the result file's content."""
    env = environment(device)
    peak = measure_peak(device, args.peak_mib * 2**20, args.cpu_clock)
    print(f"{env['device']}: copy peak {peak['peak_GBps']:.1f} GB/s; kernel {kernel.name}", flush=True)
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        try:
            rows += run_shape(shape, kernel, args, device, dtype, peak["peak_GBps"], trace)
        except Exception as e:
            if device.type != "cuda":
                raise
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            rows.append({"shape": name, "error": f"{type(e).__name__}: {e}"})
            torch.cuda.empty_cache()
    payload = {
        "benchmark": "one MoE layer's decode step: SGLang fused MoE with and without expert selection in front",
        "relative_only": device.type != "cuda",
        "triton_interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "timing": ("CUDA graph of `copies` layers (own weights and routing each), replayed; CUDA events over blocks "
                   "of replays; median per layer" if device.type == "cuda" and kernel.capturable else
                   f"CPU: {'process CPU time' if args.cpu_clock == 'cpu' else 'wall clock'} of one layer step, "
                   f"{torch.get_num_threads()} thread(s), policies interleaved, median; relative numbers only"
                   if device.type == "cpu" else "CUDA events around eager calls, median"),
        "kernel": kernel.describe(),
        "routing": {"random": f"Gaussian logits (scale 2) plus a per-batch skew (scale {args.skew})",
                    "trace": (f"{args.trace} ({trace['model']}, E={trace['num_experts']}, k={trace['top_k']}), "
                              f"{args.trace_kind} rows, scaled with routing_stats.scaled_logits; copy c replays "
                              f"recorded layer c mod {trace['num_layers']}") if trace else None},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "dtype": args.dtype,
        "peak": peak,
        "shapes": {s: asdict(SHAPES[s]) for s in args.shapes},
        "environment": env,
        "results": rows,
    }
    return payload


def plot(payload: dict, png: Path) -> None:
    """Per shape: time per layer, speedup over off, and share of peak bandwidth, against B."""
    plt = pyplot(png)
    if plt is None:
        return

    rows = [r for r in payload["results"] if "time_us" in r]
    shapes = [s for s in payload["shapes"] if any(r["shape"] == s for r in rows)]
    if not shapes:
        return
    fig, axes = plt.subplots(3, len(shapes), figsize=(max(7.0, 4.6 * len(shapes)), 10.5), squeeze=False)
    colors = {"off": "black", "off_aa": "grey", "lynx": "tab:blue", "oea": "tab:orange", "budget": "tab:green"}
    for col, s in enumerate(shapes):
        for routing, ls in (("random", "-"), ("trace", "--")):
            for pol in sorted({r["policy"] for r in rows}):
                pts = sorted((r["B"], r) for r in rows if r["shape"] == s and r["routing"] == routing
                             and r["policy"] == pol)
                if not pts:
                    continue
                bs = [p[0] for p in pts]
                kw = dict(color=colors.get(pol, "grey"), ls=ls, marker="o", ms=3, label=f"{pol} ({routing})")
                axes[0][col].plot(bs, [p[1]["time_us"] for p in pts], **kw)
                if pol != "off":
                    axes[1][col].plot(bs, [p[1].get("speedup", float("nan")) for p in pts], **kw)
                    if pol != "off_aa" and all("roofline_speedup" in p[1] for p in pts):
                        axes[1][col].plot(bs, [p[1]["roofline_speedup"] for p in pts], color=kw["color"], ls=":",
                                          lw=1, label=f"{pol} ({routing}): roofline (off's bytes / its bytes)")
                axes[2][col].plot(bs, [100 * p[1]["bw_fraction_of_peak"] for p in pts], **kw)
        sh = payload["shapes"][s]
        axes[0][col].set_title(f"{s} (E={sh['experts']} k={sh['top_k']} d={sh['hidden']} d_ff={sh['ff']}"
                               f"{', shared ' + str(sh['shared_ff']) if sh['shared_ff'] else ''})", fontsize=8)
        axes[0][col].set_ylabel("time per layer (us)")
        axes[1][col].set_ylabel("speedup vs off")
        axes[1][col].axhline(1.0, color="grey", lw=0.8)
        axes[2][col].set_ylabel("expert bytes / time, % of copy peak")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_xlabel("decode batch B")
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=6)
        axes[1][col].legend(fontsize=5)
    env = payload["environment"]
    title = f"MoE layer decode step on {env['device']} ({payload['kernel']['name']}, {payload['dtype']})"
    if payload["relative_only"]:
        title += "\nCPU: relative numbers only"
    title += "\nsolid: random routing, dashed: trace replay"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
