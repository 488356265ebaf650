"""Expert parallelism on a real (CPU) SGLang server: `--tp 2 --ep-size 2 --moe-a2a-backend lynx`."""

from __future__ import annotations

import re

import pytest
import torch

from lynx_sglang.client import PROMPTS, complete, scrape_a2a_metrics, scrape_lynx_metrics
from lynx_sglang.server_process import REPO, free_port, running_server, start_server

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU server tests (launch/cpu_server.sh)")

from conftest import STOCK_ARGS as BASE  # noqa: E402  the shared stock server's arguments
from conftest import STOCK_MAX_NEW as MAX_NEW  # noqa: E402
from conftest import STOCK_PROMPTS  # noqa: E402

EP = (*BASE, "--tp", "2", "--ep-size", "2", "--moe-a2a-backend", "lynx", "--moe-backend", "lynx",
      "--enable-metrics", "--decode-log-interval", "1")


def _greedy(server, prompts):
    return [server.generate(p, max_new_tokens=MAX_NEW)["output_ids"] for p in prompts]


def _transfer_bytes_per_token(url) -> dict[int, float]:
    """Per layer: all-to-all bytes (dispatch + combine) per decode token that took part in selection."""
    a2a, sel = scrape_a2a_metrics(url), scrape_lynx_metrics(url)
    assert a2a and set(a2a) == set(sel)
    return {layer: (a2a[layer]["dispatch_bytes"] + a2a[layer]["combine_bytes"]) / sel[layer].rows_voting
            for layer in a2a}


@pytest.fixture(scope="module")
def off_run(tmp_path_factory):
    """Policy off through our dispatcher: answers and traffic of the router's own choice."""
    with running_server(*EP, "--lynx-policy", "off", log_dir=tmp_path_factory.mktemp("a2a_off")) as srv:
        greedy = _greedy(srv, PROMPTS[:STOCK_PROMPTS])
        answers = complete(srv.url, PROMPTS, max_tokens=MAX_NEW, concurrency=16)
        yield {"greedy": greedy, "answers": answers, "bytes_per_token": _transfer_bytes_per_token(srv.url),
               "a2a": scrape_a2a_metrics(srv.url)}


def test_a2a_dispatch_with_policy_off_equals_the_single_process_server(off_run, stock, tmp_path):
    assert stock["greedy"] == off_run["greedy"]
    # SGLang's own expert-parallel path (a2a none: experts sharded, outputs all-reduced) with the plugin.
    a2a_none = (*BASE, "--tp", "2", "--ep-size", "2", "--moe-backend", "lynx", "--lynx-policy", "off")
    with running_server(*a2a_none, log_dir=tmp_path / "a2a_none") as srv:
        assert _greedy(srv, PROMPTS[:STOCK_PROMPTS]) == off_run["greedy"]
    assert len(off_run["answers"]) == len(PROMPTS)
    for layer, m in off_run["a2a"].items():
        assert m["steps"] > 0 and m["dispatch_bytes"] > 0 and m["combine_bytes"] > 0, layer
        # Both ranks ran experts on tokens; the busiest rank bounds each rank's per-step load.
        assert set(m["rank_tokens"]) == {0, 1} and all(v > 0 for v in m["rank_tokens"].values())
        assert m["busiest_rank_experts"] >= max(m["rank_experts"].values())


def test_rank_aware_policy_serves_concurrent_requests_with_less_traffic(off_run, tmp_path):
    with running_server(*EP, "--lynx-policy", "lynx_ep", log_dir=tmp_path) as srv:
        answers = complete(srv.url, PROMPTS, max_tokens=MAX_NEW, concurrency=16)
        per_token = _transfer_bytes_per_token(srv.url)
        selection = scrape_lynx_metrics(srv.url)
    assert len(answers) == len(PROMPTS) and all(a.strip() for a in answers)
    assert all(s.rows_changed > 0 for s in selection.values())
    # Averaged over layers, tokens cross to the other rank less often than with the router's choice.
    off = off_run["bytes_per_token"]
    assert sum(per_token.values()) < 0.95 * sum(off.values()), (per_token, off)


def test_a2a_backend_needs_expert_parallelism(tmp_path):
    with pytest.raises(RuntimeError, match="needs --ep-size equal to --tp-size and >= 2"):
        start_server(*BASE, "--moe-a2a-backend", "lynx", log_dir=tmp_path, timeout=120)


def test_rank_aware_policy_needs_expert_parallelism(tmp_path):
    with pytest.raises(RuntimeError, match="lynx_ep needs expert parallelism"):
        start_server(*BASE, "--moe-backend", "lynx", "--lynx-policy", "lynx_ep", log_dir=tmp_path, timeout=240)


def test_two_node_launch_serves_like_one_node(off_run, tmp_path):
    """launch/ep_multinode.sh (CPU=1): two "nodes" of one rank each, joined over --dist-init-addr."""
    script = REPO / "launch" / "ep_multinode.sh"
    env = {"CPU": "1", "NNODES": "2", "GPUS_PER_NODE": "1", "MASTER": f"127.0.0.1:{free_port()}", "POLICY": "off"}
    node1 = start_server(*BASE, env={**env, "NODE_RANK": "1"}, script=script, wait_healthy=False,
                         log_dir=tmp_path / "node1")
    try:
        with running_server(*BASE, env={**env, "NODE_RANK": "0"}, script=script, log_dir=tmp_path / "node0") as srv:
            assert _greedy(srv, PROMPTS[:STOCK_PROMPTS]) == off_run["greedy"]
    finally:
        node1.stop()
    assert "TP1 EP1" in node1.log_tail(400), "node 1 did not run the second rank"


def _rebalances(server) -> list[int]:
    """Physical slots each live EPLB rebalance moved (SGLANG_LOG_EXPERT_LOCATION_METADATA=1 logs the diffs)."""
    return [int(m) for m in re.findall(r"changed_physical_slots=(\d+)/", server.log_path.read_text(errors="replace"))]


def test_live_eplb_rebalancing_under_our_dispatcher(off_run, tmp_path):
    """EPLB moves expert replicas every 8 forward passes while requests run: answers and selection stay right.

    With policy off the greedy answers are the single-placement server's; lynx_ep follows the live map
    (it re-reads the rank tables every step) and serves concurrent requests with less traffic than off.
    """
    eplb = (*EP, "--ep-num-redundant-experts", "2", "--enable-eplb", "--eplb-rebalance-num-iterations", "8")
    env = {"SGLANG_LOG_EXPERT_LOCATION_METADATA": "1"}
    with running_server(*eplb, "--lynx-policy", "off", env=env, log_dir=tmp_path / "off") as srv:
        assert _greedy(srv, PROMPTS[:STOCK_PROMPTS]) == off_run["greedy"]
        moved = _rebalances(srv)
    assert len(moved) >= 3 and all(m > 0 for m in moved), moved
    with running_server(*eplb, "--lynx-policy", "lynx_ep", env=env, log_dir=tmp_path / "lynx_ep") as srv:
        answers = complete(srv.url, PROMPTS, max_tokens=MAX_NEW, concurrency=16)
        per_token = _transfer_bytes_per_token(srv.url)
        selection = scrape_lynx_metrics(srv.url)
        moved = _rebalances(srv)
    assert len(answers) == len(PROMPTS) and len(moved) >= 3
    assert all(c.steps > 0 and c.mean_experts_after < c.mean_experts_before for c in selection.values())
    assert sum(per_token.values()) < sum(off_run["bytes_per_token"].values())
