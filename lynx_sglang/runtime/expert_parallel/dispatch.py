"""All-to-all token dispatch for expert parallelism on ``torch.distributed`` (NCCL or gloo).

Each rank owns some tokens. ``dispatch`` sends every token once to every rank
that holds at least one of its (post-selection) experts, together with its
top-k ids and weights; picks that live elsewhere arrive as -1, so the
receiving rank's MoE runner computes exactly its share. ``combine`` returns
each expert output row to the token's home rank, which sums the shares.

Two forms of the same exchange, chosen per call:

- variable (``capacity=None``): exact splits. One small all-to-all exchanges the
  per-rank counts, which the host needs for the split sizes (one device->host
  sync per layer, the ``.tolist()`` of the counts; the send order is derived on
  the device without a second one), so it cannot be captured in a CUDA graph. Bytes on the wire
  shrink with the number of ranks each token visits: what selection cuts.
- fixed capacity (``capacity=C``): every rank sends every rank a block of C rows
  (unused rows carry ids -1). No host sync, fixed shapes, capturable; it moves
  ``N * (N - 1) * capacity`` rows each way whatever the routing
  (``accounting.capacity_bytes``), so selection saves expert work there but no
  bytes.

Ids and weights travel together in one int32 tensor (weights bit-cast), so a
dispatch is two all-to-alls (three with the count exchange) and a combine one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from lynx_sglang.runtime.selection.config import ConfigError
from lynx_sglang.runtime.expert_parallel.accounting import destinations
from lynx_sglang.runtime.expert_parallel.placement import ExpertPlacement

@dataclass
class DispatchHandle:
    """What ``combine`` needs to send results home (opaque to callers)."""

    num_tokens: int
    dtype: torch.dtype
    send_token: Optional[torch.Tensor] = None  # variable: [S] home row of each sent row
    send_splits: Optional[list] = None
    recv_splits: Optional[list] = None
    grid_slot: Optional[torch.Tensor] = None  # capacity: [t, N] row in the exchange block, or the dummy row
    grid_sent: Optional[torch.Tensor] = None  # capacity: [t, N] bool
    capacity: Optional[int] = None


@dataclass
class Dispatched:
    """Rows this rank's experts must process."""

    hidden_states: torch.Tensor  # [R, d]
    topk_ids: torch.Tensor  # [R, k] physical ids; picks held by other ranks are -1
    topk_weights: torch.Tensor  # [R, k]
    handle: DispatchHandle


