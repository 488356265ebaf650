"""Bandwidth-realistic twin of a bundled MoE model: the same function with experts r times wider.

The bundled models' routed experts are tiny (trained-qwen3-moe: 0.15 MB each in bf16), so on a
CPU server skipping an expert saves almost nothing and any per-step cost of selection shows up
as a slowdown. Real MoE models read mostly expert weights in a decode step (Qwen3-30B-A3B: 9.4 MB
per expert, > 90 % of the weight bytes of a step at B = 16). The twin widens every routed expert's
intermediate size by a power of two ``r`` with a function-preserving transform:

* gate_proj and up_proj [ff, d] -> their rows tiled r times [r*ff, d] (row j of the twin is row
  j mod ff of the original, for gate and up alike, so act(gate_j) * up_j pairs stay matched);
* down_proj [d, ff] -> its columns tiled r times and divided by r [d, r*ff].

The twin computes sum_j (r copies of a_j * w_j / r) = sum_j a_j * w_j: the same function up to
floating-point summation order (dividing a bf16 weight by a power of two is exact unless it
underflows to a subnormal). Router, attention, norms, embeddings and LM head are untouched, so
routing is the same up to rounding (tests/test_twin.py checks logits and top-k ids).

glm4_moe: the shared expert is sized from ``moe_intermediate_size * n_shared_experts`` by both
transformers and SGLang, so it is widened by the same transform (it could not stay as it is
with the new ``moe_intermediate_size``); it is read on every step whatever the selection does.

    python -m lynx_sglang.twin models/trained-qwen3-moe --out build/twin-trained-qwen3-moe   # r = 32
    python -m lynx_sglang.twin models/trained-glm4-moe --factor 64 --out build/twin-trained-glm4-moe

``twin.json`` beside the weights records the factor, bytes per expert, and the share of the
weight bytes of a decode step that are routed experts (how it is computed: ``decode_read_share``).
The twins are large (0.6-2.4 GB): build them under build/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
ROUTING_STATS_DIR = REPO / "benchmarks" / "results"
MIN_EXPERT_BYTES = 4 * 2**20  # default factor: one expert at least this large in the served dtype
SERVED_ELEM = 2  # bf16
# The expert-similarity file fits the twin as it is: the twin's experts compute the source's functions, and
# the file's model identity leaves out moe_intermediate_size. So the twin serves the same default rule (lynx
# with the similarity-aware refill) as its source.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "sere_similarity.safetensors")

#: Keys of routed-expert projections (per-expert layout, as the bundled models store them).
ROUTED = re.compile(r"\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
#: Keys of a shared expert sized from moe_intermediate_size (glm4_moe, DeepSeek family).
SHARED = re.compile(r"\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight$")

#: Qwen3-30B-A3B's public config (HF Qwen/Qwen3-30B-A3B config.json), for the comparison.
QWEN3_30B_A3B = {"hidden_size": 2048, "num_hidden_layers": 48, "num_experts": 128, "num_experts_per_tok": 8,
                 "moe_intermediate_size": 768, "vocab_size": 151936, "num_attention_heads": 32,
                 "num_key_value_heads": 4, "head_dim": 128, "tie_word_embeddings": False}


class TwinError(ValueError):
    """A model or factor the twin cannot be built for."""


def check_factor(factor) -> int:
    """``factor`` as an int if it is a power of two >= 1, else TwinError."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or factor & (factor - 1):
        raise TwinError(f"--factor must be a power of two >= 1 (1, 2, 4, ...), got {factor!r}: a power of two keeps "
                        f"the down projection's division by the factor exact in bf16")
    return factor


def moe_config(config: dict) -> Dict[str, int]:
    """E, k and the routed expert width of a MoE config, or TwinError for a model without routed experts."""
    E = config.get("num_experts", config.get("num_local_experts", config.get("n_routed_experts")))
    ff = config.get("moe_intermediate_size")
    k = config.get("num_experts_per_tok")
    if not E or not ff or not k:
        raise TwinError(f"not a MoE model (model_type {config.get('model_type')!r}): config.json has no routed experts "
                        f"(num_experts / num_local_experts / n_routed_experts, moe_intermediate_size, "
                        f"num_experts_per_tok)")
    return {"experts": int(E), "top_k": int(k), "ff": int(ff), "hidden": int(config["hidden_size"])}


