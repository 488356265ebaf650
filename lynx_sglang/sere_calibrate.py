"""SERE's offline expert similarity: run the model on calibration text, compare every pair of experts.

    python -m lynx_sglang.sere_calibrate models/trained-qwen3-moe                       # bundled split
    python -m lynx_sglang.sere_calibrate /path/to/model --data calib.jsonl --tokens 4096 --method cka

For every MoE layer the hidden states entering the block (after the attention and the layer's
norm, as the router sees them) are captured on ``--tokens`` calibration tokens; **every routed
expert is run on all of them** (its unweighted output, as SERE's calibration does), and
``peers.expert_similarity`` turns the [E, N, H] outputs into an [E, E] matrix (symmetric,
diagonal 1). The file (``similarity.save_similarity``) holds one matrix per MoE layer keyed by
its decoder layer index, the model's identity (``model_identity``: a server refuses the file
for another model), the method, and what it was measured on (data file hash, the token ids'
hash, tokens, tool version).

Data: ``--data`` is a JSON-lines file of documents (``{"domain", "path", "text"}``, gzip if
it ends in .gz, as ``corpus.write_jsonl`` writes). For the bundled models (folders under the
repository's ``models/``) the default is the corpus's calibration split
(``data/corpus/calibration.jsonl.gz``: training documents, never held-out ones); any other
model needs ``--data`` (its own text), since our corpus is not what it was trained on.
Windows of ``--window`` tokens are taken evenly from each domain's stream (domains round
robin), so every domain contributes about equally.

Default method ``frobenius`` (SERE's script default, and what its README uses for Qwen3-MoE).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from lynx_sglang import __version__
from lynx_sglang.runtime.selection.model_identity import model_identity
from lynx_sglang.runtime.selection.peers import SIMILARITY_METHODS, expert_similarity
from lynx_sglang.runtime.selection.similarity import DEFAULT_NAME, ExpertSimilarity, save_similarity

TOOL = f"lynx_sglang.sere_calibrate {__version__}"
BUNDLED_MODELS = Path(__file__).resolve().parent.parent / "models"
DEFAULT_TOKENS = 2048
DEFAULT_WINDOW = 128


def is_bundled(model_path: Path) -> bool:
    """A model folder shipped in this repository's ``models/`` (trained on our corpus)."""
    return Path(model_path).resolve().parent == BUNDLED_MODELS


def calibration_tokens(docs, tokenizer, tokens: int, window: int) -> torch.Tensor:
    """[n, window] int64: evenly spaced windows of every domain's stream, domains round robin,
    ``ceil(tokens / window)`` windows in all (fewer if the text is short)."""
    from lynx_sglang.train_model import fixed_windows, token_streams

    streams = [s for s in token_streams(docs, tokenizer).values() if s.numel() > window]
    if not streams:
        raise ValueError(f"the calibration data holds no document longer than {window} tokens")
    n = -(-tokens // window)
    per = [n // len(streams) + (i < n % len(streams)) for i in range(len(streams))]
    parts = [fixed_windows(s, m, window) for s, m in zip(streams, per) if m]
    rows: List[torch.Tensor] = []
    for i in range(max(p.shape[0] for p in parts)):  # round robin, so a cut keeps every domain
        rows += [p[i] for p in parts if i < p.shape[0]]
    return torch.stack(rows[:n])


def expert_outputs(experts: torch.nn.Module, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """[E, N, H]: every routed expert's unweighted output on every row of ``x`` [N, H]
    (transformers' stacked ``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I] and ``act_fn``)."""
    W_gu, W_d = experts.gate_up_proj.float(), experts.down_proj.float()
    out = []
    for start in range(0, x.shape[0], chunk):
        xs = x[start:start + chunk].float()
        gate, up = torch.einsum("nh,eih->eni", xs, W_gu).chunk(2, dim=-1)
        out.append(torch.einsum("eni,ehi->enh", experts.act_fn(gate) * up, W_d))
    return torch.cat(out, dim=1)


@torch.no_grad()
def block_inputs(model, token_windows: torch.Tensor, batch: int = 16) -> List[torch.Tensor]:
    """Per MoE block (block order): the hidden states entering it on ``token_windows``, [N, H] fp32."""
    from lynx_sglang.accuracy import moe_blocks

    blocks = moe_blocks(model)
    inputs: List[List[torch.Tensor]] = [[] for _ in blocks]
    hooks = [b.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0].reshape(-1, args[0].shape[-1])))
             for i, b in enumerate(blocks)]
    try:
        for start in range(0, token_windows.shape[0], batch):
            model(input_ids=token_windows[start:start + batch])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(xs).float() for xs in inputs]


