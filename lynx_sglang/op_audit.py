"""Record what a per-step path asks of the host: syncs, host-built tensors, data-dependent shapes, launches.

A CUDA-graph decode step must never need the host: no ``.item()`` / ``.tolist()`` /
``bool(tensor)``, no tensor built from Python data inside the step
(``torch.tensor(x, device=...)``), no device<->host copy, and no output whose shape
depends on values (``nonzero``, ``unique``, boolean-mask indexing, ...). On CPU most
of these show as the aten ops a ``TorchDispatchMode`` sees, so CPU tests can catch
what would fail under capture on a GPU. The exceptions are ``Tensor.tolist``,
``Tensor.numpy`` and ``Tensor.cpu``: on a CPU tensor they reach no aten op at all (on
a GPU they are a device-to-host copy), so while an audit is active those methods are
wrapped and recorded by name.

    with OpAudit() as audit:
        selector.run(...)
    audit.raise_on_host_work()                       # AssertionError naming each offending op and where it ran
    audit.raise_on_host_work(allowed={"Tensor.tolist": 1})   # a documented sync, by op name and count
    audit.launches                                   # int: device launches the torch ops would make

What is recorded (``Finding.kind``):

- ``host sync``: ``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``, a
  tensor used as a Python index), ``aten.is_nonzero``, ``aten.equal``, a copy from a
  non-CPU device to the CPU, and the wrapped ``Tensor.tolist`` / ``.numpy`` / ``.cpu``;
- ``host data``: ``aten.lift_fresh`` (``torch.tensor(...)``, ``torch.as_tensor(...)``) and a
  copy from the CPU to another device;
- ``data-dependent shape``: ``nonzero``, ``unique``, ``masked_select``, ``bincount``,
  ``repeat_interleave`` without ``output_size``, and boolean-mask indexing / assignment.

``launches`` counts every op that would launch a device kernel: every aten op except
views and aliases, uninitialised allocations (``empty``) and metadata; collectives
(``c10d.*``) count one each. It is a proxy for kernels per call, the same on CPU and
GPU for our torch paths (a fused GPU implementation may launch fewer). Triton kernels
do not pass through the dispatcher and are not counted (nor, under
``TRITON_INTERPRET=1``, audited: their bodies run in numpy); ``ops`` holds every op
seen by name.

A tool for tests and benchmarks; nothing in ``lynx_sglang.runtime`` imports it.
"""

from __future__ import annotations

import functools
import os
import sysconfig
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: Ops that copy a device value to the host (every .item(), bool(t), int(t), float(t), torch.equal).
HOST_SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
#: Ops that build a tensor from Python data (a host-to-device copy per call on a GPU).
HOST_DATA_OPS = {aten.lift_fresh.default, aten.lift_fresh_copy.default, aten.lift.default}
#: Ops whose output shape depends on the values (a sync, and not capturable). ``nonzero_static``
#: is not one: its output shape is fixed (the capturable alternative).
DATA_DEPENDENT_OPS = {
    aten.nonzero.default, aten.argwhere.default, aten.unique_dim.default, aten._unique.default,
    aten._unique2.default, aten.unique_consecutive.default, aten.masked_select.default,
    aten.bincount.default,
}
#: Tensor methods that reach no aten op on a CPU tensor but copy to the host on a GPU.
HOST_METHODS = ("tolist", "numpy", "cpu")
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_REPEAT_INTERLEAVE = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_COPY_OPS = {aten._to_copy.default, aten.copy_.default}
#: Ops that launch no kernel: allocation without initialisation and metadata (views are found by schema).
_NO_KERNEL = {
    aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
    aten.new_empty.default, aten.new_empty_strided.default, aten._local_scalar_dense.default,
    aten.lift_fresh.default, aten.detach.default, aten.alias.default, aten._unsafe_view.default,
    aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default,
    aten.is_nonzero.default, aten.set_.source_Tensor, aten.set_.source_Storage_storage_offset,
    aten.resize_.default,
}


@dataclass
class Finding:
    """One op that needs the host, with where our code called it."""

    kind: str  # "host sync", "host data", "data-dependent shape"
    op: str  # the aten op (``aten.nonzero.default``) or the wrapped method (``Tensor.tolist``)
    where: str  # innermost lynx_sglang / kernels frame: "path:line function"


