"""The product as a user meets it: `sglang.launch_server --moe-backend lynx` on a real (CPU) server."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lynx_sglang.client import PROMPTS, complete, scrape_lynx_metrics
from lynx_sglang.server_process import DEFAULT_MODEL, START_TIMEOUT_S, running_server, servers_side_by_side, start_server

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU server tests (launch/cpu_server.sh)")

from conftest import STOCK_ARGS as BASE  # noqa: E402  the shared stock server's arguments
from conftest import STOCK_MAX_NEW as MAX_NEW  # noqa: E402
from conftest import STOCK_PROMPTS  # noqa: E402

# The product's defaults: on the trained model they re-route (docs/accuracy.md).
STRICT = ("--moe-backend", "lynx")


def _greedy(server, prompts):
    return [server.generate(p, max_new_tokens=MAX_NEW)["output_ids"] for p in prompts]


def _prompt_logprobs(server, prompt):
    out = server.post("/generate", {"text": prompt, "sampling_params": {"temperature": 0.0, "max_new_tokens": 1},
                                    "return_logprob": True, "logprob_start_len": 0})
    return [lp for lp, _tok, *_ in out["meta_info"]["input_token_logprobs"] if lp is not None]


def test_policy_off_equals_stock(stock, tmp_path):
    with running_server(*BASE, "--moe-backend", "lynx", "--lynx-policy", "off", log_dir=tmp_path) as srv:
        assert _greedy(srv, PROMPTS[:STOCK_PROMPTS]) == stock["greedy"]


def test_lynx_serves_concurrent_requests_with_fewer_experts_and_leaves_prefill_alone(stock, tmp_path):
    with running_server(*BASE, *STRICT, "--enable-metrics", "--decode-log-interval", "1", log_dir=tmp_path) as srv:
        # A request alone is a pure prefill batch: its prompt log-probabilities must be stock's, bit for bit.
        assert _prompt_logprobs(srv, PROMPTS[1]) == stock["prefill"]
        answers = complete(srv.url, PROMPTS * 2, max_tokens=MAX_NEW, concurrency=16)
        assert len(answers) == 32 and all(isinstance(a, str) for a in answers)
        layers = scrape_lynx_metrics(srv.url)
    assert sorted(layers) == list(range(json.loads((DEFAULT_MODEL / "config.json").read_text())["num_hidden_layers"]))
    for layer, c in layers.items():
        assert c.steps > 0, f"layer {layer} saw no decode step"
        assert c.mean_experts_after < c.mean_experts_before
        assert 0 < c.rows_changed <= c.rows_voting


def test_bad_option_value_stops_start_up(tmp_path):
    with pytest.raises(RuntimeError, match="alpha"):
        start_server(*BASE, "--moe-backend", "lynx", "--lynx-alpha", "-1", log_dir=tmp_path, timeout=120)
    with pytest.raises(RuntimeError, match="does not apply"):
        start_server(*BASE, "--moe-backend", "lynx", "--lynx-budget-experts", "4", log_dir=tmp_path, timeout=120)


def test_tp2_ranks_take_identical_decisions(tmp_path):
    stats_dir = tmp_path / "stats"
    stats_dir.mkdir()
    env = {"LYNX_SGLANG_STATS_DIR": str(stats_dir)}
    with running_server(*BASE, *STRICT, "--tp", "2", "--decode-log-interval", "1", env=env, log_dir=tmp_path) as srv:
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda p: srv.generate(p, max_new_tokens=MAX_NEW, ignore_eos=True), PROMPTS[:8]))
        assert all(len(o["output_ids"]) == MAX_NEW for o in outs)
        # Each rank dumps after its own step bookkeeping, so a rank may still be writing its last
        # step when the client has its answers: read while the server runs, once the ranks agree
        # on how many steps they saw (stopping first could leave one rank's dump a step behind).
        rank0, rank1 = _dumps_at_same_step(stats_dir, ranks=2)
    assert rank0 == rank1
    assert all(v["steps"] > 0 and v["experts_after"] < v["experts_before"] for v in rank0.values())


def _dumps_at_same_step(stats_dir, ranks, timeout_s=60.0):
    """Every rank's dump, once all ranks report the same decode steps per layer (or the last read at timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        dumps = [json.loads((stats_dir / f"tp{r}.json").read_text()) if (stats_dir / f"tp{r}.json").exists() else {}
                 for r in range(ranks)]
        steps = [{layer: v["steps"] for layer, v in d.items()} for d in dumps]
        if (all(steps) and all(s == steps[0] for s in steps)) or time.monotonic() > deadline:
            return dumps
        time.sleep(0.5)


