"""lynx's similarity-aware refill (``refill_similarity``): a moved pick goes to a similar kept expert.

Checked against a plain-Python oracle of the rule written from its description (config.LynxPolicy):
the kept set is lynx's own (unchanged by the refill), and freed slot j of a row, in slot order,
takes the untaken kept candidate with the largest ``score + lambda * similarity[dropped, c]``
(ties to the lower id), or -1 when none is left.
"""

from __future__ import annotations

import pytest
import torch

from lynx_sglang.op_audit import OpAudit
from lynx_sglang.runtime.selection import reference
from lynx_sglang.runtime.selection.config import ConfigError, RouterSpec, make_policy
from lynx_sglang.runtime.selection.selector import ExpertSelector
from lynx_sglang.synthetic import random_logits, route


def _batch(T, E, k, seed, scoring="softmax"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 2
    score = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    w, ids = score.topk(k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    sim = torch.rand(E, E, generator=g)
    sim = (sim + sim.T) / 2
    sim.fill_diagonal_(1.0)
    return logits, ids.int(), w.float(), sim


def _oracle(keep, sel, ids, sim, lam):
    """Per row, per freed slot in order: argmax over untaken kept candidates of sel + lam * sim[d]."""
    out = []
    for t, row in enumerate(ids):
        taken = set(row)
        new = []
        for d in row:
            if keep[d]:
                new.append(d)
                continue
            best, best_key = -1, None
            for c in range(len(keep)):
                if not keep[c] or c in taken:
                    continue
                key = torch.tensor(sel[t][c], dtype=torch.float32) + torch.tensor(lam * sim[d][c], dtype=torch.float32)
                key = float(key)
                if best_key is None or key > best_key:
                    best, best_key = c, key
            new.append(best)
            if best >= 0:
                taken.add(best)
        out.append(new)
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("lam", [0.5, 4.0])
def test_refill_follows_the_oracle_and_keeps_lynx_kept_set(seed, lam):
    T, E, k = 24, 16, 4
    router = RouterSpec(E, k)
    logits, ids, w, sim = _batch(T, E, k, seed)
    plain = make_policy("lynx", max_moved_weight=0.8, alpha=3.0)
    refill = make_policy("lynx", max_moved_weight=0.8, alpha=3.0, refill_similarity=lam)
    _, _, info0 = reference.select(plain, router, logits, ids, w)
    bias = (sim * refill.refill_similarity).float()
    new_ids, new_w, info = reference.select(refill, router, logits, ids, w, refill_bias=bias)
    assert torch.equal(info.keep, info0.keep)  # the refill changes targets, not the kept set
    # With (lam * sim) rounded to fp32 once, as the selector does at plan time.
    want = _oracle(info.keep.tolist(), logits.tolist(), ids.tolist(), (bias / lam).tolist(), lam)
    moved = (new_ids.long() != ids.long()).any()
    assert moved, "the batch must exercise re-routing"
    got = new_ids.tolist()
    for t in range(T):
        assert got[t] == want[t], (t, got[t], want[t])
        held = [e for e in got[t] if e >= 0]
        assert len(held) == len(set(held))  # no duplicate ids
    # Weights: the gate of the new set from the logits, rescaled to the row's routed sum.
    assert torch.allclose(new_w.sum(-1), w.sum(-1), atol=1e-6)


def test_similarity_changes_targets_towards_similar_experts():
    """A similarity that strongly ties each expert to one partner makes moved picks land on that partner."""
    T, E, k = 32, 16, 4
    router = RouterSpec(E, k)
    logits, ids, w, _ = _batch(T, E, k, 11)
    partner = torch.arange(E).roll(1)
    sim = torch.zeros(E, E)
    sim[torch.arange(E), partner] = 1.0
    sim.fill_diagonal_(1.0)
    pol = make_policy("lynx", max_moved_weight=1.0, alpha=3.0, refill_similarity=100.0)
    new_ids, _, info = reference.select(pol, router, logits, ids, w, refill_bias=sim * 100.0)
    landed, partnered = 0, 0
    for t in range(T):
        for j, d in enumerate(ids[t].tolist()):
            n = int(new_ids[t, j])
            if n != d and n >= 0:
                landed += 1
                partnered += n == int(partner[d])
    assert landed > 0 and partnered / landed > 0.5


def test_selector_plans_the_refill_and_refuses_what_it_cannot_serve():
    E, k = 16, 4
    router = RouterSpec(E, k)
    logits, ids, w, sim = _batch(8, E, k, 3)
    pol = make_policy("lynx", refill_similarity=2.0)
    with pytest.raises(ConfigError, match="similarity"):
        ExpertSelector(router, pol, 8)  # needs the file
    with pytest.raises(ConfigError, match="similarity"):
        ExpertSelector(router, pol, 8, backend="triton")  # on the triton backend too
    with pytest.raises(ConfigError, match="similarity is an input"):
        ExpertSelector(router, make_policy("lynx"), 8, similarity=sim)
    with pytest.raises(ConfigError, match="refill_similarity"):
        make_policy("lynx", refill_similarity=-1.0).validate(router, 8)
    with pytest.raises(ConfigError, match="lynx_ep"):
        make_policy("lynx_ep", refill_similarity=1.0).validate(router, 8)
    sel = ExpertSelector(router, pol, 8, similarity=sim)
    assert sel.backend == "torch"  # auto on CPU (on CUDA: triton, which refills the same way)
    got_ids, got_w = sel.run(logits, ids, w)
    want_ids, want_w, _ = reference.select(pol, router, logits, ids, w, refill_bias=sim * 2.0)
    assert torch.equal(got_ids, want_ids) and torch.equal(got_w, want_w)


def test_refill_step_needs_no_host():
    E, k = 32, 4
    router = RouterSpec(E, k)
    logits, ids, w, sim = _batch(16, E, k, 5)
    sel = ExpertSelector(router, make_policy("lynx", refill_similarity=2.0), 16, similarity=sim)
    sel.run(logits, ids, w)  # warm
    with OpAudit() as audit:
        sel.run(logits, ids, w)
    assert not audit.findings, audit.findings
    plain = ExpertSelector(router, make_policy("lynx"), 16)
    plain.run(logits, ids, w)
    with OpAudit() as base:
        plain.run(logits, ids, w)
    # The refill is k small fixed-shape steps on top of lynx (12 launches per slot measured: 155 vs 107 at k=4).
    assert audit.launches <= base.launches + 13 * k, (audit.launches, base.launches)


def _both_backends(router, policy, batch, bias, sim, num_valid, device):
    """(ids, weights, stats) of the torch reference on CPU and of the Triton kernels on ``device``."""
    T = batch.logits.shape[0]
    outs = []
    for backend, dev in (("torch", torch.device("cpu")), ("triton", device)):
        sel = ExpertSelector(router, policy, T, dev, correction_bias=None if bias is None else bias.to(dev),
                             backend=backend, similarity=sim.to(dev))
        nv = num_valid.to(dev) if isinstance(num_valid, torch.Tensor) else num_valid
        ids, w = sel.run(batch.logits.to(dev), batch.topk_ids.to(dev), batch.topk_weights.to(dev), nv)
        outs.append((ids.cpu().clone(), w.cpu().clone(), sel.stats()))
    return outs


@pytest.mark.parametrize("E", [8, 64, 128, 256])
@pytest.mark.parametrize("k,shared", [(2, 0), (8, 1)])
@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])  # sigmoid with a correction bias
def test_kernel_refill_matches_reference(E, k, shared, T, scoring, device):
    """The Triton kernels refill as reference.reroute(refill_bias=...) does, id for id (64 rows: 3 padding)."""
    router = RouterSpec(E, k, shared, scoring, scoring == "sigmoid")
    g = torch.Generator().manual_seed(E * 100 + k * 10 + T)
    bias = torch.randn(E, generator=g) * 0.05 if router.has_correction_bias else None
    batch = route(router, random_logits(T, E, skew=1.0, generator=g), bias)
    sim = torch.rand(E, E, generator=g) * 2 - 1
    sim = ((sim + sim.T) / 2).fill_diagonal_(1.0)
    # keep_level 0 and no moved-weight cap: picks move even in a batch of one.
    policy = make_policy("lynx", keep_level=0, max_moved_weight=1.0, refill_similarity=2.0)
    num_valid = torch.tensor(T - 3) if T > 3 else None
    (ri, rw, rs), (ki, kw, ks) = _both_backends(router, policy, batch, bias, sim, num_valid, device)
    assert torch.equal(ki, ri)
    torch.testing.assert_close(kw, rw, rtol=1e-5, atol=1e-6)
    assert ks == rs
    if T > 3:
        assert torch.equal(ki[T - 3:], batch.topk_ids[T - 3:])  # padding rows pass through
    if T > 3 and E >= 64:  # the similarity decided some target (plain lynx refills by score)
        plain = make_policy("lynx", keep_level=0, max_moved_weight=1.0)
        pi, _, _ = reference.select(plain, router, batch.logits, batch.topk_ids, batch.topk_weights, num_valid,
                                    bias)
        assert rs.rows_changed > 0 and not torch.equal(pi, ri)


