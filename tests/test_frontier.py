"""The frontier tool: interpolation, paired bootstrap, same batches for every rule, off settings are off."""

import json
from pathlib import Path

import pytest
import torch

from lynx_sglang import accuracy as A
from lynx_sglang import frontier as F
from lynx_sglang.runtime.selection.config import make_policy

MODEL = Path(__file__).resolve().parent.parent / "models" / "trained-qwen3-moe"


def _point(label, line, family, fraction, kl, per_sequence, delta=0.0):
    return {"rule": {"label": label}, "line": line, "family": family, "fraction": fraction, "kl": kl,
            "delta_points": delta, "kl_ci": None, "delta_points_ci": None, "per_sequence": per_sequence}


def _seqs(n, kl_per_token, tokens=10, correct=5, correct_off=5, gen=None):
    """Per-sequence sums of n sequences whose KL per token is about ``kl_per_token`` (noise from ``gen``)."""
    noise = torch.rand(n, generator=gen).tolist() if gen is not None else [0.5] * n
    return {"tokens": [tokens] * n, "correct_off": [correct_off] * n, "correct": [correct] * n,
            "kl": [tokens * kl_per_token * (0.5 + x) for x in noise], "top1": [tokens] * n, "dloglik": [0.0] * n}


def test_interpolation_on_a_hand_made_frontier():
    xs, ys = [0.9, 0.5, 0.7], [0.01, 0.1, 0.04]  # measurement order need not be sorted
    assert F.interpolate(xs, ys, 0.8) == pytest.approx(0.025)
    assert F.interpolate(xs, ys, 0.6) == pytest.approx(0.07)
    assert F.interpolate(xs, ys, 0.7) == pytest.approx(0.04)
    assert F.interpolate(xs, ys, 0.95) is None and F.interpolate(xs, ys, 0.45) is None  # not spanned: n/a
    # Replicates are interpolated with the same weights.
    reps = [torch.tensor([0.01, 0.02]), torch.tensor([0.1, 0.2]), torch.tensor([0.04, 0.08])]
    torch.testing.assert_close(F.interpolate(xs, reps, 0.8), torch.tensor([0.025, 0.05]))

    n = 8
    frontier = {"sequences": n, "points": [
        _point("off", "off", "off", 1.0, 0.0, _seqs(n, 0.0)),
        _point("l1", "lynx", "lynx", 0.9, 0.01, _seqs(n, 0.01)),
        _point("l2", "lynx", "lynx", 0.7, 0.04, _seqs(n, 0.04)),
        _point("l3", "lynx", "lynx", 0.5, 0.10, _seqs(n, 0.10)),
        _point("x1", "xshare", "xshare", 0.85, 0.05, _seqs(n, 0.05)),
        _point("x2", "xshare", "xshare", 0.75, 0.08, _seqs(n, 0.08)),
        _point("x3", "xshare", "xshare", 0.78, 0.20, _seqs(n, 0.20)),  # beaten by x2 on both: not on its frontier
    ]}
    reps = F.replicates(frontier)
    rows = {r["line"]: r for r in F.matched_table(frontier, reps)}
    lynx80 = rows["lynx"]["at"]["0.8"]
    assert lynx80["kl"] == pytest.approx(0.025)
    # Constant per-sequence values: every replicate equals the point, so the interval is the value.
    assert lynx80["kl_ci"] == pytest.approx([0.025, 0.025])
    x80 = rows["xshare"]["at"]["0.8"]
    assert x80["kl"] == pytest.approx(0.065) and x80["kl_minus_ref"] == pytest.approx(0.04)
    assert rows["xshare"]["at"]["0.7"] is None and rows["xshare"]["at"]["0.6"] is None  # not spanned: n/a
    assert [p["rule"]["label"] for p in F.pareto(F.lines(frontier)["xshare"])] == ["x2", "x1"]
    # With the recommended line (lynx+sim) present, every other line is paired against it, plain lynx included.
    frontier["points"].append(_point("s1", "lynx+sim", "lynx+sim", 0.9, 0.005, _seqs(n, 0.005)))
    frontier["points"].append(_point("s2", "lynx+sim", "lynx+sim", 0.7, 0.03, _seqs(n, 0.03)))
    assert F.reference_line(frontier) == "lynx+sim"
    rows = {r["line"]: r for r in F.matched_table(frontier, F.replicates(frontier))}
    assert rows["lynx"]["at"]["0.8"]["kl_minus_ref"] == pytest.approx(0.025 - 0.0175)
    assert rows["xshare"]["at"]["0.8"]["kl_minus_ref"] == pytest.approx(0.065 - 0.0175)
    assert "kl_minus_ref" not in rows["lynx+sim"]["at"]["0.8"]