def expert_bytes(hidden: int, ff: int, elem: int = SERVED_ELEM) -> int:
    """Bytes of one routed expert (gate, up, down)."""
    return 3 * hidden * ff * elem


def default_factor(hidden: int, ff: int, min_bytes: int = MIN_EXPERT_BYTES) -> int:
    """Smallest power of two r with one widened expert >= ``min_bytes`` in bf16."""
    r = 1
    while expert_bytes(hidden, ff * r) < min_bytes:
        r *= 2
    return r


def widen(name: str, w: torch.Tensor, r: int) -> torch.Tensor:
    """The transform of one projection: gate/up rows tiled r times, down columns tiled and divided by r."""
    if r == 1:
        return w
    if name.endswith("down_proj.weight"):
        return (w.float().repeat(1, r) / r).to(w.dtype)  # exact: r is a power of two
    return w.repeat(r, 1)


def _measured_distinct(model_name: str, batch: int, num_experts: int) -> Optional[dict]:
    """Mean distinct experts per MoE layer at ``batch`` (independent sequences, mixed domains) from the
    model's routing statistics (benchmarks/results/routing_stats_<name>.json), if recorded."""
    path = ROUTING_STATS_DIR / f"routing_stats_{model_name}.json"
    if not path.is_file():
        return None
    stats = json.loads(path.read_text())
    if int(stats.get("num_experts", -1)) != num_experts:
        return None
    per_layer = []
    for layer in stats.get("layers", []):
        rec = layer.get("distinct_experts", {}).get("independent_mixed", {}).get(str(batch))
        if rec is None:
            return None
        per_layer.append(float(rec["mean"]))
    if not per_layer:
        return None
    return {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer),
            "source": f"{path.relative_to(REPO)} (independent_mixed, B={batch}: held-out sequences, one token each)"}


def uniform_distinct(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts when each of ``batch`` rows picks ``top_k`` of E uniformly."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def decode_read_share(groups: Dict[str, int], routed_per_layer: Sequence[int], expert_b: int, distinct: Sequence[float],
                      batch: int, embed_bytes_per_row: int) -> dict:
    """Share of the weight bytes one decode step at ``batch`` reads that are routed experts.

    ``groups``: bytes of the weights read whole on every step (attention, norms, routers, shared
    experts, LM head); the embedding contributes ``batch`` rows; routed experts contribute
    ``distinct[l]`` experts of ``expert_b`` bytes per MoE layer. KV-cache reads are not weights and
    are left out (they grow with context; at short context they are small against these).
    """
    routed = sum(d * expert_b for d in distinct)
    other = sum(groups.values()) + batch * embed_bytes_per_row
    return {"batch": batch, "routed_expert_bytes": routed, "other_weight_bytes": other,
            "other_by_kind": {**groups, "embedding_rows": batch * embed_bytes_per_row},
            "routed_share": routed / (routed + other), "distinct_experts_per_layer": list(distinct),
            "all_routed_experts_bytes": sum(routed_per_layer) * expert_b}


def _kind(key: str) -> str:
    if ROUTED.search(key):
        return "routed_experts"
    if SHARED.search(key):
        return "shared_experts"
    if "embed_tokens" in key:
        return "embedding"
    if "lm_head" in key:
        return "lm_head"
    if ".self_attn." in key:
        return "attention"
    if ".mlp.gate." in key:
        return "router"
    if ".mlp." in key:
        return "dense_mlp"
    return "norms_other"


