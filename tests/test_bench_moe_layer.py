"""The MoE-layer benchmark (benchmarks/bench_moe_layer.py): its MoE computations against a plain
per-(token, slot) torch reference, with selection off and on, its expert accounting, the align
stand-in, SGLang's kernel files loaded without sglang (as on the GPU machine), and the CLI's files.

SGLang's Triton kernels run in Triton's CPU interpreter here (conftest sets TRITON_INTERPRET=1), in
float16: the interpreter computes bf16 dots on the raw bits, so bf16 is checked on a GPU only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_moe_layer as bm
from lynx_sglang import ExpertSelector, make_policy
from lynx_sglang.routing_stats import TRACE_FORMAT

REPO = Path(__file__).resolve().parent.parent
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="SGLang's Triton kernels run here in the interpreter")
CPU = torch.device("cpu")


def _layer(shape, dtype, std=0.2, seed=0, device=CPU):
    w = bm.make_weights(shape, dtype, device, torch.Generator().manual_seed(seed))
    for t in (w.w13, w.w2, w.shared13, w.shared2, w.shared_gate):
        if t is not None:
            t.mul_(std / 0.02)  # outputs of order 1: errors are meaningful
    return w


def _inputs(shape, B, dtype, seed=1, device=CPU):
    batch = bm.make_batches(shape, B, "random", 1, seed, device, skew=2.0)[0]
    x = torch.randn(B, shape.hidden, generator=torch.Generator().manual_seed(seed)).to(dtype=dtype, device=device)
    return batch, x


def _lynx(shape, batch):
    """Lynx's rewritten ids/weights for the batch; asserts it actually moved something (else the test is moot)."""
    sel = ExpertSelector(shape.router(), make_policy("lynx"), batch.ids.shape[0], batch.ids.device)
    ids, w = sel.run(batch.logits, batch.ids, batch.weights)
    assert not torch.equal(ids, batch.ids), "lynx changed nothing: pick a batch where it re-routes"
    return ids.clone(), w.clone()


def _check(kernel, shape, B, dtype, rtol, device=CPU):
    """off: kernel == reference(router ids); lynx: kernel == reference(rewritten ids), != off's reference."""
    w = _layer(shape, dtype, device=device)
    batch, x = _inputs(shape, B, dtype, device=device)
    fn = kernel.prepare(shape, B, dtype, device)
    ref_off = bm.moe_reference(x, w.w13, w.w2, batch.ids, batch.weights)
    got_off = fn(x, w, batch.ids, batch.weights).float().cpu()
    scale = ref_off.abs().max()
    assert (got_off - ref_off).abs().max() <= rtol * scale
    ids, wts = _lynx(shape, batch)
    ref_lynx = bm.moe_reference(x, w.w13, w.w2, ids, wts)
    got_lynx = fn(x, w, ids, wts).float().cpu()
    assert (got_lynx - ref_lynx).abs().max() <= rtol * scale
    assert (ref_lynx - ref_off).abs().max() > 5 * rtol * scale  # the comparison can tell the two apart


# --------------------------------------------------------------------------- accounting


def test_distinct_experts_counts_routed_ids_only():
    ids = torch.tensor([[0, 1, 16], [1, 5, 16], [-1, 5, 17]], dtype=torch.int32)  # 16, 17: shared slots
    assert bm.distinct_experts(ids, 16) == 3
    assert bm.distinct_experts(ids[:1, :2], 16) == 2


def test_distinct_experts_agrees_with_selector_stats():
    shape = bm.SHAPES["qwen3-30b-a3b"]
    for B in (1, 8, 32):
        batch = bm.make_batches(shape, B, "random", 1, B, CPU)[0]
        sel = ExpertSelector(shape.router(), make_policy("lynx"), B, CPU)
        ids, _ = sel.run(batch.logits, batch.ids, batch.weights)
        st = sel.stats()
        assert st.experts_before == bm.distinct_experts(batch.ids, shape.experts)
        assert st.experts_after == bm.distinct_experts(ids, shape.experts)
        assert st.experts_after <= st.experts_before <= min(shape.experts, B * shape.top_k)


# --------------------------------------------------------------------------- MoE computations


