"""How a transformers MoE block routes: one description per model family, read from the model.

The tools that measure routing (``routing_stats``) or rewrite it (``accuracy``) take
the router of each MoE layer from here instead of assuming softmax top-k:

* ``qwen3_moe`` (``Qwen3MoeSparseMoeBlock``, the bundled ``trained-qwen3-moe*``): softmax
  over the router logits, top-k, the picks' probabilities renormalised when
  ``norm_topk_prob``; no bias, no shared expert.
* ``glm4_moe`` (``Glm4MoeMoE``, the bundled ``trained-glm4-moe``; SGLang's ``glm4_moe``):
  sigmoid scores; experts are *ranked* by ``score + e_score_correction_bias`` within
  the best ``topk_group`` of ``n_group`` expert groups (a group's score: the sum of its
  two best biased scores); gate weights are the *unbiased* scores of the picks,
  renormalised when ``norm_topk_prob`` and multiplied by ``routed_scaling_factor``;
  one always-on shared expert is added to the routed experts' output.

``block_router(block)`` describes one block: its ``RouterSpec`` (what ``ExpertSelector``
needs), its correction bias, ``route(hidden)`` (the block's own router: logits,
weights, ids exactly as the model computes them), ``route_logits(logits)`` (the same
picks and weights from recorded router logits, e.g. ``output_router_logits``; picks
by ``train_model.route``) and ``moe_output`` (the block's output for given ids and
weights, as the block combines them). ``model_routers(model)`` lists every MoE
layer's description in layer order (the order of ``router_logits``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from lynx_sglang.runtime.selection.config import RouterSpec
from lynx_sglang.train_model import Glm4Shape, ModelShape, route as _route_picks

# transformers block class -> family
FAMILY_BLOCKS = {"Qwen3MoeSparseMoeBlock": "qwen3_moe", "Glm4MoeMoE": "glm4_moe"}
FAMILIES = tuple(FAMILY_BLOCKS.values())
SOFTMAX_TOPK = "softmax_topk"  # any other model that returns router logits: softmax top-k assumed


@dataclass(frozen=True)
class BlockRouter:
    """One MoE layer's router as the model runs it (see the module docstring)."""

    family: str  # qwen3_moe, glm4_moe, or SOFTMAX_TOPK (assumed, no block)
    num_experts: int
    top_k: int
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    correction_bias: Optional[torch.Tensor] = None  # [E] fp32, ranking only
    block: Optional[torch.nn.Module] = None

    @property
    def spec(self) -> RouterSpec:
        """What ``ExpertSelector`` is planned with for this layer."""
        sigmoid = self.family == "glm4_moe"
        return RouterSpec(num_experts=self.num_experts, top_k=self.top_k,
                          scoring_func="sigmoid" if sigmoid else "softmax",
                          has_correction_bias=self.correction_bias is not None)

    @property
    def has_shared_expert(self) -> bool:
        return self.block is not None and getattr(self.block, "shared_experts", None) is not None

    def _shape(self) -> ModelShape:
        """The ``train_model`` shape ``train_model.route`` reads (family, E, k, groups)."""
        if self.family == "glm4_moe":
            return Glm4Shape(experts=self.num_experts, top_k=self.top_k, n_group=self.n_group,
                             topk_group=self.topk_group, routed_scaling=self.routed_scaling_factor)
        return ModelShape(experts=self.num_experts, top_k=self.top_k)

    # ------------------------------------------------------------------ routing

    def route(self, hidden: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [T, E] fp32, weights [T, k], ids [T, k] int64)`` of hidden states [..., d]:
        the block's own router (``block.gate``), so exactly what the model routes."""
        if self.block is None:
            raise ValueError("route(hidden) needs the block; use route_logits for recorded logits")
        logits, weights, ids = self.block.gate(hidden)
        return logits, weights, ids

    def route_logits(self, logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The router's picks from its logits [T, E]: ``(ids [T, k] int64, weights [T, k] fp32, probs [T, E])``.

        ``ids`` are the same experts the block picks (``train_model.route``), ordered by the
        router's ranking key, best first; ``weights`` are the block's gate weights of those ids
        (renormalised, routed scaling included); ``probs`` the router's distribution over all
        experts (softmax; glm4_moe: the sigmoid scores normalised per token).
        """
        z = logits.float()
        ids, probs = _route_picks(z, self._shape(), self.correction_bias)
        gate = z.sigmoid() if self.family == "glm4_moe" else probs
        weights = gate.gather(-1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if self.family == "glm4_moe" else 0.0))
        if self.family == "glm4_moe":
            weights = weights * self.routed_scaling_factor
        return ids, weights, probs

    def ranking_key(self, logits: torch.Tensor) -> torch.Tensor:
        """fp32 [T, E]: what the router ranks experts by (before any group limit): the logits for a
        softmax router, ``sigmoid(logit) + bias`` for glm4_moe."""
        z = logits.float()
        if self.family != "glm4_moe":
            return z
        key = z.sigmoid()
        return key + self.correction_bias.float() if self.correction_bias is not None else key

    # ------------------------------------------------------------------ combine

    def moe_output(self, hidden_states: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The block's output for ``hidden_states`` [b, s, d] routed to ``ids``/``weights`` [b*s, k]
        (index ``num_experts``: an empty slot), combined as the block's own forward does: the
        routed experts weighted (glm4_moe: the weights already carry ``routed_scaling_factor``,
        as its router returns them), plus the shared expert."""
        if self.block is None:
            raise ValueError("moe_output needs the block")
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        out = self.block.experts(flat, ids, weights).reshape(shape)
        if self.has_shared_expert:
            out = out + self.block.shared_experts(hidden_states)
        return out

    def describe(self) -> str:
        """The routing rule in words (recorded with results)."""
        if self.family == "glm4_moe":
            norm = "renormalised, " if self.norm_topk_prob else ""
            return (f"sigmoid scores; top-{self.top_k} of score + e_score_correction_bias within the best "
                    f"{self.topk_group} of {self.n_group} expert groups (group score: sum of its top-2); gate "
                    f"weights: unbiased scores of the picks, {norm}x routed_scaling_factor "
                    f"{self.routed_scaling_factor:g}; plus {'a' if self.has_shared_expert else 'no'} shared expert")
        if self.family == "qwen3_moe":
            return f"softmax over logits, top-{self.top_k}" + (", renormalised" if self.norm_topk_prob else "")
        return f"softmax over logits, top-{self.top_k} (assumed)"

    def record(self) -> dict:
        """JSON-ready description."""
        out = {"family": self.family, "rule": self.describe(), "scoring_func": self.spec.scoring_func,
               "has_correction_bias": self.correction_bias is not None, "norm_topk_prob": self.norm_topk_prob}
        if self.family == "glm4_moe":
            out.update(n_group=self.n_group, topk_group=self.topk_group,
                       routed_scaling_factor=self.routed_scaling_factor, shared_expert=self.has_shared_expert)
        return out


def block_router(block: torch.nn.Module) -> BlockRouter:
    """The description of one transformers MoE block (``Qwen3MoeSparseMoeBlock`` or ``Glm4MoeMoE``).

    Shape and semantics are read from the block's router module (``block.gate``), which
    transformers builds from the model's config (num_experts / n_routed_experts,
    num_experts_per_tok, norm_topk_prob, n_group, topk_group, routed_scaling_factor)
    and which holds the layer's trained ``e_score_correction_bias``.
    """
    family = FAMILY_BLOCKS.get(type(block).__name__)
    if family is None:
        raise ValueError(f"{type(block).__name__} is not a supported MoE block ({', '.join(FAMILY_BLOCKS)})")
    gate = block.gate
    E, k = int(gate.num_experts), int(gate.top_k)
    if family == "qwen3_moe":
        return BlockRouter(family, E, k, norm_topk_prob=bool(gate.norm_topk_prob), block=block)
    bias = getattr(gate, "e_score_correction_bias", None)
    return BlockRouter(
        family, E, k,
        norm_topk_prob=bool(gate.norm_topk_prob),
        n_group=int(gate.num_group),
        topk_group=int(gate.topk_group),
        routed_scaling_factor=float(gate.routed_scaling_factor),
        correction_bias=None if bias is None else bias.detach().float(),
        block=block,
    )


def moe_blocks(model) -> List[torch.nn.Module]:
    """The model's MoE blocks of a supported family, in layer order ([] if none)."""
    return [m for m in model.modules() if type(m).__name__ in FAMILY_BLOCKS]


def model_routers(model) -> List[BlockRouter]:
    """Every MoE layer's ``BlockRouter``, in layer order ([] for a model of no supported family)."""
    return [block_router(b) for b in moe_blocks(model)]


def assumed_router(num_experts: int, top_k: int) -> BlockRouter:
    """Softmax top-k, for a model whose MoE blocks are of no family described here."""
    return BlockRouter(SOFTMAX_TOPK, num_experts, top_k)
