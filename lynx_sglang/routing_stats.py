"""Routing statistics of a Mixture-of-Experts model on the held-out corpus.

For any causal LM that transformers loads and that returns router logits
(Qwen3-MoE, Mixtral, OLMoE, ...), per MoE layer:

1. **Load balance**: each expert's share of the routed (token, pick) slots over
   the held-out tokens, max/mean, min/mean, dead experts; overall and per domain.
2. **Distinct experts per batch** for B = 1, 2, ..., 128 against the uniform
   expectation ``E * (1 - (1 - k/E)**B)``, for three kinds of batch:
   *contiguous* (B consecutive tokens of one window, prefill-like),
   *independent_domain* (one position of B different windows of one domain,
   decode-like) and *independent_mixed* (the same, windows from all domains).
3. **Router confidence**: quantiles and histograms of the top-1 minus top-2
   gap of the router's ranking key (the logit for softmax routers), of the top-1
   probability and of the probability mass of the top-k.

Windows are evenly spaced over each domain's token stream (so they begin at
different offsets); only positions at or after ``prefix`` are counted, so every
counted token has context. Each layer's picks are the model's own
(``lynx_sglang.model_routing``): softmax top-k for Qwen3-MoE; for ``glm4_moe``
sigmoid scores ranked with the layer's ``e_score_correction_bias`` inside the best
expert groups. For a model of no family described there (Mixtral, OLMoE, ...)
the router is taken to be softmax over the logits, top-k.

``--prompts FILE`` measures the same on a JSONL (or .jsonl.gz) of prompts instead of the
corpus, e.g. HumanEval's problems (one object a line, text in ``--prompt-field``,
default ``prompt``): the prompts are concatenated like the corpus documents, as one
domain (``--prompt-domain``, default ``python``), and windowed the same way.

``--trace`` also exports the raw router logits of fixed decode batches for
replay; ``load_trace`` reads it back and ``scaled_logits`` replays it at a
larger expert count (for benchmarks at Qwen3-30B shape, E=128, k=8).

    python -m lynx_sglang.routing_stats build/trained-qwen3-moe \\
        --out benchmarks/results/routing_stats_trained --trace build/routing_trace.pt
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import inspect
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from lynx_sglang.corpus import DOMAINS, HELDOUT, Document, read_jsonl
from lynx_sglang.model_routing import BlockRouter, assumed_router, model_routers
from lynx_sglang.train_model import fixed_windows, token_streams

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
KINDS = ("contiguous", "independent_domain", "independent_mixed")
TRACE_KINDS = ("independent_domain", "independent_mixed")
TRACE_FORMAT = "lynx-routing-trace-v1"
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
HIST_BINS = 40


class NotMoEError(ValueError):
    """The model has no routed experts (no router logits to measure)."""


# ---------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------


def moe_shape(config) -> Tuple[int, int]:
    """``(num_experts, top_k)`` of a transformers config; ``NotMoEError`` for a dense model.

    Looks at the text config (multimodal wrappers nest it) for ``num_experts``,
    ``num_local_experts`` or ``n_routed_experts`` and ``num_experts_per_tok``.
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    experts = None
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            experts = value
            break
    top_k = getattr(cfg, "num_experts_per_tok", None)
    if experts is None or not isinstance(top_k, int) or top_k <= 0:
        raise NotMoEError(
            f"{getattr(cfg, 'model_type', type(cfg).__name__)!r} is not a Mixture-of-Experts model: its config has "
            "no num_experts / num_local_experts / n_routed_experts with num_experts_per_tok, so there are no "
            "router logits to measure"
        )
    if top_k > experts:
        raise NotMoEError(f"num_experts_per_tok={top_k} exceeds the {experts} experts")
    return experts, top_k


def load_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, num_experts, top_k)``; the config is checked before any weights load."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    experts, top_k = moe_shape(config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer, experts, top_k


