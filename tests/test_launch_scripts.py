"""The expert-parallel launch scripts build the command lines the README documents."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _command(script: str, *args: str, **env: str) -> list[str]:
    """The sglang command a launch script would exec (PYTHON=echo prints it instead)."""
    out = subprocess.run([str(ROOT / "launch" / script), *args], env={**os.environ, "PYTHON": "echo", **env},
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


@pytest.mark.parametrize("gpus", ["2", "4", "8"])
def test_single_node_ep_server(gpus):
    cmd = _command("ep_server.sh", "--port", "30001", GPUS=gpus)
    assert cmd[:3] == ["-m", "sglang.launch_server", "--model-path"]
    assert _flag(cmd, "--tp-size") == _flag(cmd, "--ep-size") == gpus
    assert _flag(cmd, "--moe-a2a-backend") == "lynx" and _flag(cmd, "--lynx-policy") == "lynx_ep"
    assert cmd[-2:] == ["--port", "30001"]


def test_deepep_defaults_to_the_globally_reduced_lynx_policy():
    cmd = _command("ep_server.sh", GPUS="8", A2A="deepep")
    assert _flag(cmd, "--moe-a2a-backend") == "deepep" and _flag(cmd, "--lynx-policy") == "lynx"


def test_multinode_ep_server():
    cmd = _command("ep_multinode.sh", NNODES="2", NODE_RANK="1", MASTER="10.0.0.1:5000", GPUS_PER_NODE="8")
    assert _flag(cmd, "--tp-size") == "16" and _flag(cmd, "--ep-size") == "16"
    assert _flag(cmd, "--nnodes") == "2" and _flag(cmd, "--node-rank") == "1"
    assert _flag(cmd, "--dist-init-addr") == "10.0.0.1:5000"


def test_multinode_requires_its_variables():
    out = subprocess.run([str(ROOT / "launch" / "ep_multinode.sh")], env={**os.environ, "PYTHON": "echo"},
                         capture_output=True, text=True)
    assert out.returncode != 0 and "NNODES" in out.stderr


@pytest.mark.timeout(300)
def test_cpu_demo_matches_the_single_process_moe():
    out = subprocess.run([str(ROOT / "launch" / "ep_cpu.sh"), "demo", "--world", "2", "--tokens-per-rank", "8",
                          "--iters", "1"], capture_output=True, text=True, check=True, timeout=280)
    lines = [line for line in out.stdout.splitlines() if "max|err|" in line]
    assert [line.split()[0] for line in lines] == ["off", "lynx", "lynx_ep"]
    assert all(float(line.split("max|err|")[1].split()[0]) < 1e-4 for line in lines)


def test_cpu_launch_scripts_take_the_python_they_are_given():
    assert _command("cpu_server.sh", "--port", "1")[:3] == ["-m", "sglang.launch_server", "--model-path"]
    cmd = _command("ep_cpu.sh")
    assert _flag(cmd, "--tp-size") == _flag(cmd, "--ep-size") == "2"


def test_a_port_in_the_server_arguments_is_the_one_polled(tmp_path):
    """main_job -- --port P: the server listens on P (argparse takes the last), so start_server must poll P."""
    from lynx_sglang.server_process import flag_value, start_server

    assert flag_value(["--port", "1", "--x", "--port=5"], "--port") == "5"
    assert flag_value(["--lynx-budget-experts=8"], "--lynx-budget-experts") == "8"
    assert flag_value(["--portx", "1"], "--port") is None
    stub = tmp_path / "stub.sh"
    stub.write_text("#!/usr/bin/env bash\necho \"$@\"\n")
    stub.chmod(0o755)
    srv = start_server("--foo", "--port", "30123", script=stub, wait_healthy=False, log_dir=tmp_path)
    srv.proc.wait(timeout=30)
    assert srv.port == 30123 and srv.log_path.read_text().split() == ["--foo", "--port", "30123"]
    srv = start_server("--foo", script=stub, wait_healthy=False, log_dir=tmp_path / "b")
    srv.proc.wait(timeout=30)
    assert srv.log_path.read_text().split() == ["--port", str(srv.port), "--foo"]


def test_a_port_taken_before_the_server_binds_it_is_picked_again(tmp_path):
    """CI once lost a server to "address already in use" (its port, from bind(0), was handed to another
    socket while it loaded): ports now come from below the ephemeral range, and a taken one is re-picked."""
    import sys

    from lynx_sglang.server_process import _ephemeral_low, free_port, start_server

    assert all(p < _ephemeral_low() for p in (free_port() for _ in range(20)))
    # First start: "address already in use". Second: a real /health_generate on the port it is given.
    stub = tmp_path / "stub.sh"
    stub.write_text(f"""#!/usr/bin/env bash
if [ ! -e {tmp_path}/tried ]; then touch {tmp_path}/tried
  echo "ERROR: [Errno 98] error while attempting to bind on address ('127.0.0.1', $2): address already in use"; exit 1
fi
exec {sys.executable} -c '
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()' "$2"
""")
    stub.chmod(0o755)
    srv = start_server(script=stub, log_dir=tmp_path, timeout=60)
    try:
        logs = sorted(tmp_path.glob("server-*.log"))
        assert len(logs) == 2 and "address already in use" in "".join(p.read_text() for p in logs)
        assert srv.proc.poll() is None and srv.log_path == max(logs, key=lambda p: p.stat().st_mtime)
    finally:
        srv.stop()
    # A port the caller chose is never silently changed: the failure is raised with the log.
    (tmp_path / "tried").unlink()
    with pytest.raises(RuntimeError, match="address already in use"):
        start_server(script=stub, port=free_port(), log_dir=tmp_path / "b", timeout=60)


def test_gpu_run_script_goes_on_after_a_failed_step_and_keeps_its_results(tmp_path):
    """benchmarks/run_gpu.sh (never run on a GPU yet): each step is timed out and noted if it fails, the others
    still run, and the results so far plus the log reach $OUT as one file (the device returns at most 8)."""
    import tarfile

    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True)
    script = tree / "benchmarks" / "run_gpu.sh"
    script.write_text((ROOT / "benchmarks" / "run_gpu.sh").read_text())
    script.chmod(0o755)
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python3"  # writes a result file per benchmark module; gpu_hook_capture fails
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
case "$*" in
  *gpu_hook_capture*) exit 3 ;;
  *"-m benchmarks."*) m="$2"; echo '{{}}' > "benchmarks/results/${{m#benchmarks.}}_cuda.json" ;;
esac
exit 0
""")
    fake.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    res = subprocess.run([str(script), "checks"], cwd=tree, env={**os.environ, "PYTHON": str(fake), "OUT": str(out)},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "FAILED steps: gpu_hook_capture" in res.stdout, res.stdout + res.stderr
    ran = calls.read_text()
    assert "benchmarks.gpu_checks" in ran and "benchmarks.bench_selection --device cuda" in ran
    with tarfile.open(out / "results_cuda.tgz") as tar:
        names = set(tar.getnames())
    assert {"benchmarks/results/gpu_checks_cuda.json", "benchmarks/results/bench_selection_cuda.json",
            "benchmarks/results/run_gpu_checks_cuda.log"} <= names, names
