"""lynx's residency-aware mode on SGLang's paged experts (--lynx-residency): the served side, on CPU.

SGLang's own residency objects (``DeviceResidency``, ``LRUPolicy``, ``plan_waves``, the eager
executor's ``run`` bookkeeping) are built on the CPU and moved with their own methods; the paged
layer is a real ``PagedExpertsMoEMethod`` wired as ``process_weights_after_loading`` wires it,
without a weight store (no GEMM runs: what is checked is which ids the stage hands to paging).
The oracle is the prototype the measurements in docs/offload.md were made with (copied below
verbatim from benchmarks/bench_offload.py before it moved into the runtime).
"""

from __future__ import annotations

import argparse
import random
from types import SimpleNamespace
from typing import NamedTuple
from unittest import mock

import pytest
import torch

from lynx_sglang.op_audit import OpAudit
from lynx_sglang.runtime.selection import reference
from lynx_sglang.runtime.selection.config import ConfigError, LynxPolicy, RouterSpec, make_policy
from lynx_sglang.runtime.selection.selector import ExpertSelector
from lynx_sglang.runtime.sglang import residency as res_mod
from lynx_sglang.runtime.sglang import stage as stage_mod
from lynx_sglang.runtime.sglang.options import LynxOptions, add_cli_args, options_from_args
from lynx_sglang.runtime.sglang.phase import DECODE, published
from test_sglang_hooks import _Model, _topk, sglang_layers  # noqa: F401  (module fixture)

E, K, k, T = 32, 8, 4, 16
ROUTER = RouterSpec(E, k)


class TopKOutput(NamedTuple):
    topk_weights: torch.Tensor
    topk_ids: torch.Tensor
    router_logits: torch.Tensor


# ----------------------------------------------------------------------------- SGLang's objects, on CPU


@pytest.fixture(scope="module")
def paged():
    """SGLang's paged-experts classes (importing the method module takes a while: once per module)."""
    from sglang.srt.layers.moe.paged_experts import executor, method, residency

    return SimpleNamespace(Method=method.PagedExpertsMoEMethod, DeviceExecutor=executor.DeviceExecutor,
                           EagerExecutor=executor.EagerExecutor, DeviceResidency=residency.DeviceResidency,
                           LRUPolicy=residency.LRUPolicy, plan_waves=residency.plan_waves)


class _MoE(torch.nn.Module):
    """Where SGLang keeps a paged layer's state: ``FusedMoE.quant_method`` (and its ``layer_id``)."""

    def __init__(self, layer_id, quant_method):
        super().__init__()
        self.layer_id = layer_id
        self.quant_method = quant_method


def _paged_layer(paged, layer_id, num_experts=E, num_slots=K, graphs=True, device_residency=None):
    """A ``PagedExpertsMoEMethod`` wired as its ``process_weights_after_loading`` does (no store, no runner)."""
    m = paged.Method(base_method=None, expert_format=None, num_experts=num_experts, num_resident=num_slots,
                     graphs=graphs)
    dr = device_residency
    if dr is None and graphs:
        dr = paged.DeviceResidency(num_experts=num_experts, num_slots=num_slots, device="cpu")
    if dr is not None:
        m.device_executor = paged.DeviceExecutor(base_method=None, store=None, residency=dr, contract=None,
                                                 routed_scaling_factor=1.0)
    m.executor = paged.EagerExecutor(base_method=None, store=None, policy=m.policy, contract=None,
                                     num_experts=num_experts, routed_scaling_factor=1.0, device_residency=dr)
    return _MoE(layer_id, m)


def _eager_step(paged, layer, ids):
    """One host-planned step of SGLang's eager executor on ``ids`` (its own ``run``: load_into, plan_waves
    over ``torch.unique(ids)``, store_from); only the page-in copies and GEMMs are left out."""
    ex = layer.quant_method.executor
    distinct = [e for e in torch.unique(ids).tolist() if e >= 0]
    ex._run = lambda layer, dispatch_output: paged.plan_waves(policy=ex.policy, distinct=distinct)
    # run() first asks CUDA whether a graph is being captured, which a CPU-only machine cannot answer.
    with mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: False):
        ex.run(layer=None, dispatch_output=None)


