"""EP dispatch+combine round trip on gloo: plain torch.distributed vs DeepSpeed 0.19.8 AutoEP helpers.

Run (DeepSpeed in a side directory, never in the project venv):
    DS_BUILD_OPS=0 .venv/bin/pip install --no-deps --target /tmp/ds_eval/site deepspeed==0.19.8 hjson msgpack py-cpuinfo
    PYTHONPATH=/tmp/ds_eval/site nice .venv/bin/python benchmarks/bench_a2a_transport.py
Decision and results: docs/expert_parallel_transport.md, benchmarks/results/a2a_transport_cpu.json.
"""
import os, sys, time, json, statistics
from datetime import timedelta
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, H, E, K = 4, 1024, 64, 8
EL = E // WORLD
WARM, ITERS = 5, int(os.environ.get("ITERS", "25"))


# ---------------------------------------------------------------- (a) plain torch reference (~60 lines)
def torch_ref_roundtrip(x, ids, w, group, expert):
    """Dedup per (token, rank): counts, tokens, ids, weights, combine = 5 all_to_all_single."""
    N = dist.get_world_size(group)
    T = x.shape[0]
    rank_of = ids // EL                                                    # [T, K]
    dest = torch.zeros(T, N, dtype=torch.bool).scatter_(1, rank_of, True)  # [T, N]
    send_rank, send_tok = dest.t().nonzero(as_tuple=True)                  # grouped by dest rank
    send_counts = dest.sum(0)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    s_split, r_split = torch.stack([send_counts, recv_counts]).tolist()    # the host sync
    R = sum(r_split)
    here = rank_of[send_tok] == send_rank[:, None]
    s_ids = torch.where(here, ids[send_tok], -1).to(torch.int32)
    r_x = x.new_empty(R, x.shape[1]); r_ids = torch.empty(R, K, dtype=torch.int32)
    r_w = torch.empty(R, K, dtype=torch.float32)
    dist.all_to_all_single(r_x, x[send_tok].contiguous(), r_split, s_split, group=group)
    dist.all_to_all_single(r_ids, s_ids, r_split, s_split, group=group)
    dist.all_to_all_single(r_w, w[send_tok].float().contiguous(), r_split, s_split, group=group)
    y = expert(r_x, r_ids, r_w)                                            # [R, H], weighted, dtype of x
    back = x.new_empty(len(send_tok), x.shape[1])
    dist.all_to_all_single(back, y, s_split, r_split, group=group)
    out = torch.zeros(T, x.shape[1], dtype=torch.float32).index_add_(0, send_tok, back.float())
    return out.to(x.dtype)


def expert_dedup(r_x, r_ids, r_w):
    rank = dist.get_rank()
    valid = r_ids >= 0
    coef = torch.where(valid, r_w * SCALE[r_ids.long().clamp(min=0)], 0.0).sum(1, keepdim=True)
    return (r_x.float() * coef).to(r_x.dtype)


