"""What one expert-parallel MoE step costs: bytes on the wire and the busiest rank's load.

Pure tensor arithmetic on a step's (physical) top-k ids, with no host
synchronisation, so the dispatcher can accumulate it on the device every step
and the benchmark can replay recorded routing through the same function.

Counting rules (variable-size all-to-all, ``AllToAllDispatcher``):
- a token travels once to every *other* rank holding at least one of its picks
  (its own rank's picks need no transfer);
- dispatch carries the hidden row plus the row's k ids (int32) and k weights
  (fp32); combine carries one hidden row back per transfer;
- a rank's expert-weight load is the number of distinct local experts any
  token uses there, times one expert's weight bytes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from lynx_sglang.runtime.expert_parallel.placement import ExpertPlacement, home_rank

ID_BYTES = 4  # int32 expert ids
WEIGHT_BYTES = 4  # fp32 gate weights


@dataclass
class StepTraffic:
    """One step (or a sum of steps) of expert-parallel traffic; all int64 tensors."""

    dispatch_bytes: torch.Tensor  # scalar: bytes sent by all ranks in the dispatch all-to-all
    combine_bytes: torch.Tensor  # scalar: bytes sent back in the combine all-to-all
    rank_tokens: torch.Tensor  # [N]: token rows each rank's experts process (local + received)
    rank_experts: torch.Tensor  # [N]: distinct experts each rank runs

    def as_dict(self, expert_bytes: int) -> dict:
        """Host-side summary (one sync); ``expert_bytes``: weight bytes of one expert."""
        rank_experts = self.rank_experts.tolist()
        return {
            "dispatch_bytes": int(self.dispatch_bytes),
            "combine_bytes": int(self.combine_bytes),
            "a2a_bytes": int(self.dispatch_bytes + self.combine_bytes),
            "rank_tokens": self.rank_tokens.tolist(),
            "rank_experts": rank_experts,
            "busiest_rank_tokens": int(self.rank_tokens.max()),
            "busiest_rank_experts": max(rank_experts),
            "busiest_rank_expert_bytes": max(rank_experts) * expert_bytes,
        }


def visited_ranks(slot_rank: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """[T, N] bool: the ranks each row's slots go to (``slot_rank`` [T, k]; -1 slots go nowhere)."""
    dest = torch.zeros(slot_rank.shape[0], num_ranks + 1, dtype=torch.bool, device=slot_rank.device)
    # -1 slots land in a spare column that is dropped.
    dest.scatter_(1, torch.where(slot_rank >= 0, slot_rank.long(), num_ranks), True)
    return dest[:, :num_ranks]


def destinations(topk_ids: torch.Tensor, placement: ExpertPlacement) -> torch.Tensor:
    """[T, N] bool: row t has at least one (physical) pick on rank r; -1 slots go nowhere."""
    ids = topk_ids.long()
    ranks = placement.rank_of[ids.clamp(min=0)]
    return visited_ranks(torch.where(ids >= 0, ranks, -1), placement.num_ranks)


def step_traffic(topk_ids: torch.Tensor, placement: ExpertPlacement, home: torch.Tensor,
                 hidden_size: int, activation_bytes: int, valid_rows: torch.Tensor | None = None) -> StepTraffic:
    """Traffic and per-rank load of one step.

    topk_ids: [T, k] physical ids (-1: empty slot); home: [T] rank that owns
    each row; valid_rows: optional [T] bool (padding rows cost nothing).
    """
    T, k = topk_ids.shape
    N = placement.num_ranks
    dest = destinations(topk_ids, placement)
    if valid_rows is not None:
        dest &= valid_rows[:, None]
    remote = dest & (torch.arange(N, device=dest.device)[None, :] != home[:, None])
    transfers = remote.sum()
    row_bytes = hidden_size * activation_bytes
    # Distinct experts per rank: physical slots used by any counted row.
    ids = topk_ids.long()
    use = ids >= 0
    if valid_rows is not None:
        use &= valid_rows[:, None]
    used = torch.zeros(placement.num_physical + 1, dtype=torch.bool, device=ids.device)
    used.scatter_(0, torch.where(use, ids, placement.num_physical).reshape(-1), True)
    rank_experts = torch.zeros(N, dtype=torch.int64, device=ids.device)
    rank_experts.scatter_add_(0, placement.rank_of, used[:-1].long())
    return StepTraffic(
        dispatch_bytes=transfers * (row_bytes + k * (ID_BYTES + WEIGHT_BYTES)),
        combine_bytes=transfers * row_bytes,
        rank_tokens=dest.sum(dim=0),
        rank_experts=rank_experts,
    )


