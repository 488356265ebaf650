"""Train the bundled MoE models on the offline multi-domain corpus.

Two model families, one training loop (``--family``):

* ``qwen3_moe`` (default; ``models/trained-qwen3-moe``, ``models/trained-qwen3-moe-e128``):
  transformers' own ``Qwen3MoeForCausalLM``: softmax router, top-k, no shared expert.
* ``glm4_moe`` (``models/trained-glm4-moe``): transformers' ``Glm4MoeForCausalLM``
  (SGLang's ``glm4_moe``): sigmoid scores, a per-expert ``e_score_correction_bias``
  that only steers *which* experts are picked (group-limited: the best ``topk_group``
  of ``n_group`` expert groups first), gate weights from the unbiased scores,
  renormalised and scaled by ``routed_scaling_factor``, plus one always-on shared
  expert. The bias is a buffer, not a parameter: it is updated the auxiliary-loss-free
  way (DeepSeek-V3): after every optimiser step, per layer,
  ``bias += bias_update_rate * sign(mean_load - load)`` with the loads of that step's
  batch.

Both are transformers' own classes (so SGLang loads them with its own model code
and Hugging Face tools read them). What differs from
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
    python -m lynx_sglang.train_model build/corpus models/trained-qwen3-moe --minutes 62
    python -m lynx_sglang.train_model build/corpus models/trained-qwen3-moe-e128 --tokenizer models/trained-qwen3-moe \
        --experts 128 --top-k 8 --expert-ff 32 --threads 1 --minutes 62 --experts-implementation grouped_mm
    python -m lynx_sglang.train_model build/corpus models/trained-glm4-moe --family glm4_moe \
        --tokenizer models/trained-qwen3-moe --threads 1 --minutes 62 --experts-implementation grouped_mm

(the two newer models were trained at the same time, one core each).

For ``glm4_moe`` the shape options default to 64 routed experts, top-6, expert FFN 64,
one shared expert, 8 groups of which the best 4 are eligible, routed scaling 2.5,
every layer MoE, bias update rate 1e-3 and a light balance loss (coefficient 1e-4).
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

from lynx_sglang.corpus import DOMAINS, Document, read_jsonl, train_tokenizer


FAMILIES = ("qwen3_moe", "glm4_moe")


@dataclass
class ModelShape:
    """Architecture of a bundled model. The defaults are ``models/trained-qwen3-moe``'s."""

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
class Glm4Shape(ModelShape):
    """The glm4_moe family: sigmoid + bias routing over expert groups, one shared expert."""

    family: str = "glm4_moe"
    experts: int = 64
    top_k: int = 6
    expert_ff: int = 64
    shared_experts: int = 1
    n_group: int = 8  # experts are split into n_group groups ...
    topk_group: int = 4  # ... and only the best topk_group groups are eligible per token
    routed_scaling: float = 2.5  # GLM-4.5's routed_scaling_factor
    first_dense: int = 0  # first_k_dense_replace: every layer is MoE


SHAPES = {"qwen3_moe": ModelShape, "glm4_moe": Glm4Shape}
# Per family: (bias update rate, balance-loss coefficient). glm4_moe balances with the
# correction bias; the light loss is only DeepSeek-V3's complementary safety term.
TRAIN_DEFAULTS = {"qwen3_moe": (0.0, 0.01), "glm4_moe": (1e-3, 1e-4)}
# Written into training.json: how each family is balanced, and why.
FAMILY_NOTES = {
    "qwen3_moe": "Balanced by the per-layer load-balancing loss (balance_coef) over each mixed-domain batch.",
    "glm4_moe": (
        "Balanced by the routing-correction bias, the aux-loss-free way (DeepSeek-V3, GLM-4.5): after every "
        "optimiser step, per layer, bias += bias_update_rate * sign(mean load - load) with the loads of that "
        "step's batch; the bias is a buffer, never learned by gradient, and only steers which experts are picked "
        "(gate weights come from the unbiased sigmoid scores). The per-layer balance loss is kept only as a light "
        "safety term (balance_coef 1e-4, DeepSeek-V3's order of magnitude, 100x below the qwen3_moe models'), on "
        "the normalised sigmoid scores and the actual (biased, group-limited) picks: it barely touches the LM "
        "loss, so balance comes from the bias, while it still pulls an expert the bias cannot revive early on."
    ),
}


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
    bias_update_rate: float = 0.0  # glm4_moe: aux-loss-free update of e_score_correction_bias
    tokenizer: str | None = None  # reuse this model directory's tokenizer instead of training one
    # transformers' experts forward for training (None: its default, the per-expert loop). "grouped_mm"
    # computes the same (checked: logits and gradients agree to 1e-6) about 1.9x faster on CPU.
    experts_implementation: str | None = None