# ----------------------------------------------------------------------------- the measured prototype (oracle)


def _prototype_keep(mode, policy, router, votes, resident):
    lynx_keep = reference.keep_set(policy, router, votes)
    resident_picked = (votes.picks > 0) & resident
    if mode == "keep":
        return lynx_keep | resident_picked
    keep = resident_picked | votes.mandatory
    short = keep.sum() < policy.resolved_min_keep(router)
    return torch.where(short, keep | lynx_keep, keep)


def _prototype(mode, policy, router, logits, ids, weights, resident, correction_bias=None):
    logits = logits.float()
    sel = reference.selection_score(router, logits, correction_bias)
    votes = reference.vote(policy, router, logits, ids, weights.float(), ids.shape[0], sel)
    keep = _prototype_keep(mode, policy, router, votes, resident)
    return reference.reroute(router, logits, ids, weights.float(), sel, votes.row_ok, keep)


# ----------------------------------------------------------------------------- helpers


def _batch(seed, rows=T, router=ROUTER):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, router.num_experts, generator=g) * 1.5
    w, ids = torch.softmax(z, -1).topk(router.top_k, -1)
    return TopKOutput(w / w.sum(-1, keepdim=True), ids.to(torch.int32), z)


def _options(residency="prefer", **params):
    if residency != "off":
        params["residency"] = residency
    return LynxOptions(moe_backend="lynx", policy="lynx", params=params, max_batch=64)


def _stage(options, expert_slot=None, layer_id=0):
    return stage_mod.TopKSelectionStage(layer_id, ROUTER, options, torch.device("cpu"), None,
                                        output_type=TopKOutput, expert_slot=expert_slot)


def _run(st, out, num_valid=None):
    with published(DECODE):
        got = st(out, num_valid)
    return got.topk_ids.clone(), got.topk_weights.clone()


def _mask(lru, num_experts=E):
    m = torch.zeros(num_experts, dtype=torch.bool)
    m[list(lru.resident)] = True
    return m


# ----------------------------------------------------------------------------- the mask and the decisions


@pytest.mark.parametrize("mode,cap", [("keep", None), ("prefer", None), ("prefer", 0.5)])
def test_decisions_follow_sglang_residency_and_equal_the_prototype(paged, mode, cap):
    """Steps in time order: the stage reads SGLang's expert_slot as the eager executor leaves it, decides as the
    measured prototype on the same resident set, and its ids are what the layer then pages."""
    layer = _paged_layer(paged, 0)
    params = {} if cap is None else {"residency_max_moved_weight": cap}
    opts = _options(mode, **params)
    slots = res_mod.paged_expert_slots(_Model([layer]), opts, [(0, ROUTER)], torch.device("cpu"))
    dr = layer.quant_method.device_executor.residency
    assert slots[0] is dr.expert_slot  # a reference, never a copy
    st = _stage(opts, slots[0])
    assert st.selector.residency is dr.expert_slot and st.selector.backend == "torch"
    shadow = paged.LRUPolicy(K)  # the benchmark's replay: SGLang's LRU fed the same ids
    proto_policy = LynxPolicy() if cap is None else LynxPolicy(max_moved_weight=cap)
    moved_some = False
    for step in range(24):
        out = _batch(step)
        assert torch.equal(dr.expert_slot >= 0, _mask(shadow))  # read correctly after SGLang's own updates
        ids, w = _run(st, out)
        want_ids, want_w, changed = _prototype(mode, proto_policy, ROUTER, out.router_logits, out.topk_ids,
                                               out.topk_weights, _mask(shadow))
        assert torch.equal(ids, want_ids) and torch.equal(w, want_w.to(w.dtype)), step
        moved_some |= bool(changed.any())
        _eager_step(paged, layer, ids)  # SGLang pages what the stage chose, and updates expert_slot in place
        paged.plan_waves(policy=shadow, distinct=[e for e in torch.unique(ids).tolist() if e >= 0])
    assert moved_some


