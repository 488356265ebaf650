"""Record what a per-step path asks of the device: host syncs, host-built tensors, data-dependent shapes, launches.

A CUDA-graph decode step must never need the host: no ``.item()`` / ``.tolist()`` /
``bool(tensor)`` (all reach ``aten._local_scalar_dense``), no tensor built from
Python data inside the step (``aten.lift_fresh``: ``torch.tensor(x)``), and no
output whose shape depends on values (``nonzero``, ``unique``, boolean-mask
indexing, ``masked_select``, ``repeat_interleave`` without ``output_size``). All
of these show on CPU as the aten ops a ``TorchDispatchMode`` sees, so CPU tests can
catch what would fail under capture on a GPU.

The same recorder counts the ops that would be device kernel launches (every op
that is not a view, a metadata-only op or an uninitialised allocation): a proxy
for launches per layer and step, the same on CPU and GPU for our torch paths.

    with OpAudit() as audit:
        selector.run(...)
    audit.raise_on_host_work()          # AssertionError naming each offending op and where it ran
    audit.launches                       # int

A tool for tests and benchmarks; nothing in ``lynx_sglang.runtime`` imports it.
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Ops that copy a device value to the host (every .item(), .tolist(), bool(t), int(t), float(t)).
HOST_SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default}
#: Ops that build a tensor from Python data (a host-to-device copy per call on a GPU).
HOST_DATA_OPS = {aten.lift_fresh.default, aten.lift_fresh_copy.default, aten.lift.default}
#: Ops whose output shape depends on the values (a sync, and not capturable).
DATA_DEPENDENT_OPS = {
    aten.nonzero.default, aten.nonzero_static.default, aten.unique_dim.default, aten._unique.default,
    aten._unique2.default, aten.unique_consecutive.default, aten.masked_select.default,
    aten.repeat_interleave.Tensor, aten.bincount.default,
}
#: Ops that launch no kernel: allocation without initialisation and metadata.
_NO_KERNEL = {
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
    aten.new_empty.default, aten.new_empty_strided.default, aten._local_scalar_dense.default,
    aten.lift_fresh.default, aten.detach.default, aten.alias.default, aten.sym_size.int, aten.sym_stride.int,
    aten.sym_numel.default, aten.sym_storage_offset.default, aten.is_nonzero.default,
    aten.set_.source_Tensor, aten.resize_.default,
}


@dataclass
class Finding:
    """One op that needs the host, with where our code called it."""

    kind: str  # "host sync", "host data", "data-dependent shape"
    op: str
    where: str


@dataclass
class OpAudit(TorchDispatchMode):
    """A dispatch mode that records every aten op run under it (see the module docstring)."""

    ops: Counter = field(default_factory=Counter)
    findings: List[Finding] = field(default_factory=list)
    launches: int = 0

    def __post_init__(self):
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self._host_kind(func, args)
        if kind is not None:
            self.findings.append(Finding(kind, str(func), _our_frame()))
        if not (func in _NO_KERNEL or func.is_view):
            self.launches += 1
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _host_kind(func, args) -> Optional[str]:
        if func in HOST_SYNC_OPS:
            return "host sync"
        if func in HOST_DATA_OPS:
            return "host data"
        if func in DATA_DEPENDENT_OPS:
            return "data-dependent shape"
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                return "data-dependent shape"  # boolean-mask indexing
        return None

    def raise_on_host_work(self, allowed: dict | None = None) -> None:
        """Fail on any finding, except up to ``allowed[op]`` occurrences of a named op (a documented sync)."""
        allowed = dict(allowed or {})
        bad = []
        for f in self.findings:
            if allowed.get(f.op, 0) > 0:
                allowed[f.op] -= 1
                continue
            bad.append(f)
        if bad:
            lines = "\n".join(f"  {f.kind}: {f.op} at {f.where}" for f in bad)
            raise AssertionError(f"{len(bad)} op(s) need the host inside a per-step path:\n{lines}")


def _our_frame() -> str:
    """The innermost frame of lynx_sglang or kernels code that led to the op (file:line function)."""
    for frame in reversed(traceback.extract_stack()):
        if ("lynx_sglang" in frame.filename or "/kernels/" in frame.filename) and "op_audit" not in frame.filename:
            name = frame.filename
            cut = max(name.rfind("lynx_sglang/"), name.rfind("kernels/"))
            return f"{name[cut:]}:{frame.lineno} {frame.name}"
    return "?"
