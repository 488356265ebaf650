"""The output-aware oracle of benchmarks/explore_paged_oracle.py: its greedy step against a brute force, and its
patch on a bundled model (unlimited pages change nothing; a budget is paged exactly)."""

from pathlib import Path

import pytest
import torch

from benchmarks import bench_offload as bo
from benchmarks import explore_paged_oracle as ox
from lynx_sglang.runtime.selection import reference
from lynx_sglang.runtime.selection.config import LynxPolicy, RouterSpec

ROOT = Path(__file__).resolve().parent.parent
E, k, B, H = 8, 2, 5, 3
ROUTER = RouterSpec(E, k)


def _step(seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, E, generator=g) * 2
    w, ids = torch.softmax(z, -1).topk(k, -1)
    return z, ids, w / w.sum(-1, keepdim=True), torch.randn(B, E, H, generator=g)


def _error(z, ids, w, outputs, keep):
    """sum_rows ||y_full - y||^2 with the rows re-routed onto ``keep``, one expert and row at a time."""
    sel = reference.selection_score(ROUTER, z, None)
    new_ids, new_w, _ = reference.reroute(ROUTER, z, ids, w, sel, torch.ones(B, dtype=torch.bool), keep)
    total = 0.0
    for t in range(B):
        full = sum(float(w[t, j]) * outputs[t, int(ids[t, j])] for j in range(k))
        got = sum(float(new_w[t, j]) * outputs[t, int(new_ids[t, j])] for j in range(k) if int(new_ids[t, j]) >= 0)
        total += float(((full - got) ** 2).sum())
    return total


@pytest.mark.parametrize("seed", range(6))
def test_one_page_goes_to_the_expert_whose_paging_lowers_the_error_most(seed):
    z, ids, w, outputs = _step(seed)
    resident = torch.zeros(E, dtype=torch.bool)
    resident[:2] = True
    picked = torch.zeros(E, dtype=torch.bool)
    picked[ids.flatten()] = True
    base = picked & resident
    cands = [e for e in range(E) if picked[e] and not resident[e]]
    errors = {e: _error(z, ids, w, outputs, base | (torch.arange(E) == e)) for e in cands}
    want = min(cands, key=lambda e: (errors[e], e))
    got = ox.oracle_keep(outputs, ROUTER, z, ids, w, resident, 1)
    assert torch.equal(got, base | (torch.arange(E) == want))
    # Pages for every candidate: every pick stays, so no row moves.
    everything = ox.oracle_keep(outputs, ROUTER, z, ids, w, resident, E)
    assert torch.equal(everything, picked) and _error(z, ids, w, outputs, everything) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.skipif(not (ROOT / "models/trained-qwen3-moe/config.json").exists(), reason="bundled model missing")
def test_the_oracle_on_the_bundled_model_pages_its_budget_and_with_every_page_is_off():
    from lynx_sglang import accuracy
    from lynx_sglang.runtime.selection.config import make_policy

    model, tokenizer = accuracy.load_model(ROOT / "models/trained-qwen3-moe")
    Em, km = accuracy.model_shape(model)
    K = Em // 4
    batch = accuracy.make_batches(accuracy.domain_streams(tokenizer), 8, 1, 8 + 5 + 1, kinds=("mixed",))[0]

    def run(rule, patch):
        with bo.recording([K]):
            accuracy.SelectionPatch = patch
            res = accuracy.measure(model, batch, rule, off, 8, 0)[0]
        return res, [[c.loads for c in s] for s in bo.OffloadPatch.last.steps[K]]

    with bo.recording([K]):
        off = accuracy.off_reference(model, batch, 8, 0)
    base, off_loads = run(make_policy("off"), bo.OffloadPatch)
    free, free_loads = run(ox.OracleRule("prefer", K, LynxPolicy(), pages=Em), ox.OraclePatch)
    assert free.kl == 0 and free_loads == off_loads  # every picked expert paged: the ids are off's
    tight, tight_loads = run(ox.OracleRule("prefer", K, LynxPolicy(), pages=3), ox.OraclePatch)
    assert all(x <= 3 for layer in tight_loads for x in layer) and tight.kl > 0
    assert sum(map(sum, tight_loads)) < sum(map(sum, off_loads))
    assert ox.OracleRule("prefer", K, LynxPolicy(), pages=3).label == "oracle pages=3"


@pytest.mark.skipif(not (ROOT / "models/trained-qwen3-moe/config.json").exists(), reason="bundled model missing")
def test_expert_sketches_fit_the_experts_better_with_rank():
    """fit_sketches on the calibration text: per block (U [E, H, r], V [E, r, H]); on held-out hidden states the
    sketch's error against the expert's real output falls as the rank grows."""
    from lynx_sglang import accuracy
    from lynx_sglang.sere_calibrate import expert_outputs

    model, tokenizer = accuracy.load_model(ROOT / "models/trained-qwen3-moe")
    Em, _ = accuracy.model_shape(model)
    block = accuracy.moe_blocks(model)[0]
    H = model.config.hidden_size
    batch = accuracy.make_batches(accuracy.domain_streams(tokenizer), 4, 1, 24, kinds=("mixed",))[0]
    seen = []
    hook = block.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, H)))
    with torch.no_grad():
        model(input_ids=batch.tokens)
    hook.remove()
    x = seen[0].float()
    with torch.no_grad():
        real = expert_outputs(block.experts, x)  # [E, N, H]
    errors = []
    sketches = ox.fit_sketches(model, tokenizer, (2, 32), tokens=2048)
    for rank in (2, 32):
        u, v = sketches[rank][0]
        assert u.shape == (Em, H, rank) and v.shape == (Em, rank, H)
        approx = torch.einsum("nh,ehr,erk->enk", x, u, v)
        errors.append(float(((approx - real) ** 2).sum() / (real ** 2).sum()))
    assert errors[1] < errors[0] < 1.0, errors
    assert ox.OracleRule("prefer", 8, LynxPolicy(), pages=3, sketch_rank=32).label == "sketch r=32 pages=3"


def test_ranked_keep_pages_the_top_contributions_beyond_the_resident_picks():
    """Rows pick (0, 1), (1, 2), (2, 3); expert 0 is resident. Contributions w * scale: 1 -> 0.3 + 0.6 = 0.9,
    2 -> 0.4 * 4 + 0.5 = 2.1, 3 -> 0.5 * 0.5 = 0.25 (by weight alone 2 and 3 would tie with 1 close behind)."""
    ids = torch.tensor([[0, 1], [1, 2], [2, 3]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]])
    scale = torch.tensor([[1.0, 1.0, 4.0, 0.5]] * 2 + [[1.0, 1.0, 1.0, 0.5]])
    resident = torch.tensor([True, False, False, False, False])
    scale = torch.cat([scale, torch.ones(3, 1)], dim=1)
    keep = ox.ranked_keep(ids, w, scale, resident, 2)
    assert keep.tolist() == [True, True, True, False, False]
    assert ox.ranked_keep(ids, w, scale, resident, 1).tolist() == [True, False, True, False, False]
    # A budget beyond the candidates keeps every pick; an unpicked resident expert is not kept.
    assert ox.ranked_keep(ids, w, scale, resident, 9).tolist() == [True, True, True, True, False]