def test_server_options_carry_the_refill_and_its_file():
    from lynx_sglang.runtime.sglang.options import LynxOptions

    opts = LynxOptions(moe_backend="lynx", policy="lynx", params={"refill_similarity": 2.0}, similarity="/x/s.safetensors")
    opts.validate()
    assert opts.uses_similarity and opts.make_policy().refill_similarity == 2.0
    with pytest.raises(ConfigError, match="does not apply"):
        LynxOptions(moe_backend="lynx", policy="lynx", similarity="/x/s.safetensors").validate()


def test_default_refill_turns_on_only_with_a_file_beside_the_model(tmp_path):
    """On every device: both backends refill by similarity (the Triton kernels since they implement it)."""
    from lynx_sglang.runtime.selection.config import DEFAULT_REFILL_SIMILARITY
    from lynx_sglang.runtime.selection.similarity import DEFAULT_NAME
    from lynx_sglang.runtime.sglang.options import LynxOptions
    from lynx_sglang.runtime.sglang.stage import with_default_refill

    base = LynxOptions(moe_backend="lynx", policy="lynx")
    assert with_default_refill(base, str(tmp_path)) == base  # no file: refill by score
    (tmp_path / DEFAULT_NAME).write_bytes(b"x")  # existence decides here; the content is checked at load
    on = with_default_refill(base, str(tmp_path))
    assert on.params["refill_similarity"] == DEFAULT_REFILL_SIMILARITY
    assert on.similarity == str(tmp_path / DEFAULT_NAME) and on.uses_similarity
    explicit = LynxOptions(moe_backend="lynx", policy="lynx", params={"refill_similarity": 0.0})
    assert with_default_refill(explicit, str(tmp_path)) == explicit  # the user's choice stands
    oea = LynxOptions(moe_backend="lynx", policy="oea")
    assert with_default_refill(oea, str(tmp_path)) == oea
    assert with_default_refill(base, "Qwen/Qwen3-30B-A3B") == base  # a hub id: no folder to look in