def test_redundant_experts_select_on_logical_ids(tmp_path):
    """EPLB's placement with redundant replicas makes SGLang's top-k ids physical (remapped on CPU too).

    With policy off the answers must be the stock EP server's (the logical round trip changes
    nothing); with lynx the server serves and selects on every layer.
    """
    eplb = [*BASE, "--tp", "2", "--ep-size", "2", "--ep-num-redundant-experts", "2", "--ep-dispatch-algorithm", "dynamic"]
    prompts = PROMPTS[:6]
    launch = {"stock": eplb, "off": [*eplb, "--moe-backend", "lynx", "--lynx-policy", "off"],
              "lynx": [*eplb, *STRICT, "--enable-metrics", "--decode-log-interval", "1"]}
    with servers_side_by_side(launch, timeout=START_TIMEOUT_S * 2, log_dir=tmp_path) as srv:  # starts overlap
        assert _greedy(srv["off"], prompts) == _greedy(srv["stock"], prompts)
        answers = complete(srv["lynx"].url, PROMPTS, max_tokens=MAX_NEW, concurrency=16)
        layers = scrape_lynx_metrics(srv["lynx"].url)
    assert len(answers) == len(PROMPTS)
    assert layers and all(c.steps > 0 and c.mean_experts_after < c.mean_experts_before for c in layers.values())


# ---------------------------------------------------------------------------------------------- peer policies

def _sere_file(path, model=DEFAULT_MODEL, seed=0):
    """A SERE similarity file for ``model``: every MoE layer's matrix from random expert outputs (the real
    measurement is python -m lynx_sglang.sere_calibrate's; any valid matrix exercises the serving path)."""
    from transformers import AutoConfig

    from lynx_sglang.runtime.selection.model_identity import model_identity
    from lynx_sglang.runtime.selection.peers import expert_similarity
    from lynx_sglang.runtime.selection.similarity import ExpertSimilarity, save_similarity

    config = AutoConfig.from_pretrained(model)
    ident = model_identity(config)
    g = torch.Generator().manual_seed(seed)
    mats = {layer: expert_similarity(torch.randn(ident["num_experts"], 16, 8, generator=g), "cosine")
            for layer in range(config.num_hidden_layers)}
    save_similarity(path, ExpertSimilarity(mats, ident, "cosine", {"source": "random expert outputs (test)"}))
    return str(path)


PEER_SERVERS = {
    "lynx_paper": ("--lynx-preset", "qwen3-30b-a3b"),  # lynx_paper, alpha 3, beta 2
    "xshare": ("--lynx-policy", "xshare", "--lynx-xshare-budget", "12"),
    "sere": ("--lynx-policy", "sere", "--lynx-sere-top-s", "2", "--lynx-sere-threshold", "0.5"),
}


@pytest.mark.parametrize("policy", list(PEER_SERVERS))
def test_peer_policy_serves_concurrent_requests_with_fewer_experts(policy, tmp_path):
    args = PEER_SERVERS[policy]
    if policy == "sere":
        args = (*args, "--lynx-sere-similarity", _sere_file(tmp_path / "sim.safetensors"))
    with running_server(*BASE, "--moe-backend", "lynx", *args, "--enable-metrics", "--decode-log-interval", "1",
                        log_dir=tmp_path) as srv:
        answers = complete(srv.url, PROMPTS, max_tokens=MAX_NEW, concurrency=16)
        layers = scrape_lynx_metrics(srv.url)
    assert len(answers) == len(PROMPTS) and all(isinstance(a, str) for a in answers)
    assert sorted(layers) == list(range(json.loads((DEFAULT_MODEL / "config.json").read_text())["num_hidden_layers"]))
    for layer, c in layers.items():
        print(f"{policy} layer {layer}: {c.steps} decode steps, experts per step {c.mean_experts_before:.2f} -> "
              f"{c.mean_experts_after:.2f}, rows changed {c.rows_changed} of {c.rows_voting}")
        assert c.steps > 0, f"layer {layer} saw no decode step"
        assert c.mean_experts_after < c.mean_experts_before
        assert 0 < c.rows_changed <= c.rows_voting



