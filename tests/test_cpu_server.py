"""lynx_sglang.runtime.cpu.support: the real SGLang server on a CPU-only machine, and its pieces.

The server tests start ``launch/cpu_server.sh`` (stock ``sglang.launch_server``; our plugin
installs the CPU support) and talk to it over HTTP. ``install()`` itself only ever runs in
subprocesses here: it changes process-wide state (``sys.modules``, ``sys.path``, hooks).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
from lynx_sglang.server_process import REPO, running_server, start_server

from lynx_sglang.runtime.cpu import support as cpu_support

PROMPTS = ["Hello, world", "The capital of France is", "def fib(n):", "1, 2, 3, 4,"]
MAX_NEW_TOKENS = 16
# float32 ("auto" would serve the bundled model in its stored bf16), so that changes of
# reduction order (batching, TP all-reduce) cannot flip a greedy pick on a near tie.
SERVER_ARGS = ("--dtype", "float32")

cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU-only support (inert where a GPU exists; the launch script is CPU-only)"
)


def _run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_USE_CPU_ENGINE", "SGLANG_CPU_OMP_THREADS_BIND")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _json_tail(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- MoE forward


def _moe_layer(num_experts=8, hidden=32, inter=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        num_experts=num_experts,
        w13_weight=(torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype),
        w2_weight=(torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5).to(dtype),
    )


def _routing(tokens, num_experts, k, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:k] for _ in range(tokens)]).to(torch.int32)
    w = torch.rand(tokens, k, generator=g)
    return ids, w / w.sum(1, keepdim=True)


def _reference(layer, x, ids, w):
    """Hand-computed MoE in float64: sum over slots with id >= 0 of w * W2 (silu(W1 x) * W3 x)."""
    x = x.double()
    out = torch.zeros(x.shape, dtype=torch.float64)
    inter = layer.w2_weight.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            w13 = layer.w13_weight[e].double()
            h = torch.nn.functional.silu(w13[:inter] @ x[t]) * (w13[inter:] @ x[t])
            out[t] += float(w[t, j]) * (layer.w2_weight[e].double() @ h)
    return out


@pytest.fixture(scope="module")
def stock_moe():
    """SGLang's stock CPU MoE forward and what it takes (imported, never patched, in this process)."""
    from sglang.srt.layers.moe.fused_moe_native import moe_forward_native
    from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    return SimpleNamespace(fn=moe_forward_native, cfg=MoeRunnerConfig(activation="silu"), out=StandardTopKOutput)


def _hooked(stock_moe, layer, x, ids, w):
    """Our AROUND hook wrapped around the stock function, as HookRegistry applies it."""
    return cpu_support.moe_forward_skipping_unused_slots(
        stock_moe.fn, layer, x, stock_moe.out(w, ids, None), stock_moe.cfg
    )


@pytest.mark.parametrize("tokens,k,dtype", [(1, 4, torch.float32), (7, 4, torch.float32), (33, 2, torch.bfloat16)])
def test_moe_replacement_is_stock_without_unused_slots(stock_moe, tokens, k, dtype):
    """No -1 and no repeated expert: bit-identical to the stock function."""
    layer = _moe_layer(dtype=dtype)
    x = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    ids, w = _routing(tokens, 8, k, seed=2)
    topk = stock_moe.out(w, ids, None)
    want = stock_moe.fn(layer, x, topk, stock_moe.cfg)
    got = _hooked(stock_moe, layer, x, ids, w)
    assert got.dtype == want.dtype and torch.equal(got, want)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(want.double(), _reference(layer, x, ids, w), rtol=tol, atol=tol)