class AllToAllDispatcher:
    """Dispatch/combine for one expert-parallel group; planned once, called every step.

    Args:
        placement: which rank holds each physical expert slot.
        rank: this process's rank in ``group``.
        group: the expert-parallel process group (None: the default group).
    """

    def __init__(self, placement: ExpertPlacement, rank: int, group=None):
        world = dist.get_world_size(group)
        if world != placement.num_ranks:
            raise ConfigError(f"placement is for {placement.num_ranks} ranks but the group has {world}")
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} outside the group of {world}")
        self.placement, self.rank, self.group = placement, rank, group

    # ------------------------------------------------------------------ helpers

    def _local_picks(self, ids: torch.Tensor, to_rank: torch.Tensor) -> torch.Tensor:
        """ids with every pick not held by ``to_rank`` (broadcast over rows) replaced by -1."""
        here = self.placement.rank_of[ids.long().clamp(min=0)] == to_rank[..., None]
        return torch.where((ids >= 0) & here, ids, torch.full_like(ids, -1))

    @staticmethod
    def _pack(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return torch.cat([ids.to(torch.int32), weights.float().view(torch.int32)], dim=-1)

    @staticmethod
    def _unpack(meta: torch.Tensor, k: int, ids_dtype, weights_dtype):
        return meta[:, :k].to(ids_dtype), meta[:, k:].contiguous().view(torch.float32).to(weights_dtype)

    def _check(self, hidden, ids, weights, capacity):
        if hidden.dim() != 2 or ids.dim() != 2 or ids.shape != weights.shape or ids.shape[0] != hidden.shape[0]:
            raise ValueError(f"dispatch needs hidden [t, d], topk_ids and topk_weights [t, k]; got "
                             f"{tuple(hidden.shape)}, {tuple(ids.shape)}, {tuple(weights.shape)}")
        if capacity is not None and not (isinstance(capacity, int) and capacity >= max(1, hidden.shape[0])):
            raise ValueError(f"capacity must be an int >= the {hidden.shape[0]} tokens dispatched, got {capacity!r}")

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, hidden_states: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 capacity: Optional[int] = None) -> Dispatched:
        """Send this rank's tokens to the ranks that hold their experts (collective: every rank calls it).

        ``capacity``: None for the exact-split exchange; an int (the same on
        every rank, at least the most tokens any rank dispatches) for the
        fixed-shape, capturable one.
        """
        self._check(hidden_states, topk_ids, topk_weights, capacity)
        if capacity is not None:
            return self._dispatch_capacity(hidden_states, topk_ids, topk_weights, capacity)
        N, dev = self.placement.num_ranks, hidden_states.device
        t, k = topk_ids.shape
        dest = destinations(topk_ids, self.placement)  # [t, N]
        send_counts = dest.sum(dim=0)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        counts = torch.stack([send_counts, recv_counts]).tolist()  # the one host sync
        send_splits, recv_splits = counts[0], counts[1]
        S, R = sum(send_splits), sum(recv_splits)
        # Rows grouped by receiving rank, tokens in order inside each group: (rank, token) pairs in
        # rank-major order, each sent pair scattered to its running position (a nonzero() without
        # the second sync: S is known from the counts); unsent pairs land in a spare slot S.
        flat = dest.t().reshape(-1)
        pos = torch.where(flat, torch.cumsum(flat, dim=0) - 1, S)
        pairs = torch.arange(N * t, device=dev)
        order = torch.empty(S + 1, dtype=torch.int64, device=dev).scatter_(0, pos, pairs)[:S]
        send_rank, send_token = order // max(t, 1), order % max(t, 1)

        meta = self._pack(self._local_picks(topk_ids[send_token], send_rank), topk_weights[send_token])
        recv_meta = torch.empty(R, 2 * k, dtype=torch.int32, device=dev)
        dist.all_to_all_single(recv_meta, meta, recv_splits, send_splits, group=self.group)
        recv_hidden = hidden_states.new_empty(R, hidden_states.shape[1])
        dist.all_to_all_single(recv_hidden, hidden_states[send_token].contiguous(), recv_splits, send_splits,
                               group=self.group)
        ids, weights = self._unpack(recv_meta, k, topk_ids.dtype, topk_weights.dtype)
        handle = DispatchHandle(t, hidden_states.dtype, send_token=send_token, send_splits=send_splits,
                                recv_splits=recv_splits)
        return Dispatched(recv_hidden, ids, weights, handle)

    def _dispatch_capacity(self, hidden_states, topk_ids, topk_weights, C: int) -> Dispatched:
        N, dev = self.placement.num_ranks, hidden_states.device
        t, k = topk_ids.shape
        d = hidden_states.shape[1]
        dest = destinations(topk_ids, self.placement)  # [t, N]
        ranks = torch.arange(N, device=dev)
        # Row of (token, rank) in the block sent to that rank; unsent pairs go to a spare row N*C.
        pos = torch.cumsum(dest.long(), dim=0) - 1
        slot = torch.where(dest, ranks[None, :] * C + pos, torch.full_like(pos, N * C))

        meta_rows = self._pack(self._local_picks(topk_ids[:, None, :].expand(t, N, k), ranks[None, :]),
                               topk_weights[:, None, :].expand(t, N, k))  # [t, N, 2k]
        send_meta = torch.full((N * C + 1, 2 * k), -1, dtype=torch.int32, device=dev)
        send_meta[:, k:].zero_()  # weight bits of unused rows: 0.0 (zero_: "= 0" would build a host tensor)
        send_meta.index_copy_(0, slot.reshape(-1), meta_rows.reshape(t * N, 2 * k))
        send_hidden = hidden_states.new_zeros(N * C + 1, d)
        send_hidden.index_copy_(0, slot.reshape(-1), hidden_states[:, None, :].expand(t, N, d).reshape(t * N, d))

        recv_meta = torch.empty(N * C, 2 * k, dtype=torch.int32, device=dev)
        dist.all_to_all_single(recv_meta, send_meta[: N * C], group=self.group)
        recv_hidden = hidden_states.new_empty(N * C, d)
        dist.all_to_all_single(recv_hidden, send_hidden[: N * C], group=self.group)
        ids, weights = self._unpack(recv_meta, k, topk_ids.dtype, topk_weights.dtype)
        handle = DispatchHandle(t, hidden_states.dtype, grid_slot=slot, grid_sent=dest, capacity=C)
        return Dispatched(recv_hidden, ids, weights, handle)

    # ------------------------------------------------------------------ combine

    def combine(self, expert_output: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Return every processed row to its home rank and sum the shares: [t, d] (collective)."""
        d = expert_output.shape[1]
        dev = expert_output.device
        if handle.grid_slot is not None:
            N, C = self.placement.num_ranks, handle.capacity
            back = expert_output.new_empty(N * C, d)
            dist.all_to_all_single(back, expert_output.contiguous(), group=self.group)
            back = torch.cat([back, back.new_zeros(1, d)])  # the spare row: nothing was sent there
            shares = back[handle.grid_slot].float() * handle.grid_sent[..., None]
            return shares.sum(dim=1).to(handle.dtype)
        back = expert_output.new_empty(sum(handle.send_splits), d)
        dist.all_to_all_single(back, expert_output.contiguous(), handle.send_splits, handle.recv_splits,
                               group=self.group)
        out = torch.zeros(handle.num_tokens, d, dtype=torch.float32, device=dev)
        out.index_add_(0, handle.send_token, back.float())
        return out.to(handle.dtype)
