"""lynx's ``keep_top``: every voting row keeps its best picks by rank, on top of the moved-weight cap.

The oracle is written from the description (config.LynxPolicy, docs/policies.md) in plain Python: a voting
row's ``keep_top`` best picks (highest score, ties to the lower id) are never moved, and the kept set is lynx's
kept set without ``keep_top`` plus those picks. Both backends are checked against it.
"""

from __future__ import annotations

import pytest
import torch

from checks import assert_contract, pick_ranks, voting_rows
from test_kernels import both
from test_sglang_hooks import _parse, sglang_layers  # noqa: F401  (module fixture)
from lynx_sglang import ConfigError, ExpertSelector, RouterSpec, make_policy
from lynx_sglang.runtime.selection import reference
from lynx_sglang.synthetic import random_logits, route


def _batch(router, T, seed, bad_row=None):
    g = torch.Generator().manual_seed(seed)
    batch = route(router, random_logits(T, router.num_experts, skew=1.0, generator=g))
    if bad_row is not None:  # a row that must not vote: its picks are then free to be anything
        batch.logits[bad_row, 0] = float("nan")
    return batch


def _kept(router, policy, batch, num_valid):
    votes = reference.vote(policy, router, batch.logits, batch.topk_ids, batch.topk_weights, num_valid,
                           reference.selection_score(router, batch.logits, None))
    return reference.keep_set(policy, router, votes)


@pytest.mark.parametrize("keep_top", [1, 2, 3])
@pytest.mark.parametrize("cap", [0.35, 1.0])
def test_each_voting_row_keeps_its_best_picks_and_nothing_else_changes(keep_top, cap):
    router = RouterSpec(32, 8)
    T, num_valid = 24, 21  # three padding rows, and one NaN row below num_valid
    batch = _batch(router, T, seed=7 + keep_top, bad_row=5)
    plain = make_policy("lynx", max_moved_weight=cap, keep_top=0)
    policy = make_policy("lynx", max_moved_weight=cap, keep_top=keep_top)
    sel = ExpertSelector(router, policy, T, "cpu", batch.topk_ids.dtype, batch.topk_weights.dtype, backend="torch")
    ids, w = sel.run(batch.logits, batch.topk_ids, batch.topk_weights, num_valid)
    assert_contract(router, policy, batch.logits, batch.topk_ids, batch.topk_weights, num_valid, None, ids, w)

    ok = voting_rows(router, batch.logits, batch.topk_ids, batch.topk_weights, num_valid)
    ranks = pick_ranks(router, batch.logits, batch.topk_ids, None, ok)
    guaranteed = set()
    for t in range(T):
        if not ok[t]:
            continue
        best = {int(e) for e, r in zip(batch.topk_ids[t, :8].tolist(), ranks[t].tolist()) if r < keep_top}
        assert best <= set(ids[t, :8].tolist()), (t, best)
        guaranteed |= best
    # The kept set is lynx's own plus the guaranteed picks, exactly.
    want = _kept(router, plain, batch, num_valid).clone()
    want[sorted(guaranteed)] = True
    assert torch.equal(_kept(router, policy, batch, num_valid), want)
    # keep_top 1 changes nothing under keep_level 0 (a row's best pick already votes at level 0). Without a cap
    # the guarantee bites from 2 on: without it some row loses one of those picks.
    ids0, _ = ExpertSelector(router, plain, T, "cpu", batch.topk_ids.dtype, batch.topk_weights.dtype,
                             backend="torch").run(batch.logits, batch.topk_ids, batch.topk_weights, num_valid)
    if keep_top == 1:
        assert torch.equal(ids0, ids)
    elif cap == 1.0:
        assert not torch.equal(ids0, ids)


@pytest.mark.parametrize("E,k,T", [(64, 8, 48), (128, 8, 256), (32, 4, 33)])
def test_the_kernels_agree_with_the_reference(E, k, T, device):
    router = RouterSpec(E, k)
    batch = _batch(router, T, seed=E + T)
    policy = make_policy("lynx", max_moved_weight=0.7, keep_top=2)
    (ri, rw, rs), (ki, kw, ks) = both(router, policy, batch, T - 1, device)
    assert torch.equal(ki, ri)
    torch.testing.assert_close(kw, rw, rtol=1e-5, atol=1e-6)
    assert ks == rs and rs.rows_changed > 0


@pytest.mark.parametrize("k,same_as", [(8, 2), (4, 0), (6, 0), (2, 0)])
def test_the_default_keeps_a_quarter_of_each_tokens_picks(k, same_as):
    """keep_top None resolves to top_k // 4: at k = 8 the default decides as keep_top 2; below, as no
    guarantee (1 changes nothing at keep_level 0, where a row's best pick votes anyway)."""
    router = RouterSpec(32, k)
    assert make_policy("lynx").resolved_keep_top(router) == k // 4
    batch = _batch(router, 40, seed=k)
    out = {}
    for name, policy in (("default", make_policy("lynx", max_moved_weight=1.0)),
                         ("explicit", make_policy("lynx", max_moved_weight=1.0, keep_top=same_as)),
                         ("other", make_policy("lynx", max_moved_weight=1.0, keep_top=2 - same_as))):
        sel = ExpertSelector(router, policy, 40, "cpu", batch.topk_ids.dtype, batch.topk_weights.dtype,
                             backend="torch")
        out[name] = sel.run(batch.logits, batch.topk_ids, batch.topk_weights, 40)[0].clone()
    assert torch.equal(out["default"], out["explicit"])
    assert not torch.equal(out["default"], out["other"])


def test_bad_settings_are_refused():
    router = RouterSpec(16, 4)
    with pytest.raises(ConfigError, match="keep_top"):
        make_policy("lynx", keep_top=5).validate(router, 64)
    with pytest.raises(ConfigError, match="keep_top"):
        make_policy("lynx", keep_top=-1).validate(router, 64)
    with pytest.raises(ConfigError, match="lynx_ep does not take keep_top"):
        make_policy("lynx_ep", keep_top=1).validate(router, 64)
    make_policy("lynx", keep_top=4).validate(router, 64)  # every pick kept: allowed (nothing moves)
    make_policy("lynx_ep").validate(router, 64)  # lynx_ep's own default: no rank guarantee


def test_the_flag_reaches_workers_and_a_bad_value_is_refused(sglang_layers, monkeypatch):
    from sglang.srt.server_args import ServerArgs

    from lynx_sglang.runtime.sglang.options import ENV_VAR, LynxOptions

    monkeypatch.delenv(ENV_VAR, raising=False)
    ServerArgs.from_cli_args(_parse(["--moe-backend", "lynx", "--lynx-keep-top", "2"]))
    opts = LynxOptions.from_env()
    assert opts.params == {"keep_top": 2} and opts.make_policy().keep_top == 2
    with pytest.raises(ConfigError, match="keep_top"):
        ServerArgs.from_cli_args(_parse(["--moe-backend", "lynx", "--lynx-keep-top", "-1"]))
