"""Make a tiny, randomly initialised Qwen3-MoE checkpoint with a byte-level tokenizer.

It is a stand-in for the bundled trained model (issue 6): SGLang loads it with
its own qwen3_moe model code, so the server, the plugin hooks and their tests
run anywhere in seconds. Random routers route almost uniformly, so it says
nothing about accuracy.

    python -m lynx_sglang.tiny_model models/tiny-qwen3-moe
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

EOS = "<|endoftext|>"


def byte_tokenizer():
    """A 256-symbol byte-level tokenizer (no merges) plus an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None)


def make(out: Path, layers: int = 2, hidden: int = 64, experts: int = 16, top_k: int = 4, seed: int = 0) -> Path:
    """Write config, weights and tokenizer to ``out``; returns ``out``."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    tokenizer = byte_tokenizer()
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # wide enough that routers and outputs are not all flat
        dtype="float32",
    )
    model = Qwen3MoeForCausalLM(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    args = ap.parse_args()
    print(make(args.out, args.layers, args.hidden, args.experts, args.top_k))


if __name__ == "__main__":
    main()
