"""SERE's similarity file: round trip, and every file the server must refuse at start-up."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from lynx_sglang.runtime.selection import peers
from lynx_sglang.runtime.selection.config import ConfigError
from lynx_sglang.runtime.selection.model_identity import model_identity
from lynx_sglang.runtime.selection.similarity import FORMAT, ExpertSimilarity, load_similarity, save_similarity

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ("trained-qwen3-moe", "trained-qwen3-moe-e128", "trained-glm4-moe")
CONFIG = SimpleNamespace(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=8,
                         num_hidden_layers=3, hidden_size=16, num_experts_per_tok=2, norm_topk_prob=True,
                         mlp_only_layers=[])


def _sim(E=8, seed=0):
    return peers.expert_similarity(torch.randn(E, 5, 3, generator=torch.Generator().manual_seed(seed)), "cka")


def _save(path, matrices, config=CONFIG, method="cka"):
    save_similarity(path, ExpertSimilarity(matrices, model_identity(config), method, {"tokens": 5}))
    return path


def _raw(path, tensors, meta):
    """A file written around ``save_similarity``'s checks (what a broken or foreign tool could leave)."""
    save_file(tensors, str(path), metadata={"lynx": json.dumps(meta)} if meta is not None else None)
    return path


def test_round_trip(tmp_path):
    mats = {0: _sim(seed=0), 2: _sim(seed=2)}
    path = _save(tmp_path / "s.safetensors", mats)
    got = load_similarity(path, model_identity(CONFIG), [0, 2])
    assert got.method == "cka" and got.meta == {"tokens": 5} and got.num_experts == 8
    assert got.identity == model_identity(CONFIG)
    assert set(got.matrices) == {0, 2} and all(torch.equal(got.matrices[i], mats[i]) for i in mats)
    assert not (tmp_path / "s.safetensors.partial").exists()


def test_other_model_expert_count_and_missing_layers_are_refused(tmp_path):
    path = _save(tmp_path / "s.safetensors", {0: _sim(), 2: _sim(seed=1)})
    other = SimpleNamespace(**{**vars(CONFIG), "num_experts_per_tok": 4})
    with pytest.raises(ConfigError, match="made for another model: num_experts_per_tok is 2 there, 4 in the model"):
        load_similarity(path, model_identity(other), [0, 2])
    with pytest.raises(ConfigError, match=r"has no matrix for MoE layer\(s\) \[1\]"):
        load_similarity(path, model_identity(CONFIG), [0, 1, 2])
    e16 = SimpleNamespace(**{**vars(CONFIG), "num_experts": 16})
    with pytest.raises(ConfigError, match="num_experts is 8 there, 16"):
        load_similarity(path, model_identity(e16), [0])
    # The identity matches but the matrices are for another expert count (a broken writer).
    meta = {"format": FORMAT, "identity": model_identity(e16), "method": "cka"}
    bad = _raw(tmp_path / "e.safetensors", {"layer.0": _sim()}, meta)
    with pytest.raises(ConfigError, match="layer 0's similarity is for 8 experts, the model has 16"):
        load_similarity(bad, model_identity(e16), [0])


@pytest.mark.parametrize("case,msg", [
    ("nan", "holds NaN, inf or values outside"),
    ("range", "holds NaN, inf or values outside"),
    ("not square", "is not square"),
    ("format", "is not a lynx-sere-similarity/1 file"),
    ("no metadata", "is not a lynx-sere-similarity/1 file"),
    ("tensor name", "unexpected tensor 'sim.0'"),
    ("missing", "cannot read SERE similarity file"),
    ("garbage", "cannot read SERE similarity file"),
])
def test_broken_files_are_refused(tmp_path, case, msg):
    meta = {"format": FORMAT, "identity": model_identity(CONFIG), "method": "cka"}
    path = tmp_path / "s.safetensors"
    m = _sim()
    if case == "nan":
        m[1, 2] = float("nan")
        _raw(path, {"layer.0": m}, meta)
    elif case == "range":
        _raw(path, {"layer.0": m * 1.5}, meta)
    elif case == "not square":
        _raw(path, {"layer.0": m[:, :7].contiguous()}, meta)
    elif case == "format":
        _raw(path, {"layer.0": m}, {**meta, "format": "other/1"})
    elif case == "no metadata":
        _raw(path, {"layer.0": m}, None)
    elif case == "tensor name":
        _raw(path, {"sim.0": m}, meta)
    elif case == "garbage":
        path.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=msg):
        load_similarity(path, model_identity(CONFIG), [0])


def test_save_refuses_what_load_would(tmp_path):
    bad = _sim()
    bad[0, 0] = float("inf")
    with pytest.raises(ConfigError, match="NaN, inf"):
        _save(tmp_path / "s.safetensors", {0: bad})
    with pytest.raises(ConfigError, match="no similarity matrix"):
        _save(tmp_path / "s.safetensors", {})
    assert not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize("model", BUNDLED)
def test_sglang_and_transformers_configs_have_one_identity(model):
    """The calibration tool reads the config with transformers, the server gets SGLang's ``hf_config``
    (``ModelConfig``, what ``prepare_moe_topk`` hands our stage): both must give one identity."""
    from sglang.srt.configs.model_config import ModelConfig
    from transformers import AutoConfig

    path = str(ROOT / "models" / model)
    tool = model_identity(AutoConfig.from_pretrained(path))
    served = model_identity(ModelConfig(path).hf_config)
    assert served == tool
    assert tool["num_experts"] > 0 and "num_experts_per_tok" in tool
