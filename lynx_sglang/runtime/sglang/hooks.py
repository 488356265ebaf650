"""Where lynx-sglang enters SGLang 0.5.23: every hook, registered from one table (``HOOKS``).

Data path (docs/architecture.md): ``TopK.forward`` -> [our AROUND hook:
``stage.TopKSelectionStage``] -> dispatcher -> MoE runner. The stage rewrites the
router's ``StandardTopKOutput`` for decode rows only; the phase (``phase.Phase``)
comes from the ``ForwardBatch`` published through SGLang's ``forward_context``.

Start-up refusals are decided from the server args: in the launcher from the
parsed flags (``ServerArgs.from_cli_args``), in every worker again from its
resolved ``ServerArgs`` (``stage.refusal``); a field we cannot read is a refusal.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, NamedTuple

from lynx_sglang.runtime.sglang import a2a_dispatcher, metrics, stage
from lynx_sglang.runtime.sglang.options import LynxOptions, add_a2a_choice, add_cli_args, options_from_args
from lynx_sglang.runtime.sglang.phase import DECODE_TOKENS_ATTR, published
from lynx_sglang.runtime.sglang.phase import current as current_phase
from lynx_sglang.runtime.sglang.phase import phase_of

logger = logging.getLogger(__name__)

_TOPK = "sglang.srt.layers.moe.topk.TopK"
_FORWARD_CONTEXT = "sglang.srt.model_executor.forward_context.forward_context"
_FORWARD_BATCH_INIT = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
_PREPARE_MOE_TOPK = "sglang.srt.model_executor.model_runner_components.moe_ep_setup.prepare_moe_topk"
_SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
_CREATE_MOE_DISPATCHER = "sglang.srt.layers.moe.fused_moe_triton.layer.create_moe_dispatcher"
_PADDING_COUNT = "sglang.srt.model_executor.forward_batch_info.enable_num_token_non_padded"
_INIT_GRAPHS = "sglang.srt.model_executor.model_runner.ModelRunner.init_cuda_graphs"
_PREFILL_GRAPHS_INIT = "sglang.srt.model_executor.runner.prefill_cuda_graph_runner.PrefillCudaGraphRunner.__init__"

_REPORT_DECODE_STATS = ("sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter"
                        ".report_decode_stats")



# ----------------------------------------------------------------------------- phase

def _forward_context_around(original, ctx, *args, forward_batch=None, **kwargs):
    """Publish the phase of ``forward_batch`` for exactly the scope SGLang publishes it."""
    inner = original(ctx, *args, forward_batch=forward_batch, **kwargs)
    if forward_batch is None:
        return inner  # a nested override without a batch keeps the outer phase

    @contextlib.contextmanager
    def scope():
        with inner as value, published(phase_of(forward_batch)):
            yield value

    return scope()


def _forward_batch_init_after(result, *args, **kwargs):
    """Remember how many decode tokens a mixed batch carries (its ScheduleBatch knows, ForwardBatch does not)."""
    batch = args[1] if len(args) > 1 else kwargs.get("batch")
    mode = getattr(result, "forward_mode", None)
    if batch is not None and mode is not None and mode.is_mixed():
        setattr(result, DECODE_TOKENS_ATTR, len(getattr(batch, "decoding_reqs", None) or ()))
    return result


def _empty_topk_output_around(original, self, *args, **kwargs):
    """A rank without tokens still joins global selection's all-reduce (DeepEP-family a2a)."""
    out = original(self, *args, **kwargs)
    layer_stage = self.__dict__.get(stage.STAGE_ATTR)
    if layer_stage is not None:
        layer_stage.run_without_tokens()
    return out


def _topk_forward_around(original, self, hidden_states, router_logits, *args, **kwargs):
    out = original(self, hidden_states, router_logits, *args, **kwargs)
    layer_stage = self.__dict__.get(stage.STAGE_ATTR)
    if layer_stage is None or current_phase() is None:  # prefill/extend: skip even resolving the padding bound
        return out
    num_valid = kwargs.get("num_token_non_padded")
    if num_valid is None:
        # SGLang resolves the bound from the forward context when the caller does not pass it.
        num_valid, _ = self._resolve_routing_inputs(None, kwargs.get("expert_location_dispatch_info"))
    return layer_stage(out, num_valid, hidden_states)


def _prepare_moe_topk_after(result, *args, model=None, model_config=None, **kwargs):
    """After the model loads (before CUDA-graph capture): plan every layer's stage, or refuse."""
    options = LynxOptions.from_env()
    if options.enabled and model is not None:
        if not _hooks_applied():
            raise RuntimeError("--moe-backend lynx: SGLang did not apply lynx-sglang's TopK hook "
                               "(see the log for 'Failed to apply hooks'); refusing to run without it")
        stage.prepare(model, model_config.hf_config, options, stage.server_args_of_process())
    # Our a2a dispatchers (built with the model) move their totals into one table before graph capture.
    a2a_dispatcher.registry().seal()
    return result


# ----------------------------------------------------------------------------- CLI

def _add_cli_args_around(original, parser):
    original(parser)
    add_cli_args(parser)
    add_a2a_choice(parser)


