"""Where experts live under expert parallelism, and which rank owns which token.

SGLang lays out an expert-parallel layer's (physical) expert slots in equal
contiguous blocks: rank r holds slots ``[r * P/N, (r + 1) * P/N)``. Without
EPLB a slot is a logical expert; with EPLB (``--ep-num-redundant-experts``) a
logical expert may have replicas on several ranks, described by SGLang's
``physical_to_logical_map``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lynx_sglang.runtime.selection.config import ConfigError


@dataclass(frozen=True)
class ExpertPlacement:
    """Physical expert slot -> (rank, logical expert).

    num_ranks: N, the expert-parallel group size.
    num_logical: E, experts the router ranks.
    rank_of / logical_of: [P] int64 tensors over physical slots.
    """

    num_ranks: int
    num_logical: int
    rank_of: torch.Tensor
    logical_of: torch.Tensor

    @property
    def num_physical(self) -> int:
        """P, the number of physical expert slots (E plus redundant replicas)."""
        return int(self.rank_of.numel())

    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int, device="cpu") -> "ExpertPlacement":
        """No replicas: expert e lives on rank ``e // (E / N)`` (SGLang without EPLB)."""
        return cls.from_physical_map(torch.arange(num_experts, device=device), num_ranks, num_experts)

    @classmethod
    def from_physical_map(cls, physical_to_logical: torch.Tensor, num_ranks: int,
                          num_logical: int | None = None) -> "ExpertPlacement":
        """From SGLang's per-layer ``physical_to_logical_map`` ([P], contiguous blocks per rank)."""
        p2l = physical_to_logical.long()
        P = int(p2l.numel())
        if not isinstance(num_ranks, int) or num_ranks < 1:
            raise ConfigError(f"expert-parallel size must be a positive int, got {num_ranks!r}")
        if P == 0 or P % num_ranks:
            raise ConfigError(f"{P} expert slots cannot be split evenly over {num_ranks} ranks")
        E = int(p2l.max()) + 1 if num_logical is None else num_logical
        if bool(((p2l < 0) | (p2l >= E)).any()):
            raise ConfigError(f"physical_to_logical map holds ids outside [0, {E})")
        if int(torch.unique(p2l).numel()) != E:
            raise ConfigError("every logical expert needs at least one physical slot")
        per = P // num_ranks
        slots = torch.arange(P, device=p2l.device)
        return cls(num_ranks, E, slots // per, p2l)

    def logical_on_rank(self) -> torch.Tensor:
        """[E, N] bool: logical expert e has a replica on rank r."""
        mask = torch.zeros(self.num_logical, self.num_ranks, dtype=torch.bool, device=self.rank_of.device)
        replica = torch.empty(self.num_logical, self.num_ranks, dtype=torch.long, device=self.rank_of.device)
        rank_tables(self.logical_of, self.rank_of, mask, replica)
        return mask

    def replica_on_rank(self) -> torch.Tensor:
        """[E, N] int64: the lowest physical slot of logical expert e on rank r, or -1."""
        mask = torch.zeros(self.num_logical, self.num_ranks, dtype=torch.bool, device=self.rank_of.device)
        replica = torch.empty(self.num_logical, self.num_ranks, dtype=torch.long, device=self.rank_of.device)
        rank_tables(self.logical_of, self.rank_of, mask, replica)
        return replica

    def to(self, device) -> "ExpertPlacement":
        """The same placement with its tensors on ``device``."""
        return ExpertPlacement(self.num_ranks, self.num_logical, self.rank_of.to(device), self.logical_of.to(device))


def home_rank(num_tokens: int, num_ranks: int, device="cpu") -> torch.Tensor:
    """[T] int64: the rank that owns each row when every rank holds the whole batch.

    Under TP attention all ranks hold the same T rows; each takes a contiguous
    share of ``ceil(T / N)`` rows (the last ranks may get fewer or none), so
    every token is dispatched by exactly one rank.
    """
    share = max(1, -(-num_tokens // num_ranks))
    return torch.arange(num_tokens, device=device) // share


def owned_rows(num_tokens: int, num_ranks: int, rank: int) -> tuple[int, int]:
    """[start, end) of the rows ``rank`` owns (see ``home_rank``)."""
    share = max(1, -(-num_tokens // num_ranks))
    start = min(num_tokens, rank * share)
    return start, min(num_tokens, start + share)


def rank_tables(physical_to_logical: torch.Tensor, rank_of: torch.Tensor, mask_out: torch.Tensor,
                replica_out: torch.Tensor) -> None:
    """Fill [E, N] ``mask_out`` (expert has a replica on rank) and ``replica_out`` (its lowest slot there, or -1).

    In place and without host synchronisation, so that a live EPLB map (which
    rebalancing rewrites in place) can be re-read on every step, also inside a
    CUDA graph.
    """
    E, N = mask_out.shape
    P = rank_of.numel()
    key = physical_to_logical.long() * N + rank_of
    mask_out.zero_()
    mask_out.view(-1).index_fill_(0, key, True)
    replica_out.fill_(P)
    replica_out.view(-1).scatter_reduce_(0, key, torch.arange(P, device=rank_of.device), "amin")
    replica_out.masked_fill_(replica_out == P, -1)
