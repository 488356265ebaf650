"""``--moe-a2a-backend lynx``: our all-to-all dispatcher inside SGLang's MoE layer.

SGLang (with ``--tp N --ep N``) runs attention tensor-parallel, so every rank
holds the same T rows when the MoE layer starts; with ``--moe-a2a-backend
none`` each rank then computes its experts' share of all T rows and the model
all-reduces the partial outputs. Our dispatcher keeps that contract and moves
tokens instead of work:

  rank r owns rows ``owned_rows(T, N, r)``; ``dispatch`` sends each owned row
  once to every rank holding one of its (post-selection) experts
  (``AllToAllDispatcher``); SGLang's own MoE runner computes the received rows
  with local expert ids (``StandardDispatcher`` maps them); ``combine`` sends
  the results home, sums them, and returns [T, d] with the owned rows filled
  and zeros elsewhere, so the model's existing all-reduce assembles the full
  output on every rank.

Under CUDA-graph capture the fixed-capacity exchange is used (capacity =
ceil(T / N) rows per rank pair), which needs no host synchronisation.

Per decode step it accounts bytes dispatched and combined and each rank's
distinct experts and tokens (``A2ATotals.step``), read by the metrics -- only
when someone reads them (``--enable-metrics`` or ``LYNX_SGLANG_STATS_DIR``,
decided once per dispatcher at start-up: ``accounting_wanted``). A mixed
chunked-prefill batch counts as a decode step too, with only its decode rows
costed (its prefill rows travel as well, but are a prefill's cost).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from lynx_sglang.runtime.selection.config import ConfigError
from lynx_sglang.runtime.expert_parallel.accounting import A2ATotals
from lynx_sglang.runtime.expert_parallel.dispatch import AllToAllDispatcher
from lynx_sglang.runtime.expert_parallel.placement import ExpertPlacement, owned_rows
from lynx_sglang.runtime.sglang.options import STATS_DIR_ENV
from lynx_sglang.runtime.sglang.phase import Phase
from lynx_sglang.runtime.sglang.phase import current as current_phase

logger = logging.getLogger(__name__)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def account(totals: torch.Tensor, phase: Optional[Phase], topk_ids: torch.Tensor, placement: ExpertPlacement,
            hidden_size: int, activation_bytes: int) -> None:
    """Add one step's ``A2ATotals.step`` to ``totals`` in place (decode and mixed phases; no host sync)."""
    if phase is None or not (phase.is_decode or phase.is_mixed):
        return
    totals += A2ATotals.step(topk_ids, placement, phase.first_decode_row(topk_ids.shape[0]), hidden_size,
                             activation_bytes)


def accounting_wanted(server_args=None) -> bool:
    """Whether anyone reads the per-step traffic accounting: ``--enable-metrics`` or ``LYNX_SGLANG_STATS_DIR``.

    Decided once, when a dispatcher is built (``server_args``: this process's ServerArgs; None reads
    SGLang's). If the server args cannot be read, accounting stays on (it costs kernels, never results).
    """
    if os.environ.get(STATS_DIR_ENV):
        return True
    try:
        if server_args is None:
            from sglang.srt.runtime_context import get_server_args

            server_args = get_server_args()
        from sglang.srt.arg_groups.model_override_base import resolving_view

        metrics = resolving_view(server_args).enable_metrics
        if not isinstance(metrics, bool):
            raise TypeError(f"enable_metrics is {metrics!r}")
        return metrics
    except Exception as e:  # noqa: BLE001
        logger.warning("lynx-sglang: cannot tell whether --enable-metrics is on (%s: %s); the all-to-all "
                       "accounting stays on", type(e).__name__, e)
        return True


class _Pending(NamedTuple):
    """What ``combine`` needs from its ``dispatch``."""

    handle: object
    num_rows: int
    lo: int
    hi: int


@dataclass(frozen=True)
class A2ASnapshot:
    """One host copy of every accounting dispatcher's totals: layer label -> ``A2ATotals.as_dict``;
    ``resets`` as in ``stage.StatsSnapshot``."""

    resets: int
    layers: dict


class DispatcherRegistry:
    """This process's lynx all-to-all dispatchers (one per MoE layer) and their totals table.

    Dispatchers are created one per layer while the model is built, each with a row of its own;
    ``seal`` (after the model loads, before CUDA-graph capture) moves them into one
    [L, A2ATotals.size(N)] table, so ``snapshot`` reads every layer with one device-to-host copy.
    """

    def __init__(self):
        self._dispatchers: list = []
        self._table: Optional[torch.Tensor] = None
        self.resets = 0

    def add(self, dispatcher) -> None:
        self._dispatchers.append(dispatcher)

    def __iter__(self):
        return iter(list(self._dispatchers))

    def __len__(self) -> int:
        return len(self._dispatchers)

    def accounting(self) -> list:
        """The dispatchers that account their steps."""
        return [d for d in self._dispatchers if d.accounting]

    def seal(self) -> None:
        """Move every accounting dispatcher's totals into rows of one table (values kept). Call before
        CUDA-graph capture: captured graphs write to the rows they saw. Once only: a later call (a
        draft model's load) leaves the table alone (later dispatchers keep rows of their own)."""
        disps = self.accounting()
        if self._table is not None or not disps or len({d.totals.numel() for d in disps}) != 1 or len({d.totals.device for d in disps}) != 1:
            return
        table = torch.stack([d.totals for d in disps])
        for i, d in enumerate(disps):
            d.totals = table[i]
        self._table = table

    def _host_rows(self, disps) -> list:
        if self._table is not None and len(disps) == self._table.shape[0] and all(
                d.totals.data_ptr() == self._table[i].data_ptr() for i, d in enumerate(disps)):
            return self._table.tolist()
        return torch.stack([d.totals for d in disps]).tolist() if disps else []

    def snapshot(self) -> A2ASnapshot:
        """Every accounting dispatcher's totals by layer (one device-to-host copy)."""
        disps = self.accounting()
        rows = self._host_rows(disps)
        return A2ASnapshot(self.resets, {_layer_label(d, i): A2ATotals.as_dict(r, d.moe_ep_size)
                                         for i, (d, r) in enumerate(zip(disps, rows))})

    def reset_stats(self) -> None:
        """Zero the totals in place and count the reset (readers rebase)."""
        for d in self._dispatchers:
            d.totals.zero_()
        self.resets += 1


