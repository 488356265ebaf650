"""An output-aware oracle for paged layers: how far routing-only rules are from the best choice of page-ins.

Every rule measured on paged layers (``bench_offload``; docs/offload.md, section 3) decides from the router
alone: logits, routed weights, residency, a static expert similarity. This oracle also sees each expert's
actual output on each row, which no serving rule can (computing it means reading every expert's weights).
Per (layer, decode step) it keeps the resident picks, then adds, P times, the non-resident picked expert
whose paging most lowers the layer's routed output error: sum over rows of ||y_full - y||^2, with y the rows
re-routed onto the kept set as the runtime re-routes (``reference.reroute``: held picks stay, freed slots
take the best-scored kept expert, gate weights rescaled to the row's sum). So it pages exactly P experts
per layer-step (fewer only when fewer non-resident experts were picked).

It is a bound of a kind, not an optimum: greedy, and myopic (each layer's error, not the model's loss). Where it
reaches a point no routing-only rule reaches, the gap is information the selection stage does not have at
decision time. Batches, LRU replay and the paired accuracy statistic are ``bench_offload``'s.

``--sketch-ranks r``: the same greedy on *sketched* outputs, which a server could afford: per expert a rank-r
linear map fitted on the calibration text (reduced-rank least squares of the expert's output on the hidden states
entering its block; ``fit_sketches``). A rank-r sketch holds 2·H·r numbers against the expert's 3·H·I (Qwen3-30B,
r = 16: 1.4 %), so every expert's sketch could stay on the GPU.

    python -m benchmarks.explore_paged_oracle --model trained-glm4-moe --pages 15,17 \\
        --out benchmarks/results/offload_glm4_oracle_cpu
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks import bench_offload as bo
from lynx_sglang import accuracy
from lynx_sglang.runtime.selection import reference
from lynx_sglang.runtime.selection.config import LynxPolicy, make_policy
from lynx_sglang.runtime.selection.output_norms import pick_scale
from lynx_sglang.sere_calibrate import block_inputs, expert_outputs


@dataclass(frozen=True)
class OracleRule(bo.ResidencyRule):
    """The oracle at ``pages`` page-ins per layer-step (K: ``num_slots``; ``mode`` and ``policy`` unused)."""

    pages: int = 0
    sketch_rank: Optional[int] = None  # None: the experts' real outputs; r: their rank-r sketches
    # "greedy": the output-error greedy; otherwise the non-resident picks ranked by a contribution score,
    # sum over the rows that pick e of w * s: "weight" s = 1, "norm" s = ||E_e(x)|| (exact), "norm-fit"
    # s = the predicted norm of the output-norm heads file beside the model (``output_norms.pick_scale``): what
    # --lynx-residency-output-norms serves, here without the cap and best-pick guard of the runtime's budget.
    rank_by: str = "greedy"

    @property
    def label(self) -> str:
        if self.rank_by != "greedy":
            return f"rank by {self.rank_by} pages={self.pages}"
        return f"oracle pages={self.pages}" if self.sketch_rank is None else \
            f"sketch r={self.sketch_rank} pages={self.pages}"


def fit_sketches(model, tokenizer, ranks: Sequence[int], tokens: int = 4096,
                 window: int = 128) -> Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]]:
    """{r: per MoE block (block order): (U [E, H, r], V [E, r, H])} for each r in ``ranks``, with
    ``h @ U[e] @ V[e]`` the rank-r least-squares fit of expert e's output on the calibration text's hidden
    states entering the block (reduced-rank regression: the full fit projected on its top-r output directions)."""
    sketches: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {r: [] for r in ranks}
    windows = calibration_windows(tokenizer, tokens, window)
    for block, x in zip(accuracy.moe_blocks(model), block_inputs(model, windows)):
        with torch.no_grad():
            y = expert_outputs(block.experts, x)  # [E, N, H]
        gram = x.T @ x + 1e-4 * torch.eye(x.shape[1])  # normal equations, shared by every expert
        w = torch.linalg.solve(gram, torch.einsum("nh,enk->ehk", x, y))  # [E, H, H]
        vh = torch.linalg.svd(x @ w, full_matrices=False).Vh  # the fit's output directions, strongest first
        for r in ranks:
            v = vh[:, :r]  # [E, r, H]
            sketches[r].append((w @ v.transpose(1, 2), v))
    return sketches


def calibration_windows(tokenizer, tokens: int = 4096, window: int = 128) -> torch.Tensor:
    """The calibration text's token windows the sketches are fitted on."""
    from lynx_sglang.corpus import read_calibration
    from lynx_sglang.sere_calibrate import calibration_tokens

    return calibration_tokens(read_calibration(), tokenizer, tokens, window)