@dataclass
class OpAudit(TorchDispatchMode):
    """A dispatch mode that records every op run under it (see the module docstring).

    Attributes: ``findings`` (list of ``Finding``), ``launches`` (int), ``ops`` (Counter of op names).
    """

    ops: Counter = field(default_factory=Counter)
    findings: List[Finding] = field(default_factory=list)
    launches: int = 0

    def __post_init__(self):
        super().__init__()
        self._saved_methods: dict = {}
        self._in_method = 0  # inside a wrapped method: its own aten ops are not findings twice

    # ------------------------------------------------------------------ recording

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = None if self._in_method else self._host_kind(func, args, kwargs)
        if kind is not None:
            self.findings.append(Finding(kind, str(func), _our_frame()))
        if not (func in _NO_KERNEL or _is_alias(func)):
            self.launches += 1
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _host_kind(func, args, kwargs) -> Optional[str]:
        if func in HOST_SYNC_OPS:
            return "host sync"
        if func in HOST_DATA_OPS:
            return "host data"
        if func in DATA_DEPENDENT_OPS:
            return "data-dependent shape"
        if func in _REPEAT_INTERLEAVE and kwargs.get("output_size") is None:
            return "data-dependent shape"
        if func in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
                return "data-dependent shape"  # boolean-mask indexing
        if func in _COPY_OPS:
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0].device if func is aten.copy_.default else kwargs.get("device") or src.device
            dst = torch.device(dst)
            if isinstance(src, torch.Tensor) and src.device.type != dst.type:
                return "host sync" if dst.type == "cpu" else "host data"
        return None

    def _wrap(self, name: str):
        original = getattr(torch.Tensor, name)

        @functools.wraps(original)
        def recorded(tensor, *args, **kwargs):
            if not self._in_method:
                self.findings.append(Finding("host sync", f"Tensor.{name}", _our_frame()))
            self._in_method += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._in_method -= 1

        return original, recorded

    def __enter__(self):
        for name in HOST_METHODS:
            _, recorded = self._wrap(name)
            self._saved_methods[name] = torch.Tensor.__dict__.get(name)  # None: inherited from TensorBase
            setattr(torch.Tensor, name, recorded)
        try:
            return super().__enter__()
        except BaseException:
            self._restore_methods()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._restore_methods()

    def _restore_methods(self) -> None:
        for name, original in self._saved_methods.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)
        self._saved_methods.clear()

    # ------------------------------------------------------------------ verdict

    def raise_on_host_work(self, allowed: dict | None = None) -> None:
        """Fail on any finding, except exactly ``allowed[op]`` occurrences of a named op (a documented sync).

        An allowed op seen fewer times than allowed fails too: the allowance (and the docs it stands
        for) must be updated when a sync goes away.
        """
        allowed = dict(allowed or {})
        bad = []
        for f in self.findings:
            if allowed.get(f.op, 0) > 0:
                allowed[f.op] -= 1
                continue
            bad.append(f)
        unused = {op: n for op, n in allowed.items() if n > 0}
        msg = []
        if bad:
            lines = "\n".join(f"  {f.kind}: {f.op} at {f.where}" for f in bad)
            msg.append(f"{len(bad)} op(s) need the host inside a per-step path:\n{lines}")
        if unused:
            msg.append(f"allowed but not seen (stale allowance): {unused}")
        if msg:
            raise AssertionError("\n".join(msg))


def _is_alias(func) -> bool:
    """True for views and other ops whose every output aliases an input without writing (no kernel)."""
    if func.is_view:
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


# Frames under these (torch, Triton, the standard library, installed packages) are never "where".
_LIBRARY_DIRS = tuple({os.path.dirname(torch.__file__)}
                      | {sysconfig.get_paths()[key] for key in ("stdlib", "purelib", "platlib")})


def _our_frame() -> str:
    """The innermost frame outside torch, Triton, the standard library and this module that led to the op
    (``path:line function``; paths relative to the working directory where they are under it)."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename
        ours = f"{os.sep}lynx_sglang{os.sep}" in name  # also when installed under site-packages
        if name == __file__ or name.startswith("<") or (name.startswith(_LIBRARY_DIRS) and not ours):
            continue
        for root in (os.getcwd() + os.sep, os.path.dirname(os.path.dirname(__file__)) + os.sep):
            if name.startswith(root):
                name = name[len(root):]
                break
        else:
            if ours:
                name = name[name.rindex(f"lynx_sglang{os.sep}"):]
        return f"{name}:{frame.lineno} {frame.name}"
    return "?"