# ---------------------------------------------------------------- (a'') plain torch, DeepSpeed's protocol
def torch_lean_roundtrip(x, ids, w, group, expert=None):
    """Row per (token, expert), expert-sorted; per-expert count matrix; tokens; combine = 3 a2a."""
    N = dist.get_world_size(group)
    T = x.shape[0]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    r_counts = torch.empty_like(counts)
    dist.all_to_all_single(r_counts, counts, group=group)
    s_split, r_split = torch.stack([counts.view(N, EL).sum(1), r_counts.view(N, EL).sum(1)]).tolist()
    r_x = x.new_empty(sum(r_split), x.shape[1])
    dist.all_to_all_single(r_x, x[order // K].contiguous(), r_split, s_split, group=group)
    # expert ids of received rows from the [source, local expert] counts alone
    local = torch.arange(EL).repeat(N) + dist.get_rank(group) * EL
    r_ids = torch.repeat_interleave(local, r_counts.long(), output_size=r_x.shape[0])
    y = (r_x.float() * SCALE[r_ids][:, None]).to(x.dtype)
    back = x.new_empty(T * K, x.shape[1])
    dist.all_to_all_single(back, y, s_split, r_split, group=group)
    contrib = back.float() * w.reshape(-1)[order].float()[:, None]
    return torch.zeros(T, x.shape[1]).index_add_(0, order // K, contrib).to(x.dtype)


# ---------------------------------------------------------------- (b) DeepSpeed AutoEP helpers
def ds_roundtrip(x, ids, w, group, expert=None):
    from deepspeed.module_inject.auto_ep_layer import compute_split_plan, _AllToAllV, combine_from_routed
    T = x.shape[0]
    N = dist.get_world_size(group)
    order = torch.argsort(ids.view(-1), stable=True)
    plan = compute_split_plan(ids, E, N, EL, group)           # count-matrix a2a + one .cpu().tolist()
    routed = x[order // K]
    r_x = _AllToAllV.apply(group, routed, plan.input_splits, plan.output_splits)
    local = torch.arange(EL).repeat(N) + dist.get_rank(group) * EL
    r_ids = torch.repeat_interleave(local, plan.local_counts_by_source.reshape(-1).long(), output_size=r_x.shape[0])
    y = (r_x.float() * SCALE[r_ids][:, None]).to(x.dtype)
    back = _AllToAllV.apply(group, y, plan.output_splits, plan.input_splits)
    return combine_from_routed(back, w, order, K, "post", "weighted_sum", (1, T, x.shape[1])).reshape(T, -1)


def ds_a2av_lean_roundtrip(x, ids, w, group, expert=None):
    """torch_lean3 with DeepSpeed's compute_split_plan + _AllToAllV (deepspeed.comm) as the only change."""
    from deepspeed.module_inject.auto_ep_layer import compute_split_plan, _AllToAllV
    N = dist.get_world_size(group)
    T = x.shape[0]
    order = torch.argsort(ids.reshape(-1), stable=True)
    plan = compute_split_plan(ids, E, N, EL, group)
    r_x = _AllToAllV.apply(group, x[order // K], plan.input_splits, plan.output_splits)
    local = torch.arange(EL).repeat(N) + dist.get_rank(group) * EL
    r_ids = torch.repeat_interleave(local, plan.local_counts_by_source.reshape(-1).long(), output_size=r_x.shape[0])
    y = (r_x.float() * SCALE[r_ids][:, None]).to(x.dtype)
    back = _AllToAllV.apply(group, y, plan.output_splits, plan.input_splits)
    contrib = back.float() * w.reshape(-1)[order].float()[:, None]
    return torch.zeros(T, x.shape[1]).index_add_(0, order // K, contrib).to(x.dtype)


# ---------------------------------------------------------------- (c) plain torch, fixed capacity (equal splits)
def torch_cap_roundtrip(x, ids, w, group, expert):
    """Capacity C = T rows per (sender, receiver): tokens+ids+weights, combine = 4 a2a, no counts, no host sync."""
    N = dist.get_world_size(group)
    T, C, Hd = x.shape[0], x.shape[0], x.shape[1]
    rank_of = ids // EL
    dest = torch.zeros(T, N, dtype=torch.bool).scatter_(1, rank_of, True)           # [T, N]
    pos = torch.cumsum(dest.long(), 0) - 1
    slot = torch.where(dest, torch.arange(N)[None] * C + pos, N * C)                # spare row N*C
    s_x = x.new_zeros(N * C + 1, Hd).index_copy_(0, slot.reshape(-1), x[:, None].expand(T, N, Hd).reshape(-1, Hd))
    here = rank_of[:, None, :] == torch.arange(N)[None, :, None]                    # [T, N, K]
    s_ids = torch.full((N * C + 1, K), -1, dtype=torch.int32).index_copy_(
        0, slot.reshape(-1), torch.where(here, ids[:, None], -1).reshape(-1, K).to(torch.int32))
    s_w = torch.zeros(N * C + 1, K).index_copy_(0, slot.reshape(-1), w[:, None].expand(T, N, K).reshape(-1, K).float())
    r_x, r_ids, r_w = torch.empty_like(s_x[:-1]), torch.empty_like(s_ids[:-1]), torch.empty_like(s_w[:-1])
    dist.all_to_all_single(r_x, s_x[:-1], group=group)
    dist.all_to_all_single(r_ids, s_ids[:-1], group=group)
    dist.all_to_all_single(r_w, s_w[:-1], group=group)
    y = expert(r_x, r_ids, r_w)                                                      # padding rows: coef 0
    back = torch.empty_like(y)
    dist.all_to_all_single(back, y, group=group)
    back = torch.cat([back.float(), back.new_zeros(1, Hd, dtype=torch.float32)])
    return back[slot].sum(1).to(x.dtype)


def project_roundtrip_factory(group, capacity):
    """The project's AllToAllDispatcher (exact splits, or fixed capacity when capacity is set)."""
    from lynx_sglang.runtime.expert_parallel.dispatch import AllToAllDispatcher
    from lynx_sglang.runtime.expert_parallel.placement import ExpertPlacement
    disp = AllToAllDispatcher(ExpertPlacement.contiguous(E, WORLD), dist.get_rank(group), group)

    def rt(x, ids, w, group, expert=None):
        d = disp.dispatch(x, ids, w, capacity=capacity)
        return disp.combine(expert_dedup(d.hidden_states, d.topk_ids, d.topk_weights.float()), d.handle)
    return rt


SCALE = 1.0 + torch.arange(E, dtype=torch.float32) / E


def worker(rank, port, q):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), TORCH_EXTENSIONS_DIR="/tmp/ds_eval/ext")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    group = dist.new_group(list(range(WORLD)), timeout=timedelta(seconds=60))  # like an SGLang-made EP group
    info = {}
    # deepspeed.comm without init: does _AllToAllV work?
    t0 = time.perf_counter()
    import deepspeed
    import deepspeed.comm as dcomm
    info["import_s"] = time.perf_counter() - t0
    try:
        from deepspeed.module_inject.auto_ep_layer import _AllToAllV
        _AllToAllV.apply(group, torch.zeros(4, 2), [1] * 4, [1] * 4)
        info["a2av_without_init"] = "ok"
    except Exception as e:
        info["a2av_without_init"] = f"{type(e).__name__}: {e}"[:120]
    t0 = time.perf_counter()
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=60))
    info["ds_init_s"] = time.perf_counter() - t0

    methods = {"torch_ref5": torch_ref_roundtrip, "torch_lean3": torch_lean_roundtrip, "ds_autoep3": ds_roundtrip,
               "ds_a2av_lean3": ds_a2av_lean_roundtrip,
               "torch_cap4": torch_cap_roundtrip}
    if os.environ.get("PROJECT") == "1":
        try:
            methods["project_var"] = project_roundtrip_factory(group, None)
        except Exception as e:
            info["project_import"] = f"{type(e).__name__}: {e}"[:160]
    results = {}
    for T in (64, 256):
        for dtype in (torch.bfloat16, torch.float32):
            g = torch.Generator().manual_seed(1000 * rank + T)
            x = torch.randn(T, H, generator=g).to(dtype)
            logits = torch.randn(T, E, generator=g)
            tw, ids = torch.topk(torch.softmax(logits, -1), K, dim=-1)
            tw = tw / tw.sum(-1, keepdim=True)
            ref = (x.float() * (tw * SCALE[ids]).sum(1, keepdim=True)).to(dtype).float()
            times = {m: [] for m in methods}
            errs = {}
            for it in range(WARM + ITERS):
                for m, fn in methods.items():   # round-robin so noise hits every method alike
                    dist.barrier(group)
                    t0 = time.perf_counter()
                    out = fn(x, ids, tw, group, expert_dedup)
                    dt = time.perf_counter() - t0
                    if it >= WARM:
                        times[m].append(dt)
                    if it == 0:
                        errs[m] = (out.float() - ref).abs().max().item()
            for m in methods:
                results[f"{m}|T={T}|{str(dtype)[6:]}"] = (statistics.median(times[m]), errs[m])
    import deepspeed.comm as dcomm
    small, out_small = torch.arange(64, dtype=torch.int32), torch.empty(64, dtype=torch.int32)
    for name, f in (("torch", dist.all_to_all_single), ("deepspeed.comm", dcomm.all_to_all_single)) * 2:
        dist.barrier(group)
        t0 = time.perf_counter()
        for _ in range(200):
            f(out_small, small, group=group)
        info[f"tiny_a2a_us_{name}"] = round((time.perf_counter() - t0) / 200 * 1e6, 1)
    # bytes moved: rows this rank sends in the dispatch (last config)
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, {"rank": rank, "info": info, "results": results})
    if rank == 0:
        q.put(gathered)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    ps = [ctx.Process(target=worker, args=(r, port, q)) for r in range(WORLD)]
    t0 = time.perf_counter()
    for p in ps:
        p.start()
    gathered = q.get(timeout=600)
    for p in ps:
        p.join(60)
    print("wall", round(time.perf_counter() - t0, 1), "s")
    for g in gathered:
        print(g["rank"], g["info"])
    keys = gathered[0]["results"].keys()
    print(f"{'method|T|dtype':36s} {'slowest-rank median ms':>22s} {'per-rank medians ms':>30s} max_err")
    for k in keys:
        meds = [g["results"][k][0] * 1e3 for g in gathered]
        err = max(g["results"][k][1] for g in gathered)
        print(f"{k:36s} {max(meds):22.2f} {str([round(v, 2) for v in meds]):>30s} {err:.2e}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "a2a_transport_cpu.json")
    with open(out, "w") as f:
        json.dump(gathered, f)
