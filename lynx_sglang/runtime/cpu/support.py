"""Run stock SGLang on a CPU-only machine (development and tests); inert wherever a GPU exists.

``install()`` is called by the plugin entry point in every SGLang process. On a
machine with a GPU (or any other torch accelerator) it returns False and touches
nothing. On a CPU-only machine it:

* puts a pure-torch stand-in for ``sgl_kernel`` in ``sys.modules`` (the wheel's
  ``.so`` needs libcuda, and the CPU build of sgl-kernel has no wheel), and a
  directory on ``sys.path`` that gives SGLang's spawned processes the same stand-in;
* defaults ``SGLANG_USE_CPU_ENGINE=1`` (SGLang's switch for its CPU engine paths);
* registers SGLang hooks (``HookRegistry``): process groups without PyNccl, one set
  of cores per rank when ranks outnumber NUMA nodes (``--tp 2`` on one node), a
  MoE forward that skips ``-1`` expert slots and handles repeated experts, and
  EPLB rebalancing without its CUDA-synchronising timer;
* lets SGLang's paged experts (``--enable-paged-experts``) run on its eager path:
  a pageable host store, per-entry MoE outputs where the paged executor asks for
  them (``no_combine``), a torch top-k sum, and the LRU mirrored into a
  ``DeviceResidency`` held in CPU memory (docs/offload.md, "The CPU server").

Only the standard library is imported at module level: this runs in every process.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import pkgutil
import sys
import types

logger = logging.getLogger(__name__)

_installed: bool | None = None

#: Public names the CPU server imports from ``sgl_kernel`` and actually calls: real pure-torch versions.
_IMPLEMENTED: dict[str, str] = {
    # name -> submodule of the real package that defines it
    "assign_req_to_token_pool_cpu": "speculative",
}
#: Names the CPU server imports at module load (unguarded) but never calls on the paths we run:
#: importable, raising NotImplementedError when called.
_IMPORTED_NOT_CALLED: dict[str, str] = {
    # mem_cache/memory_pool -> kernels/ops/kvcache/cache_move: speculative decoding and unified pools only
    "copy_all_layer_kv_cache_cpu": "kvcacheio",
    # kernels/ops/speculative/*: imported by the scheduler's module graph, called only when speculating
    "assign_draft_cache_locs_contiguous_cpu": "speculative",
    "assign_extend_cache_locs_cpu": "speculative",
    "fill_accept_out_cache_loc_cpu": "speculative",
    "fill_bonus_tokens_cpu": "speculative",
    "rotate_input_ids_cpu": "speculative",
    "build_tree_kernel_efficient_cpu": "speculative",
    "verify_tree_greedy_cpu": "speculative",
    # layers/attention/linear/*: linear-attention (GDN/KDA) models only
    "causal_conv1d_fn_cpu": "mamba",
    "causal_conv1d_update_cpu": "mamba",
    "chunk_gated_delta_rule_cpu": "mamba",
}

_MOE_TARGET = "sglang.srt.layers.moe.fused_moe_native.moe_forward_native"
_GROUP_TARGET = "sglang.srt.distributed.parallel_state.init_model_parallel_group"
_THREADS_TARGET = "sglang.srt.utils.numa_utils.init_threads_binding"
_EPLB_TARGET = "sglang.srt.eplb.eplb_manager.EPLBManager.__init__"
_PAGED = "sglang.srt.layers.moe.paged_experts"
_PAGED_ALLOC_TARGET = _PAGED + ".store.HostExpertStore._alloc"
_PAGED_SUM_TARGET = _PAGED + ".runners.TritonContract._sum_top_k"
_PAGED_LOADED_TARGET = _PAGED + ".method.PagedExpertsMoEMethod.process_weights_after_loading"
_PAGED_RUN_TARGET = _PAGED + ".executor.EagerExecutor.run"
_PAGED_PAGE_IN_TARGET = _PAGED + ".store.HostExpertStore.page_in"
#: Where the CPU server appends one JSON line per paged MoE layer and step (rows, distinct experts,
#: experts paged in, waves), for benchmarks/bench_paged_served_cpu.py; unset: nothing is written.
PAGED_LOG_ENV = "LYNX_CPU_PAGED_LOG"


# --------------------------------------------------------------------------- entry point


def has_accelerator() -> bool:
    """True when torch sees a CUDA/ROCm GPU or another accelerator (then ``install`` does nothing)."""
    import torch

    if torch.cuda.is_available():
        return True
    acc = getattr(torch, "accelerator", None)
    # A CUDA build reports "cuda" as its accelerator type even with no device: ask is_available().
    return bool(acc is not None and acc.is_available())


SPAWN_PATH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_spawn_path")


def install() -> bool:
    """Install CPU support if this machine has no GPU; idempotent.

    Returns True when installed (CPU-only machine), False on machines with a GPU,
    where nothing is changed.
    """
    global _installed
    if _installed is not None:
        return _installed
    if has_accelerator():
        _installed = False
        return False
    if glob.glob("/dev/nvidia[0-9]*"):  # a GPU the driver or torch cannot reach: say so before SGLang fails later
        logger.warning("lynx-sglang: NVIDIA device files exist but torch sees no CUDA device; installing CPU "
                       "support (SGLang will run on the CPU, or fail without sgl-kernel if asked for a GPU)")
    _set_env_defaults()
    install_sgl_kernel_standin()
    _put_standin_on_spawn_path()
    _register_hooks()
    _installed = True
    logger.info("lynx-sglang CPU support installed (sgl_kernel stand-in, CPU hooks)")
    return True


def _set_env_defaults() -> None:
    # setdefault: an explicit user choice wins; scheduler processes inherit it from the launcher.
    # is_cpu() is False without it, and SGLang takes none of its CPU engine paths.
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")


def split_cores(world_size: int, cpus: list[int] | None = None) -> str:
    """A ``SGLANG_CPU_OMP_THREADS_BIND`` value giving each of ``world_size`` ranks its own cores.

    Cores of this process's affinity are split into contiguous groups (``"0|1"`` for 2 ranks
    on 2 cores); with fewer cores than ranks, ranks share cores round-robin.
    """
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    n = len(cpus)
    if n >= world_size:
        groups = [cpus[r * n // world_size : (r + 1) * n // world_size] for r in range(world_size)]
    else:
        groups = [[cpus[r % n]] for r in range(world_size)]
    return "|".join(",".join(map(str, g)) for g in groups)


def _parse_cpu_list(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        elif part:
            out.append(int(part))
    return out


def _bind_threads(original, *args, **kwargs):
    """AROUND hook on ``numa_utils.init_threads_binding`` (scheduler process, ``--device cpu``).

    Stock SGLang puts one rank per NUMA node unless ``SGLANG_CPU_OMP_THREADS_BIND`` is set,
    so ``--tp 2`` on a one-node machine fails its assert: when unset and ranks outnumber
    nodes, split this machine's cores among the ranks. Then pin the rank to its cores and
    size torch's thread pool to them: stock does that with ``sgl_kernel.init_cpu_threads_env``
    only on AMX/arm64 CPUs, so otherwise every rank would run one thread per core of the
    whole machine and the ranks would oversubscribe the cores.
    """
    import torch

    world_size = kwargs.get("world_size")  # stock calls it with keywords only
    if "SGLANG_CPU_OMP_THREADS_BIND" not in os.environ and isinstance(world_size, int):
        from sglang.srt.utils.common import get_cpu_ids_by_node

        if world_size > len(get_cpu_ids_by_node()):
            os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = split_cores(world_size)
    local = original(*args, **kwargs)
    # Affinity of this (main) thread, inherited by the threads it starts; the pool size is what
    # keeps two ranks from running two threads each on a 2-core machine.
    try:
        cpus = _parse_cpu_list(str(local))
        if cpus:
            os.sched_setaffinity(0, cpus)
            torch.set_num_threads(len(cpus))
    except (ValueError, OSError) as e:  # an unusual bind string: keep torch's defaults
        logger.warning("lynx-sglang: could not pin this rank to CPUs %r: %s", local, e)
    return local


# --------------------------------------------------------------------------- sgl_kernel stand-in


class NotProvidedError(NotImplementedError, AttributeError):
    """An ``sgl_kernel`` function that lynx-sglang's CPU support does not provide.

    It is also an ``AttributeError`` so that ``hasattr`` is False and
    ``try: from sgl_kernel import X / except ImportError:`` still takes its fallback.
    """


def _not_provided_message(qualname: str) -> str:
    return (
        f"{qualname} is not provided by lynx-sglang's CPU support: sgl-kernel has no CPU build here, "
        f"and lynx_sglang.runtime.cpu.support implements only the functions the CPU server path calls "
        f"({', '.join(sorted(_IMPLEMENTED))})"
    )


class _StandInModule(types.ModuleType):
    """A stand-in ``sgl_kernel`` (sub)module: known names resolve, any other raises NotProvidedError."""

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            # Keep Python's own probing (__path__, __wrapped__, ...) an ordinary AttributeError.
            raise AttributeError(name)
        raise NotProvidedError(_not_provided_message(f"{self.__name__}.{name}"))


def _unavailable(qualname: str):
    def stub(*args, **kwargs):
        raise NotImplementedError(_not_provided_message(qualname))

    stub.__name__ = qualname.rsplit(".", 1)[-1]
    stub.__qualname__ = stub.__name__
    stub.__doc__ = f"Not provided on CPU: calling it raises NotImplementedError ({qualname})."
    return stub


def assign_req_to_token_pool_cpu(
    req_pool_indices,
    req_to_token,
    start_offset,
    end_offset,
    out_cache_loc,
    pool_len: int,
) -> None:
    """Pure-torch ``sgl_kernel.assign_req_to_token_pool_cpu``.

    For request ``i``: ``req_to_token[req_pool_indices[i], start[i]:end[i]] = out_cache_loc[o_i : o_i + n_i]``
    with ``n_i = end[i] - start[i]`` and ``o_i`` the sum of the earlier ``n_j`` (the Triton
    kernel ``mem_cache.allocation.assign_req_to_token_pool``'s contract).
    """
    import torch

    del pool_len  # implied by req_to_token's row length
    lengths = (end_offset - start_offset).long()
    total = int(lengths.sum())
    if total == 0:
        return
    rows = torch.repeat_interleave(req_pool_indices.long(), lengths)
    # Column of each written slot: its request's start plus its rank inside the request.
    first = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(total, device=lengths.device) - torch.repeat_interleave(first, lengths)
    cols = torch.repeat_interleave(start_offset.long(), lengths) + within
    req_to_token[rows, cols] = out_cache_loc[:total].to(req_to_token.dtype)


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``sgl_kernel`` and the top-level submodules the real package has, as stand-in modules."""

    def __init__(self, submodules: frozenset[str]):
        self.submodules = submodules

    def find_spec(self, fullname, path=None, target=None):
        """Claim ``sgl_kernel`` and its real submodule names; anything else is not ours."""
        if fullname == "sgl_kernel":
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        head, _, tail = fullname.partition(".")
        # One level only, as plain modules: deeper names stay ModuleNotFoundError, which also keeps
        # "from sgl_kernel.x import name" an ImportError (Python would otherwise try x.name as a module).
        if head == "sgl_kernel" and tail in self.submodules:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        """A fresh stand-in module."""
        return _StandInModule(spec.name)

    def exec_module(self, module):
        """Fill in the names this stand-in provides for that (sub)module."""
        module.__file__ = __file__
        module.__lynx_cpu_standin__ = True
        sub = module.__name__.partition(".")[2]
        if sub == "":
            module.__path__ = []  # a package, so "import sgl_kernel.x" comes back to this finder
        for table, make in ((_IMPLEMENTED, _implementation), (_IMPORTED_NOT_CALLED, _unavailable_for)):
            for name, home in table.items():
                if sub in ("", home):  # the top level re-exports everything, like the real __init__
                    setattr(module, name, make(name))
        if sub == "":
            module.__version__ = "0.0.0+lynx-cpu-standin"


def _implementation(name: str):
    return globals()[name]


def _unavailable_for(name: str):
    return _unavailable(f"sgl_kernel.{name}")


def _real_submodule_names() -> frozenset[str]:
    # Where the real wheel is installed, offer its top-level submodule names (a directory
    # listing executes nothing); any other sgl_kernel.X stays a ModuleNotFoundError.
    path = [p for p in sys.path if p != SPAWN_PATH_DIR]
    try:
        spec = importlib.machinery.PathFinder.find_spec("sgl_kernel", path)
    except (ImportError, ValueError):
        spec = None
    names = set(_IMPLEMENTED.values()) | set(_IMPORTED_NOT_CALLED.values())
    if spec is not None and spec.submodule_search_locations:
        names |= {m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)}
    return frozenset(names)