def test_dominance_needs_fewer_experts_and_lower_kl_beyond_the_noise():
    n, gen = 40, torch.Generator().manual_seed(1)
    lynx = [_point("l1", "lynx", "lynx", 0.9, 0.0, _seqs(n, 0.02, gen=gen)),
            _point("l2", "lynx", "lynx", 0.6, 0.0, _seqs(n, 0.08, gen=gen))]
    better = _point("p1", "sere", "sere", 0.7, 0.0, _seqs(n, 0.01, gen=gen))  # far below lynx at 0.7
    close = _point("p2", "sere", "sere", 0.62, 0.0, _seqs(n, 0.075, gen=gen))  # within the noise
    left = _point("p3", "xshare", "xshare", 0.5, 0.0, _seqs(n, 0.03, gen=gen))  # fewer than lynx's last point
    pts = lynx + [better, close, left]
    for p in pts:
        s = p["per_sequence"]
        p["kl"] = sum(s["kl"]) / sum(s["tokens"])
    frontier = {"sequences": n, "points": pts}
    found = {d["point"]: d for d in F.dominance(frontier, F.replicates(frontier))}
    assert set(found) == {"p1", "p3"}
    assert found["p3"]["where"] == "its point l2" and found["p1"]["kl_diff_ci"][1] < 0