def _from_cli_args_around(original, *args, **kwargs):
    """Read our options before SGLang builds ServerArgs (``--moe-a2a-backend lynx`` becomes ``none`` there)."""
    namespace = args[-1] if args else kwargs.get("args")
    options = options_from_args(namespace)
    if options.enabled:
        stage.check_supported(namespace)  # the workers decide again from the resolved server args
    options.to_env()
    if options.enabled:
        logger.info("lynx-sglang: --moe-backend lynx, policy %s %s", options.policy, options.params)
    if options.a2a_backend != "none":
        logger.info("lynx-sglang: --moe-a2a-backend %s (all-to-all token dispatch)", options.a2a_backend)
    return original(*args, **kwargs)


def _padding_count_around(original, *args, **kwargs):
    """With selection stages, CUDA-graph decode always carries the real token count.

    SGLang passes it (and masks padded top-k rows to -1) only under expert parallelism or
    DP gathering. Under plain TP a replayed graph's padding rows (token 0, repeated) would
    otherwise vote, bending the kept set towards their experts and counting in the statistics.
    """
    return True if stage.registry() else original(*args, **kwargs)


def _init_cuda_graphs_after(result, *args, **kwargs):
    """Zero the statistics the graph warm-up and capture runs added (dummy decode batches), in place:
    captured graphs keep adding to the same buffers. The registries count the reset, so the metrics
    take what follows as counted from zero (their counters never go backwards)."""
    stage.registry().reset_stats()
    a2a_dispatcher.registry().reset_stats()
    return result


def _prefill_graphs_init_after(result, runner, *args, **kwargs):
    """Mixed chunked-prefill batches run eager while Lynx has stages.

    SGLang replays a mixed batch through the prefill graph captured for extend batches
    (the default breakable prefill graphs on CUDA), where selection was captured as a
    pass-through: its decode rows would never be selected on. Every rank decides the same
    way (all have stages), so the attention-DP replay vote stays consistent.
    """
    if stage.registry() and not getattr(runner, "prefer_eager_mixed_prefill", False):
        runner.prefer_eager_mixed_prefill = True
        logger.info("lynx-sglang: mixed prefill+decode batches run eager so that their decode rows are selected on")
    return result


def _create_moe_dispatcher_around(original, moe_runner_config, *args, **kwargs):
    """Our all-to-all dispatcher for every FusedMoE layer when ``--moe-a2a-backend lynx``."""
    if LynxOptions.from_env().a2a_backend == "lynx":
        return a2a_dispatcher.make_dispatcher(moe_runner_config)
    return original(moe_runner_config, *args, **kwargs)


# ----------------------------------------------------------------------------- registration

def _hooks_applied() -> bool:
    """True when SGLang has wrapped ``TopK.forward`` with our hook (apply_hooks only logs failures)."""
    from sglang.srt.layers.moe.topk import TopK

    fn = TopK.__dict__.get("forward")  # TopK inherits forward; only a hook puts one on the class
    while fn is not None:  # ours may sit under another plugin's wrapper: follow the chain
        if any(c.cell_contents is _topk_forward_around for c in getattr(fn, "__closure__", None) or ()):
            return True
        fn = getattr(fn, "__wrapped__", None)
    return False


class Hook(NamedTuple):
    """One SGLang function we wrap: its dotted path, our function, and how HookRegistry applies it."""

    target: str
    fn: Callable
    kind: str  # a HookType member name: BEFORE, AFTER, AROUND or REPLACE


#: Every hook lynx-sglang registers with SGLang (CPU-only machines add cpu.support's own).
HOOKS = (
    Hook(f"{_SERVER_ARGS}.add_cli_args", _add_cli_args_around, "AROUND"),
    Hook(f"{_SERVER_ARGS}.from_cli_args", _from_cli_args_around, "AROUND"),
    Hook(_CREATE_MOE_DISPATCHER, _create_moe_dispatcher_around, "AROUND"),
    Hook(f"{_TOPK}.forward", _topk_forward_around, "AROUND"),
    Hook(f"{_TOPK}.empty_topk_output", _empty_topk_output_around, "AROUND"),
    Hook(_FORWARD_CONTEXT, _forward_context_around, "AROUND"),
    Hook(_FORWARD_BATCH_INIT, _forward_batch_init_after, "AFTER"),
    Hook(_PREPARE_MOE_TOPK, _prepare_moe_topk_after, "AFTER"),
    Hook(_PADDING_COUNT, _padding_count_around, "AROUND"),
    Hook(_INIT_GRAPHS, _init_cuda_graphs_after, "AFTER"),
    Hook(_PREFILL_GRAPHS_INIT, _prefill_graphs_init_after, "AFTER"),
    Hook(_REPORT_DECODE_STATS, metrics.report_decode_stats_after, "AFTER"),
)


_registered = False


def register_hooks() -> None:
    """Register every hook of ``HOOKS`` with SGLang's HookRegistry (applied by ``load_plugins``); idempotent.

    Registering twice would wrap each target twice (two selection passes, flags added twice).
    """
    global _registered
    if _registered:
        return
    _registered = True
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for hook in HOOKS:
        HookRegistry.register(hook.target, hook.fn, HookType[hook.kind])
