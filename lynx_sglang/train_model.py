"""Train the bundled Qwen3-MoE model on the offline multi-domain corpus.

The model is transformers' own ``Qwen3MoeForCausalLM`` (so SGLang loads it
with its qwen3_moe code and Hugging Face tools read it). What differs from
transformers' training recipe is the load-balancing loss: it is computed
**per layer** over the whole step's batch (which mixes all domains) and then
averaged, instead of transformers' loss pooled over all layers, which looks
balanced while single layers have dead experts. Balancing over a mixed-domain
batch (not per sequence) leaves experts free to specialise by domain, as
global-batch balancing does in large MoE training.

Training runs for a wall-clock budget with a cosine learning-rate schedule
over elapsed time; it writes checkpoints, a JSON-lines training log, and at
the end held-out loss and next-token accuracy per domain (``training.json``).

    python -m lynx_sglang.corpus build/corpus --manifest data/corpus
    python -m lynx_sglang.train_model build/corpus models/lynx-moe-mini --minutes 60
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

from .corpus import DOMAINS, Document, read_jsonl, train_tokenizer


@dataclass
class ModelShape:
    """Architecture of the bundled model (Qwen3-MoE family, no shared expert)."""

    vocab_size: int = 4096
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    experts: int = 32
    top_k: int = 4
    expert_ff: int = 96  # d_ff / d = 0.375, as in Qwen3-30B-A3B (768 / 2048)
    max_positions: int = 2048


@dataclass
class TrainConfig:
    """Optimisation settings; recorded with the model."""

    seq_len: int = 256
    seqs_per_domain: int = 4  # every step's batch holds every domain
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.05
    balance_coef: float = 0.01
    minutes: float = 60.0
    seed: int = 0
    threads: int = 2
    checkpoint_minutes: float = 10.0
    eval_windows: int = 64  # held-out windows per domain for the final numbers


def make_config(shape: ModelShape, tokenizer):
    """The transformers config of the bundled model."""
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=4 * shape.hidden,  # unused: every layer is MoE
        moe_intermediate_size=shape.expert_ff,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.hidden // shape.heads,
        num_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,  # SGLang's qwen3_moe has a separate lm_head
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        output_router_logits=False,
        dtype="bfloat16",
    )


def token_streams(docs: List[Document], tokenizer) -> Dict[str, torch.Tensor]:
    """Per domain, every document's tokens followed by end-of-text, concatenated."""
    eos = tokenizer.eos_token_id
    out: Dict[str, List[int]] = {d: [] for d in DOMAINS}
    for doc in docs:
        out[doc.domain].extend(tokenizer(doc.text, add_special_tokens=False)["input_ids"] + [eos])
    return {d: torch.tensor(ids, dtype=torch.long) for d, ids in out.items() if ids}


