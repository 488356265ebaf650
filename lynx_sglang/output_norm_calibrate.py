"""Fit the output-norm heads that ``--lynx-residency-output-norms`` ranks a page budget by.

    python -m lynx_sglang.output_norm_calibrate models/trained-glm4-moe                 # bundled split
    python -m lynx_sglang.output_norm_calibrate /path/to/model --data calib.jsonl --tokens 16384

For every MoE layer the hidden states entering the block are captured on ``--tokens`` calibration
tokens (``sere_calibrate.block_inputs``, the same windows as SERE's calibration), every routed
expert is run on all of them, and a ridge least-squares fit per layer maps the head's features
(``output_norms.features``: x and its squares) and a bias to log ||E_e(x)|| for all E experts at
once: one [2H + 1, E] solve. A quarter of the windows is held out of the fit
and its R^2 (share of the variance of log norms explained) is written into the file's metadata
and printed, so a user sees how much the head knows before serving it. The file
(``output_norms.save_output_norms``) is refused by a server for another model.

Data as in ``sere_calibrate``: bundled models default to the corpus's calibration split (never
held-out text); any other model needs ``--data``. Use more tokens for wider models: the fit has
2H + 1 unknowns per expert (glm4, H = 256: R^2 0.51-0.56 from 4096 tokens, more from 16384).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from lynx_sglang import __version__
from lynx_sglang.runtime.selection.model_identity import model_identity
from lynx_sglang.runtime.selection.output_norms import DEFAULT_NAME, OutputNorms, features, save_output_norms
from lynx_sglang.sere_calibrate import DEFAULT_WINDOW, block_inputs, calibration_args, calibration_inputs, expert_outputs

TOOL = f"lynx_sglang.output_norm_calibrate {__version__}"
DEFAULT_TOKENS = 16384
RIDGE = 1e-2


def fit_head(f: torch.Tensor, log_norms: torch.Tensor, ridge: float = RIDGE) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight [F, E], bias [E]): the ridge least-squares fit of ``log_norms`` [E, N] on features ``f`` [N, F]
    (the bias unpenalised in effect: its column is all ones, ``ridge`` is small against N)."""
    xb = torch.cat([f.float(), torch.ones(f.shape[0], 1)], dim=1)
    gram = xb.T @ xb + ridge * torch.eye(xb.shape[1])
    sol = torch.linalg.solve(gram, xb.T @ log_norms.T.float())  # [F + 1, E]
    return sol[:-1].contiguous(), sol[-1].contiguous()


def log_output_norms(experts: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[E, N]: log of every routed expert's unweighted output norm on each row of ``x``."""
    return expert_outputs(experts, x).norm(dim=-1).clamp(min=1e-12).log()


def r_squared(head: Tuple[torch.Tensor, torch.Tensor], f: torch.Tensor, log_norms: torch.Tensor) -> float:
    """Share of the variance of ``log_norms`` [E, N] that ``head``'s prediction on features ``f`` explains."""
    pred = (f.float() @ head[0] + head[1]).T
    return float(1 - ((log_norms - pred) ** 2).mean() / log_norms.var(unbiased=False))


@torch.no_grad()
def fit_heads(model, token_windows: torch.Tensor, ridge: float = RIDGE,
              held_out: float = 0.25) -> Tuple[Dict[int, Tuple[torch.Tensor, torch.Tensor]], Dict[int, float]]:
    """({decoder layer id: (weight [2H, E], bias [E])}, {layer id: held-out R^2}). The last ``held_out`` share of
    ``token_windows`` measures the fit; the heads returned are then refitted on every window."""
    from lynx_sglang.accuracy import moe_blocks, moe_layer_ids

    cut = max(1, int(round(token_windows.shape[0] * (1 - held_out)))) * token_windows.shape[1]  # rows fitted
    heads, quality = {}, {}
    for layer_id, block, x in zip(moe_layer_ids(model), moe_blocks(model), block_inputs(model, token_windows)):
        y, f = log_output_norms(block.experts, x), features(x)
        if cut < x.shape[0]:
            quality[layer_id] = r_squared(fit_head(f[:cut], y[:, :cut], ridge), f[cut:], y[:, cut:])
        heads[layer_id] = fit_head(f, y, ridge)
    return heads, quality


def run(model_path: Path, data: Optional[Path] = None, tokens: int = DEFAULT_TOKENS, out: Optional[Path] = None,
        window: int = DEFAULT_WINDOW) -> Tuple[Path, Dict[int, float]]:
    """Fit ``model_path``'s heads and write the file; returns (the path written, held-out R^2 per layer)."""
    t0 = time.time()
    model, windows, meta = calibration_inputs(model_path, data, tokens, window)
    heads, quality = fit_heads(model, windows)
    meta.update(ridge=RIDGE, held_out_r2={str(k): round(v, 4) for k, v in quality.items()}, tool=TOOL,
                seconds=round(time.time() - t0, 1))
    out = Path(model_path) / DEFAULT_NAME if out is None else Path(out)
    save_output_norms(out, OutputNorms(heads=heads, identity=model_identity(model.config), meta=meta))
    return out, quality


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = calibration_args(__doc__, DEFAULT_TOKENS, DEFAULT_NAME).parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    path, quality = run(args.model, args.data, args.tokens, args.out, args.window)
    print(json.dumps({"wrote": str(path), "bytes": path.stat().st_size, "held_out_r2": quality,
                      "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
