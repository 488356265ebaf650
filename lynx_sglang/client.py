"""A small client for a running SGLang server: concurrent completions and Lynx's metrics."""

from __future__ import annotations

import json
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .metrics import METRICS

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


@dataclass
class LayerCounts:
    """Lynx's counters for one MoE layer, as scraped from /metrics."""

    steps: float = 0.0
    experts_before: float = 0.0
    experts_after: float = 0.0
    rows_changed: float = 0.0
    rows_voting: float = 0.0

    @property
    def experts_per_step_before(self) -> float:
        """Mean distinct experts per decode step as the router picked them."""
        return self.experts_before / self.steps if self.steps else 0.0

    @property
    def experts_per_step_after(self) -> float:
        """Mean distinct experts per decode step after selection."""
        return self.experts_after / self.steps if self.steps else 0.0


_SAMPLE = re.compile(r'^(lynx:[a-z_]+)\{([^}]*)\}\s+([0-9.eE+-]+)$')


def scrape_lynx_metrics(base_url: str, timeout: float = 30.0) -> dict[int, LayerCounts]:
    """Per-layer Lynx counters from the server's Prometheus endpoint (summed over other labels)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    return parse_lynx_metrics(text)


def parse_lynx_metrics(text: str) -> dict[int, LayerCounts]:
    """Parse Prometheus text exposition into per-layer ``LayerCounts``."""
    by_name = {name: key for key, (name, _) in METRICS.items()}
    layers: dict[int, LayerCounts] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m or m.group(1) not in by_name:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if "layer" not in labels:
            continue
        counts = layers.setdefault(int(labels["layer"]), LayerCounts())
        key = by_name[m.group(1)]
        setattr(counts, key, getattr(counts, key) + float(m.group(3)))
    return dict(sorted(layers.items()))
