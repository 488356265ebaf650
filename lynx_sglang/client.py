"""A small client for a running SGLang server: concurrent completions and Lynx's metrics."""

from __future__ import annotations

import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from lynx_sglang.runtime.sglang.metrics import METRIC_SCALE, METRICS
from lynx_sglang.runtime.selection.stats import SelectionStats

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "#!/bin/sh\n# copy every log file to the backup folder\n",
    "#include <stdio.h>\nint main(void) {",
    "Once upon a time, in a small village,",
    "import numpy as np\n\ndef normalize(x):",
    "SELECT name, count(*) FROM users",
    "The three laws of thermodynamics are",
    "for (int i = 0; i < n; i++) {",
    "Dear team, the release is delayed because",
    "class Stack:\n    def __init__(self):",
    "To install the package, run",
    "The quick brown fox",
    "while read line; do",
    "In 1969, the first humans",
    "struct list_head {",
]


def _post(url: str, payload: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def complete(base_url: str, prompts: list[str], max_tokens: int = 32, concurrency: int = 16,
             model: str = "default", timeout: float = 600.0) -> list[str]:
    """Greedy completions through the OpenAI-compatible API, ``concurrency`` requests in flight."""

    def one(prompt: str) -> str:
        out = _post(f"{base_url}/v1/completions",
                    {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}, timeout)
        return out["choices"][0]["text"]

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, prompts))


_SAMPLE = re.compile(r'^(lynx:[a-z0-9_]+)\{([^}]*)\}\s+([0-9.eE+-]+)$')


def scrape_lynx_metrics(base_url: str, timeout: float = 30.0) -> dict[int, SelectionStats]:
    """Per-layer Lynx counters from the server's Prometheus endpoint (summed over other labels)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    return parse_lynx_metrics(text)


def parse_lynx_metrics(text: str) -> dict[int, SelectionStats]:
    """Per-layer totals from Prometheus text exposition (summed over labels other than ``layer``)."""
    by_name = {name: field for field, (name, _) in METRICS.items()}
    layers: dict[int, dict] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m or m.group(1) not in by_name:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if "layer" not in labels:
            continue
        totals = layers.setdefault(int(labels["layer"]), {field.key: 0 for field in METRICS})
        field = by_name[m.group(1)]
        totals[field.key] += round(float(m.group(3)) * METRIC_SCALE.get(field, 1))
    return {layer: SelectionStats(**totals) for layer, totals in sorted(layers.items())}


def scrape_a2a_metrics(base_url: str, timeout: float = 30.0) -> dict[int, dict]:
    """Per-layer all-to-all counters (``--moe-a2a-backend lynx``): scalars, and per-rank lists."""
    from lynx_sglang.runtime.sglang.metrics import A2A_METRICS, A2A_RANK_METRICS, a2a_key

    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    scalar = {name: a2a_key(field) for field, (name, _) in A2A_METRICS.items()}
    per_rank = {name: key for key, (name, _) in A2A_RANK_METRICS.items()}
    layers: dict[int, dict] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m or (m.group(1) not in scalar and m.group(1) not in per_rank):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if "layer" not in labels:
            continue
        entry = layers.setdefault(int(labels["layer"]), {a2a_key(f): 0 for f in A2A_METRICS} | {k: {} for k in A2A_RANK_METRICS})
        value = int(float(m.group(3)))
        if m.group(1) in scalar:
            entry[scalar[m.group(1)]] += value
        else:
            ranks = entry[per_rank[m.group(1)]]
            ranks[int(labels["ep_rank"])] = ranks.get(int(labels["ep_rank"]), 0) + value
    return dict(sorted(layers.items()))