def install_sgl_kernel_standin() -> types.ModuleType:
    """Make ``import sgl_kernel`` (and its submodules) resolve to the pure-torch stand-in; returns it.

    Idempotent. Also called from ``_spawn_path/sgl_kernel.py`` in spawned processes.
    """
    mod = sys.modules.get("sgl_kernel")
    if getattr(mod, "__lynx_cpu_standin__", False):
        return mod
    # Drop a half-initialised real wheel (its import fails without libcuda) or the spawn-path file.
    for name in [n for n in sys.modules if n == "sgl_kernel" or n.startswith("sgl_kernel.")]:
        del sys.modules[name]
    finder = next((f for f in sys.meta_path if isinstance(f, _StandInFinder)), None)
    if finder is None:
        finder = _StandInFinder(_real_submodule_names())
        sys.meta_path.insert(0, finder)
    spec = finder.find_spec("sgl_kernel")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sgl_kernel"] = module
    spec.loader.exec_module(module)
    return module


def _put_standin_on_spawn_path() -> None:
    # SGLang starts its scheduler/detokenizer processes with multiprocessing "spawn"; the child
    # unpickles its target (importing sgl_kernel through SGLang's module graph) before it calls
    # load_plugins(), so sys.modules of this process does not reach it. spawn does copy sys.path.
    if not os.path.isfile(os.path.join(SPAWN_PATH_DIR, "sgl_kernel.py")):
        # Only a non-editable install that did not ship the file gets here.
        logger.warning(
            "lynx-sglang: %s/sgl_kernel.py is missing: SGLang's spawned processes will fail "
            "to import sgl_kernel on this CPU-only machine",
            SPAWN_PATH_DIR,
        )
        return
    if SPAWN_PATH_DIR not in sys.path:
        sys.path.insert(0, SPAWN_PATH_DIR)


