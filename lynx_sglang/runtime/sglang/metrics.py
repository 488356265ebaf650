"""Lynx's Prometheus metrics, published beside SGLang's own with ``--enable-metrics``.

Each layer's selector accumulates its statistics on the device, in its row of
one [L, NUM_STATS] table (``stage.StageRegistry``); we read that table with one
device-to-host copy only when SGLang's scheduler does its periodic decode-stats
work (every ``--decode-log-interval`` decode steps), use that one host copy for
both these counters and the ``LYNX_SGLANG_STATS_DIR`` dump, and add the
difference since the last read to the counters (label ``layer``):

| metric | meaning |
|---|---|
| ``lynx:decode_steps_total`` | decode batches the layer selected on (a lone decode token under lynx is not: it cannot change) |
| ``lynx:experts_before_total`` | sum over those steps of distinct experts the router picked |
| ``lynx:experts_after_total`` | sum of distinct experts after selection |
| ``lynx:tokens_rerouted_total`` | decode tokens that lost at least one pick |
| ``lynx:tokens_total`` | decode tokens that took part in selection |
| ``lynx:moved_weight_total`` | routed gate weight re-routed tokens had on the experts they lost (router's weight units) |

Distinct experts per decode step: ``rate(lynx:experts_after_total) / rate(lynx:decode_steps_total)``.
Routed weight moved per re-routed token: ``rate(lynx:moved_weight_total) / rate(lynx:tokens_rerouted_total)``;
``calibrate`` records what it saw per layer (``moved_per_rerouted_token``), so drift shows against it.

With ``--moe-a2a-backend lynx`` the all-to-all dispatcher adds, per layer
(label ``layer``; the per-rank ones also ``ep_rank``), summed over decode steps:

| metric | meaning |
|---|---|
| ``lynx:a2a_decode_steps_total`` | decode steps the dispatcher accounted (mixed batches included) |
| ``lynx:a2a_mixed_steps_total`` | of those, mixed chunked-prefill batches (only their decode rows are costed) |
| ``lynx:a2a_dispatch_bytes_total`` | bytes sent to other ranks by the dispatch all-to-all (rows, ids, weights) |
| ``lynx:a2a_combine_bytes_total`` | bytes sent back by the combine all-to-all |
| ``lynx:a2a_busiest_rank_experts_total`` | distinct experts run by the step's busiest rank |
| ``lynx:a2a_busiest_rank_tokens_total`` | token rows processed by the step's busiest rank |
| ``lynx:a2a_rank_experts_total`` | distinct experts each rank ran |
| ``lynx:a2a_rank_tokens_total`` | token rows each rank's experts processed |

Bytes count the exact-split exchange; under CUDA graphs the fixed-capacity
exchange sends more (``expert_parallel.accounting.capacity_bytes``). The
dispatchers' totals are one [L, A2ATotals.size(N)] table, read with one copy too.

Counters never go backwards: a zeroing of the device totals (the CUDA-graph
warm-up reset) is counted by the registries, and a snapshot from after a reset
is taken as counted from zero. Nothing here raises into the scheduler: an
unexpected error is logged once and the scheduler continues.
"""

from __future__ import annotations

import json
import logging
import os

from lynx_sglang.runtime.expert_parallel.accounting import A2ATotals
from lynx_sglang.runtime.selection.config import WEIGHT_Q
from lynx_sglang.runtime.selection.stats import StatField
from lynx_sglang.runtime.sglang import a2a_dispatcher, stage
from lynx_sglang.runtime.sglang.a2a_dispatcher import A2ASnapshot
from lynx_sglang.runtime.sglang.options import STATS_DIR_ENV
from lynx_sglang.runtime.sglang.stage import StatsSnapshot

logger = logging.getLogger(__name__)

__all__ = ["METRICS", "METRIC_SCALE", "A2A_METRICS", "A2A_RANK_METRICS", "STATS_DIR_ENV", "LynxMetrics", "dump_stats",
           "report_decode_stats_after"]

