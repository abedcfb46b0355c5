"""The cluster path. Both cluster-launcher configs pass Ray's own schema validation (what ``ray up`` checks before
it touches a cloud); and a real two-node Ray cluster on this machine (``ray start --head`` plus a worker node
joined with ``ray start --address``) runs a smoke sweep submitted as a Ray job through the job submission API,
with a real MLflow server on 127.0.0.1, then stops with nothing of it left running."""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from rattention import metrics as M
from tests.conftest import write_sweep_spec

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["ray_cluster.yaml", "ray_cluster.onprem.yaml"]


# ----- the launcher configs ------------------------------------------------------------------------------

def prepared(name: str, change=None) -> dict:
    """The config as ``ray up`` sees it: Ray's defaults for the provider filled in, then validated."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / name).read_text())
    if change is not None:
        change(cfg)
    full = prepare_config(copy.deepcopy(cfg))
    validate_config(full)
    return full


@pytest.mark.parametrize("name", CONFIGS)
def test_cluster_config_passes_rays_schema(name: str) -> None:
    full = prepared(name)
    text = (ROOT / name).read_text()
    assert full["head_node_type"] in full["available_node_types"]
    assert any("pip install" in c and ".[platform,triton]" in c for c in full["setup_commands"])
    assert any("--dashboard-host=127.0.0.1" in c for c in full["head_start_ray_commands"])
    assert "ssh_private_key:" not in text.replace("# ssh_private_key:", "") and "aws_secret" not in text.lower()


def test_aws_config_is_a_gpu_cluster_with_docker_and_autoscaling() -> None:
    full = prepared("ray_cluster.yaml")
    assert full["provider"]["type"] == "aws"
    assert full["docker"]["image"].startswith("rayproject/ray:") and full["docker"]["image"].endswith("-gpu")
    import ray

    assert f":{ray.__version__}-" in full["docker"]["image"]  # the cluster runs the Ray the client pins
    workers = [t for name, t in full["available_node_types"].items() if name != full["head_node_type"]]
    assert len(workers) == 1 and workers[0]["resources"]["GPU"] >= 1
    assert workers[0]["min_workers"] == 0 < workers[0]["max_workers"] <= full["max_workers"]
    assert full["file_mounts"] and any("MLFLOW_TRACKING_URI" in c for c in full["head_start_ray_commands"])


@pytest.mark.parametrize("change, says", [
    (lambda c: c.update(bogus_field=1), "bogus_field"),
    (lambda c: c["available_node_types"]["ray.worker.gpu"].update(min_workers="zero"), "'zero' is not of type"),
    (lambda c: c.update(head_node_type="ray.head.missing"), "head_node_type"),
])
def test_the_schema_check_refuses_a_broken_config(change, says) -> None:
    """The validation is real: a config broken in each of these ways is refused."""
    with pytest.raises(Exception, match=says):
        prepared("ray_cluster.yaml", change)


# ----- the cluster for real ------------------------------------------------------------------------------

def psutil():
    """Ray's bundled psutil: ``import ray`` puts ray/thirdparty_files on sys.path."""
    import ray  # noqa: F401

    return importlib.import_module("psutil")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_processes(temp: Path) -> list:
    """Every live process of our cluster: those naming its temp dir (GCS, raylets, dashboard, agents, log
    monitors, workers) and all their descendants (the job's driver, its trials)."""
    ps = psutil()
    roots = []
    for p in ps.process_iter(["cmdline"]):
        with_tmp = str(temp) in " ".join(p.info["cmdline"] or [])
        if with_tmp and p.pid != os.getpid():
            roots.append(p)
    found = {p.pid: p for p in roots}
    for p in roots:
        with contextlib.suppress(ps.NoSuchProcess):
            found.update({c.pid: c for c in p.children(recursive=True)})
    alive = []
    for p in found.values():
        try:
            if p.status() != ps.STATUS_ZOMBIE:
                alive.append(p)
        except ps.NoSuchProcess:
            pass
    return alive


def stop_cluster(temp: Path, timeout: float = 10.0) -> list:
    """Stop our cluster alone (``ray stop`` would stop every Ray of this user on the machine): SIGTERM to its
    processes, SIGKILL to what is left after ``timeout`` (``ray stop`` grants 16 s; some of Ray's processes
    outlast a minute's grace here, so waiting longer only costs time); return what is still alive (nothing,
    we assert)."""
    ps = psutil()
    for sig_kill in (False, True):
        procs = cluster_processes(temp)
        for p in procs:
            with contextlib.suppress(ps.NoSuchProcess):
                p.kill() if sig_kill else p.terminate()
        deadline = time.monotonic() + timeout
        while cluster_processes(temp) and time.monotonic() < deadline:
            time.sleep(0.5)
        if not cluster_processes(temp):
            return []
    return cluster_processes(temp)


