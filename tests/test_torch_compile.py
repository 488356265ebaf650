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


def test_compile_step_serves_every_batch_size_without_recompiling_and_matches_eager():
    """--lynx-torch-compile (CPU servers): compiled once at plan time for every shape class a server sends
    (T = 1 and T >= 2; num_valid None or a tensor), leaves the statistics alone, then agrees with eager:
    ids and statistics exactly, weights to float rounding (inductor fuses the float ops)."""
    from torch._dynamo.utils import counters

    router = RouterSpec(16, 4, 1)
    g = torch.Generator().manual_seed(3)
    sim = torch.rand(16, 16, generator=g)
    sim = ((sim + sim.T) / 2).fill_diagonal_(1.0)
    policy = make_policy("lynx", refill_similarity=8.0)  # the CPU server's default rule
    fast = ExpertSelector(router, policy, 64, backend="torch", similarity=sim)
    eager = ExpertSelector(router, policy, 64, backend="torch", similarity=sim)
    fast.compile_step()
    assert fast.stats() == eager.stats() and fast.stats().steps == 0  # compiling counted nothing
    graphs = counters["stats"]["unique_graphs"]
    changed = 0
    for T in (1, 3, 16, 64):
        batch = route(router, random_logits(T, 16, scale=2.0, generator=g))
        for nv in (None, torch.tensor(max(T - 1, 0))):
            ids, w = [t.clone() for t in fast.run(batch.logits, batch.topk_ids, batch.topk_weights, nv)]
            want_ids, want_w = eager.run(batch.logits, batch.topk_ids, batch.topk_weights, nv)
            assert torch.equal(ids, want_ids)
            torch.testing.assert_close(w, want_w)
            changed += int((ids != batch.topk_ids).any(dim=1).sum())
    assert counters["stats"]["unique_graphs"] == graphs, "a batch size recompiled after compile_step"
    assert fast.stats() == eager.stats() and changed > 0


def test_a_step_that_cannot_compile_is_refused_and_the_stage_runs_eager(monkeypatch, caplog):
    """No C++ compiler (or any inductor failure) must not stop a server: compile_step raises with the cause,
    the stage logs it once and keeps the eager step, which still selects."""
    import logging
    from types import SimpleNamespace

    from lynx_sglang.runtime.sglang.options import LynxOptions
    from lynx_sglang.runtime.sglang.stage import TopKSelectionStage

    def broken(fn, **kw):
        def call(*a, **k):
            raise OSError("no C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    router = RouterSpec(16, 4)
    sel = ExpertSelector(router, make_policy("lynx"), 8, backend="torch")
    try:
        sel.compile_step()
        raise AssertionError("compile_step returned")
    except RuntimeError as e:
        assert "no C++ compiler" in str(e)
    opts = LynxOptions(moe_backend="lynx", max_batch=64, torch_compile=True)
    out_type = SimpleNamespace  # stands in for SGLang's StandardTopKOutput (not used before a step)
    with caplog.at_level(logging.WARNING):
        stage = TopKSelectionStage(0, router, opts, torch.device("cpu"), None, output_type=out_type)
    assert sum("runs the step eagerly" in r.getMessage() for r in caplog.records) == 1
    batch = route(router, random_logits(16, 16, scale=2.0, generator=torch.Generator().manual_seed(4)))
    assert stage.selector.ids_dtype == torch.int64  # what the CPU server's top-k hands over (no re-plan)
    ids, _ = stage.selector.run(batch.logits, batch.topk_ids.long(), batch.topk_weights)
    assert stage.selector._run.__func__ is ExpertSelector._run and not torch.equal(ids, batch.topk_ids.long())
