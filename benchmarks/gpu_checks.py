"""GPU checks of the selection kernels: agreement with the torch reference (every kernel policy, lynx with its
similarity refill, ``lynx+sim``, included) and CUDA-graph replay.

Also ``lynx_ep`` (torch backend only): the same ids, slot ranks and statistics on the GPU as
on the CPU, and a captured selector's replays equal to eager runs. And lynx's residency mode on a
paged layer (``--lynx-residency prefer``, with and without a page budget; torch backend): a captured
selector reads an ``expert_slot`` written in place between replays, as SGLang's paged experts
writes it, and decides as an eager one.

Plain Python (no pytest, no sglang): the GPU machine carries only this tree.

    python -m benchmarks.gpu_checks                    # on a GPU
    TRITON_INTERPRET=1 python -m benchmarks.gpu_checks --device cpu --quick   # logic check on CPU

Writes benchmarks/results/gpu_checks_cuda.json on a GPU; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.results_io import environment, save
from lynx_sglang import ExpertSelector, RouterSpec, make_policy
from lynx_sglang.runtime.expert_parallel import ExpertPlacement, RankAwareSelector, home_rank
from lynx_sglang.synthetic import random_logits, random_similarity, route

POLICIES = [("lynx", {}), ("lynx+sim", {}), ("oea", {}), ("budget", {"max_experts": 32}), ("off", {})]
#: Labels for policies with an option that changes the kernels (lynx's similarity refill: REFILL).
_LABELS = {"lynx+sim": ("lynx", {"refill_similarity": 8.0})}


def _make(label: str, params: dict | None = None):
    """(policy, its [E, E]-similarity maker or None) of a label of POLICIES or cuda_graph_replay."""
    name, extra = _LABELS.get(label, (label, {}))
    policy = make_policy(name, **{**extra, **(params or {})})
    return policy, (random_similarity if getattr(policy, "refill_similarity", 0) > 0 else None)


def _recorded(check: str, fields: dict, fn) -> dict:
    """``fn()``'s row, or a failed row with the error: one failing case must not lose the others' results."""
    try:
        return fn()
    except Exception as e:
        return {"check": check, **fields, "ok": False, "error": f"{type(e).__name__}: {e}"}


def agreement(device, shapes) -> list[dict]:
    """Kernels on ``device`` against the torch reference on CPU: ids equal, weights close, stats equal."""
    rows = []
    for E, k, shared, T in shapes:
        for name, params in POLICIES:
            fields = {"policy": name, "E": E, "k": k, "shared": shared, "T": T}
            rows.append(_recorded("agreement", fields, lambda: _agreement_one(device, name, params, E, k, shared, T)))
    return rows


def _agreement_one(device, name: str, params: dict, E: int, k: int, shared: int, T: int) -> dict:
    router = RouterSpec(E, k, shared)
    if "max_experts" in params:  # the budget cannot exceed the experts there are
        params = {**params, "max_experts": min(params["max_experts"], E)}
    policy, sim = _make(name, params)
    g = torch.Generator().manual_seed(E + 7 * T + k)
    batch = route(router, random_logits(T, E, skew=1.0, generator=g).to(torch.bfloat16))
    ref = ExpertSelector(router, policy, T, "cpu", backend="torch", similarity=sim and sim(E, "cpu"))
    ker = ExpertSelector(router, policy, T, device, backend="triton", similarity=sim and sim(E, device))
    nv = max(1, T - 3)
    r_ids, r_w = ref.run(batch.logits, batch.topk_ids, batch.topk_weights, nv)
    k_ids, k_w = ker.run(batch.logits.to(device), batch.topk_ids.to(device), batch.topk_weights.to(device),
                         torch.tensor(nv, device=device))
    ok = (torch.equal(k_ids.cpu(), r_ids) and torch.allclose(k_w.cpu(), r_w, rtol=1e-5, atol=1e-6)
          and ker.stats() == ref.stats())
    return {"check": "agreement", "policy": name, "E": E, "k": k, "shared": shared, "T": T, "ok": bool(ok)}


EP_RANKS = 4  # lynx_ep checks: contiguous placement over this many ranks


def _selector(policy_name: str, router: RouterSpec, T: int, device, **kw) -> tuple:
    """A selector (lynx_ep: torch backend, contiguous placement) and the extra ``run`` arguments it needs."""
    policy, sim = _make(policy_name)
    if policy_name != "lynx_ep":
        return ExpertSelector(router, policy, T, device, similarity=sim and sim(router.num_experts, device), **kw), {}
    mask = ExpertPlacement.contiguous(router.num_experts, EP_RANKS).logical_on_rank()
    sel = RankAwareSelector(router, policy, T, device, backend="torch", rank_mask=mask)
    return sel, {"home": home_rank(T, EP_RANKS, device)}


def rank_aware_agreement(device, shapes) -> list[dict]:
    """lynx_ep on ``device`` against lynx_ep on CPU: ids, slot ranks and stats equal, weights close."""
    rows = []
    for E, k, T in shapes:
        fields = {"policy": "lynx_ep", "E": E, "k": k, "T": T}
        rows.append(_recorded("agreement", fields, lambda: _rank_aware_one(device, E, k, T)))
    return rows


def _rank_aware_one(device, E: int, k: int, T: int) -> dict:
    router = RouterSpec(E, k)
    g = torch.Generator().manual_seed(E + 7 * T + k)
    batch = route(router, random_logits(T, E, skew=1.0, generator=g))
    ref, ref_kw = _selector("lynx_ep", router, T, "cpu")
    dev, dev_kw = _selector("lynx_ep", router, T, device)
    r_ids, r_w = ref.run(batch.logits, batch.topk_ids, batch.topk_weights, **ref_kw)
    d_ids, d_w = dev.run(batch.logits.to(device), batch.topk_ids.to(device), batch.topk_weights.to(device), **dev_kw)
    ok = (torch.equal(d_ids.cpu(), r_ids) and torch.equal(dev.last_slot_rank.cpu(), ref.last_slot_rank)
          and torch.allclose(d_w.cpu(), r_w, rtol=1e-5, atol=1e-6) and dev.stats() == ref.stats())
    return {"check": "agreement", "policy": "lynx_ep", "E": E, "k": k, "T": T, "ok": bool(ok)}


def cuda_graph_replay(device, policies=("lynx", "lynx+sim", "lynx_ep"),
                      shapes=((128, 8, 16), (128, 8, 64), (256, 8, 64))) -> list[dict]:
    """Capture ``run`` in a CUDA graph on static inputs; replays on new batches must equal eager runs.

    On CPU (the logic check) the "graph" is a closure that re-runs the call into the captured outputs.
    """
    rows = []
    for name in policies:
        for E, k, T in shapes:
            rows.append(_recorded("cuda_graph_replay", {"policy": name, "E": E, "k": k, "T": T},
                                  lambda: _graph_replay_one(device, name, RouterSpec(E, k), T)))
    return rows


def capture(fn, device):
    """(outputs, replay) of ``fn``: a CUDA graph on CUDA; on CPU a closure re-running ``fn`` into the outputs."""
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return out, graph.replay
    out = tuple(t.clone() for t in fn())

    def replay():
        for o, new in zip(out, fn()):
            o.copy_(new)
    return out, replay


def _graph_replay_one(device, name: str, router: RouterSpec, T: int) -> dict:
    """One policy and shape of ``cuda_graph_replay``."""
    E, k = router.num_experts, router.top_k
    captured, kw = _selector(name, router, T, device)
    eager, _ = _selector(name, router, T, device)
    g = torch.Generator().manual_seed(T)
    first = route(router, random_logits(T, E, skew=1.0, generator=g, device=device))
    static = [t.clone() for t in (first.logits, first.topk_ids, first.topk_weights)]
    nv = torch.tensor(T, device=device)
    captured.run(*static, nv, **kw)  # warm up (compiles the kernels) outside the graph
    if device.type == "cuda":
        torch.cuda.synchronize()
    (out_ids, out_w), replay = capture(lambda: captured.run(*static, nv, **kw), device)
    captured.reset_stats()
    ok = True
    for step in range(3):
        b = route(router, random_logits(T, E, skew=1.0, generator=g, device=device))
        for dst, src in zip(static, (b.logits, b.topk_ids, b.topk_weights)):
            dst.copy_(src)
        nv.fill_(T - step)
        replay()
        want_ids, want_w = eager.run(b.logits, b.topk_ids, b.topk_weights, torch.tensor(T - step, device=device),
                                     **kw)
        ok &= torch.equal(out_ids, want_ids) and torch.equal(out_w, want_w)
        if getattr(captured, "last_slot_rank", None) is not None:  # lynx_ep: the slots' ranks too
            ok &= torch.equal(captured.last_slot_rank, eager.last_slot_rank)
    ok &= captured.stats() == eager.stats()
    return {"check": "cuda_graph_replay", "policy": name, "E": E, "k": k, "T": T, "ok": bool(ok)}


RESIDENCY = {"prefer": {"residency": "prefer", "residency_max_moved_weight": 0.6},
             "prefer+budget": {"residency": "prefer", "residency_max_moved_weight": 0.6, "residency_page_budget": 12},
             # --lynx-residency-output-norms: the budget ranked by a head on the hidden states (a replayed input too)
             "prefer+budget by output": {"residency": "prefer", "residency_max_moved_weight": 0.0,
                                         "residency_page_budget": 6, "output_norms": True}}
HIDDEN = 64  # hidden size of the output-norm check's made-up head


def residency_graph_replay(device, shapes=((128, 8, 16), (128, 8, 64), (64, 6, 16))) -> list[dict]:
    """lynx --lynx-residency prefer on a paged layer, captured: each replay follows a new batch and a new
    resident set written in place into the ``expert_slot`` the selector was planned with (never re-planned),
    and equals an eager selector reading the same state; the statistics too."""
    rows = []
    for label, params in RESIDENCY.items():
        for E, k, T in shapes:
            rows.append(_recorded("residency_graph_replay", {"policy": label, "E": E, "k": k, "T": T},
                                  lambda: _residency_one(device, label, params, RouterSpec(E, k), T)))
    return rows


def _residency_one(device, label: str, params: dict, router: RouterSpec, T: int) -> dict:
    E = router.num_experts
    params = dict(params)
    with_norms = params.pop("output_norms", False)
    policy = make_policy("lynx", **params)
    slot = torch.full((E,), -1, dtype=torch.int32, device=device)  # SGLang's DeviceResidency.expert_slot
    g = torch.Generator().manual_seed(E + T)
    head = ((torch.randn(2 * HIDDEN, E, generator=g) / HIDDEN ** 0.5).to(device),
            torch.randn(E, generator=g).to(device)) if with_norms else None
    captured = ExpertSelector(router, policy, T, device, backend="torch", residency=slot, output_norms=head)
    eager = ExpertSelector(router, policy, T, device, backend="torch", residency=slot, output_norms=head)

    def resident_set():  # E/4 resident experts in random slots, written in place
        slot.fill_(-1)
        chosen = torch.randperm(E, generator=g)[: E // 4].to(device)
        slot[chosen] = torch.arange(E // 4, dtype=torch.int32, device=device)

    resident_set()
    first = route(router, random_logits(T, E, skew=1.0, generator=g, device=device))
    static = [t.clone() for t in (first.logits, first.topk_ids, first.topk_weights)]
    hidden = torch.randn(T, HIDDEN, generator=g).to(device) if with_norms else None
    nv = torch.tensor(T, device=device)
    captured.run(*static, nv, hidden)  # warm up (plan-time allocations) outside the graph
    if device.type == "cuda":
        torch.cuda.synchronize()
    (out_ids, out_w), replay = capture(lambda: captured.run(*static, nv, hidden), device)
    captured.reset_stats()
    ok, moved = True, 0
    for step in range(4):
        resident_set()
        b = route(router, random_logits(T, E, skew=1.0, generator=g, device=device))
        for dst, src in zip(static, (b.logits, b.topk_ids, b.topk_weights)):
            dst.copy_(src)
        if hidden is not None:
            hidden.copy_(torch.randn(T, HIDDEN, generator=g).to(device))
        nv.fill_(T - step)
        replay()
        want_ids, want_w = eager.run(b.logits, b.topk_ids, b.topk_weights, torch.tensor(T - step, device=device),
                                     None if hidden is None else hidden.clone())
        ok &= torch.equal(out_ids, want_ids) and torch.equal(out_w, want_w)
        moved += int((want_ids != b.topk_ids).any(dim=1).sum())
    ok &= captured.stats() == eager.stats() and moved > 0  # the rule did move picks on these batches
    return {"check": "residency_graph_replay", "policy": label, "E": E, "k": router.top_k, "T": T, "ok": bool(ok)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="few shapes (for the CPU interpreter)")
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = [(8, 2, 0, 16), (64, 8, 0, 16), (128, 8, 2, 5)] if args.quick else [
        (E, k, s, T) for E in (8, 64, 128, 256) for k, s in ((2, 0), (8, 1)) if k <= E for T in (1, 16, 64, 256, 512)]
    rows = agreement(device, shapes)
    rows += rank_aware_agreement(device, [(64, 8, 16), (128, 8, 64)] if args.quick else
                                 [(E, k, T) for E in (64, 128, 256) for k in (2, 8) for T in (1, 16, 64, 256)])
    rows += cuda_graph_replay(device, shapes=((16, 4, 8),) if args.quick else ((128, 8, 16), (128, 8, 64),
                                                                                (256, 8, 64)))
    rows += residency_graph_replay(device, shapes=((16, 4, 8),) if args.quick else ((128, 8, 16), (128, 8, 64),
                                                                                    (64, 6, 16)))
    failed = [r for r in rows if not r["ok"]]
    if device.type == "cuda":  # on CPU this only checks the script's logic: not a result to keep
        save("gpu_checks_cuda", {"environment": environment(device), "results": rows,
                                 "passed": len(rows) - len(failed), "failed": len(failed)})
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    for r in failed:
        print("FAILED", r)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
