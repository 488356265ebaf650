"""Plain-Python oracles of the peer rules (``lynx_sglang.runtime.selection.peers``).

Written from the rules' descriptions (the docstrings of ``peers.py`` and docs/policies.md's
contract), one token and one expert at a time, with Python ints, ``Fraction``s and floats:
no torch. Inputs and outputs are nested lists (``tensor.tolist()``); fp32 arithmetic that
decides ids is emulated by rounding through ``struct``.

Every oracle returns ``(ids, weights, info)`` with ``info`` a dict of ``keep`` (set of
experts the voting rows hold afterwards), ``experts_before``, ``experts_after``,
``rows_changed``, ``rows_voting``.
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction

MAX_GATE_WEIGHT = 1.0e6
LOGIT_Q = 65536


def f32(x: float) -> float:
    """Round a Python float to the nearest fp32 value."""
    return struct.unpack("f", struct.pack("f", x))[0]


class Batch:
    """One batch as lists, with the contract's per-row facts."""

    def __init__(self, E, k, scoring, logits, score, ids, weights, num_valid):
        self.E, self.k, self.scoring = E, k, scoring
        self.logits, self.score, self.ids, self.weights = logits, score, ids, weights
        self.T = len(logits)
        self.num_valid = self.T if num_valid is None else num_valid
        self.ok = [self._row_ok(t) for t in range(self.T)]

    def _row_ok(self, t) -> bool:
        ids = self.ids[t][: self.k]
        w = self.weights[t][: self.k]
        return (
            t < self.num_valid
            and all(0 <= i < self.E for i in ids)
            and len(set(ids)) == len(ids)
            and all(math.isfinite(z) for z in self.logits[t])
            and all(0.0 <= x <= MAX_GATE_WEIGHT for x in w)
        )

    def voting(self):
        return [t for t in range(self.T) if self.ok[t]]

    def better(self, t, a, b) -> bool:
        """Expert a ranks above b for row t: higher score, then lower id."""
        sa, sb = self.score[t][a], self.score[t][b]
        return sa > sb or (sa == sb and a < b)

    def rank(self, t):
        """rank[s] of each routed pick of row t (0 = best)."""
        picks = self.ids[t][: self.k]
        return [sum(1 for b in picks if b != a and self.better(t, b, a)) for a in picks]

    def by_score(self, t, experts):
        return sorted(experts, key=lambda e: (-self.score[t][e], e))

    def gate_weights(self, t, new_ids):
        """Router gate values of the held experts, rescaled to the row's original routed sum."""
        z = self.logits[t]
        held = [e for e in new_ids if e >= 0]
        if self.scoring == "softmax":
            logs = {e: z[e] for e in held}
        else:  # log sigmoid
            logs = {e: (-math.log1p(math.exp(-z[e])) if z[e] >= 0 else z[e] - math.log1p(math.exp(z[e]))) for e in held}
        top = max(logs.values())
        g = {e: math.exp(v - top) for e, v in logs.items()}
        total = sum(g.values())
        row_sum = sum(self.weights[t][: self.k])
        return [row_sum * g[e] / total if e >= 0 else 0.0 for e in new_ids]

    def reroute(self, t, allowed):
        """Surviving picks stay; freed slots take the best allowed experts not held; -1 if none."""
        k = self.k
        picks = self.ids[t][:k]
        if all(e in allowed for e in picks):
            return None
        cands = self.by_score(t, [e for e in allowed if e not in picks])
        new = []
        for e in picks:
            if e in allowed:
                new.append(e)
            else:
                new.append(cands.pop(0) if cands else -1)
        return new

    def finish(self, rewritten):
        """Assemble outputs from {row: (new routed ids, new routed weights)}."""
        k = self.k
        ids = [list(r) for r in self.ids]
        weights = [list(r) for r in self.weights]
        for t, (new_ids, new_w) in rewritten.items():
            ids[t][:k] = new_ids
            weights[t][:k] = new_w
        voting = self.voting()
        keep = {e for t in voting for e in ids[t][:k] if e >= 0}
        return ids, weights, {
            "keep": keep,
            "experts_before": len({e for t in voting for e in self.ids[t][:k]}),
            "experts_after": len(keep),
            "rows_changed": len(rewritten),
            "rows_voting": len(voting),
        }


def lynx_paper_depth(T: int) -> int:
    """Deepest popularity level counted without a beta (peers.lynx_paper_depth)."""
    bits = max(1, math.ceil(math.log2(max(2, T))))
    return 62 // bits - 1


def lynx_paper(batch: Batch, alpha: float, beta):
    """Official Lynx: q = ceil(alpha (z - max z)) (clamped at -beta), h = B**q,
    each row's top-k of q + (sum_rows h - h_row) / B (exact fractions), keep the union,
    then each row's top-k over the kept experts."""
    E, k = batch.E, batch.k
    voting = batch.voting()
    B = len(voting)
    a32 = f32(alpha)
    depth = beta if beta is not None else lynx_paper_depth(batch.T)
    q = {}
    for t in voting:
        zmax = max(batch.logits[t])
        row = []
        for z in batch.logits[t]:
            x = f32(a32 * f32(z - zmax))
            level = -beta if (beta is not None and x <= -beta) else math.ceil(x)
            row.append(level)
        q[t] = row

    def h(level):
        # B**level; without a beta, rows deeper than the counted depth add nothing.
        return Fraction(1, B ** (-level)) if -level <= depth else Fraction(0)

    common = [sum((h(q[t][e]) for t in voting), Fraction(0)) for e in range(E)]
    keep = set()
    for t in voting:
        score = [q[t][e] + (common[e] - h(q[t][e])) / B for e in range(E)]
        keep.update(sorted(range(E), key=lambda e: (-score[e], e))[:k])
    rewritten = {}
    for t in voting:
        new = batch.reroute(t, keep)
        if new is not None:
            rewritten[t] = (new, batch.gate_weights(t, new))
    return batch.finish(rewritten)