def test_a_per_layer_plan_gives_each_paged_layer_its_own_cap(paged):
    """A plan's layer_params (a --lynx-config file) set the paged cap per layer, as ``bench_offload --layer-caps``
    replays it: each layer's stage decides as the prototype at its own cap on the same resident set."""
    caps = {0: 0.35, 1: 0.9}
    opts = LynxOptions(moe_backend="lynx", policy="lynx", params={"residency": "prefer"}, max_batch=64,
                       layer_params={str(i): {"residency_max_moved_weight": c} for i, c in caps.items()})
    layers = [_paged_layer(paged, i) for i in caps]
    slots = res_mod.paged_expert_slots(_Model(layers), opts, [(i, ROUTER) for i in caps], torch.device("cpu"))
    decided = []
    for i, cap in caps.items():
        st = _stage(opts, slots[i], layer_id=i)
        out = _batch(7)
        ids, w = _run(st, out)
        want_ids, want_w, _ = _prototype("prefer", LynxPolicy(max_moved_weight=cap), ROUTER, out.router_logits,
                                         out.topk_ids, out.topk_weights, slots[i] >= 0)
        assert torch.equal(ids, want_ids) and torch.equal(w, want_w.to(w.dtype)), i
        decided.append(ids)
    assert not torch.equal(decided[0], decided[1])  # the caps differ, and so do the decisions


def _budget_oracle(policy, budget, logits, ids, weights, resident, scale=None):
    """resident-first under a page budget, written out row by row: rows' best picks and resident picks stay;
    the other picks the cap holds on non-resident experts stay by total routed weight (then lower id) while
    the budget lasts; the rest move (``reference.reroute``). ``scale`` [T, E]: each pick counts weight * scale
    and rows' best picks are ranked with the rest (--lynx-residency-output-norms)."""
    sel = reference.selection_score(ROUTER, logits.float(), None)
    votes = reference.vote(policy, ROUTER, logits.float(), ids, weights.float(), ids.shape[0], sel)
    picked = {int(e) for e in ids.flatten()}
    best = {int(ids[t, int(torch.argmax(sel[t, ids[t].long()]))]) for t in range(ids.shape[0])}
    fixed = {e for e in picked if resident[e]} | (best if scale is None else set())
    demand = {}
    for t in range(ids.shape[0]):
        for e, wt in zip(ids[t].tolist(), weights[t].tolist()):
            if scale is not None:
                wt = float(torch.tensor(wt, dtype=torch.float32) * scale[t, e])  # fp32, as the runtime multiplies
            demand[e] = demand.get(e, 0) + int(wt * reference.WEIGHT_SCALE + 0.5)
    held = sorted((e for e in picked if bool(votes.mandatory[e]) and e not in fixed and not resident[e]),
                  key=lambda e: (-demand[e], e))
    room = max(0, budget - sum(1 for e in fixed if not resident[e]))
    keep = torch.zeros(E, dtype=torch.bool)
    keep[sorted(fixed | set(held[:room]))] = True
    assert int(keep.sum()) >= policy.resolved_min_keep(ROUTER)  # the min_keep fallback is not exercised here
    return reference.reroute(ROUTER, logits.float(), ids, weights.float(), sel, votes.row_ok, keep)


@pytest.mark.parametrize("budget", [0, 3, 6])
def test_a_page_budget_bounds_each_step_and_trims_by_routed_weight(paged, budget):
    """Steps in time order on SGLang's residency: each step pages at most max(budget, its non-resident best
    picks) experts, its ids are the row-by-row oracle's, and the budget binds (it pages fewer than without)."""
    cap = 0.6
    layer = _paged_layer(paged, 0)
    dr = layer.quant_method.device_executor.residency
    opts = _options("prefer", residency_max_moved_weight=cap, residency_page_budget=budget)
    st, unbounded = _stage(opts, dr.expert_slot), _stage(_options("prefer", residency_max_moved_weight=cap),
                                                          dr.expert_slot)
    bound_binds = 0
    for step in range(16):
        out = _batch(100 + step)
        resident = dr.expert_slot >= 0
        ids, w = _run(st, out)
        want_ids, want_w, _ = _budget_oracle(LynxPolicy(max_moved_weight=cap), budget, out.router_logits,
                                             out.topk_ids, out.topk_weights, resident)
        assert torch.equal(ids, want_ids) and torch.equal(w, want_w.to(w.dtype)), step
        pages = {e for e in ids.flatten().tolist() if not resident[e]}
        best = {int(row[0]) for row in out.topk_ids}  # _batch's ids are sorted best first
        assert len(pages) <= max(budget, len({e for e in best if not resident[e]})), step
        free_ids, _ = _run(unbounded, out)
        bound_binds += len(pages) < len({e for e in free_ids.flatten().tolist() if not resident[e]})
        _eager_step(paged, layer, ids)
    assert bound_binds >= 8


