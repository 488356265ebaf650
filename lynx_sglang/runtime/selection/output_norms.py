"""Predicted expert output norms: what lets a paged layer's page budget rank picks by what they add.

A pick's share of a token's MoE output is its gate weight times the norm of its expert's output on
that token, and on one token those norms differ several-fold between experts (glm4: 3.4-3.8x between
the 10th and 90th percentile; docs/offload.md). The router's weights do not carry it. A small head
per layer predicts log ||E_e(x)|| for every routed expert e from the hidden state x entering the MoE
block: linear in the features [x, x * x] (``features``; a SwiGLU expert's output is about quadratic
in x, and the squares raise the variance explained on glm4 from 0.60-0.66 to 0.67-0.79), fitted
offline on calibration text. ``--lynx-residency-output-norms`` then ranks a page budget's candidates
by sum over rows of w * exp(prediction) instead of sum w.

The head costs one [T, 2H] x [2H, E] product per paged layer and step, twice the router's own.

File: written by ``python -m lynx_sglang.output_norm_calibrate``, read at start-up. One safetensors
file: tensors ``layer.<id>.weight`` float32 [2H, E] and ``layer.<id>.bias`` float32 [E] per MoE layer
(decoder layer index, SGLang's ``layer_id``); metadata ``lynx`` holds JSON: the format tag, the
model identity (``model_identity.model_identity``), and what the tool measured (data, tokens, fit
quality). ``load_output_norms`` refuses, with a clear message, a file of another format, another
model, another hidden size or expert count, non-finite values, or missing layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Mapping, Tuple

import torch

from lynx_sglang.runtime.selection import settings_file
from lynx_sglang.runtime.selection.config import ConfigError

FORMAT = "lynx-output-norms/1"
DEFAULT_NAME = "lynx_output_norms.safetensors"
# exp() of a prediction outside [-LOG_LIMIT, LOG_LIMIT] is clamped: the quantised demand (units of
# 1/65536, summed over up to 65536 rows of top-8) then stays inside int64, and a wild hidden state
# (NaN included) cannot overflow the vote.
LOG_LIMIT = 16.0

Head = Tuple[torch.Tensor, torch.Tensor]  # weight [2H, E], bias [E]


def features(hidden: torch.Tensor) -> torch.Tensor:
    """[T, 2H] fp32: what a head reads from the hidden states [T, H]: each coordinate and its square."""
    x = hidden.float()
    return torch.cat([x, x * x], dim=-1)


@dataclass(frozen=True)
class OutputNorms:
    """Per-layer heads predicting log ||E_e(x)|| for every routed expert, and where they came from."""

    heads: Dict[int, Head]  # decoder layer id -> (weight float32 [2H, E], bias float32 [E])
    identity: dict  # model_identity() of the model they were fitted on
    meta: dict = field(default_factory=dict)  # data, tokens, fit quality, tool version


def pick_scale(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[T, E] fp32 predicted output norm of every routed expert on each row of ``hidden`` [T, H].

    exp of the head's prediction on ``features(hidden)``, clamped to [exp(-LOG_LIMIT), exp(LOG_LIMIT)]; a
    non-finite prediction (a NaN hidden state) gives 1. Fixed shapes, no host sync."""
    z = torch.addmm(bias, features(hidden), weight)
    return torch.nan_to_num(z, nan=0.0, posinf=LOG_LIMIT, neginf=-LOG_LIMIT).clamp(-LOG_LIMIT, LOG_LIMIT).exp()


def check_head(head: Head, hidden_size, num_experts, what: str) -> None:
    """Refuse (ConfigError, messages starting with ``what``) a head that is not weight [2 x ``hidden_size``,
    ``num_experts``] and bias [``num_experts``] of finite values (None: that size is not checked)."""
    w, b = head
    if w.dim() != 2 or b.dim() != 1 or b.shape[0] != w.shape[1]:
        raise ConfigError(f"{what} has shapes {tuple(w.shape)} / {tuple(b.shape)}, "
                          f"expected [2 x hidden size, experts] / [experts]")
    if w.shape[0] % 2 or (hidden_size is not None and w.shape[0] != 2 * hidden_size):
        raise ConfigError(f"{what} reads {w.shape[0]} features, the model has hidden size "
                          f"{hidden_size} (a head reads 2 x hidden size)")
    if num_experts is not None and w.shape[1] != num_experts:
        raise ConfigError(f"{what} is for {w.shape[1]} experts, the model has {num_experts}")
    if not bool(torch.isfinite(w).all()) or not bool(torch.isfinite(b).all()):
        raise ConfigError(f"{what} holds NaN or inf")


def save_output_norms(path: str | Path, norms: OutputNorms) -> None:
    """Write ``norms`` (checked first; the file is written whole or not at all)."""
    if not norms.heads:
        raise ConfigError("no output-norm head to save")
    tensors = {}
    for layer, (w, b) in norms.heads.items():
        check_head((w, b), norms.identity.get("hidden_size"), norms.identity.get("num_experts"),
                   f"output norms: layer {layer}'s head")
        tensors[f"layer.{layer}.weight"], tensors[f"layer.{layer}.bias"] = w, b
    settings_file.write(path, tensors, {"format": FORMAT, "identity": norms.identity, "meta": norms.meta})


def load_output_norms(path: str | Path, identity: Mapping, layer_ids: Iterable[int]) -> OutputNorms:
    """Read an output-norm file for the model with ``identity``, refusing any mismatch (ConfigError).

    ``layer_ids``: the paged MoE layers that will rank by it; each must have a head."""
    what = f"output-norm file {path}"
    meta, tensors = settings_file.read(path, FORMAT, identity, what)
    parts: Dict[int, dict] = {}
    for key, t in tensors.items():
        pieces = key.split(".")
        if len(pieces) != 3 or pieces[0] != "layer" or not pieces[1].isdigit() or pieces[2] not in ("weight", "bias"):
            raise ConfigError(f"{what}: unexpected tensor {key!r}")
        parts.setdefault(int(pieces[1]), {})[pieces[2]] = t.float()
    heads = {}
    for layer, p in parts.items():
        if set(p) != {"weight", "bias"}:
            raise ConfigError(f"{what}: layer {layer} lacks its {'bias' if 'weight' in p else 'weight'}")
        heads[layer] = (p["weight"], p["bias"])
        check_head(heads[layer], identity.get("hidden_size"), identity.get("num_experts"),
                   f"{what}: layer {layer}'s head")
    missing = sorted(set(layer_ids) - set(heads))
    if missing:
        raise ConfigError(f"{what} has no head for MoE layer(s) {missing}")
    return OutputNorms(heads, dict(meta["identity"]), dict(meta.get("meta") or {}))
