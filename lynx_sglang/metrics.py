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
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable

STATS_DIR_ENV = "LYNX_SGLANG_STATS_DIR"

METRICS = {
    "steps": ("lynx:decode_steps_total", "Decode batches the layer selected experts on."),
    "experts_before": ("lynx:experts_before_total", "Sum over decode steps of distinct experts the router picked."),
    "experts_after": ("lynx:experts_after_total", "Sum over decode steps of distinct experts after selection."),
    "rows_changed": ("lynx:tokens_rerouted_total", "Decode tokens that lost at least one expert pick."),
    "rows_voting": ("lynx:tokens_total", "Decode tokens that took part in expert selection."),
}


class LynxMetrics:
    """Counters per layer; ``publish`` adds what the selectors accumulated since the last call."""

    def __init__(self, labels: dict, registry=None):
        # Imported here: prometheus_client must see PROMETHEUS_MULTIPROC_DIR, which SGLang sets at start.
        from prometheus_client import REGISTRY, Counter

        self.labels = dict(labels)
        names = list(self.labels) + ["layer"]
        self.counters = {key: Counter(name=name, documentation=doc, labelnames=names, registry=registry or REGISTRY)
                         for key, (name, doc) in METRICS.items()}
        self._last = {}

    def publish(self, stages: Iterable) -> None:
        """Read every stage's totals (one sync) and add the increments."""
        for stage in stages:
            totals = stage.selector.stats()
            last = self._last.get(stage.layer_id)
            for key, counter in self.counters.items():
                value = getattr(totals, key)
                delta = value - (getattr(last, key) if last is not None else 0)
                if delta < 0:  # the selector was re-planned (stats reset): count from zero
                    delta = value
                if delta:
                    counter.labels(**self.labels, layer=str(stage.layer_id)).inc(delta)
            self._last[stage.layer_id] = totals


_metrics = None


def dump_stats(stages, directory: str) -> str:
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
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)
    return path


def _report_decode_stats_after(result, reporter, *args, **kwargs):
    """After SGLang's own decode-stats reporting: publish ours at the same cadence and on the same rank."""
    global _metrics
    from . import sglang_hooks

    interval = max(1, getattr(reporter, "decode_log_interval", 40))
    if getattr(reporter, "forward_ct_decode", 0) % interval != 0:
        return result
    stages = sglang_hooks.stages()
    if not stages:
        return result
    if os.environ.get(STATS_DIR_ENV):
        dump_stats(stages, os.environ[STATS_DIR_ENV])
    if not (getattr(reporter, "enable_metrics", False) and getattr(reporter, "current_scheduler_metrics_enabled", False)):
        return result
    if _metrics is None:
        collector = getattr(reporter, "metrics_collector", None)
        _metrics = LynxMetrics(getattr(collector, "labels", {}) or {})
    _metrics.publish(stages)
    return result


_registered = False


def register_hooks() -> None:
    """Hook SGLang's scheduler metrics reporter (applied by ``load_plugins``); idempotent."""
    global _registered
    if _registered:
        return
    _registered = True
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.metrics_reporter.SchedulerMetricsReporter.report_decode_stats",
        _report_decode_stats_after,
        HookType.AFTER,
    )
