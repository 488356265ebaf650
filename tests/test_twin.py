"""The bandwidth-realistic twin (lynx_sglang/twin.py): the same function and the same routing, wider experts.

Small factors only (2 and 4) into tmp_path: the real twins (factor 32-128, 0.6-2.4 GB) are built by hand
under build/. Everything runs in fp32, where the twin differs from its source only by summation order:
logits within 1e-4 of the logit scale, and top-k ids equal on every MoE layer for 2 x 48 held-out tokens
per domain.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lynx_sglang import twin

REPO = Path(__file__).resolve().parent.parent
MODELS = {"qwen3": REPO / "models" / "trained-qwen3-moe", "glm4": REPO / "models" / "trained-glm4-moe"}
LOGIT_RTOL = 1e-4  # max |logit difference| over max |logit|, fp32


def _heldout_ids(tokenizer, per_domain: int = 48, rows: int = 2) -> torch.Tensor:
    """[rows * domains, per_domain] token ids from the first held-out documents of each domain."""
    from lynx_sglang.routing_stats import heldout_windows

    windows, _ = heldout_windows(tokenizer, window=per_domain, max_windows=rows)
    return torch.cat([w[:rows] for w in windows.values()])


def _routing(model, ids: torch.Tensor):
    """(LM logits [N, T, V], per MoE layer the model's own top-k ids [N*T, k]) in fp32."""
    from lynx_sglang.model_routing import model_routers

    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    routers = model_routers(model)
    picks = [r.route_logits(z.float().reshape(-1, z.shape[-1]))[0] for r, z in zip(routers, out.router_logits)]
    assert len(picks) == model.config.num_hidden_layers
    return out.logits.float(), picks


@pytest.mark.parametrize("family,factor", [("qwen3", 4), ("glm4", 2)])
def test_twin_preserves_logits_and_routing(tmp_path, family, factor):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = MODELS[family]
    info = twin.build_twin(src, tmp_path / "twin", factor=factor, quiet=True)
    cfg_src = json.loads((src / "config.json").read_text())
    cfg_twin = json.loads((tmp_path / "twin" / "config.json").read_text())
    assert cfg_twin["moe_intermediate_size"] == factor * cfg_src["moe_intermediate_size"]
    assert {k: v for k, v in cfg_twin.items() if k != "moe_intermediate_size"} == \
        {k: v for k, v in cfg_src.items() if k != "moe_intermediate_size"}
    assert (tmp_path / "twin" / "tokenizer.json").is_file() and (tmp_path / "twin" / "twin.json").is_file()
    assert info["bytes_per_expert_bf16"]["twin"] == factor * info["bytes_per_expert_bf16"]["source"]
    assert info["tensors_widened"]["routed"] == 3 * cfg_src["num_hidden_layers"] * info["experts"]
    assert (info["tensors_widened"]["shared"] > 0) == (family == "glm4")

    tok = AutoTokenizer.from_pretrained(src)
    ids = _heldout_ids(tok)
    a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "twin", dtype=torch.float32).eval()
    # The twin really is wider (transformers read the new size and the widened tensors).
    n_a, n_b = sum(p.numel() for p in a.parameters()), sum(p.numel() for p in b.parameters())
    assert n_b > n_a
    logits_a, picks_a = _routing(a, ids)
    logits_b, picks_b = _routing(b, ids)
    scale = logits_a.abs().max()
    assert (logits_a - logits_b).abs().max() <= LOGIT_RTOL * scale
    for layer, (pa, pb) in enumerate(zip(picks_a, picks_b)):
        assert torch.equal(pa, pb), f"layer {layer}: top-k ids differ"
    # The source's expert-similarity file comes along and fits the twin's config (what the server checks),
    # so the twin serves the same default rule as its source.
    from lynx_sglang.runtime.selection.model_identity import model_identity
    from lynx_sglang.runtime.selection.similarity import load_similarity

    sim_twin = load_similarity(tmp_path / "twin" / "sere_similarity.safetensors", model_identity(b.config),
                               range(cfg_src["num_hidden_layers"]))
    sim_src = load_similarity(src / "sere_similarity.safetensors", model_identity(a.config),
                              range(cfg_src["num_hidden_layers"]))
    assert all(torch.equal(sim_twin.matrices[i], m) for i, m in sim_src.matrices.items())


def test_widen_is_exact_in_bf16():
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(6, 8, generator=g).bfloat16()
    down = torch.randn(8, 6, generator=g).bfloat16()
    r = 8
    g2, d2 = twin.widen("x.gate_proj.weight", gate, r), twin.widen("x.down_proj.weight", down, r)
    assert g2.shape == (48, 8) and d2.shape == (8, 48) and g2.dtype == d2.dtype == torch.bfloat16
    assert torch.equal(g2[12:18], gate)
    assert torch.equal(d2[:, 12:18].float() * r, down.float())  # a power of two divides exactly


def test_default_factor_makes_experts_at_least_4_mib():
    assert twin.default_factor(256, 96) == 32  # trained-qwen3-moe: 0.14 MiB -> 4.5 MiB
    assert twin.default_factor(256, 32) == 128  # trained-qwen3-moe-e128
    assert twin.default_factor(256, 64) == 64  # trained-glm4-moe
    assert twin.default_factor(2048, 768) == 1  # Qwen3-30B-A3B is already there


def test_qwen3_30b_share_from_public_config():
    share = twin.qwen3_30b_a3b_share(16)
    assert share["expert_bytes"] == 3 * 2048 * 768 * 2
    assert 0.9 < share["routed_share"] < 0.97


@pytest.mark.parametrize("factor", [0, -2, 3, 6, 2.0, True])
def test_bad_factor_refused(tmp_path, factor):
    with pytest.raises(twin.TwinError, match="power of two"):
        twin.build_twin(MODELS["qwen3"], tmp_path / "t", factor=factor, quiet=True)
    assert not (tmp_path / "t").exists()


def test_not_a_moe_model_refused(tmp_path):
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128}))
    with pytest.raises(twin.TwinError, match="not a MoE model"):
        twin.build_twin(dense, tmp_path / "t", factor=2, quiet=True)
    with pytest.raises(twin.TwinError, match="no config.json"):
        twin.build_twin(tmp_path / "missing", tmp_path / "t", factor=2, quiet=True)


def test_cli_refuses_with_a_message(tmp_path, capsys):
    assert twin.main([str(MODELS["qwen3"]), "--factor", "3", "--out", str(tmp_path / "t")]) == 2
    assert "power of two" in capsys.readouterr().err
