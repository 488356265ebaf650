"""The SGLang integration's per-step paths need no host: no sync, no host-built tensor, no data-dependent shape.

A captured CUDA-graph decode step replays our ``TopK.forward`` hook body
(``stage.TopKSelectionStage.__call__``) on every MoE layer, and our all-to-all
dispatcher's accounting on every layer too. ``lynx_sglang.op_audit.OpAudit`` sees
on CPU the aten ops that would break capture (or stall the stream) on a GPU; each
test runs the path once to warm up (plan-time allocations), then audited, with
``num_token_non_padded`` as a device tensor, as SGLang passes it.

Scope: this file checks the integration code, ``lynx_sglang/runtime/sglang/``.
Findings from the selection core (``runtime/selection/reference.py``) and from
lynx_ep (``runtime/expert_parallel/rank_aware.py``) are being fixed by their
owners while this is written, so they are filtered out here on ``Finding.where``
(they are printed, so a run shows them); the selection core has its own no-sync
tests.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from lynx_sglang.op_audit import OpAudit
from lynx_sglang.runtime.expert_parallel.accounting import A2ATotals
from lynx_sglang.runtime.expert_parallel.placement import ExpertPlacement
from lynx_sglang.runtime.selection.config import RouterSpec
from lynx_sglang.runtime.sglang import stage as stage_mod
from lynx_sglang.runtime.sglang.a2a_dispatcher import account
from lynx_sglang.runtime.sglang.options import LynxOptions
from lynx_sglang.runtime.sglang.phase import DECODE, mixed, published

OURS = "lynx_sglang/runtime/sglang/"
E, K, T, MAX_BATCH = 16, 4, 24, 64


class TopKOutput(NamedTuple):
    """The fields of SGLang's ``StandardTopKOutput`` (the stage takes its output type; no SGLang import here)."""

    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    router_logits: torch.Tensor


def _ours(audit: OpAudit) -> list:
    """Findings in the integration code; the others are shown, not asserted (see the module docstring)."""
    others = [f for f in audit.findings if not f.where.startswith(OURS)]
    if others:
        print("not the integration's (owned elsewhere):", *{(f.kind, f.op, f.where) for f in others}, sep="\n  ")
    return [f for f in audit.findings if f.where.startswith(OURS)]


def _batch(seed: int = 0, rows: int = T):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, E, generator=g) * 3
    w, ids = torch.softmax(logits, -1).topk(K, -1)
    return TopKOutput(w / w.sum(-1, keepdim=True), ids.to(torch.int32), logits)


def _options(policy: str) -> LynxOptions:
    params = {"budget": {"max_experts": 6}, "lynx": {"keep_level": 0, "min_votes": 2, "max_moved_weight": 1.0}}
    return LynxOptions(moe_backend="lynx", policy=policy, params=params.get(policy, {}), max_batch=MAX_BATCH)


def _stage(policy: str, **kw) -> stage_mod.TopKSelectionStage:
    return stage_mod.TopKSelectionStage(0, RouterSpec(E, K), _options(policy), torch.device("cpu"), None,
                                        output_type=TopKOutput, **kw)


def _audited_call(st, out, num_valid, phase=DECODE):
    """Warm up once, then the audited call; returns (audit, output)."""
    with published(phase):
        st(out, num_valid)
        with OpAudit() as audit:
            result = st(out, num_valid)
    return audit, result


def _eplb_maps():
    """16 logical experts on 24 physical slots (8 replicated), as SGLang's ExpertLocationMetadata holds them."""
    g = torch.Generator().manual_seed(3)
    physical_to_logical = torch.cat([torch.randperm(E, generator=g), torch.randperm(E, generator=g)[:8]])
    replicas = torch.bincount(physical_to_logical, minlength=E)
    logical_to_all = torch.full((E, int(replicas.max())), -1, dtype=torch.int64)
    for e in range(E):
        where = (physical_to_logical == e).nonzero().flatten()
        logical_to_all[e, : where.numel()] = where
    return stage_mod.EplbMaps(physical_to_logical, logical_to_all, replicas)


def _physical(out: TopKOutput, maps) -> TopKOutput:
    """The logical picks of ``out`` on replicas, as EPLB's dispatch hands them to the top-k hook."""
    ids = out.topk_ids.long()
    pick = torch.arange(ids.numel()).view_as(ids) % maps.replicas[ids]
    return out._replace(topk_ids=maps.logical_to_all[ids, pick].to(torch.int32))


@pytest.mark.parametrize("policy", ["off", "lynx", "oea", "budget"])
def test_decode_step_of_the_stage_needs_no_host(policy):
    st = _stage(policy)
    out = _batch()
    audit, result = _audited_call(st, out, torch.tensor(T - 3))  # 3 padding rows, bound on the device
    assert _ours(audit) == []
    assert result.topk_ids.shape == out.topk_ids.shape
    assert torch.equal(result.topk_ids[T - 3:], out.topk_ids[T - 3:])  # padding rows unchanged


def test_mixed_step_of_the_stage_needs_no_host():
    st = _stage("lynx")
    audit, result = _audited_call(st, _batch(), None, phase=mixed(10))
    assert _ours(audit) == []
    assert st.mixed_batches == 2


def test_rank_aware_step_with_our_dispatcher_needs_no_host():
    st = _stage("lynx_ep", ep=stage_mod.EpLayout(num_ranks=2, rank=0, a2a_home=True))
    audit, _ = _audited_call(st, _batch(), torch.tensor(T))
    assert _ours(audit) == []


@pytest.mark.parametrize("policy", ["lynx", "budget", "lynx_ep"])
def test_eplb_physical_id_step_needs_no_host(policy, monkeypatch):
    """``_select_physical``: logical round trip, replica choice, and (lynx_ep) the live rank-table refresh."""
    maps = _eplb_maps()
    monkeypatch.setattr(stage_mod, "eplb_maps", lambda layer_id: maps)
    ep = stage_mod.EpLayout(num_ranks=2, rank=0, a2a_home=True) if policy == "lynx_ep" else stage_mod.EpLayout()
    st = _stage(policy, physical_ids=True, ep=ep)
    audit, result = _audited_call(st, _physical(_batch(1), maps), torch.tensor(T - 2))
    assert _ours(audit) == []
    got = result.topk_ids.long()
    assert bool((got < maps.physical_to_logical.numel()).all())  # physical ids again


def test_a2a_accounting_step_needs_no_host():
    placement = ExpertPlacement.contiguous(E, 4)
    ids = _batch().topk_ids
    totals = torch.zeros(A2ATotals.size(4), dtype=torch.int64)
    for phase in (DECODE, mixed(7)):
        with OpAudit() as audit:
            account(totals, phase, ids, placement, 32, 2)
        assert _ours(audit) == [], phase
        # A2ATotals.step itself (runtime/expert_parallel/accounting.py) needs no host either.
        assert audit.findings == [], phase
    assert A2ATotals.as_dict(totals.tolist(), 4)["steps"] == 2


def test_the_filter_sees_integration_syncs():
    """Control: a host copy in runtime/sglang/ is found and attributed to it (here the once-per-interval
    metrics read, a sync by design, never on the per-step path)."""
    st = _stage("lynx")
    with published(DECODE):
        st(_batch(), None)
    with OpAudit() as audit:
        snapshot = stage_mod.StageRegistry([st]).snapshot()
    assert snapshot.layers[0].steps == 1
    assert any(f.kind == "host sync" and f.where.startswith(OURS + "stage.py") for f in _ours(audit)), audit.findings