@torch.no_grad()
def calibrate(model, token_windows: torch.Tensor, method: str = "frobenius",
              batch: int = 16) -> Dict[int, torch.Tensor]:
    """{decoder layer index: fp32 [E, E]} from the hidden states entering every MoE block."""
    from lynx_sglang.accuracy import moe_blocks, moe_layer_ids

    out = {}
    for layer_id, block, x in zip(moe_layer_ids(model), moe_blocks(model), block_inputs(model, token_windows, batch)):
        out[layer_id] = expert_similarity(expert_outputs(block.experts, x), method)
    return out


def data_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def calibration_inputs(model_path: Path, data: Optional[Path], tokens: int, window: int) -> Tuple[object, torch.Tensor, dict]:
    """(model, token windows, what they are) for an offline calibration tool: the model loaded, ``tokens``
    calibration tokens in windows of ``window`` (``data``, or for a bundled model the corpus's calibration
    split), and the metadata every calibration file records (data and its hash, the windows' hash, tokens,
    window, torch). SystemExit when ``data`` is None and the model is not bundled."""
    from lynx_sglang.accuracy import load_model
    from lynx_sglang.corpus import CALIBRATION, read_calibration, read_jsonl

    if data is None:
        if not is_bundled(model_path):
            raise SystemExit(f"{model_path} is not a bundled model (under {BUNDLED_MODELS}): give its own calibration "
                             "text with --data FILE.jsonl (our corpus is not what it was trained on)")
        data, docs = CALIBRATION, read_calibration()
    else:
        docs = read_jsonl(data)
    model, tokenizer = load_model(model_path)
    windows = calibration_tokens(docs, tokenizer, tokens, window)
    meta = {"data": str(data), "data_sha256": data_hash(data),
            "tokens_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16],
            "tokens": int(windows.numel()), "window": window, "torch": torch.__version__}
    return model, windows, meta


def run(model_path: Path, data: Optional[Path] = None, tokens: int = DEFAULT_TOKENS, method: str = "frobenius",
        out: Optional[Path] = None, window: int = DEFAULT_WINDOW) -> Path:
    """Calibrate ``model_path`` and write its similarity file; returns the path written."""
    if method not in SIMILARITY_METHODS:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(SIMILARITY_METHODS)})")
    t0 = time.time()
    model, windows, meta = calibration_inputs(model_path, data, tokens, window)
    matrices = calibrate(model, windows, method)
    meta.update(tool=TOOL, seconds=round(time.time() - t0, 1))
    out = Path(model_path) / DEFAULT_NAME if out is None else Path(out)
    save_similarity(out, ExpertSimilarity(matrices=matrices, identity=model_identity(model.config), method=method,
                                          meta=meta))
    return out


def calibration_args(doc: str, tokens: int, default_name: str) -> argparse.ArgumentParser:
    """The options every calibration tool takes: the model, ``--data --tokens --window --out --threads``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, help="JSON-lines documents (default for bundled models: the calibration split)")
    ap.add_argument("--tokens", type=int, default=tokens, help="calibration tokens (default %(default)s)")
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="tokens per window (default %(default)s)")
    ap.add_argument("--out", type=Path, help=f"output file (default <model>/{default_name})")
    ap.add_argument("--threads", type=int, default=None)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = calibration_args(__doc__, DEFAULT_TOKENS, DEFAULT_NAME)
    ap.add_argument("--method", choices=SIMILARITY_METHODS, default="frobenius")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    path = run(args.model, args.data, args.tokens, args.method, args.out, args.window)
    print(json.dumps({"wrote": str(path), "bytes": path.stat().st_size, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