# --------------------------------------------------------------------------- hooks


def _register_hooks() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_GROUP_TARGET, _no_pynccl, HookType.BEFORE)
    HookRegistry.register(_THREADS_TARGET, _bind_threads, HookType.AROUND)
    HookRegistry.register(_MOE_TARGET, moe_forward_skipping_unused_slots, HookType.AROUND)
    HookRegistry.register(_EPLB_TARGET, _eplb_in_one_untimed_chunk, HookType.AFTER)
    HookRegistry.register(_PAGED_ALLOC_TARGET, _pageable_host_rows, HookType.AROUND)
    HookRegistry.register(_PAGED_SUM_TARGET, _sum_top_k_in_torch, HookType.AROUND)
    HookRegistry.register(_PAGED_LOADED_TARGET, _mirror_lru_into_residency, HookType.AFTER)
    HookRegistry.register(_PAGED_RUN_TARGET, _eager_run_without_graph_check, HookType.AROUND)
    HookRegistry.register(_PAGED_PAGE_IN_TARGET, _counting_page_in, HookType.AROUND)


# --------------------------------------------------------------------------- paged experts on the CPU
# SGLang's paged experts needs three things a CPU machine lacks: page-locked host memory (a CUDA
# driver), a runner that returns one output per routed (token, k) entry, and a Triton top-k sum.
# With them its eager executor (LRUPolicy, plan_waves, page_in, waves, merge) runs as it is; the
# "GPU" slots are CPU tensors and a page-in is a memory copy, so page-in counts and waves are SGLang's
# own, while times say nothing about PCIe.


