"""Routing statistics tool (lynx_sglang.routing_stats) on the tiny random Qwen3-MoE model."""

import json
from pathlib import Path

import pytest
import torch

from lynx_sglang import routing_stats as rs
from lynx_sglang.corpus import DOMAINS

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "models" / "tiny-qwen3-moe"
WINDOW, PREFIX, MAX_WINDOWS = 160, 16, 40  # 40 windows per domain: enough for B=32 one-domain batches


@pytest.fixture(scope="module")
def tiny():
    """Model shape, routing facts and a trace of the tiny model on a slice of the held-out corpus."""
    model, tokenizer, E, k = rs.load_model(TINY)
    windows, sizes = rs.heldout_windows(tokenizer, rs.HELDOUT, WINDOW, MAX_WINDOWS)
    positions = PREFIX + torch.randint(0, WINDOW - PREFIX, (8,), generator=torch.Generator().manual_seed(1))
    routing = rs.collect(model, windows, E, k, PREFIX, trace_positions=positions)
    trace = rs.build_trace(routing, str(TINY), num_batches=8, batch=32)
    return {"E": E, "k": k, "windows": windows, "sizes": sizes, "routing": routing, "trace": trace}


def test_shape_and_coverage(tiny):
    assert (tiny["E"], tiny["k"]) == (16, 4)
    r = tiny["routing"]
    assert r.num_layers == 2 and r.domains == list(DOMAINS)
    for d, ids in r.ids[0].items():
        assert ids.shape == (tiny["windows"][d].shape[0], WINDOW - PREFIX, 4)
        assert int(ids.min()) >= 0 and int(ids.max()) < 16
        # A token's picks are distinct experts.
        assert (ids.sort(dim=-1).values.diff(dim=-1) > 0).all()


@pytest.mark.parametrize("kind", rs.KINDS)
def test_distinct_bounds(tiny, kind):
    """B=1 gives exactly k; no batch ever exceeds min(E, k*B) (checked batch by batch)."""
    E, k = tiny["E"], tiny["k"]
    gen = torch.Generator().manual_seed(0)
    for layer_ids in tiny["routing"].ids:
        for B in rs.BATCH_SIZES:
            batches = rs.sample_batches(layer_ids, kind, B, 64, gen)
            if B <= 32:
                assert batches, f"{kind} B={B} should fit the test data"
            for b in batches.values():
                assert b.shape == (64, B, k)
                n = rs.distinct_count(b, E)
                if B == 1:
                    assert (n == k).all()
                assert (n >= k).all() and (n <= min(E, k * B)).all()


def test_distinct_experts_report(tiny):
    E, k = tiny["E"], tiny["k"]
    out = rs.distinct_experts(tiny["routing"].ids[0], E, k, num_batches=32)
    for kind in rs.KINDS:
        assert out[kind]["1"]["mean"] == k and out[kind]["1"]["std"] == 0
        for B, v in out[kind].items():
            assert k <= v["mean"] <= min(E, k * int(B))
    # Too few windows for one-domain batches of 64 (40 per domain): skipped, not faked.
    assert "64" not in out["independent_domain"]
    assert "128" in out["contiguous"] and "128" in out["independent_mixed"]


def test_uniform_formula():
    assert rs.uniform_distinct(16, 4, 1) == pytest.approx(4)
    assert rs.uniform_distinct(128, 8, 2) == pytest.approx(8 + 8 * (1 - 8 / 128))
    assert rs.uniform_distinct(32, 4, 10_000) == pytest.approx(32)
    # Monte Carlo: B tokens each picking k of E uniformly without replacement.
    gen = torch.Generator().manual_seed(0)
    E, k, B, n = 32, 4, 8, 4000
    ids = torch.rand(n, B, E, generator=gen).argsort(dim=-1)[..., :k]
    mc = float(rs.distinct_count(ids, E).mean())
    assert mc == pytest.approx(rs.uniform_distinct(E, k, B), abs=0.15)


def test_load_balance(tiny):
    E = tiny["E"]
    for layer_ids in tiny["routing"].ids:
        allb = rs.load_balance(torch.cat([x.reshape(-1) for x in layer_ids.values()]), E)
        assert sum(allb["shares"]) == pytest.approx(1.0, abs=1e-4)
        assert allb["slots"] == sum(x.numel() for x in layer_ids.values())
        assert allb["max_over_mean"] >= 1.0 >= allb["min_over_mean"]
        for x in layer_ids.values():
            assert sum(rs.load_balance(x, E)["shares"]) == pytest.approx(1.0, abs=1e-4)
    dead = rs.load_balance(torch.tensor([[0, 1], [1, 2]]), 4)
    assert dead["dead"] == 1 and dead["min_over_mean"] == 0 and dead["shares"] == [0.25, 0.5, 0.25, 0.0]