def prompt_documents(path: Path, field: str = "prompt", domain: str = "python") -> List[Document]:
    """Prompts from a JSONL (or .jsonl.gz) file as documents of one domain, in file order.

    Each line is an object whose ``field`` holds the text (HumanEval: ``prompt``) or a bare JSON string.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain {domain!r} is not one of {DOMAINS}")
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            text = rec if isinstance(rec, str) else rec.get(field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{n}: no text field {field!r}")
            docs.append(Document(domain=domain, path=f"{path}:{n}", text=text))
    if not docs:
        raise ValueError(f"{path} holds no prompts")
    return docs


def heldout_windows(
    tokenizer,
    heldout: Path = HELDOUT,
    window: int = 160,
    max_windows: Optional[int] = None,
    docs: Optional[List[Document]] = None,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """Per domain, evenly spaced windows [N, window] of the held-out stream, and the stream lengths.

    Without ``max_windows`` the windows tile the whole stream (as many as fit
    without overlap), so the statistics cover every held-out token. ``docs``
    (e.g. ``prompt_documents``) replaces the documents read from ``heldout``.
    """
    streams = token_streams(read_jsonl(Path(heldout)) if docs is None else docs, tokenizer)
    windows, sizes = {}, {}
    for domain, stream in streams.items():
        sizes[domain] = int(stream.numel())
        n = stream.numel() // window
        if max_windows is not None:
            n = min(n, max_windows)
        if n >= 1:
            windows[domain] = fixed_windows(stream, n, window)
    return windows, sizes


@dataclass
class Routing:
    """What one pass over the windows leaves, per MoE layer and domain (positions >= prefix only)."""

    num_experts: int
    top_k: int
    prefix: int
    ids: List[Dict[str, torch.Tensor]] = field(default_factory=list)  # [N, P, k] int16 top-k expert ids
    gap: List[Dict[str, torch.Tensor]] = field(default_factory=list)  # [N*P] top-1 minus top-2 ranking key
    top1: List[Dict[str, torch.Tensor]] = field(default_factory=list)  # [N*P] top-1 probability
    mass: List[Dict[str, torch.Tensor]] = field(default_factory=list)  # [N*P] probability of the top-k
    routers: List[BlockRouter] = field(default_factory=list)  # per MoE layer: how the picks were made
    trace_positions: Optional[torch.Tensor] = None  # positions (absolute in the window) kept for the trace
    trace_logits: List[Dict[str, torch.Tensor]] = field(default_factory=list)  # [N, len(positions), E] fp16

    @property
    def num_layers(self) -> int:
        return len(self.ids)

    @property
    def domains(self) -> List[str]:
        return list(self.ids[0]) if self.ids else []


def _forward_router_logits(model, x: torch.Tensor):
    kwargs = {"input_ids": x, "output_router_logits": True}
    # Only the last position's LM logits are computed when the model allows it: the LM head is not measured.
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    router = getattr(out, "router_logits", None)
    if not router:
        raise NotMoEError(f"{type(model).__name__} returned no router_logits")
    return router


@torch.no_grad()
def collect(
    model,
    windows: Dict[str, torch.Tensor],
    num_experts: int,
    top_k: int,
    prefix: int = 16,
    forward_batch: int = 16,
    trace_positions: Optional[torch.Tensor] = None,
    routers: Optional[Sequence[BlockRouter]] = None,
) -> Routing:
    """Run every window through the model once and keep per-token routing facts.

    Keeps the top-k ids and three confidence numbers of every position >=
    ``prefix``; the full logits only at ``trace_positions`` (for the trace).
    ``routers``: each MoE layer's router (default: ``model_routing.model_routers``,
    or softmax top-k for a model of no family described there).
    """
    if routers is None:
        routers = model_routers(model)
    r = Routing(num_experts, top_k, prefix, trace_positions=trace_positions)
    per_layer: List[Dict[str, Dict[str, list]]] = []
    for domain, w in windows.items():
        if w.shape[1] <= prefix:
            raise ValueError(f"windows of {w.shape[1]} tokens leave nothing after the {prefix}-token prefix")
        for i in range(0, w.shape[0], forward_batch):
            x = w[i : i + forward_batch]
            router = _forward_router_logits(model, x)
            if not per_layer:
                per_layer = [{} for _ in router]
                if routers and len(routers) != len(router):
                    raise ValueError(f"{len(routers)} routers for {len(router)} layers of router logits")
                r.routers = list(routers) if routers else [assumed_router(num_experts, top_k) for _ in router]
            for li, logits in enumerate(router):
                z = logits.float().view(x.shape[0], x.shape[1], -1)
                if z.shape[-1] != num_experts:
                    raise ValueError(f"router logits have {z.shape[-1]} experts, config says {num_experts}")
                acc = per_layer[li].setdefault(domain, {"ids": [], "gap": [], "top1": [], "mass": [], "trace": []})
                if trace_positions is not None:
                    acc["trace"].append(z[:, trace_positions].to(torch.float16))
                ids, gap, p = _route(r.routers[li], z[:, prefix:].reshape(-1, num_experts))
                acc["ids"].append(ids.view(x.shape[0], -1, top_k).to(torch.int16))
                acc["gap"].append(gap)
                acc["top1"].append(p.amax(dim=-1))
                acc["mass"].append(p.gather(-1, ids).sum(-1))
    for layer in per_layer:
        r.ids.append({d: torch.cat(a["ids"]) for d, a in layer.items()})
        r.gap.append({d: torch.cat(a["gap"]) for d, a in layer.items()})
        r.top1.append({d: torch.cat(a["top1"]) for d, a in layer.items()})
        r.mass.append({d: torch.cat(a["mass"]) for d, a in layer.items()})
        if trace_positions is not None:
            r.trace_logits.append({d: torch.cat(a["trace"]) for d, a in layer.items()})
    return r


def _route(router: BlockRouter, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's routing of logits [T, E]: (top-k ids [T, k], top-1 minus top-2 gap [T], probs [T, E]).

    The picks are the model's (``BlockRouter.route_logits``), best first by the router's ranking
    key; the gap is between the two best picks' keys (softmax: logits; glm4_moe: sigmoid score +
    correction bias). With top-1 routing the runner-up is the best unpicked expert (no group limit).
    """
    ids, _, probs = router.route_logits(z)
    key = router.ranking_key(z)
    top2 = key.gather(-1, ids[:, :2]) if router.top_k >= 2 else key.topk(2, dim=-1).values
    return ids, top2[:, 0] - top2[:, 1], probs


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


