"""SERE's expert-similarity file: [E, E] per MoE layer, measured offline, loaded at start-up.

Written by ``python -m lynx_sglang.sere_calibrate`` (which runs the model on calibration text and
calls ``peers.expert_similarity``), read by the server for ``--lynx-policy sere``. One safetensors
file: tensor ``layer.<id>`` per MoE layer (decoder layer index, as SGLang's ``layer_id``), float32
[E, E]; metadata ``lynx`` holds JSON: the format tag, the model identity
(``model_identity.model_identity``), the similarity method, and what the tool measured on (data
hash, tokens, tool version). ``load_similarity`` refuses, with a clear message, a file of another
format, another model, another expert count, values outside [-1, 1] or NaN, or missing layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional

import torch

from lynx_sglang.runtime.selection import settings_file
from lynx_sglang.runtime.selection.config import ConfigError

FORMAT = "lynx-sere-similarity/1"
# Default file name beside the model (the server looks there when no path is given).
DEFAULT_NAME = "sere_similarity.safetensors"


@dataclass(frozen=True)
class ExpertSimilarity:
    """Per-layer [E, E] similarity matrices of one model, and where they came from."""

    matrices: Dict[int, torch.Tensor]  # decoder layer id -> float32 [E, E]
    identity: dict  # model_identity() of the model they were measured on
    method: str  # peers.SIMILARITY_METHODS
    meta: dict = field(default_factory=dict)  # data hash, tokens, tool version, ...

    @property
    def num_experts(self) -> int:
        """E (every matrix is [E, E])."""
        return next(iter(self.matrices.values())).shape[0]


def _check_matrix(layer: int, m: torch.Tensor, num_experts: Optional[int], what: str) -> None:
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ConfigError(f"{what}: layer {layer}'s similarity is not square ({tuple(m.shape)})")
    if num_experts is not None and m.shape[0] != num_experts:
        raise ConfigError(f"{what}: layer {layer}'s similarity is for {m.shape[0]} experts, the model has {num_experts}")
    if not bool(torch.isfinite(m).all()) or bool((m.abs() > 1).any()):
        raise ConfigError(f"{what}: layer {layer}'s similarity holds NaN, inf or values outside [-1, 1]")


def save_similarity(path: str | Path, sim: ExpertSimilarity) -> None:
    """Write ``sim`` (checked first; the file is written whole or not at all)."""
    if not sim.matrices:
        raise ConfigError("no similarity matrix to save")
    E = sim.num_experts
    for layer, m in sim.matrices.items():
        _check_matrix(layer, m, E, "similarity")
    settings_file.write(path, {f"layer.{layer}": m for layer, m in sim.matrices.items()},
                        {"format": FORMAT, "identity": sim.identity, "method": sim.method, "meta": sim.meta})


def load_similarity(path: str | Path, identity: Mapping, layer_ids: Iterable[int]) -> ExpertSimilarity:
    """Read a similarity file for the model with ``identity``, refusing any mismatch (ConfigError).

    ``layer_ids``: the MoE layers that will run SERE; each must have a matrix.
    """
    what = f"SERE similarity file {path}"
    meta, tensors = settings_file.read(path, FORMAT, identity, what)
    matrices = {}
    for key, m in tensors.items():
        if not key.startswith("layer.") or not key[6:].isdigit():
            raise ConfigError(f"{what}: unexpected tensor {key!r}")
        matrices[int(key[6:])] = m.float()
    E = identity.get("num_experts")
    for layer, m in matrices.items():
        _check_matrix(layer, m, E, what)
    missing = sorted(set(layer_ids) - set(matrices))
    if missing:
        raise ConfigError(f"{what} has no matrix for MoE layer(s) {missing}")
    return ExpertSimilarity(matrices, dict(meta["identity"]), str(meta.get("method")), dict(meta.get("meta") or {}))