#: Selection counters by statistics field: (Prometheus name, help).
METRICS = {
    StatField.STEPS: ("lynx:decode_steps_total", "Decode batches the layer selected experts on."),
    StatField.EXPERTS_BEFORE: ("lynx:experts_before_total", "Sum over decode steps of distinct experts the router picked."),
    StatField.EXPERTS_AFTER: ("lynx:experts_after_total", "Sum over decode steps of distinct experts after selection."),
    StatField.ROWS_CHANGED: ("lynx:tokens_rerouted_total", "Decode tokens that lost at least one expert pick."),
    StatField.ROWS_VOTING: ("lynx:tokens_total", "Decode tokens that took part in expert selection."),
    StatField.MOVED_WEIGHT: ("lynx:moved_weight_total", "Routed gate weight re-routed decode tokens had on the "
                                                        "experts they lost (the router's weight units)."),
}
#: Device totals kept in fixed point: published value = total / scale (others: as counted).
METRIC_SCALE = {StatField.MOVED_WEIGHT: WEIGHT_Q}

_A2A = A2ATotals.Field
#: All-to-all counters by totals field: (Prometheus name, help).
A2A_METRICS = {
    _A2A.STEPS: ("lynx:a2a_decode_steps_total", "Decode steps the lynx all-to-all dispatcher accounted."),
    _A2A.DISPATCH_BYTES: ("lynx:a2a_dispatch_bytes_total", "Bytes the dispatch all-to-all sends to other ranks (exact split; CUDA-graph steps send a fixed capacity)."),
    _A2A.COMBINE_BYTES: ("lynx:a2a_combine_bytes_total", "Bytes the combine all-to-all sends back (exact split; CUDA-graph steps send a fixed capacity)."),
    _A2A.BUSIEST_RANK_EXPERTS: ("lynx:a2a_busiest_rank_experts_total", "Distinct experts of each step's busiest rank."),
    _A2A.BUSIEST_RANK_TOKENS: ("lynx:a2a_busiest_rank_tokens_total", "Token rows of each step's busiest rank."),
    _A2A.MIXED_STEPS: ("lynx:a2a_mixed_steps_total", "Mixed chunked-prefill steps among them (decode rows costed)."),
}
#: Per-rank all-to-all counters by ``A2ATotals.RANK_KEYS`` key: (Prometheus name, help).
A2A_RANK_METRICS = {
    "rank_experts": ("lynx:a2a_rank_experts_total", "Distinct experts each expert-parallel rank ran, per step."),
    "rank_tokens": ("lynx:a2a_rank_tokens_total", "Token rows each expert-parallel rank processed, per step."),
}
assert set(A2A_METRICS) == set(_A2A) and tuple(A2A_RANK_METRICS) == A2ATotals.RANK_KEYS


def a2a_key(field: A2ATotals.Field) -> str:
    """The key of ``field`` in ``A2ATotals.as_dict`` (and in ``client.scrape_a2a_metrics``)."""
    return field.name.lower()


class LynxMetrics:
    """Counters per layer; ``publish`` / ``publish_a2a`` add what a snapshot holds beyond the last one."""

    def __init__(self, labels: dict, registry=None):
        # Imported here: prometheus_client must see PROMETHEUS_MULTIPROC_DIR, which SGLang sets at start.
        from prometheus_client import REGISTRY, Counter

        self.labels = dict(labels)
        names = list(self.labels) + ["layer"]
        registry = registry or REGISTRY
        self.counters = {f: Counter(name=name, documentation=doc, labelnames=names, registry=registry)
                         for f, (name, doc) in METRICS.items()}
        self.a2a_counters = {f: Counter(name=name, documentation=doc, labelnames=names, registry=registry)
                             for f, (name, doc) in A2A_METRICS.items()}
        self.a2a_rank_counters = {key: Counter(name=name, documentation=doc, labelnames=names + ["ep_rank"],
                                               registry=registry)
                                  for key, (name, doc) in A2A_RANK_METRICS.items()}
        self._last, self._resets = {}, 0  # selection: layer -> SelectionStats; registry resets seen
        self._last_a2a, self._resets_a2a = {}, 0
        self._warned = set()

    def _delta(self, what: str, value: int, last: int) -> int:
        """``value - last``, or ``value`` if the device totals went down without a counted reset (never < 0)."""
        if value >= last:
            return value - last
        if what not in self._warned:
            self._warned.add(what)
            logger.warning("lynx-sglang metrics: %s went down (%d -> %d) without a counted reset; counting it "
                           "from zero", what, last, value)
        return max(value, 0)

    def publish(self, snapshot: StatsSnapshot) -> None:
        """Add the selection totals of ``snapshot`` beyond the last published ones."""
        if snapshot.resets != self._resets:  # the device totals were zeroed since: they count from zero
            self._last, self._resets = {}, snapshot.resets
        for layer_id, totals in snapshot.layers.items():
            last = self._last.get(layer_id)
            for f, counter in self.counters.items():
                value = getattr(totals, f.key)
                delta = self._delta(f"layer {layer_id} {f.key}", value, getattr(last, f.key) if last else 0)
                if delta:
                    counter.labels(**self.labels, layer=str(layer_id)).inc(delta / METRIC_SCALE.get(f, 1))
            self._last[layer_id] = totals

    def publish_a2a(self, snapshot: A2ASnapshot) -> None:
        """Add the all-to-all totals of ``snapshot`` beyond the last published ones (same guard)."""
        if snapshot.resets != self._resets_a2a:
            self._last_a2a, self._resets_a2a = {}, snapshot.resets
        for layer, totals in snapshot.layers.items():
            last = self._last_a2a.get(layer)
            for f, counter in self.a2a_counters.items():
                key = a2a_key(f)
                delta = self._delta(f"a2a layer {layer} {key}", totals[key], last[key] if last else 0)
                if delta:
                    counter.labels(**self.labels, layer=layer).inc(delta)
            for key, counter in self.a2a_rank_counters.items():
                for rank, value in enumerate(totals[key]):
                    before = last[key][rank] if last and rank < len(last[key]) else 0
                    delta = self._delta(f"a2a layer {layer} {key}[{rank}]", value, before)
                    if delta:
                        counter.labels(**self.labels, layer=layer, ep_rank=str(rank)).inc(delta)
            self._last_a2a[layer] = totals


