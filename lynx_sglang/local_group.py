"""Run a function on N local processes joined in one gloo group (CPU development and tests).

``run_group(fn, world, *args)`` starts ``world`` processes, each calling
``fn(rank, world, *args)`` after ``torch.distributed`` is initialised with
gloo, and returns their results in rank order. A rank that raises makes the
call raise with that rank's traceback; collectives time out after
``timeout_s`` instead of hanging for the 30-minute default.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, store_path: str, out_dir: str, timeout_s: float, fn, args) -> None:
    torch.set_num_threads(1)  # N processes share few cores; oversubscription only slows gloo down
    result = None
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        result = ("ok", fn(rank, world, *args))
    except BaseException:  # report every failure to the parent, which raises it
        result = ("error", traceback.format_exc())
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def run_group(fn, world: int, *args, timeout_s: float = 60.0) -> list:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo processes; returns the results in rank order.

    ``fn`` must be importable by name (a module-level function) and its
    arguments and result picklable.
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    with tempfile.TemporaryDirectory(prefix="lynx_group_") as tmp:
        store = os.path.join(tmp, "store")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_entry, args=(r, world, store, tmp, timeout_s, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        results, errors = [], []
        for r, p in enumerate(procs):
            path = os.path.join(tmp, f"rank{r}.pkl")
            if not os.path.exists(path):
                errors.append(f"rank {r} exited with code {p.exitcode} without a result")
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {r} raised:\n{value}")
            results.append(value)
        if errors:
            raise RuntimeError("\n".join(errors))
        return results
