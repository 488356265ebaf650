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
