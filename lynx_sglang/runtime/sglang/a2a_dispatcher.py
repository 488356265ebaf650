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
distinct experts and tokens (``accounting.step_traffic``), read by the metrics.
A mixed chunked-prefill batch counts as a decode step too, with only its decode
rows costed (its prefill rows travel as well, but are a prefill's cost).
"""

from __future__ import annotations

import logging
import torch

from lynx_sglang.runtime.selection.config import ConfigError
from lynx_sglang.runtime.expert_parallel.accounting import A2ATotals
from lynx_sglang.runtime.expert_parallel.dispatch import AllToAllDispatcher
from lynx_sglang.runtime.expert_parallel.placement import ExpertPlacement, owned_rows
from lynx_sglang.runtime.sglang.phase import current as current_phase

logger = logging.getLogger(__name__)

_dispatchers: list = []


def dispatchers() -> list:
    """The lynx all-to-all dispatchers of this process's model (one per MoE layer)."""
    return list(_dispatchers)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


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
            self._pending = None
            # ``A2ATotals.step`` summed in place on the device (so a captured CUDA graph keeps adding to
            # the same buffer), read by the metrics.
            self.totals = torch.zeros(A2ATotals.size(self.moe_ep_size), dtype=torch.int64, device=get_device())
            _dispatchers.append(self)

        def dispatch(self, hidden_states: torch.Tensor, topk_output):
            """Send this rank's owned rows to the ranks holding their picks; SGLang's runner gets what arrived."""
            if not isinstance(topk_output, StandardTopKOutput):
                raise RuntimeError(f"--moe-a2a-backend lynx needs standard top-k output, got "
                                   f"{type(topk_output).__name__} (choose --moe-runner-backend triton)")
            T = hidden_states.shape[0]
            N = self.moe_ep_size
            self._account(hidden_states, topk_output.topk_ids)
            lo, hi = owned_rows(T, N, self.moe_ep_rank)
            capacity = max(1, -(-T // N)) if _capturing() else None
            sent = self.a2a.dispatch(hidden_states[lo:hi], topk_output.topk_ids[lo:hi],
                                     topk_output.topk_weights[lo:hi], capacity)
            self._pending = (sent.handle, T, lo, hi)
            received = StandardTopKOutput(topk_weights=sent.topk_weights, topk_ids=sent.topk_ids,
                                          router_logits=sent.hidden_states.new_empty(0, 0))
            return super().dispatch(sent.hidden_states, received)

        def combine(self, combine_input) -> torch.Tensor:
            """Return expert outputs to their rows' home ranks: [T, d], owned rows filled, zeros elsewhere."""
            local = super().combine(combine_input)
            handle, T, lo, hi = self._pending
            self._pending = None
            own = self.a2a.combine(local, handle)
            out = own.new_zeros(T, own.shape[1])
            out[lo:hi] = own
            return out

        def _account(self, hidden_states, topk_ids):
            phase = current_phase()
            if phase is None or not (phase.is_decode or phase.is_mixed):
                return
            self.totals += A2ATotals.step(topk_ids, self.placement, phase.first_decode_row(topk_ids.shape[0]),
                                          hidden_states.shape[1], hidden_states.element_size())

        def stats(self) -> dict:
            """Totals over decode steps (mixed batches' decode rows included) so far (one host sync)."""
            return A2ATotals.as_dict(self.totals.tolist(), self.moe_ep_size)

    return LynxAllToAllDispatcher(moe_runner_config)