def read_share_of_dir(model_dir: Path, config: dict, r: int, batch: int) -> dict:
    """``decode_read_share`` of a model dir's safetensors after widening by ``r`` (bf16 for every weight:
    the served dtype; fp32 tensors such as a correction bias are counted at their own size)."""
    mc = moe_config(config)
    groups: Dict[str, int] = {}
    layers = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        if f.name == "sere_similarity.safetensors":
            continue
        with safe_open(f, "pt") as st:
            for key in st.keys():
                kind = _kind(key)
                sl = st.get_slice(key)
                n = math.prod(sl.get_shape())
                elem = 4 if sl.get_dtype() == "F32" else SERVED_ELEM  # e.g. a correction bias kept in fp32
                if kind == "routed_experts":
                    layers.add(int(key.split(".layers.")[1].split(".")[0]))
                    continue
                if kind == "shared_experts":
                    n *= r
                if kind == "embedding":
                    continue
                groups[kind] = groups.get(kind, 0) + n * elem
    eb = expert_bytes(mc["hidden"], mc["ff"] * r)
    measured = _measured_distinct(model_dir.name, batch, mc["experts"])
    if measured is not None:
        distinct = measured["per_layer"]
        if len(distinct) != len(layers):
            distinct = [measured["mean"]] * len(layers)
        how = measured["source"]
    else:
        distinct = [uniform_distinct(mc["experts"], mc["top_k"], batch)] * len(layers)
        how = "uniform routing (no recorded routing statistics for this model)"
    out = decode_read_share(groups, [mc["experts"]] * len(layers), eb, distinct, batch,
                            mc["hidden"] * SERVED_ELEM)
    out["distinct_experts_from"] = how
    return out


