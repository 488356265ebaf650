"""Lynx's Prometheus metrics, published beside SGLang's own with ``--enable-metrics``.

Each layer's selector accumulates its statistics on the device; we read them
(one host sync for all layers) only when SGLang's scheduler does its periodic
decode-stats work (every ``--decode-log-interval`` decode steps), and add the
difference since the last read to these counters (label ``layer``):

| metric | meaning |
|---|---|
| ``lynx:decode_steps_total`` | decode batches the layer selected on |
| ``lynx:experts_before_total`` | sum over those steps of distinct experts the router picked |
| ``lynx:experts_after_total`` | sum of distinct experts after selection |
| ``lynx:tokens_rerouted_total`` | decode tokens that lost at least one pick |
| ``lynx:tokens_total`` | decode tokens that took part in selection |

Distinct experts per decode step: ``rate(lynx:experts_after_total) / rate(lynx:decode_steps_total)``.

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
exchange sends more (``expert_parallel.accounting.capacity_bytes``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable

from lynx_sglang.runtime.sglang import a2a_dispatcher, stage

STATS_DIR_ENV = "LYNX_SGLANG_STATS_DIR"

METRICS = {
    "steps": ("lynx:decode_steps_total", "Decode batches the layer selected experts on."),
    "experts_before": ("lynx:experts_before_total", "Sum over decode steps of distinct experts the router picked."),
    "experts_after": ("lynx:experts_after_total", "Sum over decode steps of distinct experts after selection."),
    "rows_changed": ("lynx:tokens_rerouted_total", "Decode tokens that lost at least one expert pick."),
    "rows_voting": ("lynx:tokens_total", "Decode tokens that took part in expert selection."),
}


A2A_METRICS = {
    "steps": ("lynx:a2a_decode_steps_total", "Decode steps the lynx all-to-all dispatcher accounted."),
    "dispatch_bytes": ("lynx:a2a_dispatch_bytes_total", "Bytes the dispatch all-to-all sends to other ranks (exact split; CUDA-graph steps send a fixed capacity)."),
    "combine_bytes": ("lynx:a2a_combine_bytes_total", "Bytes the combine all-to-all sends back (exact split; CUDA-graph steps send a fixed capacity)."),
    "busiest_rank_experts": ("lynx:a2a_busiest_rank_experts_total", "Distinct experts of each step's busiest rank."),
    "busiest_rank_tokens": ("lynx:a2a_busiest_rank_tokens_total", "Token rows of each step's busiest rank."),
    "mixed_steps": ("lynx:a2a_mixed_steps_total", "Mixed chunked-prefill steps among them (decode rows costed)."),
}
A2A_RANK_METRICS = {
    "rank_experts": ("lynx:a2a_rank_experts_total", "Distinct experts each expert-parallel rank ran, per step."),
    "rank_tokens": ("lynx:a2a_rank_tokens_total", "Token rows each expert-parallel rank processed, per step."),
}


class LynxMetrics:
    """Counters per layer; ``publish`` adds what the selectors accumulated since the last call."""

    def __init__(self, labels: dict, registry=None):
        # Imported here: prometheus_client must see PROMETHEUS_MULTIPROC_DIR, which SGLang sets at start.
        from prometheus_client import REGISTRY, Counter

        self.labels = dict(labels)
        names = list(self.labels) + ["layer"]
        registry = registry or REGISTRY
        self.counters = {key: Counter(name=name, documentation=doc, labelnames=names, registry=registry)
                         for key, (name, doc) in METRICS.items()}
        self.a2a_counters = {key: Counter(name=name, documentation=doc, labelnames=names, registry=registry)
                             for key, (name, doc) in A2A_METRICS.items()}
        self.a2a_rank_counters = {key: Counter(name=name, documentation=doc, labelnames=names + ["ep_rank"],
                                               registry=registry)
                                  for key, (name, doc) in A2A_RANK_METRICS.items()}
        self._last = {}
        self._last_a2a = {}

    def publish(self, stages: Iterable) -> None:
        """Read every stage's totals (one sync) and add the increments."""
        for layer_stage in stages:
            totals = layer_stage.selector.stats()
            last = self._last.get(layer_stage.layer_id)
            for key, counter in self.counters.items():
                value = getattr(totals, key)
                delta = value - (getattr(last, key) if last is not None else 0)
                if delta < 0:  # the selector was re-planned (stats reset): count from zero
                    delta = value
                if delta:
                    counter.labels(**self.labels, layer=str(layer_stage.layer_id)).inc(delta)
            self._last[layer_stage.layer_id] = totals


    def publish_a2a(self, dispatchers: Iterable) -> None:
        """Add what the all-to-all dispatchers accounted since the last call (one sync each)."""
        for i, disp in enumerate(dispatchers):
            layer = str(disp.layer_id if disp.layer_id is not None else i)
            totals = disp.stats()
            last = self._last_a2a.get(layer)
            for key, counter in self.a2a_counters.items():
                delta = totals[key] - (last[key] if last else 0)
                if delta:
                    counter.labels(**self.labels, layer=layer).inc(delta)
            for key, counter in self.a2a_rank_counters.items():
                for rank, value in enumerate(totals[key]):
                    delta = value - (last[key][rank] if last else 0)
                    if delta:
                        counter.labels(**self.labels, layer=layer, ep_rank=str(rank)).inc(delta)
            self._last_a2a[layer] = totals


_metrics = None


def dump_stats(stages, directory: str, dispatchers=()) -> str:
    """Write this rank's per-layer totals to ``<directory>/tp<rank>.json`` (atomically); returns the path.

    Enabled by ``LYNX_SGLANG_STATS_DIR``: every TP rank writes its own file, so
    tests can check that all ranks took the same decisions. ``mixed_batches``
    counts mixed prefill+decode batches whose decode rows were selected on.
    """
    from sglang.srt.runtime_context import get_parallel

    rank = get_parallel().tp_rank
    path = os.path.join(directory, f"tp{rank}.json")
    payload = {str(s.layer_id): {**dataclasses.asdict(s.selector.stats()), "mixed_batches": s.mixed_batches}
               for s in stages}
    for i, d in enumerate(dispatchers):
        payload.setdefault(str(d.layer_id if d.layer_id is not None else i), {})["a2a"] = d.stats()
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)
    return path


def report_decode_stats_after(result, reporter, *args, **kwargs):
    """After SGLang's own decode-stats reporting: publish ours at the same cadence and on the same rank."""
    global _metrics

    interval = max(1, getattr(reporter, "decode_log_interval", 40))
    if getattr(reporter, "forward_ct_decode", 0) % interval != 0:
        return result
    stages, a2a = stage.stages(), a2a_dispatcher.dispatchers()
    if not stages and not a2a:
        return result
    if os.environ.get(STATS_DIR_ENV):
        dump_stats(stages, os.environ[STATS_DIR_ENV], a2a)
    if not (getattr(reporter, "enable_metrics", False) and getattr(reporter, "current_scheduler_metrics_enabled", False)):
        return result
    if _metrics is None:
        collector = getattr(reporter, "metrics_collector", None)
        _metrics = LynxMetrics(getattr(collector, "labels", {}) or {})
    _metrics.publish(stages)
    _metrics.publish_a2a(a2a)
    return result