def sample_windows(stream: torch.Tensor, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random windows of ``length`` tokens from one stream, [n, length]."""
    starts = torch.randint(0, stream.numel() - length, (n,), generator=gen)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def fixed_windows(stream: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """``n`` evenly spaced windows (deterministic evaluation set), [n, length]."""
    n = min(n, stream.numel() // length)
    step = (stream.numel() - length) // max(1, n - 1) if n > 1 else 0
    return torch.stack([stream[i * step : i * step + length] for i in range(n)])


def balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss computed per layer, averaged over layers.

    For each layer: E * sum_e f_e * P_e with f_e the fraction of routed slots
    that went to expert e over the whole batch and P_e the mean router
    probability of e. Equals 1 when the layer is perfectly balanced.
    """
    losses = []
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        E = probs.shape[-1]
        picks = probs.topk(top_k, dim=-1).indices
        f = torch.zeros(E, device=probs.device).scatter_add_(
            0, picks.reshape(-1), torch.ones(picks.numel(), device=probs.device)
        ) / picks.numel()
        losses.append(E * (f * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def layer_loads(router_logits, top_k: int) -> List[Dict[str, float]]:
    """Per layer: heaviest and lightest expert load relative to the mean, and dead experts."""
    out = []
    for logits in router_logits:
        E = logits.shape[-1]
        picks = logits.topk(top_k, dim=-1).indices.reshape(-1)
        load = torch.bincount(picks, minlength=E).float()
        mean = load.mean()
        out.append(
            {
                "max_over_mean": round(float(load.max() / mean), 3),
                "min_over_mean": round(float(load.min() / mean), 3),
                "dead": int((load == 0).sum()),
            }
        )
    return out


@torch.no_grad()
def evaluate(model, windows: Dict[str, torch.Tensor], batch: int = 16) -> Dict[str, Dict[str, float]]:
    """Held-out loss and next-token accuracy per domain (fp32 compute)."""
    model.eval()
    out = {}
    for domain, w in windows.items():
        nll, correct, count = 0.0, 0, 0
        for i in range(0, w.shape[0], batch):
            x = w[i : i + batch]
            logits = model(input_ids=x[:, :-1]).logits.float()
            target = x[:, 1:]
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
            count += target.numel()
        out[domain] = {"loss": round(nll / count, 4), "accuracy": round(correct / count, 4), "tokens": count}
    model.train()
    return out


def save(model, tokenizer, out: Path, record: Dict) -> None:
    """Write the model in bf16 with its tokenizer and training record."""
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    model.to(torch.float32)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def train(corpus_dir: Path, out: Path, shape: ModelShape, cfg: TrainConfig) -> Dict:
    """Train, checkpoint and evaluate; returns the training record."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    train_docs = read_jsonl(corpus_dir / "train.jsonl.gz")
    held_docs = read_jsonl(corpus_dir / "heldout.jsonl.gz")
    t0 = time.time()
    tokenizer = train_tokenizer(train_docs, shape.vocab_size)
    train_streams = token_streams(train_docs, tokenizer)
    held_streams = token_streams(held_docs, tokenizer)
    held_windows = {d: fixed_windows(s, cfg.eval_windows, cfg.seq_len + 1) for d, s in held_streams.items()}
    prep_s = time.time() - t0

    config = make_config(shape, tokenizer)
    model = Qwen3MoeForCausalLM(config).float().train()
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    log_path = out / "training_log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    record = {
        "shape": asdict(shape),
        "train": asdict(cfg),
        "parameters": params,
        "tokens_per_domain": {d: int(s.numel()) for d, s in train_streams.items()},
        "heldout_tokens_per_domain": {d: int(s.numel()) for d, s in held_streams.items()},
        "tokenizer_and_data_seconds": round(prep_s, 1),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    budget = cfg.minutes * 60.0
    start = time.time()
    last_ckpt = start
    step, tokens = 0, 0
    while True:
        elapsed = time.time() - start
        if elapsed >= budget:
            break
        frac = elapsed / budget
        warm = min(1.0, (step + 1) / cfg.warmup_steps)
        lr = cfg.lr * warm * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = torch.cat([sample_windows(s, cfg.seqs_per_domain, cfg.seq_len + 1, gen) for s in train_streams.values()])
        outputs = model(input_ids=x[:, :-1], output_router_logits=True)
        logits = outputs.logits
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        bal = balance_loss(outputs.router_logits, shape.top_k)
        loss = lm + cfg.balance_coef * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += x[:, 1:].numel()
        if step % 25 == 0 or step == 1:
            entry = {
                "step": step,
                "seconds": round(time.time() - start, 1),
                "tokens": tokens,
                "lr": round(lr, 6),
                "lm_loss": round(float(lm), 4),
                "balance_loss": round(float(bal), 4),
                "loads": layer_loads([r.detach() for r in outputs.router_logits], shape.top_k),
            }
            log.write(json.dumps(entry) + "\n")
            log.flush()
            print(json.dumps({k: entry[k] for k in ("step", "seconds", "tokens", "lm_loss", "balance_loss")}), flush=True)
        if time.time() - last_ckpt >= cfg.checkpoint_minutes * 60.0:
            last_ckpt = time.time()
            save(model, tokenizer, out, {**record, "steps": step, "tokens": tokens, "final": False})
    log.close()
    record.update(
        steps=step,
        tokens=tokens,
        train_seconds=round(time.time() - start, 1),
        final=True,
        heldout=None,
    )
    # Held-out numbers of the weights as saved (bf16), computed in fp32.
    model.to(torch.bfloat16).to(torch.float32)
    record["heldout"] = evaluate(model, held_windows)
    save(model, tokenizer, out, record)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--minutes", type=float, default=TrainConfig.minutes)
    ap.add_argument("--threads", type=int, default=TrainConfig.threads)
    ap.add_argument("--experts", type=int, default=ModelShape.experts)
    ap.add_argument("--top-k", type=int, default=ModelShape.top_k)
    ap.add_argument("--layers", type=int, default=ModelShape.layers)
    ap.add_argument("--hidden", type=int, default=ModelShape.hidden)
    ap.add_argument("--expert-ff", type=int, default=ModelShape.expert_ff)
    ap.add_argument("--vocab-size", type=int, default=ModelShape.vocab_size)
    ap.add_argument("--balance-coef", type=float, default=TrainConfig.balance_coef)
    ap.add_argument("--eval-windows", type=int, default=TrainConfig.eval_windows)
    args = ap.parse_args()
    shape = ModelShape(
        vocab_size=args.vocab_size,
        hidden=args.hidden,
        layers=args.layers,
        experts=args.experts,
        top_k=args.top_k,
        expert_ff=args.expert_ff,
    )
    cfg = TrainConfig(
        minutes=args.minutes, threads=args.threads, balance_coef=args.balance_coef, eval_windows=args.eval_windows
    )
    record = train(args.corpus_dir, args.out, shape, cfg)
    print(json.dumps(record["heldout"], indent=1))


if __name__ == "__main__":
    main()
