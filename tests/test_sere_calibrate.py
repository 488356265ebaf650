"""SERE's similarity calibration on the bundled model, and the corpus's calibration split."""

from pathlib import Path

import pytest
import torch

from lynx_sglang import sere_calibrate as C
from lynx_sglang.accuracy import load_model, moe_blocks, moe_layer_ids
from lynx_sglang.corpus import CALIBRATION, HELDOUT, read_calibration, read_jsonl
from lynx_sglang.runtime.selection.config import ConfigError
from lynx_sglang.runtime.selection.model_identity import model_identity
from lynx_sglang.runtime.selection.similarity import load_similarity

MODELS = Path(__file__).resolve().parent.parent / "models"
MODEL = MODELS / "trained-qwen3-moe"


def test_calibration_split_is_training_text_only():
    calib = read_calibration()
    held = {d.path for d in read_jsonl(HELDOUT)}
    assert calib and not ({d.path for d in calib} & held) and not any(d.heldout for d in calib)
    assert {d.domain for d in calib} == {"python", "c", "shell", "english"}
    assert 50_000 < CALIBRATION.stat().st_size < 500_000


@pytest.mark.parametrize("name", ["trained-qwen3-moe", "trained-glm4-moe"])
def test_expert_outputs_are_the_experts_own(name):
    model = load_model(MODELS / name)[0]
    block = moe_blocks(model)[1]
    x = torch.randn(5, model.config.hidden_size)
    Y = C.expert_outputs(block.experts, x, chunk=2)
    E = block.experts.num_experts
    assert Y.shape == (E, 5, model.config.hidden_size)
    for e in (0, 7, E - 1):
        ids = torch.full((5, 1), e, dtype=torch.long)
        torch.testing.assert_close(Y[e], block.experts(x, ids, torch.ones(5, 1)), rtol=1e-5, atol=1e-5)


def test_calibrate_writes_a_file_the_server_accepts_only_for_this_model(tmp_path):
    out = C.run(MODEL, tokens=256, method="cosine", out=tmp_path / "sim.safetensors", window=64)
    config = load_model(MODEL)[0].config
    ident = model_identity(config)
    layers = list(range(config.num_hidden_layers))
    sim = load_similarity(out, ident, layers)
    assert sim.method == "cosine" and sim.meta["tokens"] == 256 and sim.meta["tool"] == C.TOOL
    assert sim.meta["data"].endswith("calibration.jsonl.gz") and len(sim.meta["data_sha256"]) == 16
    for layer in layers:
        m = sim.matrices[layer]
        assert m.shape == (config.num_experts, config.num_experts) and m.dtype == torch.float32
        torch.testing.assert_close(m.diagonal(), torch.ones(config.num_experts))
        torch.testing.assert_close(m, m.T)
        off = m[~torch.eye(m.shape[0], dtype=torch.bool)]
        assert bool((off < 1).all()) and off.std() > 0  # experts differ
    other = model_identity(load_model(MODELS / "trained-qwen3-moe-e128")[0].config)
    with pytest.raises(ConfigError, match="another model"):
        load_similarity(out, other, layers)


def test_bundled_similarity_files_match_their_models():
    for name in ("trained-qwen3-moe", "trained-qwen3-moe-e128", "trained-glm4-moe"):
        path = MODELS / name / "sere_similarity.safetensors"
        if not path.exists():
            pytest.skip(f"{path} not generated (python -m lynx_sglang.sere_calibrate models/{name})")
        model = load_model(MODELS / name)[0]
        sim = load_similarity(path, model_identity(model.config), moe_layer_ids(model))
        assert sim.method == "frobenius" and sim.meta["tokens"] >= 2048


def test_a_model_outside_models_needs_data(tmp_path):
    import shutil

    copy = tmp_path / "my-model"
    shutil.copytree(MODEL, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(SystemExit, match="--data"):
        C.run(copy, tokens=64)
    assert not C.is_bundled(copy) and C.is_bundled(MODEL)
