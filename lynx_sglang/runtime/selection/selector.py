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

from lynx_sglang.runtime.selection import peers, reference
from lynx_sglang.runtime.selection.config import (
    MAX_KERNEL_EXPERTS, ConfigError, LynxPolicy, Policy, RankAwareLynxPolicy, RouterSpec, is_peer,
    needs_similarity,
)
from lynx_sglang.runtime.selection.output_norms import check_head, pick_scale
from lynx_sglang.runtime.selection.stats import NUM_STATS, SelectionStats, StatField

BACKENDS = ("auto", "triton", "torch")
# The statistics a torch-backend step gathers from ``reference.SelectionInfo``: every field after
# STEPS, in vector order (STEPS is a constant 1 in the planned step vector).
_STEP_FIELDS = tuple(f for f in StatField if f != StatField.STEPS)
assert StatField.STEPS == 0 and [int(f) for f in _STEP_FIELDS] == list(range(1, len(StatField)))


def _triton_usable(device: torch.device) -> bool:
    from lynx_sglang.kernels.expert_selection import interpreting

    return device.type == "cuda" or (interpreting() and device.type == "cpu")


def default_backend(device: torch.device, router: RouterSpec) -> str:
    """What backend ``auto`` means: the fused kernels on CUDA where they are compiled and checked, else torch."""
    return "triton" if device.type == "cuda" and router.num_experts <= MAX_KERNEL_EXPERTS else "torch"


