"""Expert-parallel dispatch + expert compute + combine on real gloo process groups (EP = 2 and 4).

Every rank builds the same global batch, selects on it (as every TP rank does
in SGLang), dispatches the rows it owns through ``AllToAllDispatcher`` and runs
its local experts; the rows gathered from all ranks must equal the
single-process MoE on the whole batch.
"""

from __future__ import annotations

import pytest
import torch

from lynx_sglang import RouterSpec, make_policy
from lynx_sglang.runtime.selection import reference
from lynx_sglang.runtime.selection.config import ConfigError
from lynx_sglang.runtime.expert_parallel import ExpertPlacement, capacity_bytes, home_rank, owned_rows, step_traffic
from lynx_sglang.runtime.expert_parallel.dispatch import AllToAllDispatcher
from lynx_sglang.ep_oracle import ExpertWeights, ep_moe_forward, moe_reference
from lynx_sglang.local_group import run_group
from lynx_sglang.runtime.expert_parallel.rank_aware import select_rank_aware
from lynx_sglang.synthetic import random_logits, route

E, K, D, F = 16, 4, 32, 24
POLICIES = {
    "off": {},
    "lynx": {},
    "lynx_uncapped": {"alpha": 1.0, "max_moved_weight": 1.0},
    "oea": {},
    "budget": {"max_experts": 6},
    "lynx_ep": {},
}


def make_case(T: int, routing: str, policy: str, seed: int, world: int = 1):
    """The global batch of one case, after selection: (hidden, logical ids, weights)."""
    g = torch.Generator().manual_seed(seed)
    router = RouterSpec(E, K)
    if routing == "one_rank":  # every token's picks on rank 0's experts
        logits = random_logits(T, E, generator=g)
        logits[:, E // 4:] -= 100.0
    else:
        logits = random_logits(T, E, skew=3.0 if routing == "skewed" else 0.0, generator=g)
    batch = route(router, logits)
    name = "lynx" if policy == "lynx_uncapped" else policy
    if policy == "lynx_ep":  # rank-aware: needs the placement and each row's home rank
        mask = ExpertPlacement.contiguous(E, world).logical_on_rank()
        ids, w, _, _ = select_rank_aware(make_policy("lynx_ep"), router, batch.logits, batch.topk_ids,
                                         batch.topk_weights, mask, home=home_rank(T, world))
    else:
        ids, w, _ = reference.select(make_policy(name, **POLICIES[policy]), router, batch.logits, batch.topk_ids,
                                     batch.topk_weights)
    hidden = torch.randn(T, D, generator=g)
    return hidden, ids, w


def to_physical(ids: torch.Tensor, placement: ExpertPlacement) -> torch.Tensor:
    """Logical -> physical ids, replica chosen by row (as SGLang's dynamic EPLB dispatch does)."""
    table = [[p for p in range(placement.num_physical) if int(placement.logical_of[p]) == e]
             for e in range(placement.num_logical)]
    rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)
    out = [[table[e][r % len(table[e])] if e >= 0 else -1 for e, r in zip(er, rr)]
           for er, rr in zip(ids.tolist(), rows.tolist())]
    return torch.tensor(out, dtype=ids.dtype).reshape(ids.shape)


def placement_for(kind: str, world: int) -> ExpertPlacement:
    if kind == "contiguous":
        return ExpertPlacement.contiguous(E, world)
    # Redundant experts: 16 logical + 4 replicas of the first four (20 or 24 slots, divisible by the world).
    extra = 4 if world in (2, 4) else world
    p2l = torch.cat([torch.arange(E), torch.arange(extra)])
    return ExpertPlacement.from_physical_map(p2l, world, E)


CASES = [
    # (tokens, routing, policy, placement, mode, dtype)
    *[(24, r, p, "contiguous", "variable", "float32") for r in ("skewed", "uniform") for p in POLICIES],
    (24, "skewed", "lynx", "replicated", "variable", "float32"),
    (24, "skewed", "lynx", "contiguous", "capacity", "float32"),
    (23, "uniform", "off", "replicated", "capacity", "float32"),
    (7, "skewed", "lynx", "contiguous", "variable", "float32"),  # uneven shares
    (2, "uniform", "off", "contiguous", "variable", "float32"),  # ranks without tokens
    (1, "skewed", "lynx", "contiguous", "capacity", "float32"),  # T = 1
    (0, "skewed", "lynx", "contiguous", "variable", "float32"),  # nobody has tokens
    (16, "one_rank", "off", "contiguous", "variable", "float32"),  # all tokens on one rank's experts
    (16, "one_rank", "lynx", "contiguous", "capacity", "float32"),
    (24, "skewed", "lynx", "contiguous", "variable", "bfloat16"),
]


