"""The expert-parallel traffic simulation (benchmarks/bench_ep_traffic.py): its counting on a hand-checked
step, its batch construction from the trace, and a --quick run's files and numbers."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_ep_traffic as bt
from lynx_sglang.runtime.expert_parallel import ExpertPlacement, capacity_bytes, home_rank, step_traffic
from lynx_sglang.routing_stats import load_trace
from lynx_sglang.synthetic import route


def test_hand_checked_step():
    # E = 4 on N = 2 ranks (rank 0: e0, e1; rank 1: e2, e3), k = 2, hidden 8, bf16 rows of 16 bytes.
    # Row 0 (home 0) picks e0, e2: one transfer to rank 1. Row 1 (home 1) picks e0, e1: one transfer to rank 0.
    placement = ExpertPlacement.contiguous(4, 2)
    ids = torch.tensor([[0, 2], [0, 1]])
    slot_rank = placement.rank_of[ids]
    home = torch.tensor([0, 1])
    # Before selection row 1 picked e2, e1 (ranks 1, 0): its visit to rank 0 is not new; row 0's are not either.
    routed_rank = torch.tensor([[0, 1], [1, 0]])
    s = bt.measure_step(ids, slot_rank, placement, home, hidden=8, expert_bytes=1000, rows_changed=1,
                        routed_rank=routed_rank)
    # dispatch: 2 transfers x (16 row bytes + 2 x 4 id bytes + 2 x 4 weight bytes); combine: 2 x 16.
    assert (s["dispatch_bytes"], s["combine_bytes"], s["a2a_bytes"]) == (64, 32, 96)
    assert s["busiest_rank_experts"] == 2 and s["busiest_rank_expert_bytes"] == 2000  # rank 0 runs e0, e1
    assert s["busiest_rank_tokens"] == 2  # rank 0 gets both rows, rank 1 only row 0
    assert s["remote_ranks_per_token"] == 1.0 and s["distinct_experts"] == 3
    assert s["rows_changed"] == 1 and s["rows_changed_pct"] == 50.0
    assert s["token_imbalance"] == 2 * 2 / 3 and s["new_visits_pct"] == 0.0 == s["busiest_new_pct"]
    # Had row 1 gone only to rank 1 before, its visit to rank 0 would be new: 1 of 3 visits.
    s = bt.measure_step(ids, slot_rank, placement, home, hidden=8, expert_bytes=1000, rows_changed=1,
                        routed_rank=torch.tensor([[0, 1], [1, 1]]))
    assert s["new_visits_pct"] == 100 / 3 and s["busiest_new_pct"] == 50.0  # rank 0: rows 0 and 1 (new)
    direct = step_traffic(ids, placement, home, 8, 2).as_dict(1000)
    assert direct["a2a_bytes"] == s["a2a_bytes"] and direct["rank_tokens"] == [2, 1]
    # The fixed-capacity exchange with 1 row per rank sends a row each way between the two ranks.
    assert capacity_bytes(1, 2, 8, 2, 2) == 2 * ((16 + 16) + 16)


def test_trace_rows_concatenate_recorded_batches():
    trace = load_trace(bt.DEFAULT_TRACE)
    z = trace["kinds"][bt.TRACE_KIND]["logits"]  # [L, 32, 128, E]
    rows, used = bt.trace_rows(trace, 64, 1, 8)  # one recorded batch: s_1 = 4, first 64 rows
    assert used == [4] and torch.equal(rows, z[:, 4, :64].float())
    rows, used = bt.trace_rows(trace, 300, 7, 8)  # m = 3 batches from s_7 = 28, wrapping around
    assert used == [28, 29, 30]
    assert torch.equal(rows[:, 128:256], z[:, 29].float()) and torch.equal(rows[:, 256:], z[:, 30, :44].float())
    rows, used = bt.trace_rows(trace, 2048, 7, 8)
    assert used == [(28 + i) % 32 for i in range(16)] and rows.shape == (4, 2048, 32)


def test_scaled_sources_keep_the_recorded_top_picks():
    # The Qwen3-30B source replays the trace rows at E = 128: each pick's parent (id mod 32) is a recorded pick.
    trace = load_trace(bt.DEFAULT_TRACE)
    rows, _ = bt.trace_rows(trace, 16, 0, 8)
    src = bt.SOURCES["qwen3-30b-a3b"]
    z = bt.layer_logits(src, trace, rows, 2, seed=5)
    assert z.shape == (16, 128)
    parents = (z.topk(8, dim=1).indices % 32).sort(dim=1).values
    recorded = rows[2].topk(8, dim=1).indices.sort(dim=1).values
    # scaled_logits shuffles the rows: compare as multisets of rows.
    assert sorted(map(tuple, parents.tolist())) == sorted(map(tuple, recorded.tolist()))
    assert torch.equal(bt.layer_logits(src, trace, rows, 2, seed=5), z)  # deterministic


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep_traffic") / "ep"
    payload = bt.main(["--quick", "--out", str(out)])
    return payload, out


def test_quick_run_files_and_shape(quick):
    payload, out = quick
    js = json.loads(out.with_name("ep.json").read_text())
    assert out.with_name("ep.png").stat().st_size > 10_000
    md = out.with_name("ep.md").read_text()
    assert js["device"] == bt.DEVICE == "cpu (simulation: exact counts, no timings)"
    env = js["environment"]
    assert env["date"] and env["commit"] and env["torch"] == torch.__version__
    n_src, n_pol = len(bt.SOURCES), len(bt.POLICY_VARIANTS)
    eps, toks = bt.QUICK["ep"], bt.QUICK["tokens"]
    assert len(js["results"]) == n_src * len(eps) * len(toks) * n_pol
    samples = bt.QUICK["batches"] * js["num_layers"]
    for r in js["results"]:
        assert r["batch"] == r["ep"] * r["tokens_per_rank"] and r["samples"] == samples
        assert all(len(v) == samples for v in r["raw"].values())
        assert r["mean"]["a2a_bytes"] == pytest.approx(sum(r["raw"]["a2a_bytes"]) / samples)
        assert set(r["reduction_pct"]) == set(bt.REDUCED)
    # One target line per source for the target policy, and its verdict follows from the numbers.
    target = [v for v in js["target"] if v["target_policy"]]
    assert sorted(v["source"] for v in target) == sorted(bt.SOURCES)
    for v in target:
        ok = min(v["a2a_reduction_pct"], v["busiest_rank_expert_bytes_reduction_pct"]) >= 35.0
        assert v["verdict"] == ("PASS" if ok else "MISS") and v["policy"] == "lynx_ep"
        assert f"{v['verdict']} [{v['source']}] EP=4, 64 tokens/rank, lynx_ep vs off" in md


def test_quick_run_numbers(quick):
    payload, _ = quick
    rows = payload["results"]
    by = {(r["source"], r["ep"], r["tokens_per_rank"], r["policy"]): r for r in rows}
    for r in rows:
        src = bt.SOURCES[r["source"]]
        m = r["mean"]
        k, d = src.shape.top_k, src.shape.hidden
        if r["policy"] == "off":
            assert all(x == 0.0 for x in r["reduction_pct"].values()) and m["rows_changed"] == 0
        # Bytes and remote ranks are two countings of the same transfers.
        assert m["a2a_bytes"] == pytest.approx(m["remote_ranks_per_token"] * r["batch"] * (4 * d + 8 * k))
        assert m["busiest_rank_expert_bytes"] == pytest.approx(m["busiest_rank_experts"] * src.expert_bytes())
        assert r["capacity_bytes"] == capacity_bytes(r["tokens_per_rank"], r["ep"], d, 2, k)
        # A row goes to at most N - 1 other ranks: never more than the fixed-capacity exchange.
        assert max(r["raw"]["a2a_bytes"]) <= r["capacity_bytes"]
        assert m["busiest_rank_experts"] <= src.shape.experts // r["ep"]
    for ep in bt.QUICK["ep"]:
        for t in bt.QUICK["tokens"]:
            off, ep_row = by[("trace", ep, t, "off")], by[("trace", ep, t, "lynx_ep")]
            assert ep_row["mean"]["remote_ranks_per_token"] < off["mean"]["remote_ranks_per_token"]
            assert ep_row["reduction_pct"]["a2a_bytes"] > 0
            # At lynx's cap (0.4), lynx_ep's kept set is a subset of lynx's: never more experts on the
            # busiest rank. (Its default cap 0.3 holds more picks, so that comparison would not hold.)
            lynx, same_cap = by[("trace", ep, t, "lynx")], by[("trace", ep, t, "lynx_ep_cap0.4")]
            assert same_cap["mean"]["busiest_rank_experts"] <= lynx["mean"]["busiest_rank_experts"]


def test_off_matches_step_traffic_directly(quick):
    # Recount one sample (trace, EP = 4, 16 tokens/rank, batch 0, layer 0) with no benchmark code in between.
    payload, _ = quick
    trace = load_trace(bt.DEFAULT_TRACE)
    src = bt.SOURCES["trace"]
    rows, _ = bt.trace_rows(trace, 64, 0, bt.QUICK["batches"])
    rb = route(src.router(), rows[0])
    t = step_traffic(rb.topk_ids, ExpertPlacement.contiguous(32, 4), home_rank(64, 4), 256, 2).as_dict(
        src.expert_bytes())
    off = next(r for r in payload["results"] if (r["source"], r["ep"], r["tokens_per_rank"], r["policy"])
               == ("trace", 4, 16, "off"))
    assert off["raw"]["a2a_bytes"][0] == t["a2a_bytes"]
    assert off["raw"]["busiest_rank_experts"][0] == t["busiest_rank_experts"]
    assert off["raw"]["busiest_rank_tokens"][0] == t["busiest_rank_tokens"]


def test_cli_rejects_unknown_names():
    with pytest.raises(SystemExit):
        bt.parse_args(["--sources", "gpt-5"])
    with pytest.raises(SystemExit):
        bt.parse_args(["--policies", "lynx_ep,bogus"])
    args = bt.parse_args(["--policies", "lynx_ep"])
    assert args.policies == ["off", "lynx_ep"]  # off is always there: reductions need it