def uniform_distinct(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts in a batch of ``batch`` tokens that each pick ``top_k`` of
    ``num_experts`` uniformly at random and independently: each expert is missed by one token
    with probability 1 - k/E, so it is hit by the batch with probability 1 - (1 - k/E)**B."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def distinct_count(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Distinct experts per batch: ``ids`` [batches, B, k] -> [batches] (float)."""
    nb = ids.shape[0]
    hit = torch.zeros(nb, num_experts, dtype=torch.bool)
    hit.scatter_(1, ids.reshape(nb, -1).long(), True)
    return hit.sum(dim=1).float()


def load_balance(ids: torch.Tensor, num_experts: int) -> Dict:
    """Per-expert share of all routed slots in ``ids`` (any shape of expert ids) and its summary."""
    counts = torch.bincount(ids.reshape(-1).long(), minlength=num_experts).double()
    shares = counts / counts.sum()
    mean = 1.0 / num_experts
    cum = shares.sort(descending=True).values.cumsum(0)
    return {
        "slots": int(counts.sum()),
        "shares": [round(float(s), 6) for s in shares],
        "max_over_mean": round(float(shares.max() / mean), 4),
        "min_over_mean": round(float(shares.min() / mean), 4),
        "dead": int((counts == 0).sum()),
        "cv": round(float(shares.std(unbiased=False) / mean), 4),
        # How concentrated the load is: the fewest experts that carry half / 90% of it.
        "experts_for_50pct": int((cum < 0.5 - 1e-12).sum()) + 1,
        "experts_for_90pct": int((cum < 0.9 - 1e-12).sum()) + 1,
    }


def sample_batches(
    ids: Dict[str, torch.Tensor], kind: str, batch: int, num: int, gen: torch.Generator
) -> Dict[str, torch.Tensor]:
    """``num`` batches of ``batch`` rows of one kind, as top-k ids [num, batch, k], keyed by domain
    (``"mixed"`` for independent_mixed); domains too small for ``batch`` are left out."""
    out = {}
    if kind == "contiguous":
        for d, x in ids.items():
            n, positions, _ = x.shape
            if batch > positions:
                continue
            win = torch.randint(0, n, (num,), generator=gen)
            start = torch.randint(0, positions - batch + 1, (num,), generator=gen)
            out[d] = x[win[:, None], start[:, None] + torch.arange(batch)]
    elif kind == "independent_domain":
        for d, x in ids.items():
            n, positions, _ = x.shape
            if batch > n:
                continue
            win = torch.rand(num, n, generator=gen).argsort(dim=1)[:, :batch]  # B different windows
            pos = torch.randint(0, positions, (num, 1), generator=gen)
            out[d] = x[win, pos]
    elif kind == "independent_mixed":
        pool = torch.cat(list(ids.values()))
        if batch <= pool.shape[0]:
            # Every domain gets the same total weight, whatever its number of windows.
            weight = torch.cat([torch.full((x.shape[0],), 1.0 / x.shape[0]) for x in ids.values()])
            win = torch.multinomial(weight.expand(num, -1), batch, replacement=False, generator=gen)
            pos = torch.randint(0, pool.shape[1], (num, 1), generator=gen)
            out["mixed"] = pool[win, pos]
    else:
        raise ValueError(f"unknown batch kind {kind!r}; expected one of {KINDS}")
    return out


def distinct_experts(
    ids: Dict[str, torch.Tensor],
    num_experts: int,
    top_k: int,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    num_batches: int = 256,
    seed: int = 0,
) -> Dict:
    """Mean distinct experts per batch for each kind and batch size, with the uniform expectation.

    ``ids``: one layer's top-k ids per domain, [windows, positions, k]. Per kind and B:
    ``mean`` over all batches (``num_batches`` per domain for the one-domain kinds), per-domain
    means, the ratio to uniform; B too large for the data is left out.
    """
    gen = torch.Generator().manual_seed(seed)
    out: Dict = {"uniform": {}, "cap": {}}
    for B in batch_sizes:
        out["uniform"][str(B)] = round(uniform_distinct(num_experts, top_k, B), 3)
        out["cap"][str(B)] = min(num_experts, top_k * B)
    for kind in KINDS:
        res = {}
        for B in batch_sizes:
            batches = sample_batches(ids, kind, B, num_batches, gen)
            if not batches:
                continue
            counts = {d: distinct_count(b, num_experts) for d, b in batches.items()}
            allc = torch.cat(list(counts.values()))
            mean = float(allc.mean())
            res[str(B)] = {
                "mean": round(mean, 3),
                "std": round(float(allc.std(unbiased=False)), 3),
                "ratio_to_uniform": round(mean / uniform_distinct(num_experts, top_k, B), 4),
                "batches": int(allc.numel()),
            }
            if kind != "independent_mixed":
                res[str(B)]["per_domain"] = {d: round(float(c.mean()), 3) for d, c in counts.items()}
        out[kind] = res
    return out


def _summary(x: torch.Tensor) -> Dict:
    v = x.double().numpy()
    q = np.quantile(v, QUANTILES)
    out = {"mean": round(float(v.mean()), 4)}
    out.update({f"q{round(p * 100):02d}": round(float(a), 4) for p, a in zip(QUANTILES, q)})
    return out


def _histogram(x: torch.Tensor, lo: float, hi: float) -> Dict:
    edges = np.linspace(lo, hi, HIST_BINS + 1)
    counts, _ = np.histogram(np.clip(x.double().numpy(), lo, hi), bins=edges)  # overflow lands in the end bins
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(c) for c in counts]}