def _pageable_host_rows(original, store, shape, dtype):
    """AROUND hook on ``HostExpertStore._alloc``: pageable rows (pinning needs a CUDA driver)."""
    import torch

    return torch.empty(shape, dtype=dtype, device="cpu")


def _sum_top_k_in_torch(original, contract, entries, out, routed_scaling_factor: float):
    """AROUND hook on ``TritonContract._sum_top_k`` (a Triton kernel): the top-k sum of the merged
    ``[tokens, top_k, hidden]`` entries into ``out``, without the routed scaling factor.

    On a GPU the kernel applies the factor. Off CUDA SGLang's models apply it to the MoE output
    themselves (e.g. ``glm4_moe.py``: ``if not _is_cuda: final_hidden_states *= routed_scaling_factor``),
    and the CPU MoE path (``moe_forward_native``) leaves it out; applying it here too would scale twice.
    """
    import torch

    torch.sum(entries, dim=1, out=out)


def _eager_run_without_graph_check(original, executor, layer, dispatch_output):
    """AROUND hook on ``EagerExecutor.run``: its body with a residency state, without asking CUDA
    whether a graph is being captured (that call needs a CUDA driver; on the CPU none ever is)."""
    residency = executor.device_residency
    if residency is None:
        return original(executor, layer, dispatch_output)
    residency.load_into(executor.policy)
    store = executor.store
    before = getattr(store, "lynx_page_ins", 0), getattr(store, "lynx_waves", 0)
    out = executor._run(layer, dispatch_output)
    residency.store_from(executor.policy)
    path = os.environ.get(PAGED_LOG_ENV)
    if path:
        ids = dispatch_output.topk_output.topk_ids
        line = {"layer": getattr(layer, "layer_id", None), "rows": int(ids.shape[0]),
                "distinct": int((ids.unique() >= 0).sum()),
                "page_ins": store.lynx_page_ins - before[0], "waves": store.lynx_waves - before[1]}
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
    return out


