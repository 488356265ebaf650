"""A self-contained expert-parallel MoE layer in plain torch: the oracle and the dev harness.

SGLang runs its own fused MoE kernels behind our dispatcher; this module gives
the same data path with simple torch experts so that dispatch + expert compute
+ combine can be checked against a single-process reference on any machine,
and tried out with ``python -m lynx_sglang.ep_demo``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lynx_sglang.runtime.expert_parallel.dispatch import AllToAllDispatcher
from lynx_sglang.runtime.expert_parallel.placement import ExpertPlacement


@dataclass
class ExpertWeights:
    """SwiGLU experts ([E, 2f, d] gate+up, [E, d, f] down), indexed by logical expert."""

    gate_up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def random(cls, num_experts: int, hidden: int, ffn: int, seed: int = 0, dtype=torch.float32) -> "ExpertWeights":
        """Deterministic random experts (the same on every rank for the same seed)."""
        g = torch.Generator().manual_seed(seed)
        gate_up = torch.randn(num_experts, 2 * ffn, hidden, generator=g) / hidden**0.5
        down = torch.randn(num_experts, hidden, ffn, generator=g) / ffn**0.5
        return cls(gate_up.to(dtype), down.to(dtype))

    def apply(self, hidden: torch.Tensor, logical_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum over slots of weight * expert(row), fp32 [T, d]; slots with id -1 contribute nothing."""
        out = torch.zeros(hidden.shape[0], hidden.shape[1], dtype=torch.float32, device=hidden.device)
        for e in torch.unique(logical_ids[logical_ids >= 0]).tolist():
            rows, slots = (logical_ids == e).nonzero(as_tuple=True)
            x = hidden[rows].float()
            gate, up = (x @ self.gate_up[e].float().t()).chunk(2, dim=-1)
            y = (torch.nn.functional.silu(gate) * up) @ self.down[e].float().t()
            out.index_add_(0, rows, y * weights[rows, slots].float()[:, None])
        return out


def moe_reference(hidden: torch.Tensor, logical_ids: torch.Tensor, weights: torch.Tensor,
                  experts: ExpertWeights) -> torch.Tensor:
    """Single-process MoE output for the whole batch (what expert parallelism must reproduce)."""
    return experts.apply(hidden, logical_ids, weights).to(hidden.dtype)


def ep_moe_forward(dispatcher: AllToAllDispatcher, experts: ExpertWeights, hidden: torch.Tensor,
                   physical_ids: torch.Tensor, weights: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """This rank's tokens through dispatch -> local experts -> combine (collective)."""
    placement: ExpertPlacement = dispatcher.placement
    sent = dispatcher.dispatch(hidden, physical_ids, weights, capacity)
    ids = sent.topk_ids.long()
    # Every received pick is local (others arrive as -1); a replica computes its logical expert.
    if bool((placement.rank_of[ids[ids >= 0]] != dispatcher.rank).any()):
        raise RuntimeError(f"rank {dispatcher.rank} received a pick of an expert it does not hold")
    logical = torch.where(ids >= 0, placement.logical_of[ids.clamp(min=0)], ids)
    local = experts.apply(sent.hidden_states, logical, sent.topk_weights)
    return dispatcher.combine(local.to(hidden.dtype), sent.handle)
