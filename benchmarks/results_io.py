"""Provenance and storage for benchmark results (JSON beside a PNG under benchmarks/results/)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _git_commit() -> str:
    """HEAD (``-dirty`` with uncommitted changes), or LYNX_COMMIT where the tree has no .git (the GPU machine)."""
    if os.environ.get("LYNX_COMMIT"):
        return os.environ["LYNX_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS_DIR.parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=RESULTS_DIR.parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def environment(device: torch.device) -> dict:
    """Where and with what a result was measured."""
    import triton

    try:
        import sglang

        sglang_version = sglang.__version__
    except Exception:  # the GPU machine may carry only our package
        sglang_version = None
    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "sglang": sglang_version,
        "device_type": device.type,
    }
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        info["device"] = platform.processor() or platform.machine()
        info["cpu_threads"] = torch.get_num_threads()
    return info


def save(name: str, payload: dict) -> Path:
    """Write ``payload`` as benchmarks/results/<name>.json and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def pyplot(png: Path):
    """matplotlib's pyplot on the Agg backend, or None (with a message) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib not installed: no {png}")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, png: Path) -> None:
    """Lay out ``fig``, write it to ``png`` and say where."""
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def write_json(prefix: Path, payload: dict) -> Path:
    """Write ``payload`` as ``<prefix>.json`` (creating its folder), say where, and return the path."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    path = prefix.with_name(prefix.name + ".json")
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
    return path


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int | None):
    """On CPU, run the block with ``threads`` torch threads (default 1), then restore the count.

    Restoring matters because a benchmark's main() may run inside another process (tests).
    """
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads or 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
