"""The bundled trained models: shape, size, recorded held-out numbers, and serving in SGLang.

Three models ship, all trained by ``lynx_sglang.train_model`` (nothing here retrains):

* ``trained-qwen3-moe``: Qwen3-MoE, 32 experts, top-4 (the default model everywhere);
* ``trained-qwen3-moe-e128``: Qwen3-MoE, 128 experts, top-8;
* ``trained-glm4-moe``: GLM-4.5-style MoE (``glm4_moe``): sigmoid scores, an aux-loss-free
  correction bias, group-limited routing, routed scaling and one shared expert.

The transformers checks run for all three. The server checks (SGLang's prompt log-probabilities
equal transformers' fp32 ones, one server per model) run for the two newer models here; the
default model's are in ``test_cpu_server.py`` / ``test_lynx_server.py``, on servers shared
with other tests. ``--moe-backend lynx`` on the glm4_moe model (sigmoid + bias + shared
expert path) is checked once, on its own server.
"""

import json
import struct
from pathlib import Path

import pytest
import torch

from lynx_sglang.corpus import DOMAINS, HELDOUT, read_jsonl
from lynx_sglang.server_process import REPO, start_server, running_server
from lynx_sglang.train_model import evaluate, fixed_windows, token_streams

MODELS = {
    # name: (model_type, routed experts, top-k)
    "trained-qwen3-moe": ("qwen3_moe", 32, 4),
    "trained-qwen3-moe-e128": ("qwen3_moe", 128, 8),
    "trained-glm4-moe": ("glm4_moe", 64, 6),
}
NEW_MODELS = ("trained-qwen3-moe-e128", "trained-glm4-moe")
GLM4 = REPO / "models" / "trained-glm4-moe"

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="launch/cpu_server.sh is for CPU-only machines")


def _path(name: str) -> Path:
    return REPO / "models" / name


def _record(name: str) -> dict:
    return json.loads((_path(name) / "training.json").read_text())


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


