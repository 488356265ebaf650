"""The installed package: entry point, kernel namespace."""

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sglang_plugin_entry_point_is_registered():
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "lynx"]
    assert len(eps) == 1 and eps[0].value == "lynx_sglang.runtime.sglang.plugin:register"


def test_sglang_loads_our_plugin_once_per_process():
    """SGLang's loader finds and runs our plugin and applies its hooks; a second register() adds no hooks (SGLang loads plugins in several
    paths of one process). In a subprocess: register() installs CPU support, which must not leak into this one."""
    code = """
import json
import sglang.srt.plugins as plugins
from sglang.srt.plugins.hook_registry import HookRegistry
from lynx_sglang.runtime.sglang.plugin import register

from lynx_sglang.runtime.sglang.hooks import _hooks_applied

plugins.load_plugins()  # what every SGLang process runs: our register(), then HookRegistry.apply_hooks()
counts = {t: len(h) for t, h in HookRegistry._hooks.items()}
register()
after = {t: len(h) for t, h in HookRegistry._hooks.items()}
print(json.dumps({"applied": _hooks_applied(), "before": counts, "after": after}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["applied"]  # SGLang ran our register() and wrapped TopK.forward (it only logs plugin failures)
    assert got["before"].get("sglang.srt.layers.moe.topk.TopK.forward") == 1
    assert got["after"] == got["before"]


def test_kernels_import_from_our_kernels_folder():
    """lynx_sglang.kernels maps to kernels/ (PyPI's unrelated top-level ``kernels`` is installed beside us)."""
    import lynx_sglang.kernels.expert_selection as ks

    assert Path(ks.__file__).resolve() == (ROOT / "kernels" / "expert_selection.py").resolve()


def test_every_subpackage_is_declared_for_the_wheel():
    """A package missing from pyproject's list imports in a checkout but not from an installed wheel."""
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lynx_sglang").rglob("__init__.py")}
    assert found <= declared, f"add {sorted(found - declared)} to [tool.setuptools] packages"