def test_a_page_budget_of_every_expert_changes_nothing(paged):
    layer = _paged_layer(paged, 0)
    dr = layer.quant_method.device_executor.residency
    _eager_step(paged, layer, torch.tensor([[9, 17, 30, 2]]))
    with_budget = _stage(_options("prefer", residency_max_moved_weight=0.6, residency_page_budget=E), dr.expert_slot)
    without = _stage(_options("prefer", residency_max_moved_weight=0.6), dr.expert_slot)
    for seed in range(6):
        out = _batch(seed)
        a, b = _run(with_budget, out), _run(without, out)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_device_state_written_in_place_is_seen_without_a_replan(paged):
    """The decide kernel (GPU) writes expert_slot in place; any in-place write reaches the next step."""
    layer = _paged_layer(paged, 0)
    dr = layer.quant_method.device_executor.residency
    st = _stage(_options("prefer"), dr.expert_slot)
    selector = st.selector
    out = _batch(1)
    for resident in (torch.arange(E) < K, torch.arange(E) >= E - K, torch.zeros(E, dtype=torch.bool)):
        dr.expert_slot.fill_(-1)
        dr.expert_slot[resident] = torch.arange(int(resident.sum()), dtype=torch.int32)
        ids, w = _run(st, out)
        want_ids, want_w, _ = _prototype("prefer", LynxPolicy(), ROUTER, out.router_logits, out.topk_ids,
                                         out.topk_weights, resident)
        assert torch.equal(ids, want_ids) and torch.equal(w, want_w)
    assert st.selector is selector


@pytest.mark.parametrize("mode", ["keep", "prefer"])
def test_every_expert_resident_moves_nothing(paged, mode):
    layer = _paged_layer(paged, 0, num_slots=E)  # K = E: SGLang keeps every expert in a slot
    st = _stage(_options(mode, residency_max_moved_weight=0.6), layer.quant_method.device_executor.residency.expert_slot)
    for seed in range(4):
        out = _batch(seed)
        ids, w = _run(st, out)
        assert torch.equal(ids, out.topk_ids) and torch.equal(w, out.topk_weights)


@pytest.mark.parametrize("mode", ["keep", "prefer"])
def test_a_layer_that_is_not_paged_runs_plain_lynx_bit_for_bit(mode):
    plain = _stage(_options("off"))
    budget = {"residency_page_budget": 2} if mode == "prefer" else {}  # nor does a page budget
    aware = _stage(_options(mode, residency_max_moved_weight=0.6, **budget))  # the paged cap does not apply here
    assert aware.selector.residency is None
    changed = 0
    for seed in range(6):
        out = _batch(seed)
        a, b = _run(plain, out), _run(aware, out)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        changed += int((a[0] != out.topk_ids).any())
    assert changed  # lynx did move picks on these batches


def test_only_paged_layers_get_residency(paged):
    model = _Model([_paged_layer(paged, 1)])
    slots = res_mod.paged_expert_slots(model, _options("prefer"), [(0, ROUTER), (1, ROUTER)], torch.device("cpu"))
    assert list(slots) == [1]
    assert res_mod.paged_expert_slots(model, _options("off"), [(0, ROUTER), (1, ROUTER)], torch.device("cpu")) == {}


# ----------------------------------------------------------------------------- refusals


