"""The accuracy harness (in-process path) on the bundled model: a small sweep end to end."""

import json
import subprocess
import sys

import pytest
import torch

from lynx_sglang import accuracy as A
from lynx_sglang.runtime.selection.config import make_policy
from lynx_sglang.server_process import DEFAULT_MODEL


@pytest.fixture(scope="module")
def model_and_streams():
    torch.manual_seed(0)
    model, tokenizer = A.load_model(DEFAULT_MODEL)
    return model, A.domain_streams(tokenizer)


def test_patch_with_selection_off_is_the_stock_forward(model_and_streams):
    model, streams = model_and_streams
    batch = A.make_batches(streams, 4, 1, 24, kinds=("mixed",))[0]
    with torch.no_grad():
        stock = model(input_ids=batch.tokens).logits
        with A.SelectionPatch(model, None) as patch:
            patch.decode_start = 8
            patched = model(input_ids=batch.tokens).logits
    assert torch.equal(stock, patched)
    assert len(patch.counts) == len(A.moe_blocks(model)) * 16  # one count per layer and decode step


def test_teacher_forced_pass_equals_a_decode_loop(model_and_streams):
    """The harness's claim: rewriting each position's column reproduces step-by-step decode."""
    model, streams = model_and_streams
    batch = A.make_batches(streams, 6, 1, 20, seed=3, kinds=("mixed",))[0]
    policy = make_policy("budget", max_experts=max(2, model.config.num_experts // 4))
    prefix = 12
    with torch.no_grad(), A.SelectionPatch(model, policy) as patch:
        full = A._teacher_forced(model, patch, batch.tokens, prefix)
        patch.decode_start = prefix
        out = model(input_ids=batch.tokens[:, :prefix], use_cache=True)
        past, step_logits = out.past_key_values, []
        patch.decode_start = 0
        for t in range(prefix, batch.tokens.shape[1] - 1):
            out = model(input_ids=batch.tokens[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            step_logits.append(out.logits[:, -1].float())
    stepwise = torch.stack(step_logits, dim=1)
    # Both hold the logits of positions prefix .. L-2, where rows of the decode region were rewritten.
    assert full.shape == stepwise.shape
    torch.testing.assert_close(full, stepwise, rtol=1e-4, atol=1e-4)


def test_small_sweep_end_to_end(model_and_streams, tmp_path):
    model, streams = model_and_streams
    cfg = model.config
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    rules = [
        A.Rule("off", make_policy("off")),
        A.Rule("lynx", make_policy("lynx")),
        A.Rule(f"budget {E // 4}", make_policy("budget", max_experts=E // 4)),
        A.Rule("random~budget", matched_to=f"budget {E // 4}"),
    ]
    summaries = A.sweep(model, streams, rules, batch_sizes=(8,), batches_per_kind=1, prefix=8, decode_len=8,
                        greedy_tokens=4, log=lambda s: None)
    by = {(s.rule["label"], s.kind): s for s in summaries}
    off = by[("off", "one-domain")]
    # Selection off is exactly the model: zero difference, not "small".
    assert off.delta_points == 0 and off.delta_loglik == 0 and off.kl == 0
    assert off.top1_agreement == 1 and off.greedy_agreement == 1
    assert off.experts_after == off.experts_before
    budget = by[(f"budget {E // 4}", "one-domain")]
    assert budget.experts_after <= E // 4 < budget.experts_before
    assert budget.kl > 0
    lynx = by[("lynx", "one-domain")]
    assert lynx.experts_after < lynx.experts_before and lynx.kl > 0
    # The control keeps exactly as many experts as the rule it is matched to, in every step.
    rand = by[("random~budget", "one-domain")]
    assert rand.per_layer_after == budget.per_layer_after
    assert {s.kind for s in summaries} >= {"one-domain", "mixed", "python", "english"}
    A.plot(summaries, tmp_path / "sweep.png", "test")
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert "budget" in A.table(summaries)


def test_expert_parallel_rules_cost_traffic(model_and_streams, tmp_path):
    """ep rules: off is the router's own choice costed by the accounting; lynx_ep moves fewer bytes."""
    from lynx_sglang.runtime.selection.config import ConfigError
    from lynx_sglang.runtime.expert_parallel import ExpertPlacement, home_rank, step_traffic

    model, streams = model_and_streams
    cfg = model.config
    ep, B, prefix = 4, 8, 6
    batch = A.make_batches(streams, B, 1, 14, kinds=("mixed",))[0]
    # The router's own picks of every decode step, costed directly.
    gate_ids = []
    hooks = [blk.gate.register_forward_hook(lambda m, i, out: gate_ids.append(out[2])) for blk in A.moe_blocks(model)]
    try:
        with torch.no_grad():
            model(input_ids=batch.tokens[:, :-1])
    finally:
        for h in hooks:
            h.remove()
    placement = ExpertPlacement.contiguous(cfg.num_experts, ep)
    expected = []
    for layer, ids in enumerate(gate_ids):
        ids = ids.view(B, -1, cfg.num_experts_per_tok)
        for t in range(prefix, ids.shape[1]):
            st = step_traffic(ids[:, t], placement, home_rank(B, ep), cfg.hidden_size, A.ACTIVATION_BYTES)
            expected.append((layer, int(st.dispatch_bytes + st.combine_bytes), int(st.rank_experts.max())))
    with A.SelectionPatch(model, make_policy("off"), ep=ep) as patch:
        A._teacher_forced(model, patch, batch.tokens, prefix)
    assert patch.traffic == expected and patch.rows[0] == 0

    rules = [A.Rule("off", make_policy("off"), ep=ep), A.Rule("lynx_ep", make_policy("lynx_ep"), ep=ep),
             A.Rule("random~lynx_ep", matched_to="lynx_ep", ep=ep),
             A.Rule("rank-drop~lynx_ep", matched_to="lynx_ep", control=A.RANK_DROP, ep=ep)]
    summaries = A.sweep(model, streams, rules, batch_sizes=(B,), batches_per_kind=1, prefix=prefix, decode_len=8,
                        greedy_tokens=2, log=lambda s: None)
    by = {(s.rule["label"], s.kind): s for s in summaries}
    off, lynx_ep = by[("off", "mixed")], by[("lynx_ep", "mixed")]
    assert off.rule["ep"] == ep and off.rows_changed == 0 and off.kl == 0 and off.delta_points == 0
    assert off.a2a_bytes_after == off.a2a_bytes_before > 0 and off.a2a_reduction == 0
    assert off.busiest_experts_after == off.busiest_experts_before
    assert lynx_ep.a2a_bytes_after < off.a2a_bytes_before and lynx_ep.rows_changed > 0
    assert by[("random~lynx_ep", "mixed")].per_layer_after == lynx_ep.per_layer_after
    control = by[("rank-drop~lynx_ep", "mixed")]
    assert control.rule["name"] == A.RANK_DROP and control.rank_drops_matched is not None
    assert 0.9 <= control.rank_drops_matched <= 1.0 and control.a2a_bytes_after < off.a2a_bytes_before
    assert lynx_ep.rank_drops_matched is None
    assert "a2a" in A.table(summaries)
    A.plot_ep(summaries, tmp_path / "ep.png", "test")
    assert (tmp_path / "ep.png").stat().st_size > 10_000
    # lynx_ep needs the placement: without ep the selector refuses it.
    with pytest.raises(ConfigError, match="expert placement"):
        A.sweep(model, streams, [A.Rule("lynx_ep", make_policy("lynx_ep"))], (4,), 1, prefix=4, decode_len=2,
                greedy_tokens=0, log=lambda s: None)


def test_random_control_must_follow_its_rule(model_and_streams):
    model, streams = model_and_streams
    with pytest.raises(ValueError, match="must follow"):
        A.sweep(model, streams, [A.Rule("random~x", matched_to="x"), A.Rule("x", make_policy("off"))], (4,), 1)
    with pytest.raises(ValueError, match="needs a lynx_ep rule"):
        A.sweep(model, streams, [A.Rule("x", make_policy("lynx"), ep=2),
                                 A.Rule("rd~x", matched_to="x", control=A.RANK_DROP, ep=2)], (4,), 1)


def test_rank_drop_control_drops_as_many_visits_chosen_blind_to_weakness():
    """The control frees lynx_ep's count of (row, remote rank) visits, strong picks included, and stays valid."""
    from lynx_sglang.runtime.selection.config import RouterSpec
    from lynx_sglang.runtime.expert_parallel import ExpertPlacement, home_rank
    from lynx_sglang.runtime.expert_parallel.rank_aware import finish_rank_aware, plan_rank_aware, weak_rank_drops
    from lynx_sglang.synthetic import random_logits, route

    router, N, T = RouterSpec(num_experts=32, top_k=4), 4, 64
    policy = make_policy("lynx_ep")
    mask = ExpertPlacement.contiguous(32, N).logical_on_rank()
    strong_dropped = 0
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        batch = route(router, random_logits(T, 32, scale=2.0, skew=1.5, generator=g))
        plan = plan_rank_aware(policy, router, batch.logits, batch.topk_ids, batch.topk_weights, mask,
                               home=home_rank(T, N))
        dropped, target, done = A.random_rank_drops(plan, torch.Generator().manual_seed(seed))
        weak = plan.refillable(weak_rank_drops(plan))
        assert target == int(A._visits(weak, plan.pick_rank, N).sum()) > 0
        assert done == target == int(A._visits(dropped, plan.pick_rank, N).sum())
        assert not (dropped & ~plan.droppable).any() and torch.equal(plan.refillable(dropped), dropped)
        # A dropped visit frees every surviving pick of the row on that rank.
        on_dropped = A._visits(dropped, plan.pick_rank, N).gather(1, plan.pick_rank.clamp(0, N - 1))
        assert torch.equal(dropped, plan.droppable & on_dropped)
        strong_dropped += int((dropped & ~plan.weak).sum())
        ids, w, _, _ = finish_rank_aware(plan, dropped)
        # Picks neither dropped nor of a dropped expert stay; rows stay valid and keep their weight sums.
        kept_pick = plan.survive & ~dropped
        assert torch.equal(ids[kept_pick], batch.topk_ids[kept_pick])
        assert ((ids >= 0) & (ids < 32)).all() and all(len(set(r)) == 4 for r in ids.tolist())
        assert plan.keep[ids].all()
        torch.testing.assert_close(w.sum(1), batch.topk_weights.sum(1))
    assert strong_dropped > 0  # blind to weakness: confident picks go too


def test_unsupported_model_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="Qwen3-MoE family"):
        A.SelectionPatch(LlamaForCausalLM(cfg), None)


def test_cli_writes_json_and_png(tmp_path):
    """The CLI on a small sweep: its file's numbers obey what must hold whatever the model does."""
    out = tmp_path / "acc"
    lynx, rand, budget = "lynx moved<=0.4", "random~lynx moved<=0.4", "budget 12"
    B, decode_len = 4, 4
    proc = subprocess.run(
        [sys.executable, "-m", "lynx_sglang.accuracy", str(DEFAULT_MODEL), "--out", str(out), "--batch-sizes", str(B),
         "--batches", "1", "--prefix", "6", "--decode-len", str(decode_len), "--greedy-tokens", "2",
         "--rules", ",".join(["off", lynx, budget, rand])],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = json.loads(out.with_suffix(".json").read_text())
    assert (payload["num_experts"], payload["top_k"]) == (32, 4)  # the bundled model; "budget 12" is 3E/8
    assert payload["settings"]["batch_sizes"] == str(B) and payload["settings"]["decode_len"] == decode_len
    by = {(s["rule"]["label"], s["kind"]): s for s in payload["summaries"]}
    kinds = {s["kind"] for s in payload["summaries"]}
    domains = kinds - {"one-domain", "mixed"}
    assert "mixed" in kinds and "one-domain" in kinds and len(domains) >= 2
    assert set(by) == {(r, k) for r in ("off", lynx, budget, rand) for k in kinds}
    moved = 0
    for kind in kinds:
        off = by[("off", kind)]
        # Selection off is the model itself: exactly no difference, not "a small one".
        assert off["accuracy"] == off["accuracy_off"] and off["delta_points"] == 0 and off["delta_loglik"] == 0
        assert off["kl"] == 0 and off["top1_agreement"] == 1 and off["greedy_agreement"] == 1
        assert off["per_layer_after"] == off["per_layer_before"] and off["rows_changed"] == 0 and off["reduction"] == 0
        for rule in ("off", lynx, budget, rand):
            s = by[(rule, kind)]
            # one batch of B sequences, decode_len scored positions each (one-domain: one batch per domain)
            batches = len(domains) if kind == "one-domain" else 1
            assert s["batch_size"] == B and s["tokens"] == B * decode_len * batches
            # the same batches for every rule: the same baseline, and layer 0 routes before any rewrite
            assert s["accuracy_off"] == off["accuracy_off"] and s["per_layer_before"][0] == off["per_layer_before"][0]
            assert s["delta_points"] == pytest.approx(100 * (s["accuracy"] - s["accuracy_off"]), abs=1e-6)
            assert s["experts_after"] == pytest.approx(sum(s["per_layer_after"]) / 4, abs=1e-3)
            assert s["reduction"] == pytest.approx(1 - s["experts_after"] / s["experts_before"], abs=1e-3)
            assert all(a <= b for a, b in zip(s["per_layer_after"], s["per_layer_before"]))
            assert s["kl"] >= 0 and 0 <= s["rows_changed"] <= 1
        assert max(by[(budget, kind)]["per_layer_after"]) <= 12
        # The random control keeps exactly as many experts as the rule it is matched to, step for step.
        assert by[(rand, kind)]["per_layer_after"] == by[(lynx, kind)]["per_layer_after"]
        moved += by[(lynx, kind)]["rows_changed"] > 0 and by[(lynx, kind)]["kl"] > 0
    assert moved > 0  # lynx really changed something (else the comparisons above prove little)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pooling_runs_weights_by_tokens_and_recomputes_changes(tmp_path):
    def summary(tokens, acc, kl, a2a_after, label="lynx_ep"):
        return A.Summary(rule={"label": label, "name": "lynx_ep"}, kind="mixed", batch_size=256, tokens=tokens,
                         accuracy_off=0.5, accuracy=acc, delta_points=100 * (acc - 0.5), delta_loglik=0.0, kl=kl,
                         top1_agreement=1.0, greedy_agreement=1.0, experts_before=32.0, experts_after=30.0,
                         reduction=1 / 16, per_layer_before=[32.0, 32.0], per_layer_after=[30.0, 31.0],
                         a2a_bytes_before=1000.0, a2a_bytes_after=a2a_after, a2a_reduction=1 - a2a_after / 1000,
                         busiest_experts_before=8.0, busiest_experts_after=8.0)

    run0 = [summary(100, 0.49, 0.01, 600.0), summary(100, 0.5, 0.0, 1000.0, label="off")]
    run1 = [summary(300, 0.45, 0.03, 700.0)]
    pooled = {s.rule["label"]: s for s in A.pool_summaries([run0, run1])}
    lynx = pooled["lynx_ep"]
    assert lynx.tokens == 400 and lynx.accuracy == pytest.approx(0.46) and lynx.kl == pytest.approx(0.025)
    assert lynx.delta_points == pytest.approx(-4.0) and lynx.a2a_bytes_after == pytest.approx(675.0)
    assert lynx.a2a_reduction == pytest.approx(0.325) and lynx.per_layer_after == [30.0, 31.0]
    assert lynx.rank_drops_matched is None
    assert pooled["off"] == run0[1]  # a group of one stays as it is
    # The CLI pools result files.
    from dataclasses import asdict
    files = []
    for i, run in enumerate((run0, run1)):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps({"model": "m", "settings": {}, "seconds": 1.0,
                                         "summaries": [asdict(s) for s in run]}))
    subprocess.run([sys.executable, "-m", "lynx_sglang.accuracy", "--pool", *map(str, files),
                    "--out", str(tmp_path / "pooled")], check=True, capture_output=True)
    payload = json.loads((tmp_path / "pooled.json").read_text())
    assert len(payload["runs"]) == 2 and payload["seconds"] == 2.0
    assert {s["rule"]["label"]: s["tokens"] for s in payload["summaries"]} == {"lynx_ep": 400, "off": 100}
    assert (tmp_path / "pooled.png").exists()


# ----------------------------------------------------------------------------- every bundled model's router

BUNDLED = ("trained-qwen3-moe", "trained-qwen3-moe-e128", "trained-glm4-moe")


@pytest.fixture(scope="module")
def bundled():
    """Each bundled model (fp32), loaded once for the tests below."""
    from lynx_sglang.server_process import REPO

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = A.load_model(REPO / "models" / name)[0]
        return cache[name]

    return get


def _capture_blocks(model, tokens):
    """One forward pass; per MoE block its input, its output and its router's (logits, weights, ids)."""
    blocks = A.moe_blocks(model)
    seen = {}
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o))) for n, b in enumerate(blocks)]
    hooks += [b.gate.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(("gate", n), o))
              for n, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            logits = model(input_ids=tokens).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, [(*seen[n], seen[("gate", n)]) for n in range(len(blocks))]


@pytest.mark.parametrize("name", BUNDLED)
def test_block_router_is_the_models_own_routing(bundled, name):
    """model_routing reproduces each block: ids/weights from the logits, and the block's output from them."""
    from lynx_sglang.model_routing import block_router

    model = bundled(name)
    tokens = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    _, captured = _capture_blocks(model, tokens)
    glm = name == "trained-glm4-moe"
    for block, (hidden, out, (logits, weights, ids)) in zip(A.moe_blocks(model), captured):
        r = block_router(block)
        # What the harness hands ExpertSelector: the family's scoring and the layer's own bias.
        assert r.spec.scoring_func == ("sigmoid" if glm else "softmax") and r.spec.has_correction_bias == glm
        if glm:
            assert torch.equal(r.correction_bias, block.gate.e_score_correction_bias)
            assert r.correction_bias.abs().max() > 0  # trained: a zero bias would hide a missing one
            assert (r.n_group, r.topk_group, r.routed_scaling_factor, r.top_k) == (8, 4, 2.5, 6)
            assert r.has_shared_expert
        # route(hidden) is the block's router call itself.
        for a, b in zip(r.route(hidden), (logits, weights, ids)):
            assert torch.equal(a, b)
        # route_logits (what routing_stats uses on recorded logits): the same picks and gate weights.
        got_ids, got_w, probs = r.route_logits(logits)
        s_ids, order = ids.sort(dim=-1)
        g_ids, g_order = got_ids.sort(dim=-1)
        assert torch.equal(s_ids, g_ids)
        torch.testing.assert_close(got_w.gather(-1, g_order), weights.float().gather(-1, order), rtol=0, atol=1e-6)
        torch.testing.assert_close(got_w.sum(-1), torch.full_like(got_w[:, 0], 2.5 if glm else 1.0))
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[:, 0]))
        # The block's output, recombined from its routing (routed experts + shared expert): exact.
        with torch.no_grad():
            assert torch.equal(r.moe_output(hidden, ids, weights), out)