def xshare_budget(E: int, expert_budget, budget_alpha: float) -> int:
    if expert_budget:
        return min(expert_budget, E)
    return max(1, int(budget_alpha * E)) if budget_alpha > 0 else 0


def xshare(batch: Batch, expert_budget=None, budget_alpha=0.5, top_per_token=0, min_batch=0, max_batch=0,
           guarantee_topk=True):
    """XShare: keep the m experts with the largest batch sum of logits (1/65536 units),
    plus each token's own top top_per_token (its whole top-k when guaranteed and m < k);
    each token's top-k over what it may use. Batches outside [min_batch, max_batch] pass."""
    E, k = batch.E, batch.k
    voting = batch.voting()
    B = len(voting)
    m = xshare_budget(E, expert_budget, budget_alpha)
    k0 = min(top_per_token, k)
    if guarantee_topk and m < k:
        k0 = k
    active = B >= min_batch and (max_batch == 0 or B <= max_batch)
    if m >= E or k0 >= k or (m == 0 and k0 == 0) or not active:
        return batch.finish({})
    total = [sum(math.floor(batch.logits[t][e] * LOGIT_Q + 0.5) for t in voting) for e in range(E)]
    batch_set = set(sorted(range(E), key=lambda e: (-total[e], e))[:m])
    rewritten = {}
    for t in voting:
        rank = batch.rank(t)
        own = {e for e, r in zip(batch.ids[t][:k], rank) if r < k0}
        new = batch.reroute(t, batch_set | own)
        if new is not None:
            rewritten[t] = (new, batch.gate_weights(t, new))
    return batch.finish(rewritten)


def sere(batch: Batch, similarity, select_top_k: int, threshold: float):
    """SERE: primary = union of every token's top-S; a lower pick outside it goes to its
    most similar primary (ties to the lower id) unless threshold > 0 and that similarity
    is below it; weights are kept; slots that meet on one expert merge into the first."""
    k = batch.k
    voting = batch.voting()
    S = select_top_k
    ranks = {t: batch.rank(t) for t in voting}
    primary = sorted({e for t in voting for e, r in zip(batch.ids[t][:k], ranks[t]) if r < S})
    rho = f32(threshold)
    rewritten = {}
    for t in voting:
        target = []
        for e, r in zip(batch.ids[t][:k], ranks[t]):
            if r < S or e in primary:
                target.append(e)
                continue
            best, best_sim = None, None
            for p in primary:  # ascending ids, strictly better only: ties to the lower id
                if best_sim is None or similarity[e][p] > best_sim:
                    best, best_sim = p, similarity[e][p]
            target.append(e if (threshold > 0 and best_sim < rho) else best)
        if target == batch.ids[t][:k]:
            continue
        w = batch.weights[t][:k]
        new_ids, new_w = [], []
        for s, e in enumerate(target):
            if e in target[:s]:
                new_ids.append(-1)
                new_w.append(0.0)
            else:
                new_ids.append(e)
                new_w.append(sum(w[j] for j in range(k) if target[j] == e))
        rewritten[t] = (new_ids, new_w)
    return batch.finish(rewritten)


def expert_similarity(outputs, method: str):
    """[E][E] similarity of expert outputs ``outputs[e][n][h]`` (SERE's calibration/utils.py)."""
    E = len(outputs)
    N = len(outputs[0])

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    sim = [[0.0] * E for _ in range(E)]
    if method == "cosine":
        for i in range(E):
            for j in range(E):
                c = 0.0
                for n in range(N):
                    x, y = outputs[i][n], outputs[j][n]
                    c += dot(x, y) / (max(math.sqrt(dot(x, x)), 1e-8) * max(math.sqrt(dot(y, y)), 1e-8))
                sim[i][j] = (c / N + 1) / 2
    elif method == "frobenius":
        dist = [[math.sqrt(sum((a - b) ** 2 for n in range(N) for a, b in zip(outputs[i][n], outputs[j][n])))
                 for j in range(E)] for i in range(E)]
        top = max(max(r) for r in dist)
        sim = [[1 - dist[i][j] / top if top > 0 else 1.0 for j in range(E)] for i in range(E)]
    elif method == "cka":
        H = len(outputs[0][0])
        centred = []
        for e in range(E):
            mean = [sum(outputs[e][n][h] for n in range(N)) / N for h in range(H)]
            centred.append([[outputs[e][n][h] - mean[h] for h in range(H)] for n in range(N)])

        def cross(X, Y):  # ||Y^T X||_F^2
            return sum(sum(Y[n][a] * X[n][b] for n in range(N)) ** 2 for a in range(H) for b in range(H))

        self_norm = [math.sqrt(cross(X, X)) for X in centred]
        for i in range(E):
            for j in range(E):
                den = max(self_norm[i] * self_norm[j], 1e-12)
                sim[i][j] = min(1.0, max(0.0, cross(centred[i], centred[j]) / den))
    else:
        raise ValueError(method)
    for i in range(E):
        sim[i][i] = 1.0
    return sim