def test_moe_replacement_skips_unused_slots(stock_moe):
    """-1 slots add nothing (whatever weight they carry); all--1 rows give zeros."""
    layer = _moe_layer()
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    ids, w = _routing(6, 8, 4, seed=4)
    ids[0, 3] = -1
    w[0, 3] = 0.0  # what our selection stage emits
    ids[2, 1:] = -1
    w[2, 1:] = 0.0
    ids[4, 0] = -1
    w[4, 0] = 0.7  # a weight on an unused slot is ignored too
    ids[5, :] = -1
    w[5, :] = 0.0
    with pytest.raises(RuntimeError):  # stock: "index -1 is out of bounds"; the reason for the replacement
        stock_moe.fn(layer, x, stock_moe.out(w, ids, None), stock_moe.cfg)
    got = _hooked(stock_moe, layer, x, ids, w)
    torch.testing.assert_close(got.double(), _reference(layer, x, ids, w), rtol=1e-5, atol=1e-5)
    assert torch.equal(got[5], torch.zeros(32))
    # Row 1 and 3 have no -1: same values as the stock function gives them.
    full = stock_moe.fn(layer, x[[1, 3]], stock_moe.out(w[[1, 3]], ids[[1, 3]], None), stock_moe.cfg)
    torch.testing.assert_close(got[[1, 3]], full, rtol=1e-6, atol=1e-6)
    # Every slot unused: zeros of the input's shape and dtype.
    none = _hooked(stock_moe, layer, x, torch.full_like(ids, -1), torch.zeros_like(w))
    assert none.dtype == x.dtype and torch.equal(none, torch.zeros_like(x))