def make_config(shape: ModelShape, tokenizer):
    """The transformers config of the bundled model (of ``shape.family``)."""
    family = getattr(shape, "family", "qwen3_moe")
    if family == "glm4_moe":
        return _glm4_config(shape, tokenizer)
    if family != "qwen3_moe":
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
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


def _glm4_config(shape: "Glm4Shape", tokenizer):
    from transformers import Glm4MoeConfig

    if shape.experts % shape.n_group or shape.experts // shape.n_group < 2:
        raise ValueError("glm4_moe: experts must split into n_group groups of at least 2")
    if not 1 <= shape.topk_group <= shape.n_group or shape.top_k > shape.topk_group * shape.experts // shape.n_group:
        raise ValueError("glm4_moe: top_k must fit in the topk_group eligible groups")
    return Glm4MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=4 * shape.hidden,  # dense layers only (first_k_dense_replace)
        moe_intermediate_size=shape.expert_ff,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.hidden // shape.heads,
        partial_rotary_factor=0.5,  # GLM-4.5's (rotary on half of each head)
        attention_bias=True,  # as GLM-4.5
        use_qk_norm=True,  # as GLM-4.5
        n_routed_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        n_shared_experts=shape.shared_experts,
        n_group=shape.n_group,
        topk_group=shape.topk_group,
        routed_scaling_factor=shape.routed_scaling,
        first_k_dense_replace=shape.first_dense,
        norm_topk_prob=True,
        num_nextn_predict_layers=0,  # no MTP head
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        output_router_logits=False,
        dtype="bfloat16",
    )


def model_class(shape: ModelShape):
    """transformers' causal-LM class of ``shape.family``."""
    import transformers

    family = getattr(shape, "family", "qwen3_moe")
    return {"qwen3_moe": transformers.Qwen3MoeForCausalLM, "glm4_moe": transformers.Glm4MoeForCausalLM}[family]


def routers(model) -> List[torch.nn.Module]:
    """The router (``mlp.gate``) of every MoE layer, in layer order (the order of router_logits)."""
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


