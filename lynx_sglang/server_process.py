"""Start and stop a real SGLang server from Python (tests, the main job, benchmarks).

    with running_server("--tp", "2") as srv:
        srv.generate("Hello", max_new_tokens=8)

The server starts through ``launch/cpu_server.sh`` on a CPU-only machine and
``launch/server.sh`` (plain ``sglang.launch_server``) otherwise. Every server runs
in its own process group, and stopping it kills the whole group, so no scheduler
or detokenizer process outlives its caller.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "trained-qwen3-moe"
START_TIMEOUT_S = 180.0


def launch_script() -> Path:
    """The launch script for this machine: the CPU one unless torch sees a GPU."""
    from lynx_sglang.runtime.cpu.support import has_accelerator

    return REPO / "launch" / ("server.sh" if has_accelerator() else "cpu_server.sh")


# Ports handed to a server that binds them only ~30 s later. They come from below the kernel's
# ephemeral range: a port from bind(0) lies inside it, where any outgoing connection in between (a health
# poll, gloo) may be given it, and CI saw exactly that ("address already in use"). 22000-29999 is left to
# SGLang, which picks its own NCCL port there.
_PORT_RANGE = (12000, 21999)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(attempts: int = 64) -> int:
    """A TCP port that is free now, from below the ephemeral range where possible (else from bind(0))."""
    low, high = _PORT_RANGE[0], min(_PORT_RANGE[1], _ephemeral_low() - 1)
    if high - low + 1 >= attempts:
        for port in random.sample(range(low, high + 1), attempts):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_was_taken(log_text: str) -> bool:
    """Whether a server log shows its HTTP port was taken between our pick and its bind."""
    return "address already in use" in log_text.lower()


def flag_value(args, flag: str) -> str | None:
    """The last value given to ``flag`` in ``args`` (``--flag V`` or ``--flag=V``), else None."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    # The launch scripts run SGLang with this interpreter unless PYTHON is set (a conda env, a system install).
    env.setdefault("PYTHON", sys.executable)
    # The test suite sets TRITON_INTERPRET=1 for the kernel tests; a server must run as the
    # launch script runs it by hand, not with Triton kernels silently interpreted.
    env.pop("TRITON_INTERPRET", None)
    return env


@dataclass
class Server:
    """A running server: its process (leader of its own process group), port and log file."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    args: tuple[str, ...]
    started_in_s: float = field(default=float("nan"))

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:30201``."""
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the server's combined stdout/stderr."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"<no server log: {e}>"
        return "\n".join(text.splitlines()[-lines:])

    def post(self, path: str, payload: dict, timeout: float = 120.0) -> dict:
        """POST JSON to ``path`` and return the decoded JSON answer."""
        req = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def generate(self, text: str, max_new_tokens: int = 16, timeout: float = 120.0, **sampling) -> dict:
        """``/generate`` with greedy sampling unless ``sampling`` says otherwise; the JSON answer."""
        params = {"temperature": 0.0, "max_new_tokens": max_new_tokens, **sampling}
        return self.post("/generate", {"text": text, "sampling_params": params}, timeout=timeout)

    def stop(self) -> None:
        """Stop the server's whole process group (see ``stop_process_group``)."""
        stop_process_group(self.proc)