def test_torch_loop_matches_reference():
    _check(bm.TorchLoopMoE(), bm.SHAPES["tiny"], 8, torch.float32, rtol=1e-5)


def test_sglang_native_cpu_path_matches_reference():
    """SGLang's CPU MoE through our CPU server's hook (what the CPU benchmark times)."""
    _check(bm.SGLangNativeMoE(), bm.SHAPES["tiny"], 8, torch.float32, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("shape,B", [
    (bm.SHAPES["tiny"], 6),  # B*k = 24, E = 16: align stand-in, SGLang moe_sum_reduce_triton
    (bm.MoEShape("e80k2", 80, 2, 64, 32), 4),  # B*k = 8, E + 1 > 64: SGLang's small-numel align, torch.add
])
def test_sglang_triton_path_matches_reference(shape, B):
    kernel = bm.SGLangTritonMoE(bm.SGLangFiles.resolve(None))
    _check(kernel, shape, B, torch.float16, rtol=1e-2)
    info = kernel.point_info()
    assert info["align"] == ("sglang moe_align_small_numel" if shape.experts == 80 else "stand-in (Triton)")
    assert info["combine"] == ("torch.add" if shape.top_k == 2 else "sglang moe_sum_reduce_triton")


@pytest.mark.gpu
@pytest.mark.parametrize("shape,B", [
    (bm.MoEShape("g128", 128, 8, 256, 128), 8),  # B*k = 64: SGLang's small-numel align; sum-reduce
    (bm.MoEShape("g64", 64, 6, 256, 128), 16),  # align stand-in
    (bm.MoEShape("g8", 8, 2, 256, 128), 8),  # torch.add combine
])
def test_sglang_triton_bf16_on_gpu(device, shape, B):
    """On a GPU (LYNX_TEST_DEVICE=cuda), in bf16, with SGLang's files installed or exported (build/sglang_moe_files)."""
    if device.type != "cuda":
        pytest.skip("GPU only")
    try:
        files = bm.SGLangFiles.resolve(None)
    except RuntimeError as e:
        pytest.skip(str(e))
    _check(bm.SGLangTritonMoE(files), shape, B, torch.bfloat16, rtol=2e-2, device=device)


def test_shared_expert_matches_reference():
    shape = bm.SHAPES["tiny-shared"]
    w = _layer(shape, torch.float32)
    _, x = _inputs(shape, 5, torch.float32)
    torch.testing.assert_close(bm.shared_forward(x, w), bm.shared_reference(x, w), rtol=1e-5, atol=1e-5)
    assert bm.shared_forward(x, _layer(bm.SHAPES["tiny"], torch.float32)) is None


# --------------------------------------------------------------------------- align


def _random_ids(T, k, E, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)


def test_align_reference_on_sglang_docstring_example():
    # SGLang's moe_align_block_size docstring, in its "+1 offset" form (ids 1..4 -> buckets 2..5).
    ids = torch.tensor([[2, 3, 4], [1, 2, 4], [1, 3, 4], [1, 2, 3]]) - 1
    s, e, total = bm.align_reference(ids, 4, 4)
    assert total == 16
    assert s.tolist() == [3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]
    assert e.tolist() == [0, 1, 2, 3]


@needs_interpreter
@pytest.mark.parametrize("T,k,E,bs", [(1, 8, 128, 16), (16, 8, 128, 16), (7, 6, 64, 32), (5, 2, 8, 16)])
def test_align_standin_matches_reference(T, k, E, bs):
    ids = _random_ids(T, k, E, T * k + E)
    ids[T // 2, 0] = -1  # an expert-parallel filtered slot: bucket 0, block expert id -1
    ref_s, ref_e, total = bm.align_reference(ids, E, bs)
    s, e, n = bm.align_buffers(ids.numel(), E, bs, CPU)
    s.fill_(-7)
    e.fill_(-7)
    bm.align_standin(ids, E + 1, bs, s, e, n)
    assert int(n) == total
    assert torch.equal(s[:total], ref_s) and torch.equal(e[: total // bs], ref_e)


_COMPILE_ALIGN = r"""
import json, torch, triton
from lynx_sglang.kernels.aot_check import compile_launch, ptxas_usage
from benchmarks import bench_moe_layer as bm
for E, numel in ((128, 1024), (64, 512), (8, 256)):  # Qwen3 / OLMoE-like / Mixtral at B = 128
    nbk = triton.next_power_of_2(E + 2)
    s, e, n = bm.align_buffers(numel, E, 16, "cpu")
    args = (torch.zeros(numel, dtype=torch.int32), s, e, n, numel, 16, s.numel(), e.numel())
    k = compile_launch(bm._align_standin_kernel, args, {"CH": max(16, min(64, 8192 // nbk)), "NBK": nbk,
                                                        "num_warps": 4}, 90)
    print(json.dumps({"E": E, **ptxas_usage(k, 90)}))
"""


def test_align_standin_compiles_for_sm90_without_spills():
    """The interpreter accepts code the GPU compiler rejects: compile the stand-in with Triton's compiler."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", _COMPILE_ALIGN], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 3 and all(r["registers"] and r["spill_store_bytes"] == 0 for r in rows), rows


@needs_interpreter
def test_sglang_small_numel_align_matches_reference():
    kernel = bm.SGLangTritonMoE(bm.SGLangFiles.resolve(None))
    for T, k, E in ((1, 8, 128), (8, 8, 128), (3, 6, 64)):
        ids = _random_ids(T, k, E, T)
        ref_s, ref_e, total = bm.align_reference(ids, E, 16)
        s, e, n = bm.align_buffers(ids.numel(), E, 16, CPU)
        kernel.small.moe_align_small_numel(ids, E + 1, 16, s, e, n)
        assert int(n) == total and torch.equal(s[:total], ref_s) and torch.equal(e[: total // 16], ref_e)


# --------------------------------------------------------------------------- SGLang files, configs


def test_config_lookup_follows_sglang(monkeypatch):
    kernel = bm.SGLangTritonMoE(bm.SGLangFiles.resolve(None))
    cfg_dir = kernel.files.path(bm.SGLANG_CONFIG_DIR)
    monkeypatch.setattr(kernel, "triton_version", lambda: "3.6.0")
    # H200 has a file for Triton 3.6.0 itself.
    monkeypatch.setattr(kernel, "device_name", lambda: "NVIDIA H200")
    up, down, info = kernel.configs(128, 768, 2048, 8)
    table = json.loads((cfg_dir / "triton_3_6_0" / "E=128,N=768,device_name=NVIDIA_H200.json").read_text())
    assert up == table["8"] and info["config_source"].endswith("triton_3_6_0/E=128,N=768,device_name=NVIDIA_H200.json")
    assert down == table["8"]  # no _down file: the up table, as SGLang reuses it
    # H100 has none for 3.6.0: SGLang falls back to the newest Triton version that has one (3.7.1), nearest M.
    monkeypatch.setattr(kernel, "device_name", lambda: "NVIDIA H100 80GB HBM3")
    up, down, info = kernel.configs(128, 768, 2048, 20)
    name = "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3"
    assert info["config_source"].endswith(f"triton_3_7_1/{name}.json")
    assert up == json.loads((cfg_dir / "triton_3_7_1" / f"{name}.json").read_text())["16"]
    assert down == json.loads((cfg_dir / "triton_3_7_1" / f"{name}_down.json").read_text())["16"]
    # No tuned file: SGLang's default (M <= E).
    up, down, info = kernel.configs(64, 1408, 2048, 4)
    assert up == {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1} and down is None


_NO_SGLANG = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):  # the GPU machine: no sglang, no sgl_kernel
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('sglang', 'sgl_kernel'):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
import torch
from benchmarks import bench_moe_layer as bm
files = bm.SGLangFiles.resolve(sys.argv[1])
assert files.version and 'exported' in files.source
kernel = bm.SGLangTritonMoE(files)
shape = bm.SHAPES['tiny']
w = bm.make_weights(shape, torch.float16, torch.device('cpu'), torch.Generator().manual_seed(0))
b = bm.make_batches(shape, 3, 'random', 1, 0, torch.device('cpu'))[0]
x = torch.randn(3, shape.hidden).to(torch.float16)
got = kernel.prepare(shape, 3, torch.float16, torch.device('cpu'))(x, w, b.ids, b.weights).float()
ref = bm.moe_reference(x, w.w13, w.w2, b.ids, b.weights)
assert (got - ref).abs().max() <= 1e-2 * ref.abs().max(), (got - ref).abs().max()
assert not any(m.split('.')[0] in ('sglang', 'sgl_kernel') for m in sys.modules)
print('OK', kernel.describe()['files_sha256'])
"""


@needs_interpreter
def test_exported_files_run_without_sglang(tmp_path):
    """Export SGLang's files, then load and run them in a process where sglang cannot be imported."""
    dest = bm.export_sglang_files(tmp_path / "files", [bm.SHAPES[s] for s in bm.MODEL_SHAPES])
    manifest = json.loads((dest / bm.MANIFEST).read_text())
    assert set(bm.SGLANG_KERNEL_FILES) <= set(manifest["files"])
    assert any("E=128,N=768" in f for f in manifest["files"])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _NO_SGLANG, str(dest)], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
    # A changed file is refused.
    victim = dest / bm.SGLANG_KERNEL_FILES[1]
    victim.write_text(victim.read_text() + "\n# edited\n")
    with pytest.raises(RuntimeError, match="does not match"):
        bm.SGLangFiles.exported(dest)


# --------------------------------------------------------------------------- CLI


def _write_trace(path: Path, E: int, k: int, layers: int = 2, nb: int = 4, B: int = 32) -> Path:
    g = torch.Generator().manual_seed(3)
    rec = {"logits": (torch.randn(layers, nb, B, E, generator=g) * 2).to(torch.float16),
           "domain": torch.zeros(nb, B, dtype=torch.int8), "window": torch.zeros(nb, B, dtype=torch.int32),
           "position": torch.zeros(nb, dtype=torch.int32)}
    torch.save({"format": TRACE_FORMAT, "model": "synthetic", "num_experts": E, "top_k": k, "num_layers": layers,
                "domains": ["d"], "kinds": {"independent_mixed": rec, "independent_domain": rec}}, path)
    return path


class _FakeClock:
    """A clock that moves only when the benchmark's work does: the MoE costs ``US_PER_EXPERT`` per distinct
    expert it is handed (counted here, from the ids themselves), selection ``SELECT_US`` per call."""

    US_PER_EXPERT, SELECT_US = 10.0, 7.0

    def __init__(self):
        self.us = 0.0
        self.moe_experts = []  # distinct experts of every MoE call, in call order

    def now(self) -> float:
        return self.us * 1e-6


def test_cli_tiny_writes_json_and_png(tmp_path, monkeypatch):
    """The CLI on tiny shapes with a fake clock: every time, speedup and share it reports follows from the
    (known) cost of the work, and its expert counts are those of the ids the MoE was actually handed."""
    clock = _FakeClock()
    monkeypatch.setitem(bm.CPU_CLOCKS, "cpu", clock.now)
    monkeypatch.setattr(bm, "measure_peak", lambda *a: {"peak_GBps": 50.0, "method": "fake", "copy_us": []})
    real_prepare = bm.TorchLoopMoE.prepare

    def prepare(self, shape, B, dtype, device):
        fn = real_prepare(self, shape, B, dtype, device)

        def timed(x, w, ids, weights):
            n = len({e for e in ids[:, : shape.top_k].reshape(-1).tolist() if e >= 0})
            clock.moe_experts.append(n)
            clock.us += clock.US_PER_EXPERT * n
            return fn(x, w, ids, weights)
        return timed

    class TimedSelector(ExpertSelector):
        def run(self, *a, **kw):
            clock.us += clock.SELECT_US
            return super().run(*a, **kw)

    monkeypatch.setattr(bm.TorchLoopMoE, "prepare", prepare)
    monkeypatch.setattr(bm, "ExpertSelector", TimedSelector)

    trace = _write_trace(tmp_path / "trace.pt", E=16, k=4)
    prefix = tmp_path / "out" / "moe_layer_cpu"
    payload = bm.main(["--shapes", "tiny,tiny-shared", "--batches", "1,8", "--kernel", "torch_loop",
                       "--policies", "lynx,lynx+sim,oea", "--reps", "2", "--trace", str(trace), "--peak-mib", "8",
                       "--out", str(prefix)])
    data = json.loads(prefix.with_name("moe_layer_cpu.json").read_text())
    assert payload["results"] == data["results"]
    assert data["relative_only"] is True and data["kernel"]["name"] == "torch_loop"
    assert data["peak"]["peak_GBps"] == 50.0
    rows = data["results"]
    points = [(s, rt, B, p) for s in ("tiny", "tiny-shared") for rt in ("random", "trace") for B in (1, 8)
              for p in ("off", "lynx", "lynx+sim", "oea")]  # off added first
    assert [(r["shape"], r["routing"], r["B"], r["policy"]) for r in rows] == points
    elem = torch.tensor([], dtype=torch.bfloat16).element_size()
    moved = 0
    for r in rows:
        shape = bm.SHAPES[r["shape"]]
        # The counts, from the batch itself (plain sets) and from the selector the tool runs.
        (batch,) = bm.make_batches(shape, r["B"], r["routing"], 1, 0, CPU,
                                   torch.load(trace) if r["routing"] == "trace" else None)
        before = len(set(batch.ids[:, : shape.top_k].reshape(-1).tolist()))
        assert r["experts_before"] == before
        if r["B"] == 1:
            assert before == shape.top_k
        # Fake timing: each timed step costs exactly the MoE's distinct experts (+ one selection call).
        sel_us = 0.0 if r["policy"] == "off" else clock.SELECT_US
        step_us = clock.US_PER_EXPERT * r["experts_after"] + sel_us
        assert r["times_us"] == pytest.approx([step_us] * 2) and r["time_us"] == pytest.approx(step_us)
        assert r["selection_us"] == pytest.approx(sel_us)
        assert r["selection_share"] == pytest.approx(sel_us / step_us)
        assert r["speedup"] == pytest.approx(clock.US_PER_EXPERT * before / step_us)
        wbytes = r["experts_after"] * shape.expert_bytes(elem) + shape.shared_bytes(elem)
        assert r["weight_bytes"] == wbytes
        assert r["bw_fraction_of_peak"] == pytest.approx(wbytes / (step_us * 1e-6) / 1e9 / 50.0)
        if r["policy"] == "off":
            assert r["experts_after"] == before and r["speedup"] == 1.0
        else:
            assert r["experts_after"] <= before
            moved += r["experts_after"] < before
        if r["policy"] == "lynx" and r["B"] == 1:
            assert r["experts_after"] == shape.top_k  # a single request is never changed
        assert ("shared_us" in r) == (r["shape"] == "tiny-shared")
    assert moved > 0  # some point really lost experts (else the speedups are all 1 and prove nothing)
    # lynx+sim is lynx with the refill: the same kept set (the refill only picks among kept experts).
    by = {(r["shape"], r["routing"], r["B"], r["policy"]): r for r in rows}
    for (s, rt, B, p), r in by.items():
        if p == "lynx+sim":
            assert r["policy_params"]["refill_similarity"] == 8.0
            assert by[(s, rt, B, "lynx")]["policy_params"]["refill_similarity"] == 0
            assert r["experts_after"] == by[(s, rt, B, "lynx")]["experts_after"]
    # Every MoE call the tool made (warm-ups included) handed the MoE one of the reported expert counts.
    assert set(clock.moe_experts) <= {r["experts_after"] for r in rows}
    png = prefix.with_name("moe_layer_cpu.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_skips_trace_at_fewer_experts(tmp_path):
    trace = _write_trace(tmp_path / "trace32.pt", E=32, k=4)
    data = bm.main(["--shapes", "tiny", "--batches", "2", "--kernel", "torch_loop", "--reps", "1",
                    "--trace", str(trace), "--peak-mib", "8", "--no-plot", "--out", str(tmp_path / "r")])
    skipped = [r for r in data["results"] if "skipped" in r]
    assert len(skipped) == 1 and "32 experts" in skipped[0]["skipped"]
    assert {r["routing"] for r in data["results"] if "time_us" in r} == {"random"}


def _hooked_step_by_hand(stack, x, policy, seen):
    """One decode step of a ``HookedMoEStack`` computed independently: the router's softmax top-k
    (renormalised), ``ExpertSelector.run`` with the given policy on it, and the plain per-(token, slot) loop
    ``bm.moe_reference`` over the selected experts, plus the residual. ``seen`` holds the (ids, weights) the
    stack's MoE got, one pair per layer: each must equal what the selector makes of the router's output.
    Returns (output, stats per layer)."""
    shape, h, stats = stack.shape, x, []
    B = x.shape[0]
    for li, (router, w) in enumerate(zip(stack.routers, stack.weights)):
        logits = h.float() @ router.T
        tw, ti = torch.softmax(logits, -1).topk(shape.top_k, -1)
        tw = tw / tw.sum(-1, keepdim=True)
        sel = ExpertSelector(shape.router(), policy, B)
        ids, wts = sel.run(logits, ti.to(torch.int32), tw)
        assert torch.equal(seen[li][0], ids) and torch.equal(seen[li][1], wts), f"layer {li}: the stage's output"
        stats.append(sel.stats())
        h = h + bm.moe_reference(h, w.w13, w.w2, ids, wts)
    return h, stats


def test_hook_capture_check_runs_the_stage_on_cpu(monkeypatch):
    """benchmarks/gpu_hook_capture.check on CPU (router, top-k, our hook's stage under a published decode phase,
    MoE): every step of both stacks it builds is recomputed by hand (``_hooked_step_by_hand``), and the counts
    the check reports are the hand computation's."""
    from benchmarks import gpu_hook_capture as ghc
    from lynx_sglang.runtime.sglang.options import LynxOptions

    stacks = []

    class Recording(ghc.HookedMoEStack):
        """Records each step's input, output and what each layer's MoE was handed."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.steps, self._moe_calls = [], []
            inner = self.moe

            def spy(x, w, ids, wts):
                self._moe_calls.append((ids.clone(), wts.clone()))
                return inner(x, w, ids, wts)

            self.moe = spy
            stacks.append(self)

        def forward(self, x, nv):
            self._moe_calls = []
            out = super().forward(x, nv)
            self.steps.append((x.clone(), out.clone(), self._moe_calls))
            return out

    monkeypatch.setattr(ghc, "HookedMoEStack", Recording)
    layers, batches, steps = 2, [4, 8], 2
    rows = ghc.check(torch.device("cpu"), "tiny", layers, batches, "lynx", "torch_loop", None, graph=False,
                     steps=steps)
    assert [r["B"] for r in rows] == batches and all(r["ok"] and r["max_abs_diff"] == 0.0 for r in rows), rows
    assert len(stacks) == 2 * len(batches)  # per batch size: the "captured" stack and the eager one
    for bi, row in enumerate(rows):
        captured, eager = stacks[2 * bi], stacks[2 * bi + 1]
        B = row["B"]
        assert len(captured.steps) == steps + 1 and len(eager.steps) == steps  # + the warm-up
        policy = LynxOptions(moe_backend="lynx", policy="lynx", max_batch=max(batches)).make_policy()
        before = after = changed = 0
        for stack, recorded in ((captured, captured.steps[1:]), (eager, eager.steps)):
            for x, out, seen in recorded:
                assert x.shape == (B, bm.SHAPES["tiny"].hidden) and len(seen) == layers
                want, st = _hooked_step_by_hand(stack, x, policy, seen)
                torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
                if stack is eager:
                    before += sum(s.experts_before for s in st)
                    after += sum(s.experts_after for s in st)
                    changed += sum(s.rows_changed for s in st)
        # the check's counts are those of the steps after the warm-up, over every layer
        assert (row["experts_before"], row["experts_after"], row["rows_changed"]) == (before, after, changed)
        assert after < before and changed > 0  # selection really rewrote rows (else the check is moot)


def test_hooked_stack_is_router_topk_then_our_selection_then_the_moe():
    """What gpu_hook_capture captures, step by step: each layer's MoE gets exactly the ids and weights the
    product's ExpertSelector (server defaults) makes of the router's softmax top-k, and the stack's output
    is the residual sum of those MoE outputs."""
    from benchmarks import gpu_hook_capture as ghc
    from lynx_sglang import ExpertSelector
    from lynx_sglang.runtime.sglang.options import LynxOptions
    from lynx_sglang.runtime.sglang import phase

    shape, dev, B = bm.SHAPES["tiny"], torch.device("cpu"), 8
    moe = bm.make_kernel("torch_loop", dev, None).prepare(shape, B, torch.float32, dev)
    gen = torch.Generator().manual_seed(3)
    weights = [bm.make_weights(shape, torch.float32, dev, gen) for _ in range(2)]
    routers = [torch.randn(shape.experts, shape.hidden, generator=gen) * 2 / shape.hidden ** 0.5 for _ in range(2)]
    seen = []

    def spy(x, w, ids, wts):
        seen.append((ids.clone(), wts.clone()))
        return moe(x, w, ids, wts)

    stack = ghc.HookedMoEStack(shape, 2, spy, routers, weights, "lynx", B, dev)
    x = torch.randn(B, shape.hidden, generator=gen)
    with phase.published(phase.DECODE):
        out = stack.forward(x, torch.tensor(B))
    policy = LynxOptions(moe_backend="lynx", policy="lynx", max_batch=B).make_policy()
    h, changed = x, 0
    for li, (router, w) in enumerate(zip(routers, weights)):
        logits = h @ router.T
        tw, ti = torch.softmax(logits, -1).topk(shape.top_k, -1)
        tw = tw / tw.sum(-1, keepdim=True)
        ids, wts = ExpertSelector(shape.router(), policy, B).run(logits, ti.to(torch.int32), tw)
        assert torch.equal(seen[li][0], ids) and torch.equal(seen[li][1], wts)
        changed += int((ids != ti).any(-1).sum())
        h = h + moe(h, w, ids, wts)
    assert torch.equal(out, h)
    assert changed > 0  # selection really rewrote rows here


def test_gpu_checks_logic_on_cpu_every_policy_at_every_expert_count():
    """benchmarks/gpu_checks (the lent GPU's first step) under the interpreter: E=8 included (budget's 32 is capped
    at E), and a case that raises is a recorded failure, not the end of the run."""
    from benchmarks import gpu_checks as gc

    cpu = torch.device("cpu")
    rows = gc.agreement(cpu, [(8, 2, 0, 16)]) + gc.rank_aware_agreement(cpu, [(64, 8, 16)])
    assert len(rows) == len(gc.POLICIES) + 1 and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    bad = gc._recorded("agreement", {"E": 8}, lambda: 1 / 0)
    assert bad["ok"] is False and bad["E"] == 8 and "ZeroDivisionError" in bad["error"]


def test_cli_twin_of_the_bundled_model_on_its_recorded_routing(tmp_path, monkeypatch):
    """--model: the twin's layer (the model's E, k, d; experts r times wider) on the model's own trace is labelled
    recorded, a larger shape on the same trace an extrapolated what-if; --aa times stock twice (the noise floor);
    roofline_speedup is off's expert bytes over the policy's; paired speedups come one per round."""
    model = REPO / "models" / "trained-qwen3-moe"
    trace = REPO / "data" / "routing" / "trained-qwen3-moe.pt"
    data = bm.main(["--model", str(model), "--twin-factor", "2", "--shapes", "tiny", "--routing", "trace",
                    "--trace", str(trace), "--aa", "--batches", "1,16", "--kernel", "torch_loop", "--reps", "3",
                    "--peak-mib", "8", "--no-plot", "--out", str(tmp_path / "twin")])
    shape = bm.SHAPES["trained-qwen3-moe-twin-r2"]
    assert (shape.experts, shape.top_k, shape.hidden, shape.ff) == (32, 4, 256, 192)
    rows = [r for r in data["results"] if "time_us" in r]
    twin_rows = [r for r in rows if r["shape"] == shape.name]
    assert [(r["B"], r["policy"]) for r in twin_rows] == [(B, p) for B in (1, 16) for p in ("off", "lynx", "off_aa")]
    assert {r["routing_source"] for r in twin_rows} == {"recorded"}
    skipped = [r for r in data["results"] if "skipped" in r]  # tiny has 16 experts: fewer than the trace's 32
    assert len(skipped) == 1 and skipped[0]["shape"] == "tiny"
    for r in twin_rows:
        assert len(r["speedup_paired"]) == 3
        assert r["roofline_speedup"] == pytest.approx(
            next(o for o in twin_rows if o["B"] == r["B"] and o["policy"] == "off")["experts_after"] / r["experts_after"])
        if r["policy"] == "off_aa":
            assert r["experts_after"] == r["experts_before"] and r["selection_us"] == 0.0
    lynx16 = next(r for r in twin_rows if r["B"] == 16 and r["policy"] == "lynx")
    assert lynx16["experts_after"] < lynx16["experts_before"]  # the recorded batch really loses experts
    # The same trace at a bigger router is a what-if, and says so.
    monkeypatch.setitem(bm.SHAPES, "e64", bm.MoEShape("e64", 64, 4, 64, 32))
    big = bm.main(["--shapes", "e64", "--routing", "trace", "--trace", str(trace), "--batches", "4",
                   "--kernel", "torch_loop", "--reps", "1", "--peak-mib", "8", "--no-plot",
                   "--out", str(tmp_path / "big")])
    assert {r["routing_source"] for r in big["results"]} == {"extrapolated (what-if)"}


def test_cli_twin_refuses_a_bad_factor_and_shared_experts(tmp_path):
    from lynx_sglang.twin import TwinError

    with pytest.raises(TwinError, match="power of two"):
        bm.main(["--model", str(REPO / "models" / "trained-qwen3-moe"), "--twin-factor", "3", "--no-plot",
                 "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="shared experts"):
        bm.main(["--model", str(REPO / "models" / "trained-glm4-moe"), "--no-plot", "--out", str(tmp_path / "y")])


def test_selection_cost_benchmark_smoke(tmp_path):
    """benchmarks/bench_selection_cost.py (selection vs the twin's MoE layer) end to end at a tiny twin factor."""
    from benchmarks import bench_selection_cost as bsc

    data = bsc.main(["--factor", "1", "--batches", "1,4", "--rounds", "2", "--reps", "2",
                     "--out", str(tmp_path / "sc")])
    saved = json.loads((tmp_path / "sc.json").read_text())
    assert saved["results"] == data["results"] and saved["E"] == 32 and saved["k"] == 4
    assert [r["B"] for r in data["results"]] == [1, 4]
    for r in data["results"]:
        assert len(r["selection_times_us"]) == len(r["moe_times_us"]) == 4 and len(r["fraction_per_round"]) == 2
        assert r["fraction"] == pytest.approx(r["selection_us"] / r["moe_us"])
    assert data["results"][0]["distinct_experts_mean"] == 4  # one token: its k experts
    assert (tmp_path / "sc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_checks_graph_replay_logic_on_cpu(monkeypatch):
    """The CUDA-graph replay check's own logic on CPU (its capture is a re-running closure there): every policy it
    covers passes, lynx_ep's slot ranks included, and a replay that leaves the outputs stale is caught."""
    from benchmarks import gpu_checks as gc

    cpu = torch.device("cpu")
    rows = gc.cuda_graph_replay(cpu, shapes=((16, 4, 8),))
    assert [r["policy"] for r in rows] == ["lynx", "lynx+sim", "lynx_ep"]
    assert all(r["ok"] for r in rows), rows

    def stale(fn, device):  # captures the first outputs, then never updates them
        return tuple(t.clone() for t in fn()), lambda: None
    monkeypatch.setattr(gc, "capture", stale)
    rows = gc.cuda_graph_replay(cpu, policies=("lynx",), shapes=((16, 4, 8),))
    assert rows[0]["ok"] is False and "error" not in rows[0]


def test_gpu_checks_residency_replay_logic_on_cpu(monkeypatch):
    """The residency mode's replay check on CPU: prefer, prefer with a page budget, and the budget ranked by output
    norms pass with a resident set (and hidden states) rewritten in place between replays; a capture that re-reads
    nothing (stale outputs) is caught."""
    from benchmarks import gpu_checks as gc

    cpu = torch.device("cpu")
    rows = gc.residency_graph_replay(cpu, shapes=((16, 4, 8), (64, 6, 16)))
    assert [r["policy"] for r in rows] == ["prefer"] * 2 + ["prefer+budget"] * 2 + ["prefer+budget by output"] * 2
    assert all(r["ok"] for r in rows), rows
    monkeypatch.setattr(gc, "capture", lambda fn, device: (tuple(t.clone() for t in fn()), lambda: None))
    rows = gc.residency_graph_replay(cpu, shapes=((16, 4, 8),))
    assert not any(r["ok"] for r in rows) and not any("error" in r for r in rows)