def test_moe_replacement_handles_repeated_experts(stock_moe):
    """An expert twice in a row counts twice (stock miscounts and fails or misroutes)."""
    layer = _moe_layer()
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([[3, 3, 5, -1], [1, 2, 6, 7], [0, 0, 0, 0]], dtype=torch.int32)
    w = torch.tensor([[0.2, 0.3, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    got = _hooked(stock_moe, layer, x, ids, w)
    torch.testing.assert_close(got.double(), _reference(layer, x, ids, w), rtol=1e-5, atol=1e-5)


def test_moe_replacement_returns_weighted_entries_for_paged_experts(stock_moe):
    """SGLang's paged experts asks the runner for one output per (token, k) entry (``no_combine``, router
    weight kept) and sums them itself: entries of -1 slots are zero, and the entries sum to the MoE."""
    from dataclasses import replace

    layer = _moe_layer()
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(6))
    ids, w = _routing(5, 8, 4, seed=7)
    ids[1, 2] = -1  # an entry outside the wave: SGLang masks it to weight 0 (id -1 or 0)
    w[1, 2] = 0.0
    cfg = replace(stock_moe.cfg, no_combine=True, no_combine_keep_router_weight=True)
    entries = cpu_support.moe_forward_skipping_unused_slots(stock_moe.fn, layer, x, stock_moe.out(w, ids, None), cfg)
    assert entries.shape == (5, 4, 32) and entries.dtype == x.dtype
    assert torch.equal(entries[1, 2], torch.zeros(32))
    torch.testing.assert_close(entries.sum(dim=1).double(), _reference(layer, x, ids, w), rtol=1e-5, atol=1e-5)
    # Each entry alone is that expert's output times its weight.
    one = torch.zeros_like(ids).fill_(-1)
    one[3, 1] = ids[3, 1]
    torch.testing.assert_close(entries[3, 1].double(), _reference(layer, x, one, w)[3], rtol=1e-5, atol=1e-5)
    # Without the router weight the entries are the experts' plain outputs.
    plain = cpu_support.moe_forward_skipping_unused_slots(
        stock_moe.fn, layer, x, stock_moe.out(w, ids, None), replace(cfg, no_combine_keep_router_weight=False))
    torch.testing.assert_close((plain * w.unsqueeze(-1)).sum(dim=1), entries.sum(dim=1), rtol=1e-5, atol=1e-5)
    # No rows: an empty [0, k, hidden].
    empty = cpu_support.moe_forward_skipping_unused_slots(
        stock_moe.fn, layer, x[:0], stock_moe.out(w[:0], ids[:0], None), cfg)
    assert empty.shape == (0, 4, 32)


def test_paged_top_k_sum_and_residency_mirror():
    """The torch top-k sum leaves the routed scaling factor to the model, as the CPU MoE path does (off CUDA
    SGLang's models scale the MoE output themselves); the CPU server's eager executor gets a residency state
    that follows its LRU through SGLang's own run bookkeeping (load_into / plan_waves / store_from)."""
    from sglang.srt.layers.moe.paged_experts import executor as ex_mod
    from sglang.srt.layers.moe.paged_experts import method as method_mod

    entries = torch.arange(24, dtype=torch.float32).view(2, 3, 4)
    out = torch.empty(2, 4)
    cpu_support._sum_top_k_in_torch(None, None, entries, out, 2.5)
    assert out.tolist() == [[12.0, 15.0, 18.0, 21.0], [48.0, 51.0, 54.0, 57.0]]  # sums over k, not times 2.5

    m = method_mod.PagedExpertsMoEMethod(base_method=None, expert_format=None, num_experts=6, num_resident=2,
                                         graphs=False)
    m.store = SimpleNamespace(host={"w13_weight": torch.zeros(6, 1)})
    m.executor = ex_mod.EagerExecutor(base_method=None, store=m.store, policy=m.policy, contract=None, num_experts=6,
                                      routed_scaling_factor=1.0)
    layer = SimpleNamespace(w13_weight=torch.zeros(2, 1))
    cpu_support._mirror_lru_into_residency(None, m, layer)
    residency = m.executor.device_residency
    assert residency is not None and residency.expert_slot.tolist() == [0, 1, -1, -1, -1, -1]
    ex = m.executor
    for ids in ([[4, 5]], [[5, 3]]):  # two one-wave steps: 4, 5 paged in, then 3 replaces 4 (least recent)
        from sglang.srt.layers.moe.paged_experts.residency import plan_waves

        distinct = sorted({e for row in ids for e in row})
        ex._run = lambda layer, dispatch_output, d=distinct: plan_waves(policy=ex.policy, distinct=d)
        cpu_support._eager_run_without_graph_check(None, ex, None, None)
    slots = residency.expert_slot.tolist()
    assert {e for e, s in enumerate(slots) if s >= 0} == {3, 5} and slots[4] == -1


# --------------------------------------------------------------------------- sgl_kernel stand-in


def test_assign_req_to_token_pool_cpu_matches_loop():
    """The stand-in's one real kernel, against the Triton kernel's contract written as a loop."""
    g = torch.Generator().manual_seed(0)
    req_to_token = torch.zeros(6, 40, dtype=torch.int32)
    pool_idx = torch.tensor([4, 0, 2], dtype=torch.int64)
    start = torch.tensor([3, 0, 10], dtype=torch.int64)
    end = torch.tensor([9, 0, 31], dtype=torch.int64)  # the middle request writes nothing
    loc = torch.randint(0, 1000, (30,), generator=g, dtype=torch.int64)
    want = req_to_token.clone()
    off = 0
    for i in range(3):
        n = int(end[i] - start[i])
        want[pool_idx[i], start[i] : end[i]] = loc[off : off + n].int()
        off += n
    cpu_support.assign_req_to_token_pool_cpu(pool_idx, req_to_token, start, end, loc, req_to_token.shape[1])
    assert torch.equal(req_to_token, want)


def test_split_cores_for_ranks():
    """SGLANG_CPU_OMP_THREADS_BIND values the TP thread-binding hook would set."""
    assert cpu_support.split_cores(1, [0, 1]) == "0,1"
    assert cpu_support.split_cores(2, [0, 1]) == "0|1"
    assert cpu_support.split_cores(2, [4, 5, 6, 7]) == "4,5|6,7"
    assert cpu_support.split_cores(4, [0, 1]) == "0|1|0|1"  # fewer cores than ranks: shared
    assert cpu_support._parse_cpu_list("0-2,5") == [0, 1, 2, 5]


def test_eplb_rebalances_in_one_untimed_chunk():
    """The EPLB hook keeps SGLang's single chunk (its default size) and an explicit user chunk size."""
    default, chosen = SimpleNamespace(_rebalance_layers_per_chunk=None), SimpleNamespace(_rebalance_layers_per_chunk=2)
    assert cpu_support._eplb_in_one_untimed_chunk(None, default) is None
    assert default._rebalance_layers_per_chunk == cpu_support._ONE_CHUNK
    cpu_support._eplb_in_one_untimed_chunk(None, chosen)
    assert chosen._rebalance_layers_per_chunk == 2
    from sglang.srt.eplb import eplb_manager  # the chunking that reads it: a missing size is the same one chunk
    assert "self._rebalance_layers_per_chunk or 1000000" in inspect.getsource(eplb_manager)


@cpu_only
def test_install_on_cpu():
    """install(): stand-in modules, clear errors, fallbacks intact, hooks applied; idempotent."""
    out = _json_tail(
        _run_python(
            """
            import json, os, sys
            from lynx_sglang.runtime.cpu import support as cpu_support
            r = {"first": cpu_support.install(), "second": cpu_support.install()}
            import sgl_kernel
            from sgl_kernel import assign_req_to_token_pool_cpu, copy_all_layer_kv_cache_cpu
            from sgl_kernel.speculative import verify_tree_greedy_cpu
            r["standin"] = getattr(sgl_kernel, "__lynx_cpu_standin__", False)
            r["env"] = os.environ.get("SGLANG_USE_CPU_ENGINE")
            r["spawn_path"] = sys.path[0] == cpu_support.SPAWN_PATH_DIR
            try:
                from sgl_kernel import silu_and_mul   # try/except ImportError fallbacks keep working
                r["fallback"] = False
            except ImportError:
                r["fallback"] = True
            r["hasattr"] = hasattr(sgl_kernel, "fused_add_rmsnorm")
            try:
                sgl_kernel.fused_add_rmsnorm
            except NotImplementedError as e:
                r["attr_error"] = str(e)
            try:
                copy_all_layer_kv_cache_cpu(None, None, None, None)
            except NotImplementedError as e:
                r["call_error"] = str(e)
            try:
                import sgl_kernel.no_such_module
            except ModuleNotFoundError:
                r["no_module"] = True
            from sglang.srt.plugins.hook_registry import HookRegistry
            HookRegistry.apply_hooks()
            from sglang.srt.layers.moe import fused_moe_native
            from sglang.srt.distributed import parallel_state
            r["moe_hooked"] = hasattr(fused_moe_native.moe_forward_native, "__wrapped__")
            r["group_hooked"] = hasattr(parallel_state.init_model_parallel_group, "__wrapped__")
            print(json.dumps(r))
            """
        )
    )
    assert out["first"] is True and out["second"] is True and out["standin"] is True
    assert out["env"] == "1" and out["spawn_path"] is True
    assert out["fallback"] is True and out["hasattr"] is False and out.get("no_module") is True
    for key, name in (("attr_error", "sgl_kernel.fused_add_rmsnorm"), ("call_error", "copy_all_layer_kv_cache_cpu")):
        assert name in out[key] and "lynx-sglang's CPU support" in out[key]
    assert out["moe_hooked"] and out["group_hooked"]


def test_install_is_inert_with_a_gpu():
    """Where torch sees a GPU, install() returns False and changes nothing."""
    out = _json_tail(
        _run_python(
            """
            import json, os, sys
            import torch
            from sglang.srt.plugins.hook_registry import HookRegistry  # before the pretence: sglang probes the GPU
            from lynx_sglang.runtime.cpu import support as cpu_support
            torch.cuda.is_available = lambda: True   # pretend there is a GPU
            path, meta = list(sys.path), list(sys.meta_path)
            r = {"installed": cpu_support.install(), "again": cpu_support.install()}
            r["sgl_kernel"] = "sgl_kernel" in sys.modules
            r["path_same"] = sys.path == path and sys.meta_path == meta
            r["env"] = os.environ.get("SGLANG_USE_CPU_ENGINE")
            r["hooks"] = sorted(t for t in HookRegistry._hooks if HookRegistry._hooks[t])
            print(json.dumps(r))
            """
        )
    )
    assert out == {"installed": False, "again": False, "sgl_kernel": False, "path_same": True, "env": None, "hooks": []}


# --------------------------------------------------------------------------- the real server


def _greedy(server, prompts=PROMPTS):
    return [server.generate(p, max_new_tokens=MAX_NEW_TOKENS)["output_ids"] for p in prompts]


def test_the_plugin_entry_point_is_the_runtime_one():
    """SGLang's load_plugins() finds us through this entry point (the editable install's metadata)."""
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="sglang.srt.plugins") if e.name == "lynx"]
    assert ep.value == "lynx_sglang.runtime.sglang.plugin:register"
    from lynx_sglang.runtime.sglang import plugin

    assert ep.load() is plugin.register


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A TP-1 server of the bundled model for this module, killed (whole process group) at the end."""
    if torch.cuda.is_available():
        pytest.skip("launch/cpu_server.sh is for CPU-only machines")
    srv = start_server(*SERVER_ARGS, log_dir=tmp_path_factory.mktemp("server"))
    print(f"\nTP-1 server healthy after {srv.started_in_s:.1f} s")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def tp1_outputs(server):
    """Greedy output ids of PROMPTS from the TP-1 server."""
    return _greedy(server)


@cpu_only
def test_greedy_generate_is_repeatable(server, tp1_outputs):
    for prompt, ids in zip(PROMPTS, tp1_outputs, strict=True):
        assert 0 < len(ids) <= MAX_NEW_TOKENS, (prompt, ids)
    assert len({tuple(i) for i in tp1_outputs}) > 1, "different prompts should not all give the same answer"
    answer = server.generate(PROMPTS[0], max_new_tokens=MAX_NEW_TOKENS)
    assert isinstance(answer["text"], str) and answer["meta_info"]["completion_tokens"] == len(tp1_outputs[0])
    assert _greedy(server) == tp1_outputs


@cpu_only
def test_greedy_generate_under_concurrency(server, tp1_outputs):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda p: server.generate(p, max_new_tokens=MAX_NEW_TOKENS)["output_ids"], prompts))
    assert answers == [tp1_outputs[i % len(PROMPTS)] for i in range(8)]


@cpu_only
@pytest.mark.parametrize(
    "parallel",
    [
        pytest.param(("--tp", "2"), id="tp2"),
        # Expert parallel: each rank's dispatcher maps the other rank's experts to -1, so
        # this runs the -1-tolerant MoE forward inside the real server.
        pytest.param(("--tp", "2", "--ep-size", "2"), id="tp2-ep2"),
    ],
)
def test_parallel_server_matches_tp1(tmp_path, tp1_outputs, parallel):
    with running_server(*SERVER_ARGS, *parallel, log_dir=tmp_path) as srv:
        print(f"\n{' '.join(parallel)} server healthy after {srv.started_in_s:.1f} s")
        got = _greedy(srv)
        assert got == tp1_outputs, srv.log_tail()


@cpu_only
def test_sglang_serves_the_bundled_model_as_transformers_computes_it(server):
    """The trained model loads in SGLang with its own qwen3_moe code: prompt log-probs match transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lynx_sglang.server_process import DEFAULT_MODEL

    text = "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n"
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    ids = tokenizer(text)["input_ids"]
    out = server.post("/generate", {"input_ids": ids, "sampling_params": {"temperature": 0.0, "max_new_tokens": 1},
                                    "return_logprob": True, "logprob_start_len": 0})
    served = torch.tensor([lp for lp, *_ in out["meta_info"]["input_token_logprobs"][1:]])
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    want = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert served.shape == want.shape
    torch.testing.assert_close(served, want, atol=2e-3, rtol=0)
    assert float(want.exp().mean()) > 0.2  # a trained model: it predicts this code well above chance