def capacity_bytes(tokens_per_rank: int, num_ranks: int, hidden_size: int, activation_bytes: int, top_k: int) -> int:
    """Bytes the fixed-capacity (CUDA-graph) all-to-all sends per step, whatever the routing.

    Every rank sends every other rank a block of ``tokens_per_rank`` rows in
    both directions, so selection cannot shrink it.
    """
    per_row_dispatch = hidden_size * activation_bytes + top_k * (ID_BYTES + WEIGHT_BYTES)
    pairs = num_ranks * (num_ranks - 1) * tokens_per_rank
    return pairs * (per_row_dispatch + hidden_size * activation_bytes)


class A2ATotals:
    """The one layout of the all-to-all dispatcher's per-layer totals vector (int64, summed over steps).

    ``Field`` offsets come first, then ``rank_experts`` [N] and ``rank_tokens`` [N]. The
    dispatcher adds ``step(...)`` on the device each decode step; the metrics and the stats
    dump read it back with ``as_dict``.
    """

    class Field(enum.IntEnum):
        """Scalar offsets of the totals vector."""

        STEPS = 0  # decode steps accounted (mixed batches included)
        DISPATCH_BYTES = 1
        COMBINE_BYTES = 2
        BUSIEST_RANK_EXPERTS = 3
        BUSIEST_RANK_TOKENS = 4
        MIXED_STEPS = 5  # of those, mixed chunked-prefill batches (decode rows costed)

    #: Keys of the per-rank lists, in vector order after the scalar fields.
    RANK_KEYS = ("rank_experts", "rank_tokens")

    @classmethod
    def size(cls, num_ranks: int) -> int:
        """Length of the vector for ``num_ranks`` ranks."""
        return len(cls.Field) + len(cls.RANK_KEYS) * num_ranks

    @classmethod
    def step(cls, topk_ids: torch.Tensor, placement: ExpertPlacement, first_decode_row: int, hidden_size: int,
             activation_bytes: int) -> torch.Tensor:
        """One decode step's vector (no host sync). Rows before ``first_decode_row`` (the extend rows of a
        mixed batch) cost nothing; ``first_decode_row`` > 0 marks the step as mixed."""
        N = placement.num_ranks
        T = topk_ids.shape[0]
        dev = topk_ids.device
        mixed = first_decode_row > 0
        decode_rows = torch.arange(T, device=dev) >= first_decode_row if mixed else None
        t = step_traffic(topk_ids, placement, home_rank(T, N, dev), hidden_size, activation_bytes,
                         valid_rows=decode_rows)
        scalars = {cls.Field.STEPS: torch.ones(1, dtype=torch.int64, device=dev),
                   cls.Field.DISPATCH_BYTES: t.dispatch_bytes.view(1),
                   cls.Field.COMBINE_BYTES: t.combine_bytes.view(1),
                   cls.Field.BUSIEST_RANK_EXPERTS: t.rank_experts.max().view(1),
                   cls.Field.BUSIEST_RANK_TOKENS: t.rank_tokens.max().view(1),
                   cls.Field.MIXED_STEPS: torch.full((1,), int(mixed), dtype=torch.int64, device=dev)}
        return torch.cat([scalars[f] for f in cls.Field] + [t.rank_experts, t.rank_tokens])

    @classmethod
    def as_dict(cls, values: list, num_ranks: int) -> dict:
        """A host copy of the vector by name (per-rank fields as lists)."""
        if len(values) != cls.size(num_ranks):
            raise ValueError(f"a2a totals for {num_ranks} ranks have {cls.size(num_ranks)} values, got {len(values)}")
        out = {f.name.lower(): values[f] for f in cls.Field}
        base = len(cls.Field)
        for i, key in enumerate(cls.RANK_KEYS):
            out[key] = list(values[base + i * num_ranks: base + (i + 1) * num_ranks])
        return out
