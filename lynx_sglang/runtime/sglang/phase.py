"""Which rows of the current forward are decode tokens: the phase every per-layer stage reads.

SGLang publishes the ``ForwardBatch`` of each forward through its
``forward_context``; our AROUND hook on it (``hooks.py``) turns the batch into a
``Phase`` and publishes it here for exactly that scope. Stages and the
all-to-all accounting read ``current()``; ``None`` means nothing may be
rewritten (prefill/extend, speculative, unknown).
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import Iterator, Optional

# Attribute the ForwardBatch.init_new hook puts on mixed batches: their decode-token count.
DECODE_TOKENS_ATTR = "_lynx_decode_tokens"


class PhaseKind(enum.Enum):
    """What kind of rows a forward carries."""

    DECODE = "decode"  # every row is a decode token
    MIXED = "mixed"  # chunked prefill: extend rows first, then ``decode_rows`` decode rows
    IDLE = "idle"  # this rank routes no tokens (takes part in global selection only)


@dataclass(frozen=True)
class Phase:
    """The phase of one forward. ``decode_rows`` is the trailing decode-row count of a mixed batch."""

    kind: PhaseKind
    decode_rows: int = 0

    def __post_init__(self):
        if (self.kind is PhaseKind.MIXED) != (self.decode_rows > 0):
            raise ValueError(f"a mixed phase needs decode_rows > 0 and only it has them, got {self!r}")

    @property
    def is_decode(self) -> bool:
        """Every row is a decode token."""
        return self.kind is PhaseKind.DECODE

    @property
    def is_mixed(self) -> bool:
        """Chunked prefill with trailing decode rows."""
        return self.kind is PhaseKind.MIXED

    @property
    def is_idle(self) -> bool:
        """No rows on this rank."""
        return self.kind is PhaseKind.IDLE

    def first_decode_row(self, num_rows: int) -> int:
        """Index of the first decode row in a batch of ``num_rows`` (0 unless mixed)."""
        return num_rows - self.decode_rows if self.is_mixed else 0


DECODE = Phase(PhaseKind.DECODE)
IDLE = Phase(PhaseKind.IDLE)


def mixed(decode_rows: int) -> Phase:
    """A mixed chunked-prefill phase whose last ``decode_rows`` rows are decode tokens."""
    return Phase(PhaseKind.MIXED, decode_rows)


_current: Optional[Phase] = None


def current() -> Optional[Phase]:
    """The phase of the forward being run (None: never rewrite)."""
    return _current


@contextlib.contextmanager
def published(phase: Optional[Phase]) -> Iterator[None]:
    """Make ``phase`` current for the scope (nested scopes restore the outer one)."""
    global _current
    prev, _current = _current, phase
    try:
        yield
    finally:
        _current = prev


def phase_of(forward_batch) -> Optional[Phase]:
    """Decode-row description of a ForwardBatch, or None where nothing may be rewritten.

    Decided from ``forward_mode`` (not ``get_is_extend_in_batch``, which was seen
    to report a prefill as decode under plain TP). In a mixed chunked-prefill
    batch SGLang appends the running decode requests, one token each, after the
    extend tokens; speculative batches are left alone.
    """
    mode = getattr(forward_batch, "forward_mode", None)
    if mode is None:
        return None
    if getattr(forward_batch, "spec_info", None) is not None:
        return None
    if mode.is_decode():
        return DECODE
    if mode.is_idle():
        return IDLE
    if mode.is_mixed():
        n = getattr(forward_batch, DECODE_TOKENS_ATTR, 0)
        return mixed(n) if n > 0 else None
    return None