def confidence(gap: Dict[str, torch.Tensor], top1: Dict[str, torch.Tensor], mass: Dict[str, torch.Tensor]) -> Dict:
    """Quantiles (overall and per domain) and histograms (overall) of the three confidence measures."""
    out = {}
    for name, per_domain in (("top1_minus_top2_logit", gap), ("top1_prob", top1), ("topk_mass", mass)):
        allv = torch.cat(list(per_domain.values()))
        if name == "top1_minus_top2_logit":
            # Gap range up to the 99.9th percentile, rounded up to half a logit; the rest is overflow.
            hi = max(1.0, float(np.ceil(2 * np.quantile(allv.double().numpy(), 0.999)) / 2))
            hist = _histogram(allv, 0.0, hi)
        else:
            hist = _histogram(allv, 0.0, 1.0)
        out[name] = {
            "all": _summary(allv),
            "per_domain": {d: _summary(v) for d, v in per_domain.items()},
            "histogram": hist,
        }
    return out


# ---------------------------------------------------------------------------
# Trace export and replay
# ---------------------------------------------------------------------------


def build_trace(
    routing: Routing, model_path: str, num_batches: int = 32, batch: int = 128, seed: int = 0
) -> Dict:
    """Raw router logits of fixed decode batches (independent_domain and independent_mixed).

    Batch b of either kind takes the logits at ``routing.trace_positions[b]`` of
    ``batch`` different windows (one domain per batch, cycling over the domains
    that have ``batch`` windows, or drawn across all domains with equal weight
    per domain). Logits are float16,
    [layers, batches, batch, E]; ``domain`` [batches, batch] indexes ``domains``.
    ``router`` describes how the model routes them (``BlockRouter.record``) and, for a
    router with a correction bias (glm4_moe), ``correction_bias`` holds it, [layers, E].
    """
    if routing.trace_positions is None or not routing.trace_logits:
        raise ValueError("collect() was run without trace_positions")
    if len(routing.trace_positions) < num_batches:
        raise ValueError(f"{len(routing.trace_positions)} trace positions for {num_batches} batches")
    gen = torch.Generator().manual_seed(seed)
    domains = routing.domains
    sizes = [routing.trace_logits[0][d].shape[0] for d in domains]
    batch = min(batch, sum(sizes))
    # One-domain batches come from the domains that can fill them with different windows.
    full = [i for i, n in enumerate(sizes) if n >= batch]
    if not full:
        raise ValueError(f"no domain has {batch} windows for a one-domain trace batch")
    offsets = torch.tensor([0] + list(np.cumsum(sizes)))
    weight = torch.cat([torch.full((n,), 1.0 / n) for n in sizes])  # equal weight per domain
    kinds = {}
    for kind in TRACE_KINDS:
        flat = []
        for b in range(num_batches):
            if kind == "independent_domain":
                d = full[b % len(full)]
                flat.append(offsets[d] + torch.randperm(sizes[d], generator=gen)[:batch])
            else:
                flat.append(torch.multinomial(weight, batch, replacement=False, generator=gen))
        flat = torch.stack(flat)  # [nb, B] index into the windows of all domains, concatenated
        dom = torch.bucketize(flat, offsets[1:], right=True)
        win = flat - offsets[dom]
        col = torch.arange(num_batches)[:, None].expand_as(flat)  # batch b reads trace position b
        layers = []
        for per_domain in routing.trace_logits:
            pool = torch.cat([per_domain[d] for d in domains])  # [windows, positions, E]
            layers.append(pool[flat, col])
        kinds[kind] = {
            "logits": torch.stack(layers),  # [layers, nb, B, E] float16
            "domain": dom.to(torch.int8),
            "window": win.to(torch.int32),
            "position": routing.trace_positions[:num_batches].to(torch.int32).clone(),
        }
    trace = {
        "format": TRACE_FORMAT,
        "model": model_path,
        "num_experts": routing.num_experts,
        "top_k": routing.top_k,
        "num_layers": routing.num_layers,
        "domains": domains,
        "kinds": kinds,
    }
    if routing.routers:
        # How to route the logits (absent in older traces: softmax top-k).
        trace["router"] = routing.routers[0].record()
        if routing.routers[0].correction_bias is not None:
            trace["correction_bias"] = torch.stack([r.correction_bias for r in routing.routers])  # [layers, E]
    return trace


