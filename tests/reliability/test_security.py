"""Security (issue 14): checkpoints load with ``weights_only=True``, YAML loads safely, no user string
reaches a shell.

The payloads are real: a pickled object whose unpickling runs ``touch MARKER``, and a YAML
``!!python/object/apply:os.system`` tag doing the same. Each test first shows that an unsafe loader would
run it (the marker appears), then that the platform refuses the file in one line naming it, with the
marker absent. A scan of the platform's sources proves there is no unsafe loader or shell call to reach.
"""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import pytest
import torch
import yaml

from rattention import lifecycle
from rattention.rundir import RunDir
from tests.conftest import tiny_run_config, write_sweep_spec
from tests.reliability.faultkit import ROOT, cli, one_error_line, record

SOURCES = ("kernels", "rattention", "pipelines", "sweeps", "dashboards", "benchmarks")


class Payload:
    """Unpickling this runs ``touch <marker>`` (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_checkpoint(path: Path, marker: Path, step: int = 99) -> Path:
    torch.save({"format": 1, "step": step, "model": {"w": torch.zeros(2)}, "hook": Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()
    marker.unlink()
    return path


def test_checkpoint_with_a_pickled_payload_is_refused(tmp_path, capsys):
    """Fault: a checkpoint file carrying a pickled object that runs a command when unpickled.
    Recovery: ``rattention eval`` refuses it in one line naming the file; nothing runs."""
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    code, err, secs = cli(capsys, "eval", str(evil))
    msg = one_error_line(err)
    assert code == 2 and msg.startswith(f"{evil}: refused, it holds Python objects beyond tensors") and \
        "(posix.system)" in msg and "weights_only=True" in msg
    assert not marker.exists()
    record("checkpoint with a pickled payload (eval)", "torch.save of an object whose __reduce__ runs os.system",
           "one-line error naming the file; the payload never runs", True, "nothing", secs,
           "seconds from the command's start to its one-line error",
           "test_checkpoint_with_a_pickled_payload_is_refused")


def test_resume_from_a_payload_checkpoint_is_refused(train_dataset, tmp_path, capsys):
    """Fault: the newest checkpoint of an interrupted run replaced by a payload file. Recovery: ``rattention
    train`` resuming it refuses the file in one line naming it, marks the run FAILED; nothing runs."""
    cfg = tiny_run_config(train_dataset, "train.steps=8", "train.checkpoint_every=4", "eval.enabled=false",
                          f"train.out_dir={tmp_path / 'runs'}")
    lifecycle.run(cfg, stop_after=4, progress=False)  # preempted: resumable from step 4
    rd = lifecycle.locate(cfg)
    marker = tmp_path / "pwned"
    evil = _evil_checkpoint(rd.checkpoints / "step_00000006.pt", marker, step=6)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    code, err, secs = cli(capsys, "train", str(config), "--no-ray")
    assert code == 2 and one_error_line(err).startswith(f"{evil}: refused, it holds Python objects")
    assert not marker.exists()
    assert RunDir(rd.path).status()["status"] == "FAILED"
    record("checkpoint with a pickled payload (resume)", "a run's newest checkpoint replaced by a payload file",
           "one-line error naming the file, run FAILED; the payload never runs", True,
           "nothing (the run's earlier checkpoint is untouched)", secs,
           "seconds from the command's start to its one-line error", "test_resume_from_a_payload_checkpoint_is_refused")


def _evil_yaml(marker: Path) -> str:
    text = f'!!python/object/apply:os.system ["touch {marker}"]'
    yaml.unsafe_load(text)  # the payload is real: an unsafe loader runs it
    assert marker.exists()
    marker.unlink()
    return text


@pytest.mark.parametrize("kind", ["run-config", "sweep-spec"])
def test_yaml_with_a_python_object_tag_is_refused(train_dataset, tmp_path, capsys, kind):
    """Fault: a run config or sweep spec whose value is a ``!!python/object/apply:os.system`` tag.
    Recovery: one line naming the file and the tag; nothing runs, nothing is written."""
    marker = tmp_path / "pwned"
    tag = _evil_yaml(marker)
    if kind == "run-config":
        path = tmp_path / "evil.yaml"
        path.write_text(f"train:\n  steps: 4\nmodel: {tag}\n")
        argv = ["train", str(path), "--no-ray"]
    else:
        spec = write_sweep_spec(tmp_path, train_dataset, "http://127.0.0.1:9", "evil")
        path = spec.with_name("evil-spec.yaml")
        path.write_text(spec.read_text() + f"parallel: {tag}\n")
        argv = ["sweep", str(path)]
    before = set(tmp_path.iterdir())
    code, err, secs = cli(capsys, *argv)
    msg = one_error_line(err)
    assert code == 2 and msg.startswith(f"{path}: line ") and \
        "tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed" in msg
    assert not marker.exists() and set(tmp_path.iterdir()) == before
    record(f"YAML with a Python object tag ({kind})", "!!python/object/apply:os.system in the file",
           "one-line error naming the file and tag; the payload never runs", True, "nothing", secs,
           "seconds from the command's start to its one-line error",
           f"test_yaml_with_a_python_object_tag_is_refused[{kind}]")


def test_task_parameter_with_a_python_object_tag_is_refused(tmp_path, capsys):
    """Fault: a ``data synth -p`` value carrying a Python object tag. Recovery: one line naming the flag."""
    marker = tmp_path / "pwned"
    tag = _evil_yaml(marker)
    code, err, _ = cli(capsys, "data", "synth", "mqar", "--out", str(tmp_path / "x"), "--vocab-size", "512",
                       "-p", f"gap={tag}")
    assert code == 2 and one_error_line(err).startswith("--param 'gap=!!python/object/apply:os.system")
    assert not marker.exists() and not (tmp_path / "x").exists()


# ----- the sources: no unsafe loader, no shell ------------------------------------------------------------------

def _call_name(node: ast.Call) -> str:
    parts = []
    f = node.func
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    parts.append(f.id if isinstance(f, ast.Name) else "?")  # ?.eval(): a method on some value, not the builtin
    return ".".join(reversed(parts))


def _kw(node: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in node.keywords if k.arg == name), None)


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, what) for each call in ``source`` that could run code from a file or reach a shell."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        last = name.rsplit(".", 1)[-1]
        shell = _kw(node, "shell")
        if name.startswith("subprocess.") and not (shell is None or (isinstance(shell, ast.Constant)
                                                                     and shell.value is False)):
            found.append((node.lineno, f"{name}(shell=...)"))
        elif name in ("os.system", "os.popen", "eval", "exec", "yaml.load", "yaml.load_all", "yaml.unsafe_load",
                      "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all"):
            found.append((node.lineno, name))
        elif name == "torch.load":
            wo = _kw(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append((node.lineno, "torch.load without weights_only=True"))
        elif last in ("load", "loads") and name.split(".")[0] in ("pickle", "cloudpickle", "dill", "marshal"):
            found.append((node.lineno, name))
        elif name in ("np.load", "numpy.load"):
            ap = _kw(node, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                found.append((node.lineno, "np.load(allow_pickle=...)"))
    return found


def test_the_scan_finds_what_it_looks_for():
    """The scanner itself: every unsafe form is found, the safe forms are not."""
    bad = ("import os, subprocess, yaml, torch, pickle\n"
           "subprocess.run('ls', shell=True)\nos.system('ls')\nyaml.load(s)\nyaml.unsafe_load(s)\n"
           "torch.load(p)\ntorch.load(p, weights_only=False)\npickle.loads(b)\nnp.load(f, allow_pickle=True)\n")
    assert [what for _, what in unsafe_calls(bad)] == [
        "subprocess.run(shell=...)", "os.system", "yaml.load", "yaml.unsafe_load",
        "torch.load without weights_only=True", "torch.load without weights_only=True", "pickle.loads",
        "np.load(allow_pickle=...)"]
    good = ("model.eval()\nsubprocess.run(['ls'])\nsubprocess.Popen(cmd, shell=False)\nyaml.safe_load(s)\n"
            "torch.load(p, weights_only=True)\nnp.load(f, allow_pickle=False)\njson.loads(s)\n")
    assert unsafe_calls(good) == []


def test_no_unsafe_loader_or_shell_in_the_sources():
    """Every .py file of the platform (kernels, rattention, pipelines, sweeps, dashboards, benchmarks): no
    shell=True, os.system/popen, eval/exec, yaml.load/unsafe_load/full_load, pickle loads, torch.load without
    weights_only=True, or np.load allowing pickles. So no user string reaches a shell, and no file runs code."""
    t0 = time.perf_counter()
    files = [f for d in SOURCES if (ROOT / d).is_dir() for f in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 30
    hits = [f"{f.relative_to(ROOT)}:{line}: {what}" for f in files for line, what in unsafe_calls(f.read_text())]
    assert hits == [], hits
    record("unsafe loader or shell call in the sources", f"AST scan of {len(files)} source files",
           "none found", True, "nothing", time.perf_counter() - t0, "seconds of the scan",
           "test_no_unsafe_loader_or_shell_in_the_sources")