def test_default_position_pairs_every_other_line_at_the_defaults_count():
    """The recommended default (lynx+sim at lynx's default cap): other lines interpolated at its count with the
    paired difference, and the points of other rules that beat it on both axes beyond the noise."""
    from lynx_sglang.runtime.selection.config import LynxPolicy

    n, gen = 40, torch.Generator().manual_seed(2)
    cap = LynxPolicy().max_moved_weight
    pts = [_point("off", "off", "off", 1.0, 0.0, _seqs(n, 0.0)),
           _point(f"lynx+sim moved<={cap:g}", "lynx+sim", "lynx+sim", 0.65, 0.0, _seqs(n, 0.02, gen=gen)),
           _point("lynx+sim moved<=0.7", "lynx+sim", "lynx+sim", 0.45, 0.0, _seqs(n, 0.09, gen=gen)),
           _point("o1", "oea", "oea", 0.8, 0.0, _seqs(n, 0.01, gen=gen)),
           _point("o2", "oea", "oea", 0.5, 0.0, _seqs(n, 0.06, gen=gen)),  # oea at 0.65: 0.035, worse
           _point("s1", "sere", "sere", 0.6, 0.0, _seqs(n, 0.01, gen=gen)),  # fewer experts, lower KL: beats it
           _point("s2", "sere", "sere", 0.62, 0.0, _seqs(n, 0.0205, gen=gen))]  # within the noise
    for p in pts:
        p["kl"] = sum(p["per_sequence"]["kl"]) / sum(p["per_sequence"]["tokens"])
    frontier = {"sequences": n, "points": pts}
    dp = F.default_position(frontier, F.replicates(frontier))
    assert dp["point"] == f"lynx+sim moved<={cap:g}" and dp["fraction"] == 0.65
    by = {ln["line"]: ln for ln in dp["lines"]}
    assert set(by) == {"oea", "sere"}  # our own lines are not listed against themselves
    want = pts[3]["kl"] + (pts[4]["kl"] - pts[3]["kl"]) * (0.8 - 0.65) / 0.3
    assert by["oea"]["kl"] == pytest.approx(want) and by["oea"]["ci"][0] > 0
    assert by["sere"]["kl"] is None  # its points (0.60, 0.62) do not span 0.65
    assert [q["point"] for q in dp["dominating"]] == ["s1"]
    # Without the default's own point there is nothing to place.
    assert F.default_position({"sequences": n, "points": [pts[0], pts[2], pts[3]]}, F.replicates(frontier)) is None


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_sequences():
    gen = torch.Generator().manual_seed(0)

    def seqs(n):
        hit_off = torch.randint(20, 40, (n,), generator=gen)
        return {"tokens": [64] * n, "correct_off": hit_off.tolist(),
                "correct": (hit_off + torch.randint(-2, 2, (n,), generator=gen)).tolist(),
                "kl": (torch.rand(n, generator=gen) * 2).tolist(), "top1": [60] * n, "dloglik": [0.0] * n}

    widths = []
    for n in (16, 256):
        s = seqs(n)
        ci = A.sequence_intervals(s)
        kl = sum(s["kl"]) / sum(s["tokens"])
        d = 100 * (sum(s["correct"]) - sum(s["correct_off"])) / sum(s["tokens"])
        assert ci["kl_ci"][0] <= kl <= ci["kl_ci"][1]
        assert ci["delta_points_ci"][0] <= d <= ci["delta_points_ci"][1]
        widths.append((ci["kl_ci"][1] - ci["kl_ci"][0], ci["delta_points_ci"][1] - ci["delta_points_ci"][0]))
        assert A.sequence_intervals(s) == ci  # deterministic
    assert widths[1][0] < widths[0][0] / 2 and widths[1][1] < widths[0][1] / 2


@pytest.fixture(scope="module")
def model_and_streams():
    model, tokenizer = A.load_model(MODEL)
    return model, A.domain_streams(tokenizer)


@pytest.fixture(scope="module")
def similarity(model_and_streams, tmp_path_factory):
    from lynx_sglang import sere_calibrate

    model, _ = model_and_streams
    path = sere_calibrate.run(MODEL, tokens=256, out=tmp_path_factory.mktemp("sere") / "sim.safetensors")
    return F.load_similarity_for(model, path)


def test_same_batches_for_every_rule_and_off_settings_are_off(model_and_streams, similarity, monkeypatch):
    model, streams = model_and_streams
    E, k = A.model_shape(model)
    calls = []
    real_off = A.off_reference
    monkeypatch.setattr(A, "off_reference", lambda *a, **kw: calls.append(a[1].tokens.clone()) or real_off(*a, **kw))
    seen = []
    real_measure = A.measure
    monkeypatch.setattr(A, "measure",
                        lambda m, batch, *a, **kw: seen.append(batch.tokens) or real_measure(m, batch, *a, **kw))

    def rules_for(off_experts):
        # Every rule at its "off" setting, then one real point and the random control matched to it.
        return [F.FRule("off", "off", "off", make_policy("off")),
                F.FRule("lynx cap 0", "lynx", "lynx", make_policy("lynx", max_moved_weight=0.0)),
                F.FRule("oea k0=k", "oea", "oea", make_policy("oea", k0=k)),
                F.FRule("budget E", "budget", "budget", make_policy("budget", max_experts=E)),
                F.FRule("xshare E", "xshare", "xshare", make_policy("xshare", expert_budget=E, top_per_token=1)),
                F.FRule("sere S=k", "sere", "sere", make_policy("sere", select_top_k=k)),
                F.FRule("sere S=1", "sere", "sere", make_policy("sere", select_top_k=1)),
                F.FRule("random~sere S=1", A.RANDOM, A.RANDOM, matched_to="sere S=1")]

    f = F.measure_frontier(model, streams, "m", "one-domain", 4, 2, rules_for, prefix=4, decode_len=4,
                           similarity=similarity, log=lambda s: None)
    assert len(calls) == 2  # selection off ran once per batch, for all rules
    assert len(seen) == 2 * 8 and all(torch.equal(t, calls[i % 2]) for i, t in enumerate(seen))
    by = {p["rule"]["label"]: p for p in f.points}
    for label in ("off", "lynx cap 0", "oea k0=k", "budget E", "xshare E", "sere S=k"):
        p = by[label]
        assert p["kl"] == 0 and p["fraction"] == 1 and p["delta_points"] == 0, label
        assert p["kl_ci"] == [0, 0]
    sere = by["sere S=1"]
    assert sere["fraction"] < 1 and sere["kl"] > 0
    assert by["random~sere S=1"]["per_layer_after"] == sere["per_layer_after"]
    # Paired: every point holds the same sequences, off's correct counts identical.
    assert all(p["per_sequence"]["correct_off"] == by["off"]["per_sequence"]["correct_off"] for p in f.points)
    assert f.sequences == 8 and all(len(p["per_sequence"]["tokens"]) == 8 for p in f.points)