def _counting_page_in(original, store, layer, loads):
    """AROUND hook on ``HostExpertStore.page_in`` (one call per wave): counts experts and waves."""
    store.lynx_page_ins = getattr(store, "lynx_page_ins", 0) + len(loads)
    store.lynx_waves = getattr(store, "lynx_waves", 0) + 1
    return original(store, layer=layer, loads=loads)


def _mirror_lru_into_residency(result, method, layer):
    """AFTER hook on ``PagedExpertsMoEMethod.process_weights_after_loading``: a residency state.

    Without CUDA graphs SGLang keeps residency only in the host ``LRUPolicy``. On a GPU lynx's
    ``--lynx-residency`` then refuses (it reads ``DeviceResidency.expert_slot`` on the device). On
    the CPU server we give the eager executor a ``DeviceResidency`` in CPU memory: its ``run`` then
    loads the LRU from it before every step and stores it back after (``load_into`` /
    ``store_from``, SGLang's own code for graphs-on GPUs), so ``expert_slot`` is the residency
    each step starts from, and the decisions are those of the LRU alone (the round trip keeps its
    order).
    """
    from sglang.srt.layers.moe.paged_experts.residency import DeviceResidency

    executor = getattr(method, "executor", None)
    if executor is not None and executor.device_residency is None and method.device_executor is None:
        device = getattr(layer, next(iter(method.store.host))).device
        executor.device_residency = DeviceResidency(num_experts=method.num_experts,
                                                    num_slots=method.num_resident, device=device)
    return result


#: ``EPLBManager._compute_update_layer_ids_chunks`` reads a missing chunk size as this (one chunk).
_ONE_CHUNK = 1000000


def _eplb_in_one_untimed_chunk(result, manager, *args, **kwargs):
    """AFTER hook on ``EPLBManager.__init__``: rebalancing without ``torch.cuda.synchronize``.

    Without ``--eplb-rebalance-layers-per-chunk`` EPLB times each rebalance
    between two ``torch.get_device_module().synchronize()`` calls, which on a CPU
    machine with a CUDA build of torch fail ("Found no NVIDIA driver"). The
    untimed path with SGLang's own default chunk size updates every layer at
    once, exactly as the timed one does.
    """
    if manager._rebalance_layers_per_chunk is None:
        manager._rebalance_layers_per_chunk = _ONE_CHUNK
    return result