def load_trace(path: Path) -> Dict:
    """Read a trace written by ``--trace`` (a plain dict of tensors and metadata; see ``build_trace``)."""
    trace = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(trace, dict) or trace.get("format") != TRACE_FORMAT:
        raise ValueError(f"{path} is not a routing trace ({TRACE_FORMAT})")
    for kind, rec in trace["kinds"].items():
        shape = tuple(rec["logits"].shape)
        if len(shape) != 4 or shape[0] != trace["num_layers"] or shape[3] != trace["num_experts"]:
            raise ValueError(f"{path}: {kind} logits have shape {shape}")
    return trace


def _rank_map(num_experts: int, recorded: int, head: int) -> torch.Tensor:
    """For each new rank 0..num_experts-1 the (fractional) recorded rank whose logit it takes:
    the identity on the head, the recorded tail stretched linearly over the new tail."""
    pos = torch.arange(num_experts, dtype=torch.float64)
    tail = pos[head:]
    span_new = max(1, num_experts - 1 - head)
    tail_pos = head + (tail - head) * (recorded - 1 - head) / span_new
    return torch.cat([pos[:head], tail_pos])


def scaled_logits(
    trace: Dict,
    layer: int,
    num_experts: int,
    top_k: int,
    batch: int,
    generator: Optional[torch.Generator] = None,
    kind: str = "independent_mixed",
) -> torch.Tensor:
    """``batch`` rows of router logits [batch, num_experts] (float32) replaying one recorded layer.

    Rows are recorded rows of ``kind`` (independent_domain: all from one random domain), without
    replacement while the pool lasts; at the recorded E they are returned unchanged.
    At a larger E' each recorded expert (parent) is split into ~E'/E children (id child * E + parent).
    Values: a row's sorted logits keep the recorded top ``top_k`` exactly (the top-1 gap and the
    picks' affinities carry over) and stretch the recorded tail linearly over the other E' - k ranks.
    Identities: rank j < k goes to a random child of the recorded rank-j parent, so the picks keep
    the recorded parents (load skew, domain co-occurrence carry over); the remaining children follow
    in their parent's recorded rank order. Assumed: children of one parent are equally popular.
    Not kept: softmax probabilities (the longer tail dilutes the top-k mass).
    """
    if kind not in trace["kinds"]:
        raise ValueError(f"trace has no {kind!r} batches; it has {sorted(trace['kinds'])}")
    rec = trace["kinds"][kind]
    E = int(trace["num_experts"])
    router = trace.get("router", {})
    if num_experts != E and (router.get("scoring_func", "softmax") != "softmax" or router.get("has_correction_bias")):
        raise ValueError(f"scaling assumes a softmax top-k router (ranked by logit); this trace's router is "
                         f"{router.get('rule')!r}")
    if num_experts < E:
        raise ValueError(f"cannot replay a {E}-expert trace at fewer experts ({num_experts})")
    if num_experts != E and not 1 <= top_k < E:
        raise ValueError(f"top_k={top_k} must be below the recorded {E} experts to scale the profile")
    z = rec["logits"][layer].float()  # [nb, B, E]
    nb, B_rec, _ = z.shape
    g = generator
    pool = z.reshape(nb * B_rec, E)
    if kind == "independent_domain":
        groups = rec["domain"].reshape(-1).long()
        choice = groups.unique()
        d = choice[torch.randint(0, choice.numel(), (1,), generator=g)]
        pool = pool[groups == d]
    idx = torch.randperm(pool.shape[0], generator=g)
    if batch > idx.numel():  # more rows than recorded: repeat, with fresh children below
        idx = torch.cat([idx, torch.randint(0, pool.shape[0], (batch - idx.numel(),), generator=g)])
    rows = pool[idx[:batch]]
    if num_experts == E:
        return rows.clone()

    # Sorted recorded profile and its parents per row.
    vals, parents = rows.sort(dim=1, descending=True)  # [batch, E]
    head = top_k
    pos = _rank_map(num_experts, E, head)
    lo = pos.floor().long().clamp(max=E - 1)
    hi = (lo + 1).clamp(max=E - 1)
    frac = (pos - lo.double()).float()
    new_vals = vals[:, lo] * (1 - frac) + vals[:, hi] * frac  # [batch, E'] non-increasing

    # Children per parent (E' need not be a multiple of E: low parent ids get the extra child).
    n_children = torch.tensor([len(range(p, num_experts, E)) for p in range(E)])
    max_c = int(n_children.max())
    # A random order of each parent's children per row: key = rand, invalid children last.
    keys = torch.rand(batch, E, max_c, generator=g)
    valid = torch.arange(max_c)[None, :] < n_children[:, None]  # [E, max_c]
    keys = keys.masked_fill(~valid, 2.0)
    child_order = keys.argsort(dim=2)  # [batch, E, max_c]: child_order[t, p, 0] is p's head child
    child_ids = child_order * E + torch.arange(E)[None, :, None]

    # Rank order of new experts: head children of the top-k parents, then the rest by parent rank.
    rank_of_parent = torch.empty_like(parents)
    rank_of_parent.scatter_(1, parents, torch.arange(E).expand(batch, E))
    slot = torch.arange(max_c)[None, None, :]
    # Sort key: (is-not-head, parent rank, child slot); head = slot 0 of a parent ranked < k.
    prank = rank_of_parent[:, :, None].expand(batch, E, max_c)
    is_head = (slot == 0) & (prank < head)
    key = (~is_head).long() * (E * max_c * 2) + prank * max_c + slot
    key = key.masked_fill(~valid[None], torch.iinfo(torch.long).max)
    order = key.reshape(batch, -1).argsort(dim=1)[:, :num_experts]
    experts = child_ids.reshape(batch, -1).gather(1, order)  # [batch, E'] new id at each new rank
    out = torch.empty(batch, num_experts)
    out.scatter_(1, experts, new_vals)
    return out


