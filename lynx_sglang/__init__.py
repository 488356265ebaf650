"""lynx-sglang: batch-aware expert selection (Lynx and peers) for MoE decode in SGLang."""

from lynx_sglang.runtime.selection.config import (
    BudgetPolicy,
    ConfigError,
    LynxPolicy,
    OeaPolicy,
    OffPolicy,
    RouterSpec,
    make_policy,
)
from lynx_sglang.runtime.selection.selector import ExpertSelector, SelectionStats

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