def test_confidence(tiny):
    r = tiny["routing"]
    c = rs.confidence(r.gap[0], r.top1[0], r.mass[0])
    gap = c["top1_minus_top2_logit"]["all"]
    assert 0 <= gap["q01"] <= gap["q50"] <= gap["q99"]
    assert 1 / 16 <= c["top1_prob"]["all"]["q01"] and c["topk_mass"]["all"]["q99"] <= 1.0
    assert c["top1_prob"]["all"]["mean"] <= c["topk_mass"]["all"]["mean"]
    assert sum(c["top1_prob"]["histogram"]["counts"]) == sum(x.numel() for x in r.top1[0].values())
    # The summaries are of the collected values: the median gap, and each domain's mean top-1 probability.
    all_gap = torch.cat(list(r.gap[0].values())).double()
    assert gap["q50"] == pytest.approx(float(torch.quantile(all_gap, 0.5)), abs=1e-4)
    for d, v in r.top1[0].items():
        assert c["top1_prob"]["per_domain"][d]["mean"] == pytest.approx(float(v.double().mean()), abs=1e-4)
    # The three measures come from the same tokens' logits: p1/p2 = exp(gap), so p1 <= 1/(1+exp(-gap));
    # top-k mass >= top-1 probability. A gap or probability taken on the wrong axis or token breaks this.
    for d in r.gap[0]:
        g, p1, m = r.gap[0][d].double(), r.top1[0][d].double(), r.mass[0][d].double()
        assert g.shape == p1.shape == m.shape
        assert (p1 <= torch.sigmoid(g) + 1e-3).all() and (m >= p1 - 1e-6).all()


