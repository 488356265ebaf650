"""Expert parallelism: expert placement, the all-to-all token dispatcher, traffic accounting, lynx_ep.

Depends on the selection core only (never on the SGLang integration).
"""

from lynx_sglang.runtime.expert_parallel.accounting import (
    A2ATotals,
    StepTraffic,
    capacity_bytes,
    destinations,
    step_traffic,
)
from lynx_sglang.runtime.expert_parallel.placement import ExpertPlacement, home_rank, owned_rows
from lynx_sglang.runtime.expert_parallel.rank_aware import RankAwareSelector

__all__ = ["A2ATotals", "ExpertPlacement", "RankAwareSelector", "StepTraffic", "capacity_bytes", "destinations",
           "home_rank", "owned_rows", "step_traffic"]