def test_refusals_at_start_up(paged):
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="no paged-experts MoE layer"):
        res_mod.paged_expert_slots(_Model([_MoE(0, torch.nn.Identity())]), _options("prefer"), [(0, ROUTER)], cpu)
    with pytest.raises(ConfigError, match="no device residency state"):  # CUDA graphs fully disabled
        res_mod.paged_expert_slots(_Model([_paged_layer(paged, 0, graphs=False)]), _options("keep"), [(0, ROUTER)], cpu)
    wrong = paged.DeviceResidency(num_experts=E + 4, num_slots=K, device="cpu")
    with pytest.raises(ConfigError, match=r"expected int32 \[32\]"):
        res_mod.paged_expert_slots(_Model([_paged_layer(paged, 0, num_experts=E + 4, device_residency=wrong)]),
                                   _options("prefer"), [(0, ROUTER)], cpu)
    layer = _paged_layer(paged, 0)
    layer.quant_method.device_executor.residency.expert_slot = torch.full((E,), -1, dtype=torch.int64)
    with pytest.raises(ConfigError, match="expected int32"):
        res_mod.paged_expert_slots(_Model([layer]), _options("prefer"), [(0, ROUTER)], cpu)
    with pytest.raises(ConfigError, match="share layer_id 0"):
        res_mod.paged_expert_slots(_Model([_paged_layer(paged, 0), _paged_layer(paged, 0)]), _options("prefer"),
                                   [(0, ROUTER)], cpu)


def test_cpu_server_residency_on_the_eager_executor_is_read(paged):
    """The CPU server (no CUDA graphs, so no device executor) gets a residency state on the eager executor from
    cpu/support.py: that one is read; with none there, the refusal stands."""
    layer = _paged_layer(paged, 0, graphs=False)
    dr = paged.DeviceResidency(num_experts=E, num_slots=K, device="cpu")
    layer.quant_method.executor.device_residency = dr
    slots = res_mod.paged_expert_slots(_Model([layer]), _options("prefer"), [(0, ROUTER)], torch.device("cpu"))
    assert slots[0] is dr.expert_slot
    _eager_step(paged, layer, torch.tensor([[20, 21, 22, 23]]))  # SGLang's run moves it in place
    assert set(torch.nonzero(slots[0] >= 0).flatten().tolist()) == {4, 5, 6, 7, 20, 21, 22, 23}


def test_selector_and_policy_refusals():
    slot = torch.full((E,), -1, dtype=torch.int32)
    with pytest.raises(ConfigError, match="torch backend only"):
        ExpertSelector(ROUTER, make_policy("lynx", residency="prefer"), 8, backend="triton", residency=slot)
    with pytest.raises(ConfigError, match="input of lynx with residency keep or prefer"):
        ExpertSelector(ROUTER, make_policy("lynx"), 8, residency=slot)
    with pytest.raises(ConfigError, match=r"expert_slot must be an int32 \(or int64\) \[32\]"):
        ExpertSelector(ROUTER, make_policy("lynx", residency="keep"), 8, residency=slot[:-1])
    with pytest.raises(ConfigError, match="residency must be one of"):
        make_policy("lynx", residency="always").validate(ROUTER, 8)
    with pytest.raises(ConfigError, match="applies only with residency"):
        make_policy("lynx", residency_max_moved_weight=0.5).validate(ROUTER, 8)
    for residency in ("off", "keep"):
        with pytest.raises(ConfigError, match="residency_page_budget applies only with residency prefer"):
            make_policy("lynx", residency=residency, residency_page_budget=4).validate(ROUTER, 8)
    for bad in (-1, E + 1, 2.5):
        with pytest.raises(ConfigError, match=r"residency_page_budget must be an int in \[0, 32\]"):
            make_policy("lynx", residency="prefer", residency_page_budget=bad).validate(ROUTER, 8)
    with pytest.raises(ConfigError, match="lynx_ep does not take residency"):
        make_policy("lynx_ep", residency="prefer").validate(ROUTER, 8)
    with pytest.raises(ValueError, match="resident is an input"):
        out = _batch(0)
        reference.select(make_policy("lynx"), ROUTER, out.router_logits, out.topk_ids, out.topk_weights,
                         resident=torch.ones(E, dtype=torch.bool))