PAGED_K = 8  # of the bundled model's 32 experts: E/4


def test_stock_paged_experts_on_the_cpu_server_generate_as_unpaged(stock, tmp_path):
    """SGLang's paged experts runs on the CPU server (cpu/support.py): with 8 of 32 experts resident, every step
    pages and runs in waves, and greedy output is the unpaged server's (paging is exact; fp32 here)."""
    from lynx_sglang.runtime.cpu.support import PAGED_LOG_ENV

    log = tmp_path / "paged.jsonl"
    with running_server(*BASE, "--enable-paged-experts", "--paged-experts-num-resident", str(PAGED_K),
                        env={PAGED_LOG_ENV: str(log)}, log_dir=tmp_path) as srv:
        assert _greedy(srv, PROMPTS[:STOCK_PROMPTS]) == stock["greedy"]
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert sum(s["page_ins"] for s in steps) > 0 and max(s["waves"] for s in steps) > 1


def test_lynx_residency_serves_on_paged_experts(tmp_path):
    """--lynx-residency prefer on the CPU server's paged layers: the stage finds each layer's residency state, and
    every step SGLang runs pages as its LRU must (waves of K, page-ins between distinct - K and distinct)."""
    from lynx_sglang.runtime.cpu.support import PAGED_LOG_ENV

    log = tmp_path / "paged.jsonl"
    layers = json.loads((DEFAULT_MODEL / "config.json").read_text())["num_hidden_layers"]
    with running_server(*BASE, "--enable-paged-experts", "--paged-experts-num-resident", str(PAGED_K), *STRICT,
                        "--lynx-residency", "prefer", env={PAGED_LOG_ENV: str(log)}, log_dir=tmp_path) as srv:
        answers = complete(srv.url, PROMPTS, max_tokens=MAX_NEW, concurrency=len(PROMPTS))
        server_log = srv.log_path.read_text()
    assert len(answers) == len(PROMPTS) and all(isinstance(a, str) for a in answers)
    assert f"residency-aware selection (prefer) on {layers} paged layer(s), K = {PAGED_K}" in server_log
    steps = [json.loads(line) for line in log.read_text().splitlines()]
    assert {s["layer"] for s in steps} == set(range(layers))
    for s in steps:
        assert s["waves"] == max(1, -(-s["distinct"] // PAGED_K)), s
        assert max(0, s["distinct"] - PAGED_K) <= s["page_ins"] <= s["distinct"], s
    decode = [s for s in steps if 1 < s["rows"] <= len(PROMPTS)]
    assert decode and sum(s["page_ins"] for s in decode) > 0


def test_paged_experts_on_a_model_with_routed_scaling_and_a_shared_expert(tmp_path):
    """The bundled GLM-4.5-style model (routed scaling factor 2.5, one shared expert): paged at K = 16 of 64 it
    generates the unpaged server's greedy tokens (the model scales the MoE output itself off CUDA, so the CPU
    paged sum must not scale it again)."""
    from lynx_sglang.server_process import REPO

    glm4 = ("--model-path", str(REPO / "models" / "trained-glm4-moe"), *BASE)
    prompts = PROMPTS[:3]
    with servers_side_by_side({"unpaged": list(glm4),
                               "paged": [*glm4, "--enable-paged-experts", "--paged-experts-num-resident", "16"]},
                              log_dir=tmp_path) as srv:
        assert _greedy(srv["paged"], prompts) == _greedy(srv["unpaged"], prompts)