def test_cli_end_to_end_and_from_json(model_and_streams, tmp_path):
    out = tmp_path / "fr"
    F.main(["--models", str(MODEL), "--batch-sizes", "4", "--kinds", "mixed", "--batches", "1", "--prefix", "4",
            "--decode-len", "4", "--families", "lynx,xshare,random", "--no-lynx-variants", "--out", str(out)])
    payload = json.loads(out.with_suffix(".json").read_text())
    f = payload["frontiers"][0]
    assert payload["meta"]["torch"] and payload["meta"]["command"].startswith("python -m lynx_sglang.frontier")
    assert {p["family"] for p in f["points"]} == {"off", "lynx", "xshare", A.RANDOM}
    assert F.png_path(out, f).stat().st_size > 10_000
    md = out.with_suffix(".md").read_text()
    assert "| lynx |" in md and "xshare top_per_token=1" in md
    again = tmp_path / "again"
    F.main(["--from-json", str(out.with_suffix(".json")), "--out", str(again)])
    assert again.with_suffix(".md").read_text().split("\n", 4)[4] == md.split("\n", 4)[4]



@pytest.mark.parametrize("study", ["keep_level", "min_keep", "lambda"])
def test_deep_end_studies_are_valid_on_every_bundled_shape(study):
    """benchmarks.explore_deep_end: each study's rules are valid policies on the bundled shapes (k = 4, 6, 8),
    with unique labels; the keep_level and min_keep studies carry the recommended line, so their tables pair
    every point against it."""
    from benchmarks.explore_deep_end import study_rules
    from lynx_sglang import RouterSpec

    rules = study_rules(study)(20.0)
    assert len({r.label for r in rules}) == len(rules) and rules[0].label == "off"
    for router in (RouterSpec(32, 4), RouterSpec(128, 8), RouterSpec(64, 6, 0, "sigmoid", True)):
        for r in rules:
            r.policy.validate(router, 64)
    lines = {r.line for r in rules}
    assert ("lynx+sim" in lines) == (study != "lambda")


def test_deep_end_refuses_a_model_without_its_similarity_file(tmp_path, capsys):
    from benchmarks.explore_deep_end import main

    bare = tmp_path / "model"
    bare.mkdir()
    for f in MODEL.iterdir():
        if f.name != "sere_similarity.safetensors":
            (bare / f.name).symlink_to(f)
    rc = main(["--study", "lambda", "--models", str(bare), "--kinds", "mixed", "--batches", "1",
               "--out", str(tmp_path / "x")])
    assert rc == 2 and "sere_calibrate" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