def ranked_keep(ids: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor, resident: torch.Tensor,
                pages: int) -> torch.Tensor:
    """[E] bool kept set: the resident picks, then the ``pages`` non-resident picked experts of highest
    sum over the rows that pick them of weight * ``scale`` [B, E] (ties to the lower id)."""
    E = scale.shape[1]
    ids = ids.long()
    contrib = weights.float() * scale.gather(1, ids.clamp(min=0))
    cost = torch.zeros(E).index_add_(0, ids.clamp(min=0).flatten(), torch.where(ids >= 0, contrib, 0.0).flatten())
    picked = torch.zeros(E, dtype=torch.bool)
    picked[ids[ids >= 0]] = True
    keep = picked & resident
    cand = picked & ~resident
    order = torch.sort(torch.where(cand, cost, torch.full_like(cost, -1.0)), descending=True, stable=True).indices
    keep[order[:min(pages, int(cand.sum()))]] = True
    return keep


def oracle_keep(outputs: torch.Tensor, router, logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                resident: torch.Tensor, pages: int, sel: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[E] bool kept set: the resident picks, then ``pages`` times the non-resident picked expert whose
    addition most lowers sum_rows ||y_full - y||^2 (ties to the lower id). ``outputs``: [B, E, H], every
    routed expert's unweighted output on each row; ``sel``: the router's ranking score [B, E] that re-routing
    refills by (None: ``reference.selection_score`` without a correction bias)."""
    B, E, H = outputs.shape
    k = router.top_k
    out = torch.cat([outputs, outputs.new_zeros(B, 1, H)], dim=1)  # index E: an empty slot
    ids, w, z = ids[:, :k].long(), weights[:, :k].float(), logits.float()

    def combine(i: torch.Tensor, wt: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        i = torch.where(i < 0, E, i.long())
        return (wt.float()[..., None] * o.gather(1, i[..., None].expand(-1, -1, H))).sum(1)

    y_full = combine(ids, w, out)
    picked = torch.zeros(E, dtype=torch.bool)
    picked[ids.flatten()] = True
    keep = picked & resident
    if sel is None:
        sel = reference.selection_score(router, z, None)
    ok = torch.ones(B, dtype=torch.bool)
    for _ in range(pages):
        cand = torch.nonzero(picked & ~keep).flatten()  # ascending ids: argmin's ties go to the lower
        C = cand.numel()
        if C == 0:
            break
        rows = keep[None].repeat(C, 1)
        rows[torch.arange(C), cand] = True
        new_ids, new_w, _ = reference.reroute(router, z.repeat(C, 1), ids.repeat(C, 1), w.repeat(C, 1),
                                              sel.repeat(C, 1), ok.repeat(C), rows.repeat_interleave(B, 0))
        err = ((combine(new_ids, new_w, out.repeat(C, 1, 1)) - y_full.repeat(C, 1)) ** 2).sum(-1)
        keep[cand[int(err.view(C, B).sum(1).argmin())]] = True
    return keep


class OraclePatch(bo.OffloadPatch):
    """``OffloadPatch`` whose ``OracleRule`` decisions see the hidden states entering each MoE block
    (``step_hidden``) and every expert's output on them."""

    sketches: Optional[dict] = None  # rank -> fit_sketches(model, rank), for sketched oracles
    norm_heads: Optional[list] = None  # per block: the served (weight, bias) head (bench_offload.model_output_norms)

    def _residency_select(self, layer, logits, ids, weights):
        if not isinstance(self.rule, OracleRule):
            return super()._residency_select(layer, logits, ids, weights)
        E = self.router.num_experts
        with torch.no_grad():
            h = self.step_hidden(layer)
            if self.rule.rank_by == "norm-fit":
                outputs = None
                scale = pick_scale(h, *OraclePatch.norm_heads[layer])
            elif self.rule.rank_by == "weight":
                outputs, scale = None, torch.ones(h.shape[0], E)
            elif self.rule.sketch_rank is None:
                outputs = expert_outputs(self.blocks[layer].experts, h).permute(1, 0, 2)
            else:
                u, v = OraclePatch.sketches[self.rule.sketch_rank][layer]
                outputs = torch.einsum("bh,ehr,erk->bek", h, u, v)
            resident = bo.resident_mask(self.lru[layer][self.rule.num_slots], E)
            sel = reference.selection_score(self.router, logits.float(), self.routers[layer].correction_bias)
            if self.rule.rank_by == "norm":
                scale = outputs.norm(dim=-1)
            if self.rule.rank_by == "greedy":
                keep = oracle_keep(outputs, self.router, logits, ids, weights, resident, self.rule.pages, sel)
            else:
                k = self.router.top_k
                keep = ranked_keep(ids[:, :k], weights[:, :k], scale, resident, self.rule.pages)
            new_ids, new_w, changed = reference.reroute(self.router, logits.float(), ids.long(), weights.float(), sel,
                                                        torch.ones(ids.shape[0], dtype=torch.bool), keep)
        new_ids = new_ids.to(ids.dtype)
        self.counts.append((layer, len(bo.distinct_experts(ids)), len(bo.distinct_experts(new_ids))))
        self.rows[0] += int(changed.sum())
        self.rows[1] += ids.shape[0]
        return new_ids, new_w.to(weights.dtype)


def run(path: Path, pages: Sequence[int], batch_size: int, batches_per_kind: int, prefix: int, decode_len: int,
        seed: int, log=print, sketch_ranks: Sequence[int] = (), exact: bool = True,
        rank_by: Sequence[str] = ()) -> dict:
    """off, lynx and the oracle at each page count on ``bench_offload``'s batches, K = E/4; with ``sketch_ranks``
    also the sketched oracle at each rank and page count (``exact`` False: only those); with ``rank_by`` also
    the ranked rules (``OracleRule.rank_by``) at each page count."""
    model, tokenizer = accuracy.load_model(path)
    E, k = accuracy.model_shape(model)
    (K,) = bo.slot_counts(E, k, (4,))
    batches = accuracy.make_batches(accuracy.domain_streams(tokenizer), batch_size, batches_per_kind,
                                    prefix + decode_len + 1, seed=seed)
    rules = [OracleRule("prefer", K, LynxPolicy(), pages=p) for p in pages] if exact else []
    rules += [OracleRule("prefer", K, LynxPolicy(), pages=p, sketch_rank=r) for r in sketch_ranks for p in pages]
    rules += [OracleRule("prefer", K, LynxPolicy(), pages=p, rank_by=b) for b in rank_by for p in pages]
    OraclePatch.sketches = fit_sketches(model, tokenizer, sketch_ranks) if sketch_ranks else {}
    OraclePatch.norm_heads = bo.model_output_norms(model, path) if "norm-fit" in rank_by else None
    series, t0 = {}, time.time()

    def add(label, res):
        patch = bo.OffloadPatch.last
        s = series.setdefault(label, bo.Series(label, K, [], [], []))
        s.steps.append(patch.steps[K])
        s.prefill.append(patch.prefill[K])
        s.results.append(res)

    for i, batch in enumerate(batches):
        with bo.recording([K]):
            off = accuracy.off_reference(model, batch, prefix, 0)
            add("off", accuracy.measure(model, batch, make_policy("off"), off, prefix, 0)[0])
        with bo.recording([K]):
            add("lynx", accuracy.measure(model, batch, make_policy("lynx"), off, prefix, 0)[0])
        for rule in rules:
            with bo.recording([K]):
                accuracy.SelectionPatch = OraclePatch  # recording() restores SelectionPatch on exit
                add(rule.label, accuracy.measure(model, batch, rule, off, prefix, 0)[0])
        log(f"batch {i + 1}/{len(batches)} ({time.time() - t0:.0f} s)")
    base = series["off"].mean("loads")
    rows = []
    for label, s in series.items():
        row = {"rule": label, "page_ins_per_layer_step": s.mean("loads"), "distinct_per_layer_step": s.mean("distinct"),
               "page_ins_vs_off": s.mean("loads") / base, **s.step_tail(), **s.accuracy(),
               "delta_vs_lynx": s.paired_vs(series["lynx"])}
        rows.append(row)
        vs = row["delta_vs_lynx"]
        log(f"{label}: {row['page_ins_per_layer_step']:.2f} page-ins / layer-step ({base / row['page_ins_per_layer_step']:.2f}x "
            f"fewer than off), vs lynx {vs['points']:+.2f} [{vs['ci95'][0]:+.2f}, {vs['ci95'][1]:+.2f}], KL {row['kl']:.4f}")
    return {"model": path.name, "num_experts": E, "top_k": k, "num_slots": K, "batch_size": batch_size,
            "batches": len(batches), "decode_steps_per_batch": decode_len, "rows": rows}


def plot(result: dict, png: Path, rules: Optional[dict] = None) -> None:
    """KL against page-ins: the oracle's, the sketches' and the ranked rules' points, and (``rules``: a
    ``bench_offload`` result of the same model and batches) every routing-only rule's."""
    from benchmarks.results_io import pyplot, save_png

    plt = pyplot(png)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    if rules is not None:
        for r in rules["models"][0]["batch_sizes"][str(result["batch_size"])]["rows"]:
            if r["rule"] not in ("off",):
                ax.scatter(r["page_ins_per_layer_step"], r["kl"], color="0.6", s=22)
        ax.scatter([], [], color="0.6", s=22, label="routing-only rules (bench_offload)")
    pts = []
    families = (("oracle", "tab:red", "o", "output-aware oracle"),
                ("sketch", "tab:orange", "s", "oracle on rank-r expert sketches"),
                ("rank by weight", "tab:gray", "v", "ranked by routed weight"),
                ("rank by norm ", "tab:green", "^", "ranked by w x exact output norm"),
                ("rank by norm-fit", "tab:purple", "D", "ranked by w x predicted output norm (served head)"))
    for prefix, color, marker, label in families:
        rows = [r for r in result["rows"] if r["rule"].startswith(prefix)]
        if rows:  # a run has only the families it was asked for
            ax.scatter([r["page_ins_per_layer_step"] for r in rows], [r["kl"] for r in rows], color=color, s=40,
                       marker=marker, label=label)
            pts += rows
    lynx = next(r for r in result["rows"] if r["rule"] == "lynx")
    ax.scatter([lynx["page_ins_per_layer_step"]], [lynx["kl"]], color="tab:blue", s=40, label="lynx")
    for r in pts + [lynx]:
        vs = r["delta_vs_lynx"]["points"]
        ax.annotate(f"{vs:+.2f} pts", (r["page_ins_per_layer_step"], r["kl"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("experts paged in per layer and decode step (SGLang LRU)")
    ax.set_ylabel("KL(off || rule) per token")
    ax.set_title(f"{result['model']}, K={result['num_slots']}, B={result['batch_size']}, {result['batches']} "
                 "held-out batches (labels: accuracy vs lynx)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_png(fig, png)


def main(argv: Optional[Sequence[str]] = None) -> None:
    import json

    from benchmarks.results_io import RESULTS_DIR, environment, write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bo.add_batch_args(ap, batches=6)
    ap.add_argument("--pages", default="15,17", help="page-ins per layer-step, one oracle each")
    ap.add_argument("--sketch-ranks", default="", help="also the oracle on rank-r expert sketches, for each r")
    ap.add_argument("--sketch-only", action="store_true", help="skip the exact oracle (with --sketch-ranks/--rank-by)")
    ap.add_argument("--rank-by", default="", help="also ranked rules: weight, norm, norm-fit (comma-separated)")
    ap.add_argument("--rules", type=Path, default=None,
                    help="a bench_offload JSON of the same model and batches, drawn for comparison")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "offload_glm4_oracle_cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    result = run(bo.ROOT / "models" / args.model, [int(p) for p in args.pages.split(",")], args.batch_size,
                 args.batches, args.prefix, args.decode_len, args.seed,
                 sketch_ranks=[int(r) for r in args.sketch_ranks.split(",") if r], exact=not args.sketch_only,
                 rank_by=[b for b in args.rank_by.split(",") if b])
    payload = {**environment(torch.device("cpu")),
               "command": "python -m benchmarks.explore_paged_oracle " + " ".join(
                   sys.argv[1:] if argv is None else argv),
               "seconds": round(time.time() - t0, 1), **result}
    write_json(args.out, payload)
    plot(payload, args.out.with_suffix(".png"), json.loads(args.rules.read_text()) if args.rules else None)


if __name__ == "__main__":
    main()