def route(logits: torch.Tensor, shape: ModelShape, bias: torch.Tensor | None = None):
    """The experts picked per token and the router probabilities, as the model routes.

    ``logits``: one layer's router logits [tokens, E]. Returns ``(picks [tokens, k],
    probs [tokens, E])``: softmax for qwen3_moe; for glm4_moe the sigmoid scores
    normalised per token, with picks made as transformers' ``Glm4MoeTopkRouter`` does
    (scores + bias, best ``topk_group`` groups by their top-2 sum, then top-k).
    """
    logits = logits.float()
    if getattr(shape, "family", "qwen3_moe") == "qwen3_moe":
        probs = F.softmax(logits, dim=-1)
        return probs.topk(shape.top_k, dim=-1).indices, probs
    scores = logits.sigmoid()
    with torch.no_grad():
        choice = scores + (bias.float() if bias is not None else 0.0)
        T, E = choice.shape
        grouped = choice.view(T, shape.n_group, E // shape.n_group)
        group_idx = grouped.topk(2, dim=-1).values.sum(-1).topk(shape.topk_group, dim=-1).indices
        mask = torch.zeros(T, shape.n_group, dtype=torch.bool, device=choice.device).scatter_(1, group_idx, True)
        choice = choice.masked_fill(~mask.repeat_interleave(E // shape.n_group, dim=1), float("-inf"))
        picks = choice.topk(shape.top_k, dim=-1).indices
    return picks, scores / scores.sum(-1, keepdim=True)


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


def balance_loss(routed) -> torch.Tensor:
    """Switch-style load-balancing loss computed per layer, averaged over layers.

    ``routed``: per layer ``(picks, probs)`` from ``route``. For each layer:
    E * sum_e f_e * P_e with f_e the fraction of routed slots that went to expert e
    over the whole batch and P_e the mean router probability of e. Equals 1 when
    the layer is perfectly balanced.
    """
    losses = []
    for picks, probs in routed:
        E = probs.shape[-1]
        f = torch.zeros(E, device=probs.device).scatter_add_(
            0, picks.reshape(-1), torch.ones(picks.numel(), device=probs.device)
        ) / picks.numel()
        losses.append(E * (f * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def load_summary(load: torch.Tensor) -> Dict[str, float]:
    """Heaviest and lightest expert load relative to the mean, dead (0) and nearly dead (< 10 % of mean) experts."""
    load = load.float()
    mean = load.mean()
    return {
        "max_over_mean": round(float(load.max() / mean), 3),
        "min_over_mean": round(float(load.min() / mean), 3),
        "dead": int((load == 0).sum()),
        "under_10pct": int((load < 0.1 * mean).sum()),
    }


def layer_loads(picks_per_layer, num_experts: int) -> List[Dict[str, float]]:
    """Per layer: ``load_summary`` of the picks."""
    return [load_summary(torch.bincount(p.reshape(-1), minlength=num_experts)) for p in picks_per_layer]


@torch.no_grad()
def update_bias(model, picks_per_layer, rate: float) -> None:
    """Auxiliary-loss-free balancing: per layer, bias += rate * sign(mean load - load)."""
    for gate, picks in zip(routers(model), picks_per_layer, strict=True):
        bias = gate.e_score_correction_bias
        load = torch.bincount(picks.reshape(-1), minlength=bias.numel()).float()
        bias += rate * torch.sign(load.mean() - load)


@torch.no_grad()
def heldout_loads(model, shape: ModelShape, windows: Dict[str, torch.Tensor], batch: int = 16):
    """Per layer, the expert loads over all held-out windows (all domains): ``load_summary`` each."""
    model.eval()
    gates = routers(model)
    counts = [torch.zeros(shape.experts) for _ in gates]
    for w in windows.values():
        for i in range(0, w.shape[0], batch):
            out = model(input_ids=w[i : i + batch, :-1], output_router_logits=True)
            for c, logits, gate in zip(counts, out.router_logits, gates, strict=True):
                picks, _ = route(logits, shape, getattr(gate, "e_score_correction_bias", None))
                c += torch.bincount(picks.reshape(-1), minlength=shape.experts).float()
    model.train()
    return [load_summary(c) for c in counts]


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


def _to_dtype(model, dtype) -> None:
    """``model.to(dtype)``, except routing-correction biases, which stay float32 (as in GLM-4.5's checkpoints)."""
    biases = [g.e_score_correction_bias.detach().float().clone() for g in routers(model) if hasattr(g, "e_score_correction_bias")]
    model.to(dtype)
    for g, b in zip([g for g in routers(model) if hasattr(g, "e_score_correction_bias")], biases):
        g.e_score_correction_bias.data = b


def save(model, tokenizer, out: Path, record: Dict) -> None:
    """Write the model in bf16 (correction biases in fp32) with its tokenizer and training record."""
    out.mkdir(parents=True, exist_ok=True)
    _to_dtype(model, torch.bfloat16)
    model.save_pretrained(out)
    _to_dtype(model, torch.float32)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def train(corpus_dir: Path, out: Path, shape: ModelShape, cfg: TrainConfig) -> Dict:
    """Train, checkpoint and evaluate; returns the training record."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    train_docs = read_jsonl(corpus_dir / "train.jsonl.gz")
    held_docs = read_jsonl(corpus_dir / "heldout.jsonl.gz")
    t0 = time.time()
    if cfg.tokenizer:  # the same token ids as that model (its tokenizer.json)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        if len(tokenizer) != shape.vocab_size:
            raise ValueError(f"{cfg.tokenizer}: {len(tokenizer)} tokens, shape says {shape.vocab_size}")
    else:
        tokenizer = train_tokenizer(train_docs, shape.vocab_size)
    train_streams = token_streams(train_docs, tokenizer)
    held_streams = token_streams(held_docs, tokenizer)
    held_windows = {d: fixed_windows(s, cfg.eval_windows, cfg.seq_len + 1) for d, s in held_streams.items()}
    prep_s = time.time() - t0

    config = make_config(shape, tokenizer)
    model = model_class(shape)(config).float().train()
    if cfg.experts_implementation:
        model.config._experts_implementation = cfg.experts_implementation
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
        "family": getattr(shape, "family", "qwen3_moe"),
        "notes": FAMILY_NOTES[getattr(shape, "family", "qwen3_moe")],
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
        routed = [
            route(logits, shape, getattr(gate, "e_score_correction_bias", None))
            for logits, gate in zip(outputs.router_logits, routers(model), strict=True)
        ]
        bal = balance_loss(routed)
        loss = lm + cfg.balance_coef * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if cfg.bias_update_rate > 0:
            update_bias(model, [p for p, _ in routed], cfg.bias_update_rate)
        step += 1
        tokens += x[:, 1:].numel()
        if step % 25 == 0 or step == 1:
            entry = {
                "step": step,
                "seconds": round(time.time() - start, 1),
                "tokens": tokens,
                "lr": round(lr, 6),
                "lm_loss": round(float(lm.detach()), 4),
                "balance_loss": round(float(bal.detach()), 4),
                "loads": layer_loads([p for p, _ in routed], shape.experts),
            }
            if cfg.bias_update_rate > 0:
                entry["bias_range"] = [
                    [round(float(g.e_score_correction_bias.min()), 4), round(float(g.e_score_correction_bias.max()), 4)]
                    for g in routers(model)
                ]
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
    _to_dtype(model, torch.bfloat16)
    _to_dtype(model, torch.float32)
    record["heldout"] = evaluate(model, held_windows)
    # Expert loads per layer on all held-out windows: dead (0) or nearly dead (< 10 % of mean) experts.
    record["heldout_loads"] = heldout_loads(model, shape, held_windows)
    save(model, tokenizer, out, record)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus_dir", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--family", choices=FAMILIES, default="qwen3_moe")
    ap.add_argument("--minutes", type=float, default=TrainConfig.minutes)
    ap.add_argument("--threads", type=int, default=TrainConfig.threads)
    ap.add_argument("--tokenizer", help="reuse this model directory's tokenizer (same token ids)")
    # Shape and balancing options: unset means the family's default (ModelShape / Glm4Shape, TRAIN_DEFAULTS).
    for flag, typ in [("--experts", int), ("--top-k", int), ("--layers", int), ("--hidden", int),
                      ("--expert-ff", int), ("--vocab-size", int), ("--balance-coef", float)]:
        ap.add_argument(flag, type=typ)
    glm = ap.add_argument_group("glm4_moe only")
    for flag, typ in [("--shared-experts", int), ("--n-group", int), ("--topk-group", int),
                      ("--routed-scaling", float), ("--first-dense", int), ("--bias-update-rate", float)]:
        glm.add_argument(flag, type=typ)
    ap.add_argument("--eval-windows", type=int, default=TrainConfig.eval_windows)
    ap.add_argument("--experts-implementation", choices=("eager", "grouped_mm"),
                    help="transformers' experts forward while training (default: its own default)")
    args = ap.parse_args()
    names = {"experts": "experts", "top_k": "top_k", "layers": "layers", "hidden": "hidden",
             "expert_ff": "expert_ff", "vocab_size": "vocab_size", "shared_experts": "shared_experts",
             "n_group": "n_group", "topk_group": "topk_group", "routed_scaling": "routed_scaling",
             "first_dense": "first_dense"}
    shape_cls = SHAPES[args.family]
    given = {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg) is not None}
    unknown = set(given) - set(shape_cls.__dataclass_fields__)
    if unknown:
        ap.error(f"{sorted(unknown)} apply to glm4_moe only")
    shape = shape_cls(**given)
    rate, coef = TRAIN_DEFAULTS[args.family]
    if args.bias_update_rate is not None:
        if args.family != "glm4_moe":
            ap.error("--bias-update-rate applies to glm4_moe only")
        rate = args.bias_update_rate
    cfg = TrainConfig(
        minutes=args.minutes,
        threads=args.threads,
        balance_coef=coef if args.balance_coef is None else args.balance_coef,
        eval_windows=args.eval_windows,
        bias_update_rate=rate,
        tokenizer=args.tokenizer,
        experts_implementation=args.experts_implementation,
    )
    record = train(args.corpus_dir, args.out, shape, cfg)
    print(json.dumps(record["heldout"], indent=1))


if __name__ == "__main__":
    main()