def _no_pynccl(*args, **kwargs):
    """BEFORE hook on ``init_model_parallel_group``: never build a PyNccl communicator on CPU.

    PyNccl loads libnccl and wants CUDA devices; with no GPU the TP groups must be gloo-only.
    """
    if len(args) > 3:  # use_pynccl passed positionally (4th parameter)
        args = args[:3] + (False,) + args[4:]
    else:
        kwargs["use_pynccl"] = False
    return args, kwargs


def moe_forward_skipping_unused_slots(original, layer, x, topk_output, moe_runner_config):
    """AROUND hook on ``fused_moe_native.moe_forward_native`` (the CPU MoE path without AMX).

    With ``moe_runner_config.no_combine`` (SGLang's paged experts sets it, keeping the router
    weight) it returns each (token, k) entry's weighted output, ``[tokens, top_k, hidden]``,
    through the per-slot path below; the stock function ignores the flag.

    The stock function fails on ``-1`` expert ids (scatter out of range) and miscounts an
    expert repeated in a row. Inputs with neither go to the stock function unchanged, so
    their numerics are identical. Otherwise every valid (token, slot) pair becomes its own
    one-expert row through the stock function (same per-expert computation), and the rows
    are combined as stock does: weights in the top-k weight dtype, summed over slots, with
    ``-1`` slots contributing nothing whatever their weight.
    """
    import torch

    topk_weights, topk_ids = topk_output[0], topk_output[1]
    per_entry = bool(getattr(moe_runner_config, "no_combine", False))  # SGLang's paged experts asks for it
    if topk_ids.shape[0] == 0:  # an all-to-all rank that received no rows (the stock reshape fails)
        return x.new_zeros((0, topk_ids.shape[1], x.shape[-1]) if per_entry else (0, x.shape[-1]))
    valid = topk_ids >= 0
    if not per_entry and bool(valid.all()) and not _has_repeats(topk_ids):
        return original(layer, x, topk_output, moe_runner_config)

    num_tokens, k = topk_ids.shape
    slot = valid.reshape(-1).nonzero().squeeze(1)
    if slot.numel() == 0:
        return x.new_zeros((num_tokens, k, x.shape[-1]) if per_entry else (num_tokens, x.shape[-1]))
    token = slot // k
    ids = topk_ids.reshape(-1)[slot].unsqueeze(1)
    ones = torch.ones(ids.shape, dtype=topk_weights.dtype, device=topk_weights.device)
    per_slot = original(layer, x[token], _with_routing(topk_output, ones, ids), moe_runner_config)
    # Stock combine: expert outputs (x dtype) -> weight dtype, times weights, sum over slots, -> x dtype.
    full = torch.zeros((num_tokens * k, per_slot.shape[-1]), dtype=topk_weights.dtype, device=x.device)
    full[slot] = per_slot.to(topk_weights.dtype)
    entries = full.view(num_tokens, k, -1)
    if per_entry and not getattr(moe_runner_config, "no_combine_keep_router_weight", False):
        return entries.masked_fill_(~valid.unsqueeze(-1), 0).to(per_slot.dtype)
    weighted = entries.mul_(topk_weights.unsqueeze(-1)).masked_fill_(~valid.unsqueeze(-1), 0)
    if per_entry:  # no_combine: each entry's weighted output, summed by the caller (SGLang's paged experts)
        return weighted.to(per_slot.dtype)
    return weighted.sum(dim=1).to(per_slot.dtype)


def _with_routing(topk_output, weights, ids):
    # StandardTopKOutput is a NamedTuple (weights, ids, router_logits); the stock function only unpacks it.
    rest = tuple(topk_output[2:])
    if hasattr(type(topk_output), "_fields"):
        return type(topk_output)(weights, ids, *rest)
    return (weights, ids, *rest)


def _has_repeats(topk_ids) -> bool:
    if topk_ids.shape[1] < 2:
        return False
    s = topk_ids.sort(dim=1).values
    return bool(((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).any())