def test_default_refill_falls_back_to_plain_lynx_when_the_file_beside_the_model_does_not_fit(tmp_path, monkeypatch):
    """An implicit file made for another model: a warning and plain lynx, not a refused start-up."""
    from types import SimpleNamespace

    from lynx_sglang.runtime.selection.similarity import DEFAULT_NAME, ExpertSimilarity, save_similarity
    from lynx_sglang.runtime.sglang import stage as stage_mod
    from lynx_sglang.runtime.sglang.options import LynxOptions

    other = {"model_type": "qwen3_moe", "num_experts": 16, "num_experts_per_tok": 2, "config_hash": "x"}
    save_similarity(tmp_path / DEFAULT_NAME, ExpertSimilarity({0: torch.eye(16)}, other, "cosine"))
    served = SimpleNamespace(model_type="qwen3_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=1)
    seen = {}
    monkeypatch.setattr(stage_mod, "check_supported", lambda args: None)
    monkeypatch.setattr(stage_mod, "build_stages", lambda model, cfg, options, **kw: seen.setdefault("opts", options) and [])
    monkeypatch.setattr(stage_mod, "_eplb_remaps_ids", lambda: False)
    monkeypatch.setattr(stage_mod, "_ep_layout", lambda options: stage_mod.EpLayout())
    model = torch.nn.Linear(2, 2)
    stage_mod.prepare(model, served, LynxOptions(moe_backend="lynx", policy="lynx"),
                      SimpleNamespace(model_path=str(tmp_path)))
    assert "refill_similarity" not in seen["opts"].params and seen["opts"].similarity is None
    # The same file, asked for explicitly, is refused where build_stages loads it.
    explicit = LynxOptions(moe_backend="lynx", policy="lynx", params={"refill_similarity": 8.0},
                           similarity=str(tmp_path / DEFAULT_NAME))
    with pytest.raises(ConfigError, match="made for another model"):
        stage_mod.layer_similarities(served, explicit, [0])