@pytest.mark.parametrize("name", BUNDLED)
def test_patched_forward_with_policy_off_is_the_model(bundled, name):
    model = bundled(name)
    tokens = torch.randint(0, model.config.vocab_size, (4, 20), generator=torch.Generator().manual_seed(1))
    stock, _ = _capture_blocks(model, tokens)
    with torch.no_grad(), A.SelectionPatch(model, make_policy("off")) as patch:
        patch.decode_start = 6
        patched = model(input_ids=tokens).logits
    assert torch.equal(stock, patched)
    assert patch.rows == [0, 4 * 14 * len(A.moe_blocks(model))]
    sel = patch.selectors[0]
    if name == "trained-glm4-moe":
        assert sel.router.scoring_func == "sigmoid" and sel.router.has_correction_bias
        assert torch.equal(sel.correction_bias, A.moe_blocks(model)[0].gate.e_score_correction_bias)
    else:
        assert sel.router.scoring_func == "softmax" and sel.correction_bias is None


def test_glm4_selection_keeps_the_routed_scale_and_the_controls_run(bundled, model_and_streams):
    """On glm4: a rewritten row keeps its routed weight sum (x2.5); lynx, budget and random-keep run end to end."""
    model = bundled("trained-glm4-moe")
    tokens = torch.randint(0, model.config.vocab_size, (16, 12), generator=torch.Generator().manual_seed(2))
    _, captured = _capture_blocks(model, tokens)
    hidden, _, (logits, weights, ids) = captured[1]
    last = torch.arange(16) * 12 + 11  # one decode step: the last position of every sequence
    with A.SelectionPatch(model, make_policy("budget", max_experts=24)) as patch:
        new_ids, new_w = patch._select(1, logits[last], ids[last], weights[last])
    assert A._distinct(new_ids, 64) <= 24 < A._distinct(ids[last], 64)
    assert (new_ids != ids[last]).any()
    torch.testing.assert_close(new_w.sum(-1), torch.full((16,), 2.5))
    assert all(len(set(row)) == 6 for row in new_ids.tolist())

    rules = [A.Rule("off", make_policy("off")), A.Rule("lynx", make_policy("lynx")),
             A.Rule("random~lynx", matched_to="lynx")]
    streams = {"python": model_and_streams[1]["python"]}  # glm4 was trained with the qwen3 model's tokenizer
    summaries = A.sweep(model, streams, rules, batch_sizes=(8,), batches_per_kind=1, prefix=6, decode_len=4,
                        greedy_tokens=2, log=lambda s: None)
    by = {(s.rule["label"], s.kind): s for s in summaries}
    off = by[("off", "mixed")]
    assert off.kl == 0 and off.delta_points == 0 and off.experts_after == off.experts_before
    assert by[("random~lynx", "mixed")].per_layer_after == by[("lynx", "mixed")].per_layer_after
    assert by[("lynx", "mixed")].experts_after <= off.experts_before


