"""The command line as a user meets it, through the installed ``rattention`` console script: every failure
is one line on stderr and no traceback; usage and config errors exit 2. (Ctrl-C, exit 130:
tests/reliability/test_signal_faults.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RATTENTION = Path(sys.executable).parent / "rattention"  # the console script pip installed beside python
TINY = ROOT / "configs" / "tiny.yaml"


def rattention(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(RATTENTION), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": ""})


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