# ---------------------------------------------------------------------------
# The whole run, plot and CLI
# ---------------------------------------------------------------------------


def analyse(
    model_dir: Path,
    heldout: Path = HELDOUT,
    window: int = 160,
    prefix: int = 16,
    max_windows: Optional[int] = None,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    num_batches: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    trace_batches: int = 0,
    trace_batch_size: int = 128,
    prompts: Optional[Path] = None,
    prompt_field: str = "prompt",
    prompt_domain: str = "python",
) -> Tuple[Dict, Optional[Dict]]:
    """All statistics of one model as a JSON-ready dict, and the trace (``None`` if ``trace_batches`` is 0).

    With ``prompts`` the text is that file's prompts (``prompt_documents``), not ``heldout``.
    """
    import transformers

    model, tokenizer, E, k = load_model(Path(model_dir), dtype)
    docs = prompt_documents(prompts, prompt_field, prompt_domain) if prompts is not None else None
    windows, stream_sizes = heldout_windows(tokenizer, heldout, window, max_windows, docs=docs)
    trace_pos = None
    if trace_batches:
        gen = torch.Generator().manual_seed(seed + 1)
        trace_pos = prefix + torch.randint(0, window - prefix, (trace_batches,), generator=gen)
    routing = collect(model, windows, E, k, prefix, trace_positions=trace_pos)
    layers = []
    for li in range(routing.num_layers):
        ids = routing.ids[li]
        layers.append(
            {
                "moe_layer": li,
                "balance": {
                    "all": load_balance(torch.cat([x.reshape(-1) for x in ids.values()]), E),
                    "per_domain": {d: load_balance(x, E) for d, x in ids.items()},
                },
                "distinct_experts": distinct_experts(ids, E, k, batch_sizes, num_batches, seed + li),
                "confidence": confidence(routing.gap[li], routing.top1[li], routing.mass[li]),
            }
        )
    cfg = model.config.get_text_config()
    result = {
        "model": str(model_dir),
        "architecture": (getattr(model.config, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(cfg, "model_type", None),
        "num_experts": E,
        "top_k": k,
        "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
        "num_moe_layers": routing.num_layers,
        "norm_topk_prob": getattr(cfg, "norm_topk_prob", None),
        "router": routing.routers[0].describe(),
        "router_spec": routing.routers[0].record(),
        # What the confidence gap measures: the router's ranking key (see model_routing.BlockRouter.ranking_key).
        "gap_key": "logit" if routing.routers[0].spec.scoring_func == "softmax" else "sigmoid score + correction bias",
        "settings": {
            "heldout": None if prompts is not None else str(heldout),
            "prompts": None if prompts is None else {"file": str(prompts), "field": prompt_field,
                                                     "domain": prompt_domain, "count": len(docs)},
            "window": window,
            "prefix": prefix,
            "max_windows": max_windows,
            "batch_sizes": list(batch_sizes),
            "batches_per_size": num_batches,
            "seed": seed,
            "dtype": str(dtype).replace("torch.", ""),
        },
        "tokens": {
            d: {
                "heldout_tokens": stream_sizes[d],
                "windows": int(windows[d].shape[0]) if d in windows else 0,
                "counted_tokens": int(routing.ids[0][d].shape[0] * routing.ids[0][d].shape[1]) if d in windows else 0,
            }
            for d in stream_sizes
        },
        "summary": summary(layers, E, k),
        "layers": layers,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    trace = build_trace(routing, str(model_dir), trace_batches, trace_batch_size, seed) if trace_batches else None
    return result, trace


def summary(layers: List[Dict], num_experts: int, top_k: int, batch: int = 32) -> Dict:
    """Headline per layer: distinct experts at ``batch`` per kind vs uniform, and balance."""
    out = {"batch": batch, "uniform": round(uniform_distinct(num_experts, top_k, batch), 3), "layers": []}
    for L in layers:
        row = {"moe_layer": L["moe_layer"]}
        for kind in KINDS:
            got = L["distinct_experts"][kind].get(str(batch))
            row[kind] = got["mean"] if got else None
        bal = L["balance"]["all"]
        row.update(max_over_mean=bal["max_over_mean"], min_over_mean=bal["min_over_mean"], dead=bal["dead"])
        row["median_top1_gap"] = L["confidence"]["top1_minus_top2_logit"]["all"]["q50"]
        out["layers"].append(row)
    return out


def plot(result: Dict, path: Path) -> None:
    """Per layer: distinct experts vs B (three kinds, uniform, cap), the top-1 gap histogram, sorted loads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    E, k = result["num_experts"], result["top_k"]
    fig, axes = plt.subplots(len(layers), 3, figsize=(15, 3.6 * len(layers)), squeeze=False)
    styles = {"contiguous": "tab:blue", "independent_domain": "tab:orange", "independent_mixed": "tab:green"}
    for row, L in zip(axes, layers):
        ax = row[0]
        de = L["distinct_experts"]
        bs = [int(b) for b in de["uniform"]]
        ax.plot(bs, [de["uniform"][str(b)] for b in bs], "k--", label="uniform E(1-(1-k/E)^B)")
        ax.plot(bs, [de["cap"][str(b)] for b in bs], ":", color="grey", label="min(E, kB)")
        for kind, color in styles.items():
            got = sorted((int(b), v["mean"]) for b, v in de[kind].items())
            if got:
                ax.plot(*zip(*got), "o-", color=color, label=kind, ms=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size B")
        ax.set_ylabel("distinct experts")
        ax.set_title(f"MoE layer {L['moe_layer']}: distinct experts per batch (E={E}, k={k})")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

        ax = row[1]
        h = L["confidence"]["top1_minus_top2_logit"]["histogram"]
        edges = np.array(h["edges"])
        counts = np.array(h["counts"], dtype=float)
        ax.bar(edges[:-1], counts / counts.sum(), width=np.diff(edges), align="edge", alpha=0.7)
        ax.set_xlabel(f"top-1 minus top-2 router {result.get('gap_key', 'logit')} (last bin: overflow)")
        ax.set_ylabel("fraction of tokens")
        med = L["confidence"]["top1_minus_top2_logit"]["all"]["q50"]
        ax.axvline(med, color="k", lw=1, label=f"median {med:.2f}")
        ax.legend(fontsize=7)
        ax.set_title("router confidence gap")

        ax = row[2]
        ax.plot(np.arange(E), sorted(L["balance"]["all"]["shares"], reverse=True), "k-o", ms=3, label="all")
        for d, bal in L["balance"]["per_domain"].items():
            ax.plot(np.arange(E), sorted(bal["shares"], reverse=True), "-", lw=1, label=d)
        ax.axhline(1.0 / E, color="grey", ls=":", label="uniform 1/E")
        ax.set_xlabel("expert (sorted by load)")
        ax.set_ylabel("load share")
        ax.set_title(
            f"load: max/mean {L['balance']['all']['max_over_mean']:.2f}, min/mean "
            f"{L['balance']['all']['min_over_mean']:.2f}, dead {L['balance']['all']['dead']}"
        )
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Routing statistics: {result['model']}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (3.6 * len(layers))))  # room for the suptitle
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(result: Dict, prefix: Path) -> Tuple[Path, Path]:
    """``<prefix>.json`` and ``<prefix>.png``."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path = prefix.with_name(prefix.name + ".json")
    png_path = prefix.with_name(prefix.name + ".png")
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, png_path)
    return json_path, png_path


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--out", type=Path, help="output prefix (default: benchmarks/results/routing_stats_<dir name>"
                    "[_<prompts file stem>])")
    ap.add_argument("--heldout", type=Path, default=HELDOUT)
    ap.add_argument("--prompts", type=Path, help="JSONL(.gz) of prompts to measure instead of the held-out corpus")
    ap.add_argument("--prompt-field", default="prompt", help="the text's key in each --prompts line")
    ap.add_argument("--prompt-domain", default="python", choices=DOMAINS, help="domain the prompts count as")
    ap.add_argument("--window", type=int, default=160, help="tokens per window")
    ap.add_argument("--prefix", type=int, default=16, help="positions before this are not counted")
    ap.add_argument("--max-windows", type=int, default=None, help="per domain (default: all held-out tokens)")
    ap.add_argument("--batches", type=int, default=256, help="sampled batches per batch size (per domain)")
    ap.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--trace", type=Path, help="also write replayable router logits of decode batches here")
    ap.add_argument("--trace-batches", type=int, default=32)
    ap.add_argument("--trace-batch-size", type=int, default=128)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = f"routing_stats_{args.model_dir.resolve().name}"
    if args.prompts is not None:  # not over the corpus's file: routing_stats_<model>_<prompts file stem>
        name += "_" + args.prompts.name.split(".")[0]
    out = args.out or Path("benchmarks/results") / name
    result, trace = analyse(
        args.model_dir,
        heldout=args.heldout,
        window=args.window,
        prefix=args.prefix,
        max_windows=args.max_windows,
        batch_sizes=[int(b) for b in args.batch_sizes.split(",") if b],
        num_batches=args.batches,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        trace_batches=args.trace_batches if args.trace else 0,
        trace_batch_size=args.trace_batch_size,
        prompts=args.prompts,
        prompt_field=args.prompt_field,
        prompt_domain=args.prompt_domain,
    )
    json_path, png_path = write(result, out)
    print(f"wrote {json_path} and {png_path}")
    if trace is not None:
        args.trace.parent.mkdir(parents=True, exist_ok=True)
        torch.save(trace, args.trace)
        print(f"wrote {args.trace} ({args.trace.stat().st_size / 1e6:.2f} MB)")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