def test_paired_bootstrap_intervals_and_peer_rules(model_and_streams):
    """Per-sequence sums add up to the summary; intervals hold the estimate; pooling concatenates; a peer
    rule (XShare, through ExpertSelector) runs in the harness."""

    model, streams = model_and_streams
    E = model.config.num_experts
    rules = [A.Rule("off", make_policy("off")), A.Rule("lynx", make_policy("lynx")),
             A.Rule("xshare", make_policy("xshare", expert_budget=E // 4, top_per_token=1))]
    run = lambda seed: A.sweep(model, streams, rules, batch_sizes=(8,), batches_per_kind=1, prefix=8,  # noqa: E731
                               decode_len=8, greedy_tokens=0, seed=seed, log=lambda s: None)
    first, second = run(0), run(1)
    by = {(s.rule["label"], s.kind): s for s in first}
    off = by[("off", "one-domain")]
    assert off.kl_ci == [0, 0] and off.delta_points_ci == [0, 0]
    for label in ("lynx", "xshare"):
        s = by[(label, "one-domain")]
        seq = s.per_sequence
        assert s.sequences == 4 * 8 == len(seq["tokens"]) and sum(seq["tokens"]) == s.tokens
        assert sum(seq["correct"]) / s.tokens == pytest.approx(s.accuracy, abs=1e-5)
        assert sum(seq["correct_off"]) / s.tokens == pytest.approx(s.accuracy_off, abs=1e-5)
        assert sum(seq["kl"]) / s.tokens == pytest.approx(s.kl, abs=1e-6)
        assert s.kl_ci[0] <= s.kl <= s.kl_ci[1] and s.delta_points_ci[0] <= s.delta_points <= s.delta_points_ci[1]
        assert s.kl > 0
    assert by[("xshare", "one-domain")].experts_after < off.experts_before
    assert "95% CI" in A.table(first)
    pooled = {(s.rule["label"], s.kind): s for s in A.pool_summaries([first, second])}
    p, a = pooled[("lynx", "one-domain")], by[("lynx", "one-domain")]
    assert p.sequences == 2 * a.sequences and p.per_sequence["kl"][: a.sequences] == a.per_sequence["kl"]
    assert p.kl_ci[0] <= p.kl <= p.kl_ci[1]
