"""lynx-sglang: batch-aware expert selection (Lynx and peers) for MoE decode in SGLang."""

from .config import (
    BudgetPolicy,
    ConfigError,
    LynxPolicy,
    OeaPolicy,
    OffPolicy,
    RouterSpec,
    make_policy,
)
from .selector import ExpertSelector, SelectionStats

__version__ = "0.1.0"
__all__ = [
    "BudgetPolicy",
    "ConfigError",
    "ExpertSelector",
    "LynxPolicy",
    "OeaPolicy",
    "OffPolicy",
    "RouterSpec",
    "SelectionStats",
    "make_policy",
]
