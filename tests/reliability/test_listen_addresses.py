"""Every service of a local Ray the platform starts listens on loopback only, and Ray's own lines stay out of the
output. Each test runs the real thing in a child process and reads the listening sockets of that child's
process tree (psutil), so only our processes are judged, whatever else runs on the machine."""

from __future__ import annotations

import importlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import write_sweep_spec

ROOT = Path(__file__).resolve().parents[2]

# Lines Ray prints on its own that the platform keeps out of a command's output (see pipelines/ray_utils.py).
RAY_NOISE = ["Token authentication is enabled", "Started a local Ray instance", "View the dashboard at",
             "repeated", "Ray deduplicates logs", "streaming_executor.py", "logging_progress.py",
             "Progress will be logged", "core_worker.cc"]

# A driver as pipelines.train starts one (with the dashboard, its agents and the job server), running a task
# and an actor; it prints READY and waits for a line on stdin while the test reads its sockets.
DRIVER = """
import sys
from pipelines.ray_utils import init_ray
import ray

init_ray(num_cpus=2, dashboard=True)

@ray.remote
def square(x):
    return x * x

@ray.remote
class Counter:
    def add(self, n):
        return n + 1

assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
assert ray.get(Counter.remote().add.remote(1)) == 2
print("READY", ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.readline()
ray.shutdown()
"""


def psutil():
    """Ray's bundled psutil: ``import ray`` puts ray/thirdparty_files on sys.path."""
    import ray  # noqa: F401

    return importlib.import_module("psutil")


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def listeners(pid: int) -> dict[tuple[str, int], str]:
    """{(ip, port): process} for every listening TCP socket of ``pid`` and its descendants."""
    ps = psutil()
    try:
        root = ps.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except ps.NoSuchProcess:
        return {}
    out = {}
    for p in procs:
        try:
            # the whole command line: a checkout's path can be long enough to push the script's name (such as
            # ray/dashboard/dashboard.py) past any fixed cut
            name = " ".join(p.cmdline()) or p.name()
            for c in p.net_connections(kind="inet"):
                if c.status == ps.CONN_LISTEN:
                    out[(c.laddr.ip, c.laddr.port)] = name
        except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
            continue
    return out


def test_local_ray_listens_on_loopback_only() -> None:
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), f"driver failed (exit {proc.poll()}): {proc.stderr.read()[-3000:]}"
        gcs = line.split()[1]
        assert gcs.startswith("127.0.0.1:"), gcs
        found = listeners(proc.pid)
        proc.communicate("\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    names = " | ".join(found.values())
    # the services are there to be judged: GCS, raylet, dashboard (with the job server), its agents, a worker
    for service in ("gcs_server", "raylet", "dashboard.py", "DashboardAgent", "RuntimeEnvAgent", "ray::"):
        assert service in names, f"{service} not listening: {names}"
    assert ("127.0.0.1", int(gcs.rsplit(":", 1)[1])) in found or \
        ("::ffff:127.0.0.1", int(gcs.rsplit(":", 1)[1])) in found
    wide = {addr: name for addr, name in found.items() if not is_loopback(addr[0])}
    assert not wide, f"listening beyond loopback: {wide}"
    assert proc.returncode == 0


@pytest.mark.slow
def test_sweep_listens_on_loopback_and_prints_no_ray_noise(train_dataset: Path, tmp_path: Path) -> None:
    """``rattention sweep`` with its own local MLflow server and local Ray: every socket of its process tree,
    sampled while it runs, is on loopback; its output is the platform's lines only."""
    spec = write_sweep_spec(tmp_path, train_dataset, "", "secure", kinds=["swa"], seeds=1,
                            grid={"windows": [4, 8], "block": 4})
    base = spec.with_name("secure-base.yaml")
    base.write_text(base.read_text().replace("server_dir: .mlflow", f"server_dir: {tmp_path / 'mlflow'}")
                    .replace("uri: ''", "uri: null"))
    env = {**os.environ, "RAY_ADDRESS": "", "MLFLOW_TRACKING_URI": ""}
    out_path = tmp_path / "out.txt"
    with out_path.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rattention", "sweep", str(spec)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        seen: dict[tuple[str, int], str] = {}
        try:
            deadline = time.monotonic() + 400
            while proc.poll() is None and time.monotonic() < deadline:
                seen.update(listeners(proc.pid))
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    text = out_path.read_text()
    assert proc.returncode == 0, text[-3000:]
    names = " | ".join(seen.values())
    assert "gcs_server" in names and "raylet" in names and "uvicorn" in names, names  # Ray and MLflow were seen
    wide = {addr: name for addr, name in seen.items() if not is_loopback(addr[0])}
    assert not wide, f"listening beyond loopback: {wide}"
    noise = [line for line in text.splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noise, noise
    assert "| swa | 4 |" in text  # the answer is there