def ray_start(*args: str, env: dict[str, str]) -> str:
    ray_cli = str(Path(sys.executable).parent / "ray")
    r = subprocess.run([ray_cli, "start", *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"ray start {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


# The client's side, in its own process so it holds this cluster's token alone: submit the sweep as a Ray job
# through the job submission API, wait for it, and report its status, its log and where its trials ran.
CLIENT = """
import json, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_nodes, list_tasks

address, spec, root = sys.argv[1:4]
deadline = time.monotonic() + 120
while len([n for n in list_nodes(address=address) if n.state == "ALIVE"]) < 2:
    assert time.monotonic() < deadline, "the worker node never joined"
    time.sleep(1)
jobs = JobSubmissionClient(address)
job = jobs.submit_job(entrypoint=f"python -m rattention sweep {spec}",
                      runtime_env={"working_dir": root, "excludes": [".git"]})
deadline = time.monotonic() + 600
while (status := jobs.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
    if time.monotonic() > deadline:
        break
    time.sleep(2)
tasks = list_tasks(address=address, filters=[("type", "=", "NORMAL_TASK")], limit=1000)
print(json.dumps({"status": str(status), "logs": jobs.get_job_logs(job),
                  "trials": sorted({(t.name, t.node_id) for t in tasks if (t.name or "").startswith("trial-")})}))
"""


@pytest.mark.slow
def test_smoke_sweep_as_a_ray_job_on_a_two_node_cluster(train_dataset: Path, tmp_path: Path) -> None:
    import json
    import secrets

    from mlflow.tracking import MlflowClient

    from pipelines.tracking import local_server

    # A short temp dir: Ray's unix sockets live under it, and their paths must stay below 108 bytes.
    temp = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    token = temp / "auth_token"  # the cluster's own token: Ray's token auth, as on a real cluster
    token.write_text(secrets.token_hex(32))
    gcs, dash, head_agent, client_port, worker_agent = free_ports(5)
    env = {**os.environ, "RAY_ADDRESS": "", "MLFLOW_TRACKING_URI": "", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_AUTH_TOKEN", None)
    common = ["--num-cpus=1", "--object-store-memory=200000000", "--disable-usage-stats"]
    try:
        with local_server(tmp_path / "mlflow") as uri:
            ray_start("--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                      f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={head_agent}",
                      f"--ray-client-server-port={client_port}", f"--temp-dir={temp}", *common, env=env)
            # The worker joins through the GCS port (Ray's gRPC servers there listen on the node's address).
            ray_start(f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={worker_agent}", *common,
                      env=env)
            # Two windows side by side with one CPU per node: the round's two trials run one on each node.
            spec = write_sweep_spec(tmp_path, train_dataset, uri, "cluster", kinds=["swa"], seeds=1,
                                    grid={"windows": [4, 8], "block": 4}, parallel=2)
            r = subprocess.run([sys.executable, "-c", CLIENT, f"http://127.0.0.1:{dash}", str(spec), str(ROOT)],
                               env=env, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, r.stderr[-4000:]
            out = json.loads(r.stdout.splitlines()[-1])
            assert out["status"] == "SUCCEEDED", out["logs"][-4000:]
            assert "| swa | 4 |" in out["logs"], out["logs"][-3000:]  # the driver's answer, in the job's log
            assert len({name for name, _ in out["trials"]}) == 3, out["trials"]
            assert len({node for _, node in out["trials"]}) == 2, f"the trials did not use both nodes: {out}"

            c = MlflowClient(uri)
            exp = c.get_experiment_by_name("cluster")
            runs = c.search_runs([exp.experiment_id], max_results=100)
            parents = [r for r in runs if M.TAG_PARENT not in r.data.tags]
            assert len(parents) == 1, [r.info.run_name for r in runs]
            children = [r for r in runs if r.data.tags.get(M.TAG_PARENT) == parents[0].info.run_id]
            assert len(children) == 3 and len(runs) == 4
            assert all(r.info.status == "FINISHED" for r in runs)
            assert parents[0].data.metrics[M.sweep_minimal_window("swa")] == 4
            # both nodes' services are among the processes stopped and checked below
            raylets = [p for p in cluster_processes(temp) if p.name() == "raylet"]
            assert len(raylets) == 2, [" ".join(p.cmdline())[:100] for p in cluster_processes(temp)]
    finally:
        left = stop_cluster(temp)
    assert not left, f"left running: {[' '.join(p.cmdline())[:120] for p in left]}"