def stop_process_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the process group led by ``proc``, then SIGKILL whatever is left after ``grace_s``."""
    pgid = proc.pid  # started with start_new_session=True: it leads its own group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    # The launcher can exit before its children (or linger after they died): kill the group regardless.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _healthy(url: str) -> bool:
    # /health_generate runs a real one-token generation, so it is 200 only once the model serves.
    try:
        with urllib.request.urlopen(url + "/health_generate", timeout=20) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def start_server(
    *extra_args: str,
    timeout: float = START_TIMEOUT_S,
    port: int | None = None,
    env: dict[str, str] | None = None,
    log_dir: str | os.PathLike | None = None,
    script: str | os.PathLike | None = None,
    wait_healthy: bool = True,
) -> Server:
    """Start ``<launch script> --port PORT *extra_args`` and wait until it serves.

    ``script``: another launch script (default ``launch_script()``); ``wait_healthy=False``
    returns once it runs, for a process that never serves (a multi-node server's other nodes).
    Raises RuntimeError (with the tail of the server log) if it exits or is not healthy
    within ``timeout`` seconds; the process group is killed in that case too. A port this
    function picked itself that is taken before the server binds it is picked again (3 tries).
    """
    we_pick = port is None and flag_value(extra_args, "--port") is None
    for attempt in range(3):
        try:
            return _start_once(extra_args, timeout, port, env, log_dir, script, wait_healthy)
        except RuntimeError as e:
            if not (we_pick and port_was_taken(str(e))) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_once(extra_args, timeout, port, env, log_dir, script, wait_healthy) -> Server:
    given = flag_value(extra_args, "--port")
    if given is not None:  # the caller's --port wins (argparse takes the last), so poll that one
        if port is not None and int(given) != port:
            raise ValueError(f"port={port} and --port {given} disagree")
        port, args = int(given), tuple(extra_args)
    else:
        port = free_port() if port is None else port
        args = ("--port", str(port), *extra_args)
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="lynx-sglang-server-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"server-{port}.log"
    full_env = _server_env()
    if env:
        full_env.update(env)
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(script or launch_script()), *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,  # own process group: stop() kills launcher, schedulers, detokenizer
        )
    server = Server(proc=proc, port=port, log_path=log_path, args=args)
    try:
        while wait_healthy:
            if proc.poll() is not None:
                raise RuntimeError(f"server {args} exited with code {proc.returncode} before it was healthy")
            if _healthy(server.url):
                break
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"server {args} not healthy after {timeout:.0f} s")
            time.sleep(1.0)
    except BaseException as e:
        server.stop()
        if isinstance(e, RuntimeError):
            raise RuntimeError(f"{e}\n--- tail of {log_path} ---\n{server.log_tail()}") from None
        raise
    server.started_in_s = time.monotonic() - t0
    return server


def _distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:  # free_port() releases its port, so two calls could in principle return the same one
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


@contextlib.contextmanager
def servers_side_by_side(launch: dict[str, list[str]], timeout: float = 600.0, log_dir: str | Path | None = None):
    """Start every server of ``launch`` at once, each on its own port; yield ``{name: Server}`` once all
    are healthy, and stop them all on exit (also when one fails to start: its log tail is raised).

    On the CPU server ``--sleep-on-idle`` (in ``launch/cpu_server.sh``) keeps the idle ones off the cores
    while another is measured.
    """
    started = {}
    restarts = 0
    t0 = time.monotonic()
    try:
        for (name, args), port in zip(launch.items(), _distinct_free_ports(len(launch))):
            started[name] = start_server(*args, port=port, wait_healthy=False, log_dir=log_dir)
        pending = list(started)
        while pending:
            for name in list(pending):
                srv = started[name]
                if srv.proc.poll() is not None and restarts < 3 and port_was_taken(srv.log_tail()):
                    # Its port was given to another socket before it bound it: start it again elsewhere.
                    srv.stop()
                    restarts += 1
                    taken = {s.port for s in started.values()}
                    port = next(p for p in iter(free_port, None) if p not in taken)
                    started[name] = start_server(*launch[name], port=port, wait_healthy=False, log_dir=log_dir)
                    continue
                if srv.proc.poll() is not None:
                    raise RuntimeError(f"the {name} server exited with code {srv.proc.returncode} before it was "
                                       f"healthy\n--- tail of {srv.log_path} ---\n{srv.log_tail()}")
                if _healthy(srv.url):
                    srv.started_in_s = time.monotonic() - t0
                    pending.remove(name)
            if pending and time.monotonic() - t0 > timeout:
                tails = "\n".join(f"--- {n}: {started[n].log_path} ---\n{started[n].log_tail(20)}" for n in pending)
                raise RuntimeError(f"servers {pending} not healthy after {timeout:.0f} s\n{tails}")
            if pending:
                time.sleep(1.0)
        yield started
    finally:
        for srv in started.values():
            srv.stop()


@contextlib.contextmanager
def running_server(*extra_args: str, **kwargs):
    """Context manager: ``start_server(*extra_args, **kwargs)``, always stopped on exit."""
    server = start_server(*extra_args, **kwargs)
    try:
        yield server
    finally:
        server.stop()
