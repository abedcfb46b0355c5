"""The command line as a user meets it, through the installed ``rattention`` console script: every failure
is one line on stderr and no traceback; usage and config errors exit 2, Ctrl-C exits 130."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RATTENTION = Path(sys.executable).parent / "rattention"  # the console script pip installed beside python
TINY = ROOT / "configs" / "tiny.yaml"


def rattention(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(RATTENTION), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": ""})


def sigint_default() -> None:
    """In the child before exec. A shell's background job starts with SIGINT ignored, and its children
    inherit that; Python then installs no Ctrl-C handler, and the SIGINT a test sends does nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_console_script_is_installed():
    assert RATTENTION.is_file(), f"{RATTENTION}: run `pip install -e .`"


@pytest.mark.parametrize("args, line", [
    (["bogus"], "error: No such command 'bogus'. Try 'rattention --help'."),
    (["train"], "error: Missing argument 'config'. Try 'rattention train --help'."),
    (["data", "synth"], "error: Missing argument 'kind'. Try 'rattention data synth --help'."),
    (["data", "prepare", "--bogus"], "error: No such option: --bogus"),
    (["demo", "--profile", "bogus"], "error: Invalid value for '--profile': "),
    (["train", str(TINY), "train.lr=-1"], "error: train.lr: Input should be greater than 0, got -1"),
    (["train", "nope.yaml"], "error: nope.yaml: config file not found"),
    (["train", str(TINY), "lr=3"], "error: override 'lr=3': expected section.field=value, e.g. train.lr=3e-4"),
    (["data", "prepare", "--out", "ds", "--val-fraction", "1.5"],
     "error: val_fraction: Input should be less than 1, got 1.5"),
    (["data", "synth", "mqar", "--out", "ds", "--samples", "0"],
     "error: samples: Input should be greater than 0, got 0"),
])
def test_usage_and_config_errors_are_one_line_exit_2(tmp_path, args, line):
    r = rattention(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), r.stderr
    assert r.stdout == "" and list(tmp_path.iterdir()) == []  # failed before any work: no run folder


@pytest.mark.parametrize("args", [[], ["data"]])
def test_no_command_prints_the_help_and_exits_2(args):
    r = rattention(*args)
    assert r.returncode == 2 and r.stderr == "error: Missing command.\n", r.stderr
    assert " ".join(["Usage: rattention", *args]) in r.stdout


def test_help_exits_0():
    r = rattention("--help")
    assert r.returncode == 0 and r.stderr == ""
    assert all(c in r.stdout for c in ("data", "train", "eval", "import-run", "demo"))
    r = rattention("train", "--help")
    assert r.returncode == 0 and "--no-ray" in r.stdout


def test_python_m_rattention_is_the_same_app():
    r = subprocess.run([sys.executable, "-m", "rattention", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "import-run" in r.stdout
    r = subprocess.run([sys.executable, "-m", "rattention", "bogus"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr == "error: No such command 'bogus'. Try 'rattention --help'.\n"


def test_ctrl_c_is_one_line_exit_130_and_publishes_nothing(tmp_path):
    """Ctrl-C during ``rattention data prepare`` on a real corpus (stdlib sources) once the job is under way
    (its tokenizer trained, in the temp folder): one line, exit 130, and no dataset at the output path."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # enough text that the job is still tokenizing when the Ctrl-C lands (200 top-level files once finished
    # within the test's polling under CI load)
    files = [f for f in sorted(stdlib.rglob("*.py")) if "test" not in f.parts and "site-packages" not in f.parts]
    for i, f in enumerate(files[:800]):
        shutil.copy(f, corpus / f"{i:04d}_{f.name}")
    out = tmp_path / "ds"
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        # its own session, so that the Ctrl-C goes to its whole process group, as a terminal sends it
        proc = subprocess.Popen(
            [str(RATTENTION), "data", "prepare", str(corpus), "--out", str(out), "--vocab-size", "300",
             "--num-cpus", "1"],
            cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.DEVNULL, stderr=err,
            start_new_session=True, preexec_fn=sigint_default,
        )
        try:
            deadline = time.monotonic() + 120
            while not list(tmp_path.glob(".ds.tmp-*/tokenizer.json")):
                assert proc.poll() is None and time.monotonic() < deadline, \
                    f"the job never got under way (exit {proc.poll()}): {err_path.read_text()[-2000:]}"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGINT)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    stderr = err_path.read_text()
    assert rc == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1] == "interrupted"  # Ray's own log lines may come before it
    assert not out.exists() and not list(tmp_path.glob(".ds.tmp-*"))  # not published, temp folder removed
