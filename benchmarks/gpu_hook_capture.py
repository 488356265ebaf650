"""GPU check: a stack of Qwen3-30B-A3B-shaped MoE layers with our top-k hook's stage in place, in one CUDA graph.

What one layer of the captured decode step runs (B tokens):

1. router logits ``x @ W_r^T`` and softmax top-k with renormalisation (torch; what
   SGLang's fused gate computes for Qwen3-MoE: ``norm_topk_prob``);
2. the body of our AROUND hook on SGLang's ``TopK.forward``:
   ``runtime.sglang.stage.TopKSelectionStage.__call__`` with the phase SGLang's forward
   context publishes for a decode batch and ``num_token_non_padded``, running
   ``ExpertSelector`` with the product's defaults (Triton kernels on CUDA);
3. SGLang's Triton fused MoE from its own files (``bench_moe_layer.SGLangTritonMoE``,
   exported beforehand and carried: ``build/sglang_moe_files``), then a residual add.

Not SGLang's ``TopK.forward`` itself: SGLang cannot be imported on the GPU machine
(its import needs ~109 MB of packages beyond the 64 MiB a device call carries, and
it pins torch 2.14.1). The top-k output is a NamedTuple with the fields of SGLang's
``StandardTopKOutput``. The graph is captured once per batch size on static
inputs; each replay on a new batch must equal an eager run of the same stack
(separate stages, so each has its own statistics) bit for bit, and the selection
statistics must agree.

    python -m benchmarks.gpu_hook_capture                    # GPU (SGLang's files: installed or exported)
    python -m benchmarks.gpu_hook_capture --device cpu       # logic check: eager vs eager, torch MoE loop

Writes benchmarks/results/gpu_hook_capture_cuda.json on a GPU; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, List, NamedTuple

import torch

from benchmarks.bench_moe_layer import SHAPES, LayerWeights, make_kernel, make_weights
from benchmarks.results_io import environment, save
from lynx_sglang.runtime.sglang.options import LynxOptions
from lynx_sglang.runtime.sglang import phase
from lynx_sglang.runtime.sglang.stage import TopKSelectionStage


class TopKOutput(NamedTuple):
    """The fields of SGLang's ``StandardTopKOutput``, in its order."""

    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    router_logits: torch.Tensor


class HookedMoEStack:
    """``layers`` MoE layers (router, top-k, our stage, fused MoE, residual); ``forward(x)`` is one decode step."""

    def __init__(self, shape, layers: int, moe: Callable, routers: List[torch.Tensor], weights: List[LayerWeights],
                 policy: str, max_batch: int, device):
        self.shape, self.moe, self.routers, self.weights = shape, moe, routers, weights
        options = LynxOptions(moe_backend="lynx", policy=policy, max_batch=max_batch)
        self.stages = [TopKSelectionStage(i, shape.router(), options, device, None, output_type=TopKOutput)
                       for i in range(layers)]

    def forward(self, x: torch.Tensor, num_token_non_padded: torch.Tensor) -> torch.Tensor:
        k = self.shape.top_k
        for router, w, stage in zip(self.routers, self.weights, self.stages):
            logits = x.float() @ router.T
            topk_w, topk_ids = torch.softmax(logits, dim=-1).topk(k, dim=-1)
            topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
            out = stage(TopKOutput(topk_w, topk_ids.to(torch.int32), logits), num_token_non_padded)
            x = x + self.moe(x, w, out.topk_ids, out.topk_weights)
        return x

    def stats(self) -> list:
        return [s.selector.stats() for s in self.stages]


