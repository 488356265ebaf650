"""The statistics every selector accumulates on the device: one layout for the selector, kernels and metrics.

A selector adds one step's facts to an int64 vector indexed by ``StatField``
(the Triton keep/reroute kernels write the same offsets); the metrics read a
[layers, len(StatField)] table of them with one device-to-host copy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lynx_sglang.runtime.selection.config import WEIGHT_Q


class StatField(enum.IntEnum):
    """Offsets of the per-layer statistics vector (int64 totals since the last reset)."""

    STEPS = 0  # batches selected on
    EXPERTS_BEFORE = 1  # sum over steps of distinct experts the router picked
    EXPERTS_AFTER = 2  # sum over steps of distinct experts after selection
    ROWS_CHANGED = 3  # rows that lost at least one pick
    ROWS_VOTING = 4  # rows that took part in selection
    MOVED_WEIGHT = 5  # routed weight changed rows had on experts they lost, in 1/WEIGHT_Q

    @property
    def key(self) -> str:
        """Lower-case name, as ``SelectionStats`` fields and metric keys spell it."""
        return self.name.lower()


NUM_STATS = len(StatField)


@dataclass(frozen=True)
class SelectionStats:
    """Totals since the last reset (sums over steps; divide by ``steps`` for means)."""

    steps: int
    experts_before: int
    experts_after: int
    rows_changed: int
    rows_voting: int
    moved_weight: int  # 1/WEIGHT_Q units; ``moved_per_rerouted_token`` reads it

    @classmethod
    def from_values(cls, values) -> "SelectionStats":
        """From a host list (or tuple) laid out by ``StatField``."""
        if len(values) != NUM_STATS:
            raise ValueError(f"expected {NUM_STATS} statistics, got {len(values)}")
        return cls(**{f.key: int(values[f]) for f in StatField})

    @property
    def mean_experts_before(self) -> float:
        """Distinct experts per step as the router picked them."""
        return self.experts_before / self.steps if self.steps else 0.0

    @property
    def mean_experts_after(self) -> float:
        """Distinct experts per step after selection."""
        return self.experts_after / self.steps if self.steps else 0.0

    @property
    def moved_per_rerouted_token(self) -> float:
        """Mean routed gate weight a re-routed token had on the experts it lost (the router's weight units)."""
        return self.moved_weight / WEIGHT_Q / self.rows_changed if self.rows_changed else 0.0