class ExpertSelector:
    """Rewrites one MoE layer's top-k choice for a whole batch.

    Args:
        router: the layer's router (experts, top-k, shared slots, scoring function).
        policy: a policy from ``lynx_sglang.runtime.selection.config`` (``make_policy``).
        max_tokens: largest batch ``run`` will see (buffers are sized for it).
        device: where the router's tensors live.
        ids_dtype / weights_dtype: dtypes of ``topk_ids`` / ``topk_weights``
            (SGLang: int32 / float32); outputs have the same.
        correction_bias: the router's [E] bias if it ranks by ``score + bias``.
        backend: ``triton`` (fused kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``),
            ``torch`` (the reference, any device), or ``auto`` (triton on CUDA, else torch).
        block_t: rows per Triton program (None: a per-device default; results do not depend on it).
        stats: an int64 [NUM_STATS] device tensor to accumulate the statistics into (laid out by
            ``StatField``; e.g. a row of a [layers, NUM_STATS] table the metrics read with one copy),
            or None for a buffer of its own. It is kept as given (never reallocated), so a
            re-planned selector can keep accumulating into the buffer a captured graph writes.
        similarity: policy ``sere``, and ``lynx`` with ``refill_similarity > 0`` (required there): the
            layer's [E, E] expert similarity, values in
            [-1, 1]; checked and moved to ``device`` as float32 once, here (lynx: scaled by
            ``refill_similarity`` into the [E, E] refill bias that both backends read).
        residency: a paged-experts layer (SGLang ``--enable-paged-experts``) under lynx with
            ``residency`` keep or prefer: the layer's ``DeviceResidency.expert_slot``, int32 [E] on
            ``device`` (-1: not resident), which SGLang keeps current in place. Kept by reference (never
            written); every step reads ``expert_slot >= 0`` on the device as the resident mask of
            ``reference.residency_keep`` (no host sync). Torch backend only (``auto`` picks it; ``triton``
            is a ConfigError). None: the layer is not paged, and the policy runs as plain lynx.
        output_norms: with ``residency`` and lynx's ``residency_page_budget`` (``--lynx-residency-output-norms``):
            the layer's (weight [2H, E], bias [E]) head predicting log expert output norms from the hidden
            state (``output_norms``); moved to ``device`` as float32 once, here. ``run`` then needs
            ``hidden_states`` and the budget ranks by predicted output share (``reference.page_votes``).

    The peer policies (``lynx_paper``, ``xshare``, ``sere``: ``runtime.selection.peers``) run on the
    torch backend only (``auto`` picks it; ``triton`` is a ConfigError), and not in the expert-parallel
    subclasses (their votes are not reducible over ranks).
    Policy ``lynx_ep`` needs the expert placement: it runs in
    ``lynx_sglang.runtime.expert_parallel.rank_aware.RankAwareSelector``.
    """

    # A subclass whose selection is a collective (GlobalExpertSelector) runs on empty batches too.
    _collective = False
    # Set by the subclass that runs lynx_ep (RankAwareSelector).
    _rank_aware = False

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
        stats: Optional[torch.Tensor] = None,
        similarity: Optional[torch.Tensor] = None,
        residency: Optional[torch.Tensor] = None,
        output_norms: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
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
        if isinstance(policy, RankAwareLynxPolicy):
            if not self._rank_aware:
                raise ConfigError("policy lynx_ep needs the expert placement: use "
                                  "lynx_sglang.runtime.expert_parallel.RankAwareSelector")
            if backend == "triton":
                raise ConfigError("policy lynx_ep runs on the torch backend only (the Triton kernels do not implement it)")
            backend = "torch"
        peer = is_peer(policy)
        if peer:
            if self._collective or self._rank_aware:
                raise ConfigError(f"policy {policy.name} cannot run under expert-parallel global or rank-aware "
                                  f"selection: its batch decision is not a sum of per-rank votes")
            if backend == "triton":
                raise ConfigError(f"policy {policy.name} runs on the torch backend only (the Triton kernels "
                                  f"implement off, lynx, oea and budget); use backend 'torch' or 'auto'")
            backend = "torch"
        refill = isinstance(policy, LynxPolicy) and policy.refill_similarity > 0
        if needs_similarity(policy):
            if similarity is None:
                raise ConfigError(f"policy {policy.name}{' with refill_similarity' if refill else ''} needs the "
                                  f"layer's [E, E] expert similarity (similarity=...; the server reads it from "
                                  f"--lynx-sere-similarity)")
            similarity = peers.check_similarity(similarity, router.num_experts, device)
        elif similarity is not None:
            raise ConfigError(f"similarity is an input of policy sere and of lynx with refill_similarity > 0 only, "
                              f"not of {policy.name}")
        if stats is not None and (stats.shape != (NUM_STATS,) or stats.dtype != torch.int64
                                  or stats.device != device or not stats.is_contiguous()):
            raise ConfigError(f"stats must be a contiguous int64 [{NUM_STATS}] tensor on {device}, got "
                              f"{stats.dtype} {tuple(stats.shape)} on {stats.device}")
        if residency is not None:
            residency = self._check_residency(policy, router, residency, device, backend)
            backend = "torch"
        if output_norms is not None:
            output_norms = self._check_output_norms(policy, router, output_norms, residency, device)
        if backend == "auto":
            backend = default_backend(device, router)
        if backend == "triton" and router.num_experts > MAX_KERNEL_EXPERTS:
            raise ConfigError(f"the triton backend is compiled and checked for up to {MAX_KERNEL_EXPERTS} experts, "
                              f"got {router.num_experts}; use backend 'torch' (what 'auto' picks here)")
        if backend == "triton" and not _triton_usable(device):
            raise ConfigError(f"the triton backend needs a CUDA device (or TRITON_INTERPRET=1 on CPU), got {device}")

        self.router, self.policy, self.max_tokens = router, policy, max_tokens
        self.device, self.backend, self.block_t = device, backend, block_t
        self.ids_dtype, self.weights_dtype = ids_dtype, weights_dtype
        self.correction_bias = correction_bias
        kt = router.total_slots
        self._out_ids = torch.empty(max_tokens, kt, dtype=ids_dtype, device=device)
        self._out_weights = torch.empty(max_tokens, kt, dtype=weights_dtype, device=device)
        self._stats = torch.zeros(NUM_STATS, dtype=torch.int64, device=device) if stats is None else stats
        self._ws = self._launch = None
        self._consts = reference.lynx_constants(policy, device) if isinstance(policy, LynxPolicy) else None
        self._peer = peer
        self.similarity = similarity
        self.residency = residency  # SGLang's expert_slot [E] (read each step, never written), or None
        self.output_norms = output_norms  # (weight [2H, E], bias [E]) fp32 on device, or None
        # lynx's refill preference, scaled once here so the step multiplies nothing.
        self._refill_bias = (similarity * policy.refill_similarity).contiguous() if refill else None
        if peer:
            self._consts = peers.peer_constants(policy, device)
        self._writes_outputs = getattr(type(self)._select_torch, "writes_outputs", False)
        if backend == "torch":
            # One step's statistics, gathered here and added to the totals with one launch;
            # the steps field is the constant 1 (fields after it: _STEP_FIELDS, in order).
            self._step_stats = torch.zeros(NUM_STATS, dtype=torch.int64, device=device)
            self._step_stats[StatField.STEPS] = 1
        if backend == "triton":
            from lynx_sglang.kernels.expert_selection import Workspace, num_bins, select_triton

            self._ws = Workspace.allocate(router.num_experts, num_bins(policy), max_tokens, device)
            self._launch = select_triton  # resolved once: run() is on every MoE layer's hot path

    def _check_residency(self, policy, router, expert_slot, device, backend) -> torch.Tensor:
        """The plan-time checks of a paged layer's ``expert_slot`` (ConfigError naming what is wrong)."""
        if not (isinstance(policy, LynxPolicy) and policy.residency != "off"):
            raise ConfigError(f"residency (a paged layer's expert_slot) is an input of lynx with residency keep or "
                              f"prefer only, not of {policy}")
        if self._collective or self._rank_aware:
            raise ConfigError("lynx residency cannot run under expert-parallel selection (SGLang's paged experts "
                              "runs on a single GPU)")
        if backend == "triton":
            raise ConfigError("lynx residency runs on the torch backend only on paged layers (the Triton kernels "
                              "do not read residency); use backend 'torch' or 'auto'")
        if not isinstance(expert_slot, torch.Tensor) or expert_slot.dim() != 1 \
                or expert_slot.shape[0] != router.num_experts or expert_slot.dtype not in (torch.int32, torch.int64):
            what = (f"{expert_slot.dtype} {tuple(expert_slot.shape)}" if isinstance(expert_slot, torch.Tensor)
                    else type(expert_slot).__name__)
            raise ConfigError(f"a paged layer's expert_slot must be an int32 (or int64) [{router.num_experts}] tensor "
                              f"(one slot per routed expert, -1: not resident), got {what}")
        if expert_slot.device != device:
            raise ConfigError(f"a paged layer's expert_slot is on {expert_slot.device}, the selector on {device}")
        return expert_slot

    @staticmethod
    def _check_output_norms(policy, router, head, residency, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The plan-time checks of a paged layer's output-norm head (ConfigError naming what is wrong)."""
        if residency is None or not (isinstance(policy, LynxPolicy) and policy.residency == "prefer"
                                     and policy.residency_page_budget is not None):
            raise ConfigError("output norms rank a paged layer's page budget: they need lynx with residency prefer, "
                              "a residency_page_budget, and the layer's expert_slot")
        if not (isinstance(head, tuple) and len(head) == 2 and all(isinstance(t, torch.Tensor) for t in head)):
            raise ConfigError(f"output_norms must be a (weight [2H, E], bias [E]) pair of tensors, got {type(head)}")
        check_head(head, None, router.num_experts, "output_norms head")  # one sync, at plan time
        w, b = head
        return (w.to(device=device, dtype=torch.float32).contiguous(),
                b.to(device=device, dtype=torch.float32).contiguous())

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
        hidden_states: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Select experts for one batch; returns views of this selector's output buffers.

        Rows at and after ``num_valid`` (padding) and malformed rows come back
        unchanged; the outputs stay valid until the next ``run``. ``hidden_states`` [T, H]: the
        MoE block's input rows, needed exactly when the selector was planned with ``output_norms``.
        """
        self._check(router_logits, topk_ids, topk_weights, num_valid)
        if self.output_norms is None:
            if hidden_states is not None:
                raise ValueError("hidden_states is an input of a selector planned with output_norms only")
            return self._run(router_logits, topk_ids, topk_weights, num_valid)
        H = self.output_norms[0].shape[0] // 2
        if hidden_states is None or tuple(hidden_states.shape) != (router_logits.shape[0], H) \
                or not hidden_states.is_floating_point() or hidden_states.device != self.device:
            what = "None" if hidden_states is None else f"{hidden_states.dtype} {tuple(hidden_states.shape)} on " \
                                                         f"{hidden_states.device}"
            raise ValueError(f"a selector with output_norms needs hidden_states [{router_logits.shape[0]}, {H}] "
                             f"floating point on {self.device}, got {what}")
        return self._run(router_logits, topk_ids, topk_weights, num_valid, hidden_states=hidden_states)

    def _run(self, router_logits, topk_ids, topk_weights, num_valid, **extra) -> Tuple[torch.Tensor, torch.Tensor]:
        """``run`` after its checks; ``extra`` goes to ``_select_torch`` (a subclass's per-step inputs)."""
        T = router_logits.shape[0]
        out_ids, out_w = self._out_ids[:T], self._out_weights[:T]
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
                self.correction_bias, self._ws, self._stats, out_ids, out_w, self.block_t, self._refill_bias,
            )
        else:
            ids, w, info = self._select_torch(router_logits, topk_ids, topk_weights, num_valid, **extra)
            if not self._writes_outputs:  # a subclass's result in tensors of its own
                out_ids.copy_(ids)
                out_w.copy_(w)
            torch.stack([getattr(info, f.key) for f in _STEP_FIELDS], out=self._step_stats[_STEP_FIELDS[0]:])
            self._stats += self._step_stats
        return out_ids, out_w

    def _select_torch(self, router_logits, topk_ids, topk_weights, num_valid, hidden_states=None):
        """The torch backend on one batch: (ids, weights, ``reference.SelectionInfo``).

        Writes ids and weights straight into this selector's output buffers (and returns views of them).
        An override that does too marks itself ``writes_outputs = True`` (see below); ``_run`` copies
        the results of any other.
        """
        T = router_logits.shape[0]
        if self._peer:
            return peers.select_peer(
                self.policy, self.router, router_logits, topk_ids, topk_weights, num_valid, self.correction_bias,
                similarity=self.similarity, consts=self._consts, out=(self._out_ids[:T], self._out_weights[:T]),
            )
        return reference.select(
            self.policy, self.router, router_logits, topk_ids, topk_weights, num_valid, self.correction_bias,
            consts=self._consts, out=(self._out_ids[:T], self._out_weights[:T]), refill_bias=self._refill_bias,
            resident=None if self.residency is None else self.residency >= 0,
            pick_scale=None if hidden_states is None else pick_scale(hidden_states, *self.output_norms),
        )

    _select_torch.writes_outputs = True

    def stats(self) -> SelectionStats:
        """Read the accumulated statistics (the only host synchronisation)."""
        return SelectionStats.from_values(self._stats.tolist())

    def reset_stats(self) -> None:
        """Zero the accumulated statistics."""
        self._stats.zero_()

    def compile_step(self) -> None:
        """From now on run the torch backend's step through ``torch.compile`` (``--lynx-torch-compile``).

        On CPU the step is 100-200 tiny ops, each paying the dispatcher; inductor fuses them into a few C++
        loops (about 3x faster, ``docs/speed.md``). Compiled here, once per shape class a server meets
        (T = 1 and T >= 2, with ``num_valid`` None and a tensor), so no request waits on a compile; the
        compiled code is shared by every selector with the same policy. The statistics are left as they
        were. Raises RuntimeError (naming the cause: no C++ compiler, an unsupported op) where it cannot.
        """
        if self.backend != "torch" or self._collective:
            raise RuntimeError(f"compile_step applies to the torch backend of a per-rank selector, not to "
                               f"{type(self).__name__} on {self.backend}")
        compiled = torch.compile(self._run, dynamic=True)
        saved = self._stats.clone()
        try:
            for T in (2, 1):
                if T > self.max_tokens:
                    continue
                logits, ids, w = self._sample_batch(T)
                extra = {} if self.output_norms is None else {
                    "hidden_states": torch.zeros(T, self.output_norms[0].shape[0] // 2, device=self.device)}
                for num_valid in (None, torch.full((), T, dtype=torch.int64, device=self.device)):
                    compiled(logits, ids, w, num_valid, **extra)
        except Exception as e:  # inductor's errors are many types; the caller decides what to do
            raise RuntimeError(f"torch.compile of the selection step failed: {type(e).__name__}: {e}") from e
        finally:
            self._stats.copy_(saved)
        self._run = compiled

    def _sample_batch(self, T: int):
        """A well-formed batch of T rows (each row's top-k as the router picks it), for compiling."""
        E = self.router.num_experts
        logits = (torch.linspace(-2.0, 2.0, E, device=self.device)[None, :]
                  + torch.arange(T, device=self.device)[:, None] * 0.37).remainder(4.0)
        ids, w = reference.route_topk(self.router, logits, self.correction_bias)
        return logits, ids.to(self.ids_dtype), w.to(self.weights_dtype)
