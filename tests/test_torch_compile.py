"""--enable-torch-compile traces the selection stage: it must compile without graph breaks and agree with eager."""

import torch

from lynx_sglang import ExpertSelector, RouterSpec, make_policy
from lynx_sglang.synthetic import random_logits, route


def test_selector_compiles_in_one_graph_and_matches_eager():
    router = RouterSpec(16, 4, 1)
    sel = ExpertSelector(router, make_policy("lynx", keep_level=0), 64, backend="torch")
    batch = route(router, random_logits(32, 16, generator=torch.Generator().manual_seed(0)))
    nv = torch.tensor(30)
    want = [t.clone() for t in sel.run(batch.logits, batch.topk_ids, batch.topk_weights, nv)]
    compiled = torch.compile(lambda z, i, w, n: sel.run(z, i, w, n), fullgraph=True)
    ids, w = compiled(batch.logits, batch.topk_ids, batch.topk_weights, nv)
    assert torch.equal(ids, want[0])
    torch.testing.assert_close(w, want[1])
    assert not torch.equal(ids, batch.topk_ids)


def test_rank_aware_selector_compiles_in_one_graph_and_matches_eager():
    """lynx_ep runs the torch path on GPUs too: one graph (no host sync) is what CUDA-graph capture needs."""
    from lynx_sglang.runtime.expert_parallel import ExpertPlacement, RankAwareSelector, home_rank

    router = RouterSpec(32, 4)
    mask = ExpertPlacement.contiguous(32, 4).logical_on_rank()
    sel = RankAwareSelector(router, make_policy("lynx_ep"), 64, backend="torch", rank_mask=mask)
    batch = route(router, random_logits(64, 32, scale=2.0, skew=1.5, generator=torch.Generator().manual_seed(1)))
    nv, home = torch.tensor(60), home_rank(64, 4)
    want = [t.clone() for t in sel.run(batch.logits, batch.topk_ids, batch.topk_weights, nv, home=home)]
    want_rank = sel.last_slot_rank.clone()
    compiled = torch.compile(lambda z, i, w, n, h: sel.run(z, i, w, n, home=h), fullgraph=True)
    ids, w = compiled(batch.logits, batch.topk_ids, batch.topk_weights, nv, home)
    assert torch.equal(ids, want[0]) and torch.equal(sel.last_slot_rank, want_rank)
    torch.testing.assert_close(w, want[1])
    assert not torch.equal(ids, batch.topk_ids)
