"""Which model a settings file was made for, so a server refuses a file made for another.

Offline tools (SERE's similarity calibration, later per-layer calibration) measure one model and
write what they found beside it; the server loads the file at start-up. A file made for another
model would still load if only the shapes were checked (two models with 64 experts and top-6), and
silently select with the wrong evidence. ``model_identity`` reads the fields that define a MoE
model's routing from a Hugging Face config (transformers' and SGLang's ``hf_config`` are the same
class, so the tool and the server compute the same identity), and ``check_identity`` refuses a
mismatch with a message naming the first differing field.
"""

from __future__ import annotations

import hashlib
import json
from typing import Mapping

from lynx_sglang.runtime.selection.config import ConfigError

# Fields that decide a MoE model's routing and shapes, in the spellings of the families we serve.
_EXPERTS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
# Not moe_intermediate_size: SGLang pads it in its hf_config for tensor parallelism on CPU (96 -> 128 at
# --tp 2), so the served model would not match its own file; expert count, top-k and width decide routing.
_FIELDS = (
    "model_type", "num_hidden_layers", "hidden_size", "vocab_size", "num_experts_per_tok",
    "n_group", "topk_group", "n_shared_experts", "routed_scaling_factor",
    "norm_topk_prob", "first_k_dense_replace", "decoder_sparse_step", "mlp_only_layers",
)


def _text_config(config):
    inner = getattr(config, "text_config", None)
    return inner if inner is not None and inner is not config and hasattr(inner, "num_hidden_layers") else config


def model_identity(config) -> dict:
    """The routing-defining fields of a Hugging Face config, plus ``config_hash`` over them.

    ``num_experts`` is the routed-expert count under whichever name the family uses; absent
    fields are omitted (not None), so configs that differ only in spelling hash alike.
    """
    config = _text_config(config)
    ident = {}
    archs = getattr(config, "architectures", None)
    if archs:
        ident["architecture"] = str(archs[0])
    for name in _EXPERTS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            ident["num_experts"] = value
            break
    for name in _FIELDS:
        value = getattr(config, name, None)
        if value is not None:
            ident[name] = list(value) if isinstance(value, (list, tuple)) else value
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return {**ident, "config_hash": digest}


def check_identity(found: Mapping, expected: Mapping, what: str) -> None:
    """Refuse (ConfigError) when ``found`` (from a file) is not the identity of ``expected``'s model.

    Every field of ``expected`` must match; fields only the file has (written by a version that
    recorded more, e.g. ``moe_intermediate_size``) are ignored, so ``config_hash`` is a label here.
    """
    for key in sorted(set(expected) - {"config_hash"}):
        if found.get(key) != expected.get(key):
            raise ConfigError(f"{what} was made for another model: {key} is {found.get(key)!r} there, "
                              f"{expected.get(key)!r} in the model being served")