def _run_cases(rank: int, world: int, cases: list) -> list:
    experts = ExpertWeights.random(E, D, F, seed=1)
    outs = []
    for i, (T, routing, policy, kind, mode, dtype) in enumerate(cases):
        placement = placement_for(kind, world)
        hidden, ids, w = make_case(T, routing, policy, seed=100 + i, world=world)
        hidden = hidden.to(getattr(torch, dtype))
        phys = to_physical(ids, placement)
        lo, hi = owned_rows(T, world, rank)
        cap = max(1, -(-T // world))
        disp = AllToAllDispatcher(placement, rank)
        outs.append(ep_moe_forward(disp, experts, hidden[lo:hi], phys[lo:hi], w[lo:hi],
                                   capacity=cap if mode == "capacity" else None))
    return outs


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_compute_combine_equals_single_process(world):
    per_rank = run_group(_run_cases, world, CASES)
    experts = ExpertWeights.random(E, D, F, seed=1)
    for i, (T, routing, policy, kind, mode, dtype) in enumerate(CASES):
        hidden, ids, w = make_case(T, routing, policy, seed=100 + i, world=world)
        hidden = hidden.to(getattr(torch, dtype))
        expected = moe_reference(hidden, ids.long(), w, experts)
        got = torch.cat([per_rank[r][i] for r in range(world)])
        assert got.shape == expected.shape, CASES[i]
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == "bfloat16" else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, expected, **tol, msg=lambda m: f"case {CASES[i]}: {m}")
        if T:
            assert expected.abs().sum() > 0  # the case really computed something


def _mismatched_world(rank, world):
    try:
        AllToAllDispatcher(ExpertPlacement.contiguous(E, 2 * world), rank)
    except ConfigError as e:
        return str(e)
    return None


def test_dispatcher_refuses_a_placement_for_another_world():
    msgs = run_group(_mismatched_world, 2)
    assert all(m and "placement is for 4 ranks but the group has 2" in m for m in msgs)


def test_traffic_counts_remote_transfers_only():
    placement = ExpertPlacement.contiguous(8, 4)  # two experts per rank
    ids = torch.tensor([[0, 1], [0, 2], [6, 7], [-1, 4]])
    home = home_rank(4, 4)  # one row per rank
    t = step_traffic(ids, placement, home, hidden_size=10, activation_bytes=2)
    # row0 on rank0 only (home): 0 transfers; row1 -> rank1 home, picks on ranks 0,1: 1; row2 home 2 -> rank 3: 1;
    # row3 home 3 -> rank 2: 1
    assert int(t.dispatch_bytes) == 3 * (10 * 2 + 2 * 8)
    assert int(t.combine_bytes) == 3 * 20
    assert t.rank_tokens.tolist() == [2, 1, 1, 1]
    assert t.rank_experts.tolist() == [2, 1, 1, 2]  # {0,1}, {2}, {4}, {6,7}
    assert capacity_bytes(1, 4, 10, 2, 2) == 12 * (36 + 20)


def test_step_accounting_by_phase():
    """The SGLang dispatcher's per-step vector (``A2ATotals``): decode steps whole, mixed steps by their
    decode rows only; other phases are not accounted."""
    from lynx_sglang.runtime.expert_parallel.accounting import A2ATotals
    from lynx_sglang.runtime.sglang.a2a_dispatcher import account
    from lynx_sglang.runtime.sglang.phase import DECODE, IDLE, mixed

    placement = ExpertPlacement.contiguous(8, 4)
    ids = torch.tensor([[0, 1], [0, 2], [6, 7], [-1, 4]])
    assert A2ATotals.size(4) == len(A2ATotals.Field) + 2 * 4
    decode = A2ATotals.as_dict(A2ATotals.step(ids, placement, DECODE.first_decode_row(4), 10, 2).tolist(), 4)
    assert decode == {"steps": 1, "dispatch_bytes": 3 * 36, "combine_bytes": 3 * 20, "busiest_rank_experts": 2,
                      "busiest_rank_tokens": 2, "mixed_steps": 0, "rank_experts": [2, 1, 1, 2],
                      "rank_tokens": [2, 1, 1, 1]}
    # Mixed: the first two rows are extend rows; the decode rows 2, 3 (homes 2, 3) cost one transfer each.
    want_mixed = {"steps": 1, "dispatch_bytes": 2 * 36, "combine_bytes": 2 * 20, "busiest_rank_experts": 2,
                  "busiest_rank_tokens": 1, "mixed_steps": 1, "rank_experts": [0, 0, 1, 2], "rank_tokens": [0, 0, 1, 1]}
    assert A2ATotals.as_dict(A2ATotals.step(ids, placement, mixed(2).first_decode_row(4), 10, 2).tolist(), 4) == want_mixed
    # The dispatcher's in-place accumulation by phase: decode + mixed add up, None / idle add nothing.
    totals = torch.zeros(A2ATotals.size(4), dtype=torch.int64)
    for phase in (DECODE, mixed(2), None, IDLE):
        account(totals, phase, ids, placement, 10, 2)
    got = A2ATotals.as_dict(totals.tolist(), 4)
    assert got["steps"] == 2 and got["mixed_steps"] == 1
    assert got["dispatch_bytes"] == decode["dispatch_bytes"] + want_mixed["dispatch_bytes"]
    assert got["rank_tokens"] == [2, 1, 2, 2]
    with pytest.raises(ValueError, match="4 ranks"):
        A2ATotals.as_dict(totals.tolist()[:-1], 4)