def test_trace_round_trip(tiny, tmp_path):
    trace = tiny["trace"]
    path = tmp_path / "trace.pt"
    torch.save(trace, path)
    assert path.stat().st_size < 5e6
    back = rs.load_trace(path)
    assert {k: back[k] for k in ("num_experts", "top_k", "num_layers", "domains")} == {
        "num_experts": 16, "top_k": 4, "num_layers": 2, "domains": list(DOMAINS)}
    for kind in rs.TRACE_KINDS:
        for key, value in trace["kinds"][kind].items():
            assert torch.equal(back["kinds"][kind][key], value)
        assert back["kinds"][kind]["logits"].shape == (2, 8, 32, 16)
        assert back["kinds"][kind]["logits"].dtype == torch.float16
    dom = back["kinds"]["independent_domain"]["domain"]
    assert (dom == dom[:, :1]).all()  # one domain per batch
    # The trace holds the model's logits at the recorded (domain, window, position).
    r = tiny["routing"]
    rec = back["kinds"]["independent_mixed"]
    b, j = 3, 5
    d = back["domains"][int(rec["domain"][b, j])]
    assert torch.equal(rec["logits"][1, b, j], r.trace_logits[1][d][int(rec["window"][b, j]), b])
    torch.save({"not": "a trace"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError):
        rs.load_trace(tmp_path / "bad.pt")


@pytest.mark.parametrize("kind", rs.TRACE_KINDS)
def test_scaled_logits_recorded_shape(tiny, kind):
    """At the recorded E the rows are recorded rows, unchanged and not repeated."""
    trace = tiny["trace"]
    pool = trace["kinds"][kind]["logits"][1].float().reshape(-1, 16)
    out = rs.scaled_logits(trace, 1, 16, 4, 24, torch.Generator().manual_seed(0), kind=kind)
    assert out.shape == (24, 16) and out.dtype == torch.float32
    match = (out[:, None, :] == pool[None]).all(dim=-1)  # [24, rows]
    assert match.any(dim=1).all()
    assert len({int(m.nonzero()[0]) for m in match}) == 24
    if kind == "independent_domain":
        doms = trace["kinds"][kind]["domain"].reshape(-1)[match.float().argmax(dim=1)]
        assert (doms == doms[0]).all()


@pytest.mark.parametrize("num_experts,top_k", [(64, 8), (128, 8), (40, 6)])
def test_scaled_logits_larger(tiny, num_experts, top_k):
    trace = tiny["trace"]
    gen = torch.Generator().manual_seed(0)
    recorded = trace["kinds"]["independent_mixed"]["logits"][0].float().reshape(-1, 16)
    rec_sorted = recorded.sort(dim=1, descending=True).values
    for B in (1, 8, 32, 128):
        z = rs.scaled_logits(trace, 0, num_experts, top_k, B, gen)
        assert z.shape == (B, num_experts) and torch.isfinite(z).all()
        n = float(rs.distinct_count(z.topk(top_k, dim=1).indices[None], num_experts)[0])
        assert top_k <= n <= min(num_experts, top_k * B)
        if B == 1:
            assert n == top_k
        # The head of every row is a recorded row's head: top-1 gaps and pick affinities carry over.
        s = z.sort(dim=1, descending=True).values
        head = (s[:, None, :top_k] == rec_sorted[None, :, :top_k]).all(dim=-1)
        assert head.any(dim=1).all()
        # The tail stays within the recorded range of that row.
        assert (s[:, -1:] >= rec_sorted[:, -1].min()).all()
    # Many rows: the batch uses well more than k experts but (with skew) not more than uniform allows.
    z = rs.scaled_logits(trace, 0, num_experts, top_k, 128, gen)
    n = float(rs.distinct_count(z.topk(top_k, dim=1).indices[None], num_experts)[0])
    assert 2 * top_k < n <= num_experts


def test_scaled_logits_errors(tiny):
    trace = tiny["trace"]
    with pytest.raises(ValueError):
        rs.scaled_logits(trace, 0, 8, 2, 4)  # fewer experts than recorded
    with pytest.raises(ValueError):
        rs.scaled_logits(trace, 0, 128, 16, 4)  # top_k not below the recorded E
    with pytest.raises(ValueError):
        rs.scaled_logits(trace, 0, 128, 8, 4, kind="contiguous")


def test_not_moe(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(rs.NotMoEError, match="not a Mixture-of-Experts"):
        rs.moe_shape(config)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(rs.NotMoEError):
        rs.load_model(tmp_path / "llama")
    with pytest.raises(rs.NotMoEError):
        rs.main([str(tmp_path / "llama"), "--out", str(tmp_path / "x")])


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "routing_stats_tiny"
    rs.main([str(TINY), "--out", str(out), "--max-windows", "12", "--batches", "16",
             "--trace", str(tmp_path / "trace.pt"), "--trace-batches", "4", "--trace-batch-size", "8"])
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert (result["num_experts"], result["top_k"], result["num_moe_layers"]) == (16, 4, 2)
    assert set(result["tokens"]) == set(DOMAINS)
    assert all(t["counted_tokens"] == 12 * (160 - 16) for t in result["tokens"].values())
    assert result["versions"]["torch"] == torch.__version__
    layer = result["layers"][0]
    assert set(layer) == {"moe_layer", "balance", "distinct_experts", "confidence"}
    assert layer["distinct_experts"]["uniform"]["32"] == pytest.approx(rs.uniform_distinct(16, 4, 32), abs=1e-3)
    assert len(result["summary"]["layers"]) == 2
    trace = rs.load_trace(tmp_path / "trace.pt")
    assert trace["kinds"]["independent_mixed"]["logits"].shape == (2, 4, 8, 16)


# --------------------------------------------------------------------------- glm4_moe: the model's own routing

GLM4 = REPO / "models" / "trained-glm4-moe"


@pytest.fixture(scope="module")
def glm4():
    """The bundled glm4_moe model on 32 windows per domain, with its routers' own picks hooked alongside."""
    from lynx_sglang.model_routing import moe_blocks

    model, tokenizer, E, k = rs.load_model(GLM4)
    windows, _ = rs.heldout_windows(tokenizer, rs.HELDOUT, WINDOW, 32)
    blocks = moe_blocks(model)
    calls = [[] for _ in blocks]
    hooks = [b.gate.register_forward_hook(lambda m, i, o, n=n: calls[n].append(o[2])) for n, b in enumerate(blocks)]
    positions = PREFIX + torch.randint(0, WINDOW - PREFIX, (4,), generator=torch.Generator().manual_seed(1))
    try:
        routing = rs.collect(model, windows, E, k, PREFIX, forward_batch=16, trace_positions=positions)
    finally:
        for h in hooks:
            h.remove()
    # The routers' picks, cut the way collect cuts them: per domain, [windows, positions >= prefix, k].
    own = []
    for layer_calls in calls:
        it, per_domain = iter(layer_calls), {}
        for d, w in windows.items():
            parts = [next(it).view(min(16, w.shape[0] - i), WINDOW, k)[:, PREFIX:] for i in range(0, w.shape[0], 16)]
            per_domain[d] = torch.cat(parts)
        own.append(per_domain)
    return {"model": model, "E": E, "k": k, "routing": routing, "own": own, "blocks": blocks}


def test_glm4_picks_are_the_models_own(glm4):
    """collect routes glm4's logits as the model does: sigmoid + bias, group-limited (not softmax top-k)."""
    r, E, k = glm4["routing"], glm4["E"], glm4["k"]
    assert (E, k) == (64, 6) and r.num_layers == 4
    for li, router in enumerate(r.routers):
        assert router.family == "glm4_moe" and router.spec.scoring_func == "sigmoid" and router.spec.has_correction_bias
        assert torch.equal(router.correction_bias, glm4["blocks"][li].gate.e_score_correction_bias)
        for d, ids in r.ids[li].items():
            assert torch.equal(ids.long().sort(-1).values, glm4["own"][li][d].sort(-1).values), (li, d)
            # Picks come from the best 4 of 8 groups of 8 experts.
            groups = torch.zeros(*ids.shape[:2], 8, dtype=torch.bool).scatter_(-1, ids.long() // 8, True)
            assert (groups.sum(-1) <= 4).all()


def test_glm4_distinct_experts_match_the_models_routing(glm4):
    """B=32 decode-like batches: the tool's count is the count of the model's own picks, near uniform, no dead expert."""
    r, E, k = glm4["routing"], glm4["E"], glm4["k"]
    uniform = rs.uniform_distinct(E, k, 32)
    for li in range(r.num_layers):
        got = rs.distinct_experts(r.ids[li], E, k, batch_sizes=(32,), num_batches=64, seed=li)
        own = rs.distinct_experts({d: x.to(torch.int16) for d, x in glm4["own"][li].items()}, E, k,
                                  batch_sizes=(32,), num_batches=64, seed=li)
        # The same batches drawn from the model's own picks: the same counts.
        for kind in ("independent_domain", "independent_mixed"):
            assert got[kind]["32"] == own[kind]["32"]
        # What the model really does (softmax top-k of the logits said 32-50 and dead experts).
        assert 0.9 * uniform <= got["independent_mixed"]["32"]["mean"] <= min(E, 32 * k)
        assert rs.load_balance(torch.cat([x.reshape(-1) for x in r.ids[li].values()]), E)["dead"] == 0
        # A batch of the model's own picks counted directly.
        batch = torch.stack([glm4["own"][li][d][j, 40] for d in glm4["own"][li] for j in range(8)])  # [32, k]
        assert float(rs.distinct_count(batch[None], E)[0]) == float(rs.distinct_count(
            torch.stack([r.ids[li][d][j, 40].long() for d in r.ids[li] for j in range(8)])[None], E)[0])


def test_glm4_confidence_and_trace(glm4, tmp_path):
    r = glm4["routing"]
    c = rs.confidence(r.gap[0], r.top1[0], r.mass[0])
    # The gap is between the two best picks' ranking keys (sigmoid score + bias): never negative.
    assert c["top1_minus_top2_logit"]["all"]["q01"] >= 0
    assert c["top1_prob"]["all"]["mean"] <= c["topk_mass"]["all"]["mean"] <= 1.0
    trace = rs.build_trace(r, str(GLM4), num_batches=4, batch=32)
    assert trace["router"]["family"] == "glm4_moe" and trace["router"]["n_group"] == 8
    assert trace["correction_bias"].shape == (4, 64)
    torch.save(trace, tmp_path / "t.pt")
    back = rs.load_trace(tmp_path / "t.pt")
    assert torch.equal(back["correction_bias"][2], glm4["blocks"][2].gate.e_score_correction_bias)
    assert rs.scaled_logits(back, 0, 64, 6, 8, torch.Generator().manual_seed(0)).shape == (8, 64)
    with pytest.raises(ValueError, match="softmax"):
        rs.scaled_logits(back, 0, 128, 8, 8, torch.Generator().manual_seed(0))