_metrics = None
_hook_failed = False


def dump_stats(snapshot: StatsSnapshot, directory: str, a2a: A2ASnapshot | None = None) -> str:
    """Write this rank's per-layer totals to ``<directory>/tp<rank>.json`` (atomically); returns the path.

    Enabled by ``LYNX_SGLANG_STATS_DIR``: every TP rank writes its own file, so
    tests can check that all ranks took the same decisions. ``mixed_batches``
    counts mixed prefill+decode batches whose decode rows were selected on.
    Written from the same host copy the counters are published from.
    """
    from sglang.srt.runtime_context import get_parallel

    rank = get_parallel().tp_rank
    path = os.path.join(directory, f"tp{rank}.json")
    payload = {str(layer): {**{f.key: getattr(st, f.key) for f in StatField},
                            "mixed_batches": snapshot.mixed_batches.get(layer, 0)}
               for layer, st in snapshot.layers.items()}
    for layer, totals in (a2a.layers.items() if a2a is not None else ()):
        payload.setdefault(layer, {})["a2a"] = totals
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)
    return path


def report_decode_stats_after(result, reporter, *args, **kwargs):
    """After SGLang's own decode-stats reporting: publish ours at the same cadence and on the same rank.

    Never raises into the scheduler: an unexpected error is logged (once) and the scheduler continues.
    """
    global _hook_failed
    try:
        _report(reporter)
    except Exception:  # noqa: BLE001  metrics must never take the scheduler down
        if not _hook_failed:
            _hook_failed = True
            logger.exception("lynx-sglang: publishing Lynx's metrics failed (logged once; serving continues)")
    return result


def _report(reporter) -> None:
    global _metrics

    interval = max(1, getattr(reporter, "decode_log_interval", 40))
    if getattr(reporter, "forward_ct_decode", 0) % interval != 0:
        return
    stages, a2a = stage.registry(), a2a_dispatcher.registry()
    stats_dir = os.environ.get(STATS_DIR_ENV)
    publish = bool(getattr(reporter, "enable_metrics", False)
                   and getattr(reporter, "current_scheduler_metrics_enabled", False))
    if not (stats_dir or publish) or not (stages or a2a.accounting()):
        return
    # One device-to-host copy per table, shared by the dump and the counters.
    snapshot = stages.snapshot()
    a2a_snapshot = a2a.snapshot() if a2a.accounting() else None
    if stats_dir:
        dump_stats(snapshot, stats_dir, a2a_snapshot)
    if not publish:
        return
    if _metrics is None:
        collector = getattr(reporter, "metrics_collector", None)
        _metrics = LynxMetrics(getattr(collector, "labels", {}) or {})
    _metrics.publish(snapshot)
    if a2a_snapshot is not None:
        _metrics.publish_a2a(a2a_snapshot)