def qwen3_30b_a3b_share(batch: int = 16) -> dict:
    """The same share for Qwen3-30B-A3B from its public config numbers (bf16), uniform routing for distinct experts
    (its real routing is more skewed: fewer distinct experts, a slightly smaller share)."""
    c = QWEN3_30B_A3B
    d, L, hd = c["hidden_size"], c["num_hidden_layers"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    attn = (d * q + 2 * d * kv + q * d + 2 * hd) * L * SERVED_ELEM  # q, k, v, o, q/k norms
    norms = (2 * d * L + d) * SERVED_ELEM
    router = c["num_experts"] * d * L * SERVED_ELEM
    lm_head = c["vocab_size"] * d * SERVED_ELEM
    eb = expert_bytes(d, c["moe_intermediate_size"])
    distinct = [uniform_distinct(c["num_experts"], c["num_experts_per_tok"], batch)] * L
    out = decode_read_share({"attention": attn, "norms_other": norms, "router": router, "lm_head": lm_head},
                            [c["num_experts"]] * L, eb, distinct, batch, d * SERVED_ELEM)
    out.update(expert_bytes=eb, config=c, distinct_experts_from="uniform routing, E(1-(1-k/E)^B)")
    return out


def build_twin(model_dir: Path, out_dir: Path, factor: Optional[int] = None, batch: int = 16,
               quiet: bool = False) -> dict:
    """Write the twin of ``model_dir`` into ``out_dir``; returns (and writes as twin.json) what it built."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise TwinError(f"{model_dir} has no config.json")
    config = json.loads(cfg_path.read_text())
    mc = moe_config(config)
    r = check_factor(factor if factor is not None else default_factor(mc["hidden"], mc["ff"]))
    files = sorted(f for f in model_dir.glob("*.safetensors") if f.name != "sere_similarity.safetensors")
    if not files:
        raise TwinError(f"{model_dir} has no *.safetensors weights")
    if out_dir.resolve() == model_dir.resolve():
        raise TwinError("--out must differ from the model directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    widened = {"routed": 0, "shared": 0}
    index = {}
    total = 0
    for f in files:
        tensors = {}
        with safe_open(f, "pt") as st:
            meta = st.metadata() or {}
            for key in st.keys():
                w = st.get_tensor(key)
                if ROUTED.search(key):
                    w = widen(key, w, r)
                    widened["routed"] += 1
                elif SHARED.search(key):
                    w = widen(key, w, r)
                    widened["shared"] += 1
                tensors[key] = w.contiguous()
                total += w.numel() * w.element_size()
                index[key] = f.name
        save_file(tensors, str(out_dir / f.name), metadata={**meta, "format": "pt"})
        del tensors
    if widened["routed"] == 0:
        raise TwinError(f"{model_dir}: no routed-expert weights matching *.mlp.experts.<i>.(gate|up|down)_proj.weight "
                        f"(a fused expert layout is not supported)")
    idx = model_dir / "model.safetensors.index.json"
    if idx.is_file():
        j = json.loads(idx.read_text())
        j.setdefault("metadata", {})["total_size"] = total
        (out_dir / idx.name).write_text(json.dumps(j, indent=2) + "\n")
    new_config = dict(config)
    new_config["moe_intermediate_size"] = mc["ff"] * r
    (out_dir / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
    copied = []
    for name in COPIED_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out_dir / name)
            copied.append(name)

    share = read_share_of_dir(model_dir, config, r, batch)
    share_orig = read_share_of_dir(model_dir, config, 1, batch)
    ref = qwen3_30b_a3b_share(batch)
    info = {
        "tool": "lynx_sglang.twin",
        "source": str(model_dir),
        "model_type": config.get("model_type"),
        "factor": r,
        "experts": mc["experts"], "top_k": mc["top_k"], "hidden": mc["hidden"],
        "moe_intermediate_size": {"source": mc["ff"], "twin": mc["ff"] * r},
        "bytes_per_expert_bf16": {"source": expert_bytes(mc["hidden"], mc["ff"]),
                                  "twin": expert_bytes(mc["hidden"], mc["ff"] * r)},
        "weight_bytes_total": total,
        "tensors_widened": widened,
        "shared_experts": ("widened by the same transform (sized from moe_intermediate_size * n_shared_experts by "
                           "transformers and SGLang)") if widened["shared"] else "none",
        "files_copied": copied,
        "transform": "gate/up rows tiled r times; down columns tiled r times and divided by r (exact for a power "
                     "of two); router, attention, norms, embeddings, LM head unchanged",
        "decode_read_share": {
            "how": "weight bytes one decode step reads at B tokens: routed experts = distinct experts per MoE layer "
                   "x bytes per expert; attention, norms, routers, shared experts and LM head read whole; the "
                   "embedding B rows; KV cache not counted; bf16",
            "source_model": share_orig, "twin": share, "qwen3_30b_a3b": ref,
        },
    }
    (out_dir / "twin.json").write_text(json.dumps(info, indent=1) + "\n")
    if not quiet:
        print(f"{model_dir} -> {out_dir}: factor {r}, moe_intermediate_size {mc['ff']} -> {mc['ff'] * r}")
        print(f"  bytes per expert (bf16): {info['bytes_per_expert_bf16']['source'] / 2**20:.3f} MiB -> "
              f"{info['bytes_per_expert_bf16']['twin'] / 2**20:.3f} MiB; weights {total / 2**30:.2f} GiB")
        print(f"  routed-expert share of a decode step's weight reads at B={batch}: source "
              f"{100 * share_orig['routed_share']:.1f} %, twin {100 * share['routed_share']:.1f} %, "
              f"Qwen3-30B-A3B {100 * ref['routed_share']:.1f} % (distinct experts: {share['distinct_experts_from']})")
        print(f"  wrote {out_dir / 'twin.json'}")
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="HF model directory (qwen3_moe or glm4_moe, per-expert weights)")
    ap.add_argument("--factor", type=int, default=None,
                    help=f"width factor r, a power of two (default: the smallest with one expert >= "
                         f"{MIN_EXPERT_BYTES // 2**20} MiB in bf16)")
    ap.add_argument("--out", type=Path, required=True, help="output directory (use build/: twins are large)")
    ap.add_argument("--batch", type=int, default=16, help="decode batch for the read share (default 16)")
    args = ap.parse_args(argv)
    try:
        build_twin(args.model, args.out, args.factor, args.batch)
    except TwinError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