def test_flags():
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(["--moe-backend", "lynx", "--lynx-residency", "prefer",
                              "--lynx-residency-max-moved-weight", "0.5", "--lynx-residency-page-budget", "12"])
    policy = options_from_args(args).make_policy()
    assert (policy.residency, policy.residency_max_moved_weight, policy.residency_page_budget) == ("prefer", 0.5, 12)
    assert policy.paged.residency_page_budget == 12
    assert policy.paged.max_moved_weight == 0.5 and policy.max_moved_weight == LynxPolicy().max_moved_weight
    assert options_from_args(parser.parse_args(["--moe-backend", "lynx"])).make_policy().residency == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["--lynx-residency", "always"])
    with pytest.raises(ConfigError, match="does not apply to --lynx-policy oea"):
        options_from_args(parser.parse_args(["--moe-backend", "lynx", "--lynx-policy", "oea",
                                             "--lynx-residency", "prefer"]))


# ----------------------------------------------------------------------------- CUDA-graph safety


@pytest.mark.parametrize("budget", [None, 3])
def test_decode_step_with_residency_needs_no_host(paged, budget):
    layer = _paged_layer(paged, 0)
    dr = layer.quant_method.device_executor.residency
    _eager_step(paged, layer, torch.tensor([[9, 17, 30, 2]]))  # some experts paged in, some evicted
    extra = {} if budget is None else {"residency_page_budget": budget}
    st = _stage(_options("prefer", residency_max_moved_weight=0.5, **extra), dr.expert_slot)
    out, num_valid = _batch(3), torch.tensor(T - 2)  # as SGLang passes it: a device tensor
    with published(DECODE):
        st(out, num_valid)  # warm-up (plan-time allocations)
        with OpAudit() as audit:
            got = st(out, num_valid)
    assert audit.findings == [], [(f.kind, f.op, f.where) for f in audit.findings]
    assert torch.equal(got.topk_ids[T - 2:], out.topk_ids[T - 2:])


# ----------------------------------------------------------------------------- through build_stages and TopK


def test_build_stages_pairs_each_topk_with_its_paged_layer(sglang_layers, paged):
    topks = [_topk(sglang_layers, i) for i in range(2)]
    moes = [_paged_layer(paged, i, num_experts=16, num_slots=4) for i in range(2)]
    opts = LynxOptions(moe_backend="lynx", policy="lynx", params={"residency": "prefer"}, max_batch=64)
    stages = stage_mod.build_stages(_Model([*topks, *moes]), SimpleNamespace(num_experts=16), opts)
    for st, moe in zip(stages, moes):
        assert st.selector.residency is moe.quant_method.device_executor.residency.expert_slot
    # Through SGLang's TopK forward (our hook) on a decode batch: the prototype's decision.
    x, z = torch.randn(12, 8), torch.randn(12, 16) * 3
    with published(DECODE):
        got = topks[0](x, z)
    w, ids = torch.softmax(z, -1).topk(4, -1)
    want_ids, _, _ = _prototype("prefer", LynxPolicy(), RouterSpec(16, 4), z, ids.to(torch.int32),
                                w / w.sum(-1, keepdim=True), torch.arange(16) < 4)
    assert torch.equal(got.topk_ids, want_ids)
    with pytest.raises(ConfigError, match="no paged-experts MoE layer"):
        stage_mod.build_stages(_Model([_topk(sglang_layers, 0)]), SimpleNamespace(num_experts=16), opts)


def test_page_budget_trims_by_demand_with_ties_to_the_lower_id():
    """within_page_budget on hand-made sets: fixed experts stay, the rest by demand, equal demand to the lower id."""
    def mask(ids):
        m = torch.zeros(8, dtype=torch.bool)
        m[list(ids)] = True
        return m

    keep, fixed, resident = mask({0, 1, 3, 4, 5, 6}), mask({0, 1}), mask({0})
    demand = torch.tensor([9, 9, 0, 7, 7, 7, 2, 0])
    # Budget 3: expert 1 (fixed, not resident) takes one; 3 and 4 win the tie at demand 7 over 5; 6 loses.
    assert torch.equal(reference.within_page_budget(3, keep, fixed, resident, demand), mask({0, 1, 3, 4}))
    # Budget 0: the fixed set alone (it may exceed the budget); a large budget keeps everything.
    assert torch.equal(reference.within_page_budget(0, keep, fixed, resident, demand), fixed)
    assert torch.equal(reference.within_page_budget(8, keep, fixed, resident, demand), keep)
