"""Expert selection on the global batch when each expert-parallel rank holds only its own tokens.

With SGLang's DeepEP-family dispatchers (``--moe-a2a-backend deepep`` and the
like) every EP rank routes only its local tokens, yet the batch's kept expert
set has to be decided on the whole batch, and identically on every rank:
otherwise ranks would keep different experts and the saving (experts whose
weights are never read) would not happen anywhere.

The selection stages of ``lynx_sglang.runtime.selection.reference`` make this cheap. Stage 1's
votes are integer sums (and ORs) over rows, so the votes of the global batch
are the element-wise sum of every rank's votes; stage 2 (the kept set) reads
only those and the voting-row count; stage 3 (re-routing) is per row. One
all-reduce of a few E-long int64 vectors per layer and step therefore gives
every rank exactly the kept set a single process would compute on the
concatenated batch, and the rows it re-routes are bit for bit the same.

Only the torch reference runs here. The Triton kernels fuse the vote and keep
stages into one launch, so a global variant would have to split that launch
around the collective; that is not implemented.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.distributed as dist

from lynx_sglang.runtime.selection import reference
from lynx_sglang.runtime.selection.config import BudgetPolicy, ConfigError, LynxPolicy, OeaPolicy, OffPolicy, Policy, RouterSpec
from lynx_sglang.runtime.selection.selector import ExpertSelector

# Policies whose whole rule is reference.vote / keep_set / reroute (exact types: a subclass such as
# a rank-aware lynx variant may add stages that a vote reduction alone does not make global).
_SUPPORTED = (OffPolicy, LynxPolicy, OeaPolicy, BudgetPolicy)
# Fields of reference.Votes that are sums or ORs over rows, in packing order (row_ok and rank are
# per row and stay local). Every rank's policy is the same, so every rank packs the same fields.
_REDUCED_FIELDS = ("picks", "lynx_votes", "mandatory", "oea_core", "budget_score")


def all_reduce_votes(votes: reference.Votes, group: Optional[dist.ProcessGroup] = None) -> reference.Votes:
    """Sum ``votes`` over the ranks of ``group``: the votes of the concatenated batch.

    Every per-expert field present and the voting-row count are packed into one
    int64 tensor and reduced with a single ``all_reduce(SUM)`` (one collective
    per layer and step, no host synchronisation); bool fields (ORs over rows)
    come back as ``sum > 0``. ``row_ok`` and ``rank`` are returned unchanged.
    Every rank of ``group`` must call this with the same policy's votes, on a
    device its backend supports (gloo: CPU; NCCL: CUDA).
    """
    present = [(name, getattr(votes, name)) for name in _REDUCED_FIELDS if getattr(votes, name) is not None]
    # int64 for everything: counts and quantised weights are exact integers, and bools sum to OR counts.
    packed = torch.cat([t.reshape(-1).to(torch.int64) for _, t in present]
                       + [votes.voting_rows().reshape(1).to(torch.int64)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    reduced, offset = {}, 0
    for name, t in present:
        part = packed[offset:offset + t.numel()].view(t.shape)
        reduced[name] = part > 0 if t.dtype == torch.bool else part
        offset += t.numel()
    return dataclasses.replace(votes, num_voting=packed[offset], **reduced)


class GlobalExpertSelector(ExpertSelector):
    """``ExpertSelector`` whose kept expert set is decided on the batch of all ranks of ``group``.

    Same plan/run contract as ``ExpertSelector``: the constructor validates and
    allocates, ``run`` returns views of preallocated outputs (this rank's rows
    only), ``stats``/``reset_stats`` read and clear device-side totals. Always
    the torch backend (see the module docstring).

    ``run`` is a collective: every rank of ``group`` must call it on every step,
    also with 0 local tokens, so that the ranks' collectives match. A call with 0
    tokens still reduces (its votes are zero). Rows at and after ``num_valid``
    (padding) and malformed rows come back unchanged and do not vote.

    Statistics: ``experts_before`` / ``experts_after`` count the global batch's
    experts and are the same on every rank; ``rows_changed`` / ``rows_voting``
    count this rank's rows (sum them over ranks for the global batch); ``steps``
    counts every call, including those with 0 local tokens, so that it too is the
    same on every rank.

    Args:
        router, policy, max_tokens, device, ids_dtype, weights_dtype, correction_bias, stats:
            as for ``ExpertSelector``; ``max_tokens`` bounds this rank's batch.
        group: the expert-parallel process group (None: the default group).
            ``torch.distributed`` must be initialised.

    Policies: off, lynx, oea and budget (those ``reference.select`` fully defines).
    """

    def __init__(
        self,
        router: RouterSpec,
        policy: Policy,
        max_tokens: int,
        device: torch.device | str = "cpu",
        ids_dtype: torch.dtype = torch.int32,
        weights_dtype: torch.dtype = torch.float32,
        correction_bias: Optional[torch.Tensor] = None,
        *,
        group: Optional[dist.ProcessGroup],
        stats: Optional[torch.Tensor] = None,
        similarity: Optional[torch.Tensor] = None,
    ):
        if type(policy) not in _SUPPORTED:
            raise ConfigError(f"policy {policy.name!r} is not supported by global expert selection "
                              f"(supported: {', '.join(p.name for p in _SUPPORTED)})")
        super().__init__(router, policy, max_tokens, device, ids_dtype, weights_dtype, correction_bias,
                         backend="torch", stats=stats, similarity=similarity)
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("GlobalExpertSelector needs an initialised torch.distributed process group")
        self.group = group
        self.world_size = dist.get_world_size(group)
        # The lynx score's base B is the global voting-row count, up to world_size * max_tokens:
        # the exact-integer bound has to hold for that, not just for this rank's batch.
        policy.validate(router, max_tokens * self.world_size)
        self._reduce = functools.partial(all_reduce_votes, group=group)

    # Collective: every rank runs every step, also with 0 local tokens (its votes are zero), or the
    # other ranks' all-reduce would have no partner.
    _collective = True

    def _select_torch(self, router_logits, topk_ids, topk_weights, num_valid, pick_rank=None, home=None):
        """The global kept set: ``reference.select`` with the votes all-reduced over the group (lynx's
        similarity-aware refill, if planned, is per row and needs no exchange)."""
        T = router_logits.shape[0]
        return reference.select(self.policy, self.router, router_logits, topk_ids, topk_weights,
                                num_valid, self.correction_bias, vote_reduce=self._reduce, consts=self._consts,
                                out=(self._out_ids[:T], self._out_weights[:T]), refill_bias=self._refill_bias)

    _select_torch.writes_outputs = True  # straight into the planned output buffers
