"""The file format every per-model settings file shares (SERE's similarity, the output-norm heads).

One safetensors file: the tensors, and metadata ``lynx`` holding JSON with at least the format tag
and the model identity (``model_identity.model_identity``) it was measured on. ``read`` refuses, with
a ConfigError naming the file, one that cannot be read, holds no valid JSON, is of another format,
or was made for another model; what the tensors must be is the caller's to check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Tuple

import torch

from lynx_sglang.runtime.selection.config import ConfigError
from lynx_sglang.runtime.selection.model_identity import check_identity


def write(path: str | Path, tensors: Dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``tensors`` (as contiguous CPU float32) with ``meta`` as the ``lynx`` metadata; the file is
    written whole or not at all (a partial file is renamed into place)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    save_file({k: t.detach().float().cpu().contiguous() for k, t in tensors.items()}, str(tmp),
              metadata={"lynx": json.dumps(meta)})
    tmp.replace(path)


def read(path: str | Path, fmt: str, identity: Mapping, what: str) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(metadata, tensors) of a ``fmt`` file made for the model with ``identity``; ConfigError otherwise."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("lynx")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # missing file, not safetensors, truncated
        raise ConfigError(f"cannot read {what}: {e}") from e
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError as e:
        raise ConfigError(f"{what}: its metadata is not valid JSON: {e}") from e
    if meta.get("format") != fmt:
        raise ConfigError(f"{what} is not a {fmt} file (format {meta.get('format')!r})")
    check_identity(meta.get("identity") or {}, identity, what)
    return meta, tensors
