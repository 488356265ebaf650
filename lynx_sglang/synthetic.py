"""Synthetic router outputs shaped exactly like SGLang's, for tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lynx_sglang.runtime.selection.config import RouterSpec
from lynx_sglang.runtime.selection.reference import route_topk


@dataclass
class RouterBatch:
    """One batch of router output: what ``TopK.forward`` hands to the MoE layer."""

    logits: torch.Tensor  # [T, E]
    topk_ids: torch.Tensor  # [T, k + shared]
    topk_weights: torch.Tensor  # [T, k + shared]
    correction_bias: Optional[torch.Tensor]


def route(
    router: RouterSpec,
    logits: torch.Tensor,
    correction_bias: Optional[torch.Tensor] = None,
    renormalize: bool = True,
    scaling: float = 1.0,
    ids_dtype: torch.dtype = torch.int32,
    weights_dtype: torch.dtype = torch.float32,
) -> RouterBatch:
    """Top-k the way SGLang's router does (ids by score [+ bias], weights from the unbiased score).

    Fused shared experts take ids E, E+1, ... with weight 1 in the trailing slots.
    """
    ids, w = route_topk(router, logits, correction_bias, renormalize, scaling)
    ids, w = ids.to(ids_dtype), w.to(weights_dtype)
    return RouterBatch(logits, ids, w, correction_bias)


def random_logits(
    num_tokens: int,
    num_experts: int,
    scale: float = 2.0,
    skew: float = 0.0,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
) -> torch.Tensor:
    """Gaussian router logits; ``skew`` > 0 adds a per-batch preference shared by all tokens."""
    g = generator
    z = torch.randn(num_tokens, num_experts, generator=g) * scale
    if skew:
        z = z + skew * torch.randn(1, num_experts, generator=g)
    return z.to(dtype=dtype, device=device)


def random_similarity(num_experts: int, device="cpu", seed: Optional[int] = None) -> torch.Tensor:
    """A valid random [E, E] expert similarity (symmetric, diagonal 1, values in [-1, 1]).

    For kernels and timings, where what matters is that the refill path runs, not which expert it picks.
    """
    g = torch.Generator().manual_seed(num_experts if seed is None else seed)
    sim = torch.rand(num_experts, num_experts, generator=g) * 2 - 1
    return ((sim + sim.T) / 2).fill_diagonal_(1.0).to(device)
