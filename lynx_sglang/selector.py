"""The expert-selection stage: one object per MoE layer, planned once, run every step.

``ExpertSelector`` is the boundary every policy sits behind (FlashInfer-style
plan/run split): the constructor validates the configuration and allocates all
buffers; ``run`` only checks shapes on the host and launches work, so it can be
captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import reference
from .config import ConfigError, Policy, RankAwareLynxPolicy, RouterSpec

BACKENDS = ("auto", "triton", "torch")
_STAT_FIELDS = ("steps", "experts_before", "experts_after", "rows_changed", "rows_voting")


@dataclass(frozen=True)
class SelectionStats:
    """Totals since the last reset (sums over steps; divide by ``steps`` for means)."""

    steps: int
    experts_before: int
    experts_after: int
    rows_changed: int
    rows_voting: int

    @property
    def mean_experts_before(self) -> float:
        """Distinct experts per step as the router picked them."""
        return self.experts_before / self.steps if self.steps else 0.0

    @property
    def mean_experts_after(self) -> float:
        """Distinct experts per step after selection."""
        return self.experts_after / self.steps if self.steps else 0.0


def _triton_usable(device: torch.device) -> bool:
    from lynx_sglang.kernels.expert_selection import interpreting

    return device.type == "cuda" or (interpreting() and device.type == "cpu")


class ExpertSelector:
    """Rewrites one MoE layer's top-k choice for a whole batch.

    Args:
        router: the layer's router (experts, top-k, shared slots, scoring function).
        policy: a policy from ``lynx_sglang.config`` (``make_policy``).
        max_tokens: largest batch ``run`` will see (buffers are sized for it).
        device: where the router's tensors live.
        ids_dtype / weights_dtype: dtypes of ``topk_ids`` / ``topk_weights``
            (SGLang: int32 / float32); outputs have the same.
        correction_bias: the router's [E] bias if it ranks by ``score + bias``.
        backend: ``triton`` (fused kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``),
            ``torch`` (the reference, any device), or ``auto`` (triton on CUDA, else torch).
        block_t: rows per Triton program (None: a per-device default; results do not depend on it).
        rank_mask: [E, N] bool, logical expert e has a replica on expert-parallel rank r
            (``ExpertPlacement.logical_on_rank``); required by ``lynx_ep`` and only by it.
            ``lynx_ep`` runs on the torch backend (the kernels do not implement it); after each
            ``run`` the rank of every output routed slot is in ``last_slot_rank``.
    """

    # A subclass whose selection is a collective (GlobalExpertSelector) runs on empty batches too.
    _collective = False

    def __init__(
        self,
        router: RouterSpec,
        policy: Policy,
        max_tokens: int,
        device: torch.device | str = "cpu",
        ids_dtype: torch.dtype = torch.int32,
        weights_dtype: torch.dtype = torch.float32,
        correction_bias: Optional[torch.Tensor] = None,
        backend: str = "auto",
        block_t: Optional[int] = None,
        rank_mask: Optional[torch.Tensor] = None,
    ):
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ConfigError(f"max_tokens must be a positive int, got {max_tokens!r}")
        policy.validate(router, max_tokens)
        # With its index ("cuda" -> "cuda:0"): tensors report one, and run() compares devices.
        device = torch.empty(0, device=device).device
        if block_t is not None and (not isinstance(block_t, int) or block_t < 1 or block_t > 1024
                                    or block_t & (block_t - 1)):
            raise ConfigError(f"block_t must be None or a power of two in [1, 1024], got {block_t!r}")
        if ids_dtype not in (torch.int32, torch.int64):
            raise ConfigError(f"topk_ids dtype must be int32 or int64, got {ids_dtype}")
        if weights_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ConfigError(f"topk_weights dtype must be float32, bfloat16 or float16, got {weights_dtype}")
        if router.has_correction_bias != (correction_bias is not None):
            raise ConfigError("correction_bias must be given exactly when router.has_correction_bias is set")
        if correction_bias is not None:
            if correction_bias.shape != (router.num_experts,):
                raise ConfigError(f"correction_bias must have shape ({router.num_experts},), got {tuple(correction_bias.shape)}")
            if not bool(torch.isfinite(correction_bias).all()):  # one sync, at plan time
                raise ConfigError("correction_bias holds NaN or inf")
            correction_bias = correction_bias.to(device=device, dtype=torch.float32).contiguous()
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        rank_aware = isinstance(policy, RankAwareLynxPolicy)
        if rank_aware:
            rank_mask = self._plan_rank_mask(router, rank_mask, device)
            if backend == "triton":
                raise ConfigError("policy lynx_ep runs on the torch backend only (the Triton kernels do not implement it)")
            backend = "torch"
        elif rank_mask is not None:
            raise ConfigError(f"rank_mask applies only to policy lynx_ep, not {policy.name}")
        if backend == "auto":
            backend = "triton" if device.type == "cuda" else "torch"
        if backend == "triton" and not _triton_usable(device):
            raise ConfigError(f"the triton backend needs a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device}")

        self.router, self.policy, self.max_tokens = router, policy, max_tokens
        self.device, self.backend, self.block_t = device, backend, block_t
        self.ids_dtype, self.weights_dtype = ids_dtype, weights_dtype
        self.correction_bias = correction_bias
        self.rank_mask = rank_mask
        kt = router.total_slots
        self._out_ids = torch.empty(max_tokens, kt, dtype=ids_dtype, device=device)
        self._out_weights = torch.empty(max_tokens, kt, dtype=weights_dtype, device=device)
        self._stats = torch.zeros(len(_STAT_FIELDS), dtype=torch.int64, device=device)
        self._ws = self._launch = None
        # lynx_ep: the rank each output routed slot goes to (a view of this buffer after run()).
        self._slot_rank = torch.empty(max_tokens, router.top_k, dtype=torch.int64, device=device) if rank_aware else None
        self.last_slot_rank: Optional[torch.Tensor] = None
        if backend == "triton":
            from lynx_sglang.kernels.expert_selection import Workspace, num_bins, select_triton

            self._ws = Workspace.allocate(router.num_experts, num_bins(policy), max_tokens, device)
            self._launch = select_triton  # resolved once: run() is on every MoE layer's hot path

    @staticmethod
    def _plan_rank_mask(router: RouterSpec, rank_mask: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        E = router.num_experts
        if rank_mask is None:
            raise ConfigError("policy lynx_ep needs rank_mask ([E, N] bool: which ranks hold each expert)")
        if rank_mask.dim() != 2 or rank_mask.shape[0] != E or rank_mask.shape[1] < 1 or rank_mask.dtype != torch.bool:
            raise ConfigError(f"rank_mask must be a [{E}, N] bool tensor, got {rank_mask.dtype} {tuple(rank_mask.shape)}")
        if not bool(rank_mask.any(dim=1).all()):  # one sync, at plan time
            raise ConfigError("rank_mask: every expert needs a replica on at least one rank")
        return rank_mask.to(device).contiguous()

    def _check_ranks(self, T: int, pick_rank, home) -> None:
        if self.rank_mask is None:
            if pick_rank is not None or home is not None:
                raise ValueError(f"pick_rank / home apply only to policy lynx_ep, not {self.policy.name}")
            return
        for name, t, shape in (("pick_rank", pick_rank, (T, self.router.top_k)), ("home", home, (T,))):
            if t is None:
                continue
            if tuple(t.shape) != shape or t.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"{name} must be an int32/int64 tensor of shape {shape}, got {t.dtype} {tuple(t.shape)}")
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, selector planned for {self.device}")
            # Values only where checking costs no device sync (and not while torch.compile traces: a
            # data-dependent branch would break the graph); on GPUs our hook derives them from the placement.
            if t.device.type == "cpu" and not torch.compiler.is_compiling():
                N = self.rank_mask.shape[1]
                if t.numel() and bool(((t < -1) | (t >= N)).any()):
                    raise ValueError(f"{name} holds ranks outside [-1, {N}) (the rank mask has {N} ranks; -1: none)")

    def _check(self, logits, topk_ids, topk_weights, num_valid) -> None:
        T = logits.shape[0] if logits.dim() == 2 else -1
        E, kt = self.router.num_experts, self.router.total_slots
        if logits.dim() != 2 or logits.shape[1] != E:
            raise ValueError(f"router_logits must be [T, {E}], got {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise ValueError(f"router_logits must be floating point, got {logits.dtype}")
        if tuple(topk_ids.shape) != (T, kt) or tuple(topk_weights.shape) != (T, kt):
            raise ValueError(
                f"topk_ids/topk_weights must be [{T}, {kt}], got {tuple(topk_ids.shape)} / {tuple(topk_weights.shape)}"
            )
        if topk_ids.dtype != self.ids_dtype or topk_weights.dtype != self.weights_dtype:
            raise ValueError(
                f"planned for ids {self.ids_dtype} / weights {self.weights_dtype}, "
                f"got {topk_ids.dtype} / {topk_weights.dtype}"
            )
        if T > self.max_tokens:
            raise ValueError(f"batch of {T} tokens exceeds the planned max_tokens={self.max_tokens}")
        for name, t in (("router_logits", logits), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
            if t.device != self.device:
                raise ValueError(f"{name} is on {t.device}, selector planned for {self.device}")
        if isinstance(num_valid, torch.Tensor):
            if num_valid.numel() != 1 or num_valid.dtype not in (torch.int32, torch.int64):
                raise ValueError("num_valid tensor must hold one int32/int64 value")
            if num_valid.device != self.device:
                raise ValueError(f"num_valid is on {num_valid.device}, selector planned for {self.device}")
        elif num_valid is not None and not (isinstance(num_valid, int) and num_valid >= 0):
            raise ValueError(f"num_valid must be None, a non-negative int or a device tensor, got {num_valid!r}")

    def run(
        self,
        router_logits: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        num_valid: Optional[int | torch.Tensor] = None,
        pick_rank: Optional[torch.Tensor] = None,
        home: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Select experts for one batch; returns views of this selector's output buffers.

        Rows at and after ``num_valid`` (padding) and malformed rows come back
        unchanged; the outputs stay valid until the next ``run``.
        ``lynx_ep`` only: ``pick_rank`` [T, k] (rank each routed pick goes to; None: the lowest
        rank holding it) and ``home`` [T] (rank owning each row; None or -1: none); the output
        slots' ranks are then in ``last_slot_rank`` [T, k] (-1 for empty slots).
        """
        self._check(router_logits, topk_ids, topk_weights, num_valid)
        T = router_logits.shape[0]
        self._check_ranks(T, pick_rank, home)
        out_ids, out_w = self._out_ids[:T], self._out_weights[:T]
        if self._slot_rank is not None:
            self.last_slot_rank = self._slot_rank[:T]
        if T == 0 and not self._collective:
            return out_ids, out_w
        if router_logits.stride(1) != 1:
            router_logits = router_logits.contiguous()
        if self.backend == "triton":
            # The kernels need unit stride along the slot dimension.
            topk_ids = topk_ids if topk_ids.stride(1) == 1 else topk_ids.contiguous()
            topk_weights = topk_weights if topk_weights.stride(1) == 1 else topk_weights.contiguous()
            self._launch(
                self.policy, self.router, router_logits, topk_ids, topk_weights, num_valid,
                self.correction_bias, self._ws, self._stats, out_ids, out_w, self.block_t,
            )
        else:
            ids, w, info = self._select_torch(router_logits, topk_ids, topk_weights, num_valid, pick_rank, home)
            out_ids.copy_(ids)
            out_w.copy_(w)
            one = torch.ones((), dtype=torch.int64, device=self.device)
            self._stats += torch.stack(
                [one, info.experts_before, info.experts_after, info.rows_changed, info.rows_voting]
            )
        return out_ids, out_w

    def _select_torch(self, router_logits, topk_ids, topk_weights, num_valid, pick_rank, home):
        """The torch backend on one batch: (ids, weights, ``reference.SelectionInfo``)."""
        if self.rank_mask is not None:
            from .expert_parallel.rank_aware import select_rank_aware

            ids, w, slot_rank, info = select_rank_aware(
                self.policy, self.router, router_logits, topk_ids, topk_weights, self.rank_mask,
                pick_rank, home, num_valid, self.correction_bias,
            )
            self.last_slot_rank.copy_(slot_rank)
            return ids, w, info
        return reference.select(
            self.policy, self.router, router_logits, topk_ids, topk_weights, num_valid, self.correction_bias
        )

    def stats(self) -> SelectionStats:
        """Read the accumulated statistics (the only host synchronisation)."""
        return SelectionStats(**dict(zip(_STAT_FIELDS, self._stats.tolist())))

    def reset_stats(self) -> None:
        """Zero the accumulated statistics."""
        self._stats.zero_()
