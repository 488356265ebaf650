"""The bundled trained model: its shape, its size, and its recorded held-out numbers."""

import json

import pytest
import torch

from lynx_sglang.corpus import DOMAINS, HELDOUT, read_jsonl
from lynx_sglang.server_process import DEFAULT_MODEL
from lynx_sglang.train_model import evaluate, fixed_windows, token_streams



@pytest.fixture(scope="module")
def record():
    return json.loads((DEFAULT_MODEL / "training.json").read_text())


def test_shape_size_and_balance(record):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(DEFAULT_MODEL)  # transformers 5 stores num_experts as num_local_experts
    assert cfg.model_type == "qwen3_moe"
    assert cfg.num_experts >= 32 and cfg.num_experts_per_tok >= 4
    assert record["final"] is True
    size = sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir())
    assert size <= 30 * 2**20, f"bundled model is {size / 2**20:.1f} MiB"
    # The per-layer balance loss leaves no expert dead in any layer at the end of training.
    lines = (DEFAULT_MODEL / "training_log.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    assert len(last["loads"]) == cfg.num_hidden_layers
    assert all(layer["dead"] == 0 for layer in last["loads"]), last["loads"]


def test_loads_in_transformers_and_heldout_numbers_match_the_record(record):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    streams = token_streams(read_jsonl(HELDOUT), tokenizer)
    assert set(streams) == set(DOMAINS)
    n, length = record["train"]["eval_windows"], record["train"]["seq_len"] + 1
    got = evaluate(model, {d: fixed_windows(s, n, length) for d, s in streams.items()})
    for domain, want in record["heldout"].items():
        assert got[domain]["tokens"] == want["tokens"]
        # Same weights, same windows; only float summation order may differ between machines.
        assert abs(got[domain]["accuracy"] - want["accuracy"]) <= 0.002, (domain, got[domain], want)
        assert abs(got[domain]["loss"] - want["loss"]) <= 0.005, (domain, got[domain], want)
    # A trained model, not a random one: far above chance on every domain.
    assert all(v["accuracy"] > 0.25 for v in got.values()), got