@pytest.mark.parametrize("name", MODELS)
def test_shape_size_and_balance(name):
    from transformers import AutoConfig

    path, (model_type, experts, top_k) = _path(name), MODELS[name]
    record = _record(name)
    cfg = AutoConfig.from_pretrained(path)  # transformers 5 stores num_experts as num_local_experts
    assert cfg.model_type == model_type
    assert cfg.num_local_experts == experts and cfg.num_experts_per_tok == top_k
    assert cfg.num_hidden_layers == 4 and cfg.hidden_size == 256
    assert record["final"] is True
    size = sum(p.stat().st_size for p in path.iterdir())
    if name == "trained-qwen3-moe":
        assert size <= 30 * 2**20, f"bundled model is {size / 2**20:.1f} MiB"
    else:  # the bound: at most 40 MB of bf16 safetensors
        assert (path / "model.safetensors").stat().st_size <= 40e6
        assert size <= 40 * 2**20, f"{name} is {size / 2**20:.1f} MiB"
        # The same tokenizer (token ids) as the first bundled model.
        assert (path / "tokenizer.json").read_bytes() == (_path("trained-qwen3-moe") / "tokenizer.json").read_bytes()
    # Balancing (per-layer loss; for glm4_moe the correction bias) leaves no expert dead in any
    # layer's batch at the end of training.
    lines = (path / "training_log.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert len(last["loads"]) == cfg.num_hidden_layers
    assert all(layer["dead"] == 0 for layer in last["loads"]), last["loads"]


@pytest.mark.parametrize("name", MODELS)
def test_loads_in_transformers_and_heldout_numbers_match_the_record(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, record = _path(name), _record(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    streams = token_streams(read_jsonl(HELDOUT), tokenizer)
    assert set(streams) == set(DOMAINS)
    n, length = record["train"]["eval_windows"], record["train"]["seq_len"] + 1
    got = evaluate(model, {d: fixed_windows(s, n, length) for d, s in streams.items()})
    for domain, want in record["heldout"].items():
        assert got[domain]["tokens"] == want["tokens"]
        # Same weights, same windows; only float summation order may differ between machines.
        assert abs(got[domain]["accuracy"] - want["accuracy"]) <= 0.002, (domain, got[domain], want)
        assert abs(got[domain]["loss"] - want["loss"]) <= 0.005, (domain, got[domain], want)
    # A trained model, not a random one: far above chance (1/4096) on every domain. The newer models
    # saw 2.9-3.5 M tokens (the CPU was shared while they trained), the first one 7.5 M.
    floor = 0.25 if name == "trained-qwen3-moe" else 0.15
    assert all(v["accuracy"] > floor for v in got.values()), got


def test_glm4_router_is_sigmoid_with_a_trained_bias_over_expert_groups():
    """What makes the glm4_moe model different: its routing config and the correction bias."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(GLM4)
    assert cfg.n_shared_experts == 1 and cfg.first_k_dense_replace == 0 and cfg.num_nextn_predict_layers == 0
    assert cfg.n_group > cfg.topk_group >= 1 and cfg.routed_scaling_factor != 1.0 and cfg.norm_topk_prob
    record = _record("trained-glm4-moe")
    assert record["family"] == "glm4_moe" and record["train"]["bias_update_rate"] > 0
    # The bias ships in fp32 (as GLM-4.5's checkpoints), every other tensor in bf16.
    header = _safetensors_header(GLM4 / "model.safetensors")
    dtypes = {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
    biases = sorted(k for k in dtypes if k.endswith("e_score_correction_bias"))
    assert len(biases) == cfg.num_hidden_layers and all(dtypes[k] == "F32" for k in biases)
    assert all(dtypes[k] == "BF16" for k in dtypes if k not in biases)
    model = AutoModelForCausalLM.from_pretrained(GLM4, dtype=torch.float32).eval()
    for layer in model.model.layers:
        gate = layer.mlp.gate
        assert "e_score_correction_bias" in dict(gate.named_buffers())  # a buffer: not learned by gradient
        assert float(gate.e_score_correction_bias.abs().max()) > 0.01  # moved by the aux-loss-free update
        # Group-limited routing: every token's picks lie in at most topk_group of the n_group groups.
        x = torch.randn(64, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
        _, weights, ids = gate(x)
        groups = ids // (cfg.n_routed_experts // cfg.n_group)
        assert max(len(set(row.tolist())) for row in groups) <= cfg.topk_group
        torch.testing.assert_close(weights.sum(-1), torch.full((64,), cfg.routed_scaling_factor))


# --------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module", params=NEW_MODELS)
def served(request, tmp_path_factory):
    """(name, stock TP-1 server of that model in float32), one server per model for this module."""
    if torch.cuda.is_available():
        pytest.skip("launch/cpu_server.sh is for CPU-only machines")
    name = request.param
    srv = start_server("--model-path", str(_path(name)), "--dtype", "float32", log_dir=tmp_path_factory.mktemp(name))
    print(f"\n{name}: server healthy after {srv.started_in_s:.1f} s")
    try:
        yield name, srv
    finally:
        srv.stop()


CODE = "def read_config(path):\n    with open(path) as f:\n        return json.load(f)\n"


@cpu_only
def test_sglang_serves_the_model_as_transformers_computes_it(served):
    """SGLang loads the model with its own model code: prompt log-probs match transformers' fp32 ones."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, server = served
    tokenizer = AutoTokenizer.from_pretrained(_path(name))
    ids = tokenizer(CODE)["input_ids"]
    out = server.post("/generate", {"input_ids": ids, "sampling_params": {"temperature": 0.0, "max_new_tokens": 1},
                                    "return_logprob": True, "logprob_start_len": 0})
    served_lp = torch.tensor([lp for lp, *_ in out["meta_info"]["input_token_logprobs"][1:]])
    model = AutoModelForCausalLM.from_pretrained(_path(name), dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    want = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert served_lp.shape == want.shape
    print(f"\n{name}: max |SGLang - transformers| prompt log-prob {float((served_lp - want).abs().max()):.2e}, "
          f"mean p {float(want.exp().mean()):.3f}")
    torch.testing.assert_close(served_lp, want, atol=2e-3, rtol=0)
    # A trained model: it predicts this code far above chance (1/4096); the newer models saw fewer tokens.
    assert float(want.exp().mean()) > 0.05
    answer = server.generate("def fib(n):", max_new_tokens=8)
    assert 0 < answer["meta_info"]["completion_tokens"] <= 8


@cpu_only
def test_lynx_on_glm4_selects_fewer_experts_on_every_layer(tmp_path):
    """--moe-backend lynx on the sigmoid + bias + shared-expert model: it serves, and every layer's
    decode steps touch fewer distinct routed experts after selection than before."""
    from lynx_sglang.client import PROMPTS, complete, scrape_lynx_metrics

    args = ("--model-path", str(GLM4), "--dtype", "float32", "--moe-backend", "lynx", "--enable-metrics",
            "--decode-log-interval", "1")
    with running_server(*args, log_dir=tmp_path) as srv:
        answers = complete(srv.url, PROMPTS, max_tokens=12, concurrency=16)
        layers = scrape_lynx_metrics(srv.url)
    assert len(answers) == len(PROMPTS) and all(isinstance(a, str) for a in answers)
    assert sorted(layers) == list(range(4))
    for layer, c in layers.items():
        print(f"\nlayer {layer}: {c.steps} decode steps, experts/step {c.mean_experts_before:.2f} -> "
              f"{c.mean_experts_after:.2f}, rows re-routed {c.rows_changed}/{c.rows_voting}")
        assert c.steps > 0, f"layer {layer} saw no decode step"
        assert c.mean_experts_after < c.mean_experts_before, (layer, c)
        assert 0 < c.rows_changed <= c.rows_voting