def _layer_label(dispatcher, index: int) -> str:
    return str(dispatcher.layer_id if dispatcher.layer_id is not None else index)


_registry = DispatcherRegistry()


def dispatchers() -> list:
    """The lynx all-to-all dispatchers of this process's model (one per MoE layer)."""
    return list(_registry)


def registry() -> DispatcherRegistry:
    """This process's dispatcher registry."""
    return _registry


def make_dispatcher(moe_runner_config):
    """Build the dispatcher for one FusedMoE layer (called where SGLang creates its dispatcher)."""
    from sglang.srt.layers.moe.token_dispatcher.standard import StandardDispatcher
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    class LynxAllToAllDispatcher(StandardDispatcher):
        """StandardDispatcher whose dispatch/combine move each owned token to its experts' ranks."""

        def __init__(self, config):
            super().__init__(config)
            from sglang.srt.distributed.parallel_state import get_moe_ep_group

            if self.moe_ep_size < 2:
                raise ConfigError("--moe-a2a-backend lynx needs expert parallelism (--ep-size >= 2)")
            if self.num_local_shared_experts:
                raise ConfigError("--moe-a2a-backend lynx does not support fused shared experts yet "
                                  "(every rank computes them); use --moe-a2a-backend none")
            if self.skip_local_expert_mapping:
                raise ConfigError(f"--moe-a2a-backend lynx needs a MoE runner that takes local expert ids "
                                  f"(the runner {self.runner_backend} keeps global ids)")
            self.layer_id = getattr(config, "layer_id", None)
            group = get_moe_ep_group()
            from sglang.srt.utils.common import get_device

            # On the device the top-k ids live on: dispatch and accounting index it with them every step.
            self.placement = ExpertPlacement.contiguous(self.num_experts, self.moe_ep_size, get_device())
            self.a2a = AllToAllDispatcher(self.placement, self.moe_ep_rank, group.device_group)
            self._pending: Optional[_Pending] = None
            # Per-step accounting costs ~25 small kernels per layer and step: only when someone reads it.
            self.accounting = accounting_wanted()
            # ``A2ATotals.step`` summed in place on the device (so a captured CUDA graph keeps adding to
            # the same buffer), read by the metrics; a row of the registry's table once sealed.
            self.totals = torch.zeros(A2ATotals.size(self.moe_ep_size), dtype=torch.int64, device=get_device())
            _registry.add(self)

        def dispatch(self, hidden_states: torch.Tensor, topk_output):
            """Send this rank's owned rows to the ranks holding their picks; SGLang's runner gets what arrived."""
            if not isinstance(topk_output, StandardTopKOutput):
                raise RuntimeError(f"--moe-a2a-backend lynx needs standard top-k output, got "
                                   f"{type(topk_output).__name__} (choose --moe-runner-backend triton)")
            T = hidden_states.shape[0]
            N = self.moe_ep_size
            if self.accounting:
                account(self.totals, current_phase(), topk_output.topk_ids, self.placement,
                        hidden_states.shape[1], hidden_states.element_size())
            lo, hi = owned_rows(T, N, self.moe_ep_rank)
            capacity = max(1, -(-T // N)) if _capturing() else None
            sent = self.a2a.dispatch(hidden_states[lo:hi], topk_output.topk_ids[lo:hi],
                                     topk_output.topk_weights[lo:hi], capacity)
            self._pending = _Pending(sent.handle, T, lo, hi)
            received = StandardTopKOutput(topk_weights=sent.topk_weights, topk_ids=sent.topk_ids,
                                          router_logits=sent.hidden_states.new_empty(0, 0))
            return super().dispatch(sent.hidden_states, received)

        def combine(self, combine_input) -> torch.Tensor:
            """Return expert outputs to their rows' home ranks: [T, d], owned rows filled, zeros elsewhere."""
            local = super().combine(combine_input)
            pending, self._pending = self._pending, None
            own = self.a2a.combine(local, pending.handle)
            out = own.new_zeros(pending.num_rows, own.shape[1])
            out[pending.lo:pending.hi] = own
            return out

        def stats(self) -> dict:
            """Totals over decode steps (mixed batches' decode rows included) so far (one host sync; tests
            and tools: the metrics read every layer at once through the registry)."""
            return A2ATotals.as_dict(self.totals.tolist(), self.moe_ep_size)

    return LynxAllToAllDispatcher(moe_runner_config)