def check(device: torch.device, shape_name: str, layers: int, batches, policy: str, kernel: str,
          sglang_files, graph: bool, steps: int = 3) -> List[dict]:
    """One row per batch size: replays (or, without ``graph``, a second eager stack) equal eager runs."""
    shape = SHAPES[shape_name]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kern = make_kernel(kernel, device, sglang_files)
    gen = torch.Generator().manual_seed(0)
    weights = [make_weights(shape, dtype, device, gen) for _ in range(layers)]
    # Router weights ~ N(0, 1/d) * 2: logits ~ N(0, 2) for unit inputs, a realistic spread of top-k weights.
    routers = [(torch.randn(shape.experts, shape.hidden, generator=gen) * 2 / shape.hidden ** 0.5).to(device)
               for _ in range(layers)]
    rows = []
    with phase.published(phase.DECODE):  # what our forward-context hook publishes for a decode batch
        for B in batches:
            try:
                rows.append(_check_batch(device, shape, shape_name, layers, B, policy, kern, weights, routers, dtype,
                                         max(batches), gen, graph, steps))
            except Exception as e:  # a failed capture is a failed check, recorded; the other sizes still run
                rows.append({"check": "hooked_moe_stack", "shape": shape_name, "layers": layers, "B": B,
                             "policy": policy, "ok": False, "error": f"{type(e).__name__}: {e}"})
    return rows


def _check_batch(device, shape, shape_name, layers, B, policy, kern, weights, routers, dtype, max_batch, gen,
                 graph, steps) -> dict:
    """One batch size of ``check``: captured (or a second eager) stack against an eager one."""
    moe = kern.prepare(shape, B, dtype, device)
    captured = HookedMoEStack(shape, layers, moe, routers, weights, policy, max_batch, device)
    eager = HookedMoEStack(shape, layers, moe, routers, weights, policy, max_batch, device)
    xs = [torch.randn(B, shape.hidden, generator=gen).to(device=device, dtype=dtype) for _ in range(steps + 1)]
    static_x, nv = xs[0].clone(), torch.tensor(B, device=device)
    captured.forward(static_x, nv)  # warm-up outside the graph (compiles the Triton kernels)
    run = lambda: captured.forward(static_x, nv)  # noqa: E731
    if graph:
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = captured.forward(static_x, nv)
        run = lambda: (g.replay(), static_out)[1]  # noqa: E731
    for s in captured.stages:
        s.stats.zero_()  # in place: the captured graph keeps adding to the same rows
    ok, max_diff = True, 0.0
    for x in xs[1:]:
        static_x.copy_(x)
        got = run().clone()
        want = eager.forward(x, nv)
        ok &= torch.equal(got, want)
        max_diff = max(max_diff, float((got.float() - want.float()).abs().max()))
    st_c, st_e = captured.stats(), eager.stats()
    ok &= st_c == st_e
    return {"check": "hooked_moe_stack_graph_replay" if graph else "hooked_moe_stack_eager_repeat",
            "shape": shape_name, "layers": layers, "B": B, "policy": policy, "steps": steps,
            "ok": bool(ok), "max_abs_diff": max_diff,
            "experts_before": sum(s.experts_before for s in st_c),
            "experts_after": sum(s.experts_after for s in st_c),
            "rows_changed": sum(s.rows_changed for s in st_c)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default=None, help="default: qwen3-30b-a3b on CUDA, tiny on CPU")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="16,64")
    ap.add_argument("--policy", default="lynx")
    ap.add_argument("--sglang-files", default=None,
                    help="SGLang's exported kernel files (bench_moe_layer --export-sglang-files; default: the "
                    "installed sglang, else build/sglang_moe_files)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    rows = check(device, args.shape or ("qwen3-30b-a3b" if cuda else "tiny"), args.layers,
                 [int(b) for b in args.batches.split(",")], args.policy,
                 "sglang_triton" if cuda else "torch_loop", args.sglang_files if cuda else None, graph=cuda)
    failed = [r for r in rows if not r["ok"]]
    if cuda:
        save("gpu_hook_capture_cuda", {"environment": environment(device), "what_ran": __doc__.split("\n\n")[1],
                                       "results": rows, "passed": len(rows) - len(failed), "failed": len(failed)})
    for r in rows:
        print(r)
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
