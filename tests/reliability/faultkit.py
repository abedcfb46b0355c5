"""What the fault-injection tests share: a real tokenized dataset, the command line run in-process, a tmpfs
mount, and the rows of the reliability table.

A test that proves a fault's recovery calls ``record`` after its assertions. The rows go to the file named
by ``RATTENTION_RELIABILITY_ROWS`` (one JSON object a line) when it is set, as ``benchmarks/
bench_reliability.py`` sets it; a plain pytest run records nothing and writes nothing in the checkout.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROWS_ENV = "RATTENTION_RELIABILITY_ROWS"
ROOT = Path(__file__).resolve().parents[2]


def record(fault: str, injection: str, expected: str, survived: bool, lost: str, recovery_s: float,
           recovery: str, test: str) -> None:
    """One row of the reliability table: the fault, how it was injected, the recovery expected (and
    asserted by ``test``), whether it was survived, what was lost, and the recovery time in seconds
    (``recovery`` says what that time covers)."""
    path = os.environ.get(ROWS_ENV)
    if not path:
        return
    row = {"fault": fault, "injection": injection, "expected": expected, "survived": survived, "lost": lost,
           "recovery_s": round(recovery_s, 3), "recovery": recovery, "test": test}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


# ----- a real dataset, made by the pipeline -----------------------------------------------------------------

def write_corpus(folder: Path, documents: int = 60) -> Path:
    """Text files of varied words: enough for a 300-token BPE and several shards."""
    folder.mkdir(parents=True, exist_ok=True)
    words = ["window", "state", "kernel", "shard", "token", "query", "value", "recall", "merge", "layer",
             "linear", "softmax", "residual", "global", "local", "decode"]
    for i in range(documents):
        text = " ".join(words[(i * 7 + j * (i % 5 + 1)) % len(words)] for j in range(120 + 13 * (i % 9)))
        (folder / f"doc{i:03d}.txt").write_text(f"# document {i}\n{text}\n")
    return folder


def prepare_dataset(out: Path, corpus: Path, **fields: Any) -> dict[str, Any]:
    """``rattention data prepare`` (the Ray job, in this process) into ``out``; returns the manifest."""
    from pipelines import tokenize

    cfg = tokenize.make_config(out=out, sources=[str(corpus)], vocab_size=300, val_fraction=0.3,
                               shard_tokens=1500, **fields)
    return tokenize.prepare(cfg, log=lambda s: None)


def run_config_file(folder: Path, dataset: Path, *overrides: str) -> Path:
    """A run config YAML of the tiny model (``tests.conftest.tiny_run_config``) over ``dataset``'s vocab of
    300, checkpointing every 4 of 12 steps, evaluation off; runs go under ``folder/runs``."""
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(dataset, "model.vocab_size=300", "train.steps=12", "train.checkpoint_every=4",
                          "eval.enabled=false", f"train.out_dir={folder / 'runs'}", *overrides)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def manifest_of(dataset: Path) -> dict[str, Any]:
    return json.loads((dataset / "manifest.json").read_text())


def write_manifest(dataset: Path, manifest: dict[str, Any]) -> None:
    (dataset / "manifest.json").write_text(json.dumps(manifest, indent=2))


# ----- the command line, in-process as the console script runs it ------------------------------------------

def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, float]:
    """Run ``rattention ARGV`` through ``rattention.cli.main``; return (exit code, stderr, seconds)."""
    from rattention.cli import main

    capsys.readouterr()
    t0 = time.perf_counter()
    code = 0
    try:
        main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    secs = time.perf_counter() - t0
    return code, capsys.readouterr().err, secs


# A line a Ray process forwards to its driver: "(RayTrainWorker pid=123) ...", "(pid=gcs_server) ...",
# "(raylet) ...", maybe coloured. In-process commands share pytest's process with the session's Ray
# (conftest.ray_local), whose services may speak during any test, a ``--no-ray`` one included.
RAY_LINE = re.compile(r"^(\x1b\[\d+m)?\((\w+ )?(pid=\w+|raylet)")


def one_error_line(err: str) -> str:
    """The single ``error: ...`` line of a failed command (asserting that there is exactly one and no
    traceback of ours); returns its message. Lines forwarded by Ray's processes are not the command's."""
    ours = [ln for ln in err.splitlines() if not RAY_LINE.match(ln)]
    lines = [ln for ln in ours if ln.strip() and not ln.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not [ln for ln in ours if "Traceback" in ln], err
    return lines[0].removeprefix("error: ")


# ----- a tmpfs of a chosen size ---------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (e.g. ``640k``) at ``path`` for the block; the test skips, saying why,
    where mounting is impossible (not root, no CAP_SYS_ADMIN, no mount binary)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"cannot mount a tmpfs here ({err}); the disk-full and read-only faults need one")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the disk-full and "
                    f"read-only faults need root or CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True, timeout=30)
        if os.path.ismount(path):
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def remount(path: Path, size: str, read_only: bool = False) -> None:
    """Change a tmpfs mount's size (or make it writable): the space freed, as a user would."""
    opts = f"remount,size={size}" + (",ro" if read_only else ",rw")
    subprocess.run(["mount", "-o", opts, str(path)], check=True, capture_output=True, timeout=30)


# ----- processes: the signal and worker faults ----------------------------------------------------------

TAG_ENV = "RATTENTION_FAULT_TAG"  # set in a command's environment: every process it starts inherits it


def sigint_default() -> None:
    """In the child before exec: SIGINT back to its default. A shell's background job starts with SIGINT
    ignored, its children inherit that, and Python would install no Ctrl-C handler; so the Ctrl-C tests
    hold however pytest was launched."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tagged(tag: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment carries ``TAG_ENV=tag``: the command's
    process tree, including what was re-parented when its parent exited (Ray's and MLflow's servers)."""
    needle = f"{TAG_ENV}={tag}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            state = next((ln for ln in (proc / "status").read_text().splitlines() if ln.startswith("State:")), "")
            if "Z" in state.split()[1:2]:  # a zombie holds nothing; its parent reaps it
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found.append((int(proc.name), cmd))
    return found


def wait_gone(tag: str, timeout: float = 60.0) -> list[tuple[int, str]]:
    """Wait until no process carries ``tag``; return those left after ``timeout`` (empty when none)."""
    deadline = time.monotonic() + timeout
    while (left := tagged(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def titled(prefix: str) -> list[int]:
    """Pids of the processes whose command line starts with ``prefix`` (a Ray worker running a task is
    titled ``ray::<task name>``)."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith(prefix):
                out.append(int(proc.name))
    return out
