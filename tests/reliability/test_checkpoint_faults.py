"""Fault injection: a checkpoint written half-way (issue 14, item 8).

A training process (``rattention.lifecycle.run``, as ``rattention train --no-ray`` runs it) is killed while
it saves its step-8 checkpoint: half the file is on disk when ``os._exit`` ends it, or when the test sends
it SIGKILL. The recovery expected: the half-written file is never loaded; the same run started again
resumes from the step-4 checkpoint, trains to the planned step 12, and its losses equal those of a run
that was never interrupted. A half file that does carry a checkpoint's final name (a copy that stopped) is
passed over the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rattention import lifecycle
from rattention import metrics as M
from rattention.checkpoint import LocalCheckpointer, is_complete, load_checkpoint
from rattention.rundir import RunDir
from tests.conftest import tiny_run_config
from tests.reliability.faultkit import ROOT, record

STEPS, EVERY, KILL_AT = 12, 4, 8
OVERRIDES = (f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "eval.enabled=false")

# The training process: torch.save is wrapped so that the save of step KILL_AT writes half its bytes into
# the checkpoint's file, flushes them to disk, and then the process dies (mode "exit": os._exit; mode
# "sigkill": it says so in a marker file and waits for the test's SIGKILL).
CHILD = r"""
import io, os, sys, time
from pathlib import Path
import torch
from rattention import lifecycle
from tests.conftest import tiny_run_config

dataset, run_dir, kill_step, mode, marker = sys.argv[1:6]
real_save = torch.save

def dying_save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("step") == int(kill_step):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        if mode == "exit":
            os._exit(3)
        Path(marker).write_text(str(os.getpid()))
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)

torch.save = dying_save
cfg = tiny_run_config(Path(dataset), *sys.argv[6:])
lifecycle.run(cfg, run_dir, progress=False)
"""


@pytest.fixture(scope="module")
def straight(train_dataset, tmp_path_factory) -> dict[int, float]:
    """The losses of the same run, never interrupted."""
    run = tmp_path_factory.mktemp("straight") / "run"
    lifecycle.run(tiny_run_config(train_dataset, *OVERRIDES), run, progress=False)
    return {r["step"]: r[M.TRAIN_LOSS] for r in RunDir(run).metrics()}


def _kill_during_save(dataset: Path, run: Path, mode: str) -> None:
    """Start training in a subprocess and let it die during the save of step KILL_AT."""
    marker = run.parent / "in-save"
    cmd = [sys.executable, "-c", CHILD, str(dataset), str(run), str(KILL_AT), mode, str(marker), *OVERRIDES]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if mode == "sigkill":
            deadline = time.monotonic() + 240
            while not marker.exists():
                assert proc.poll() is None, f"the trainer exited before the save: {proc.stderr.read()[-2000:]}"
                assert time.monotonic() < deadline, "the trainer never reached the save of step 8"
                time.sleep(0.1)
            partial = run / "checkpoints" / f"step_{KILL_AT:08d}.pt.tmp"
            assert partial.stat().st_size > 0  # the kill lands with half a checkpoint on disk
            os.kill(proc.pid, signal.SIGKILL)
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == (-signal.SIGKILL if mode == "sigkill" else 3), proc.stderr.read()[-2000:]


def _assert_resumed_from_4(run: Path, straight: dict[int, float]) -> None:
    rd = RunDir(run)
    rows = {r["step"]: r for r in rd.metrics()}
    assert rows[EVERY][M.TRAIN_RESUMED_AT] == EVERY  # the step-4 checkpoint, not the half-written step 8
    assert rd.status()["status"] == "FINISHED" and rd.status()["step"] == STEPS
    for step in range(1, STEPS + 1):
        assert rows[step][M.TRAIN_LOSS] == pytest.approx(straight[step], rel=1e-5), step
    ckpt = LocalCheckpointer(rd.checkpoints)
    assert [p.name for p in ckpt.named()] == ["step_00000008.pt", "step_00000012.pt"]  # nothing else left
    assert not list(rd.checkpoints.glob("*.tmp"))
    assert all(is_complete(p) for p in ckpt.named()) and load_checkpoint(ckpt.named()[-1])["step"] == STEPS


@pytest.mark.parametrize("mode", ["exit", "sigkill"])
def test_process_killed_during_a_checkpoint_save(train_dataset, tmp_path, straight, mode):
    """Fault: the trainer dies (os._exit, or SIGKILL from outside) with half of its step-8 checkpoint
    written. Recovery: that file is never loaded; restarted, the run resumes from step 4 and ends at step 12
    with the losses of an uninterrupted run."""
    run = tmp_path / "run"
    _kill_during_save(train_dataset, run, mode)
    rd = RunDir(run)
    assert [p.name for p in LocalCheckpointer(rd.checkpoints).named()] == ["step_00000004.pt"]
    assert (rd.checkpoints / "step_00000008.pt.tmp").is_file()  # the half file, under its temporary name
    assert rd.status()["status"] == "RUNNING"  # a dead process set nothing; the folder claims no result
    t0 = time.perf_counter()
    lifecycle.run(tiny_run_config(train_dataset, *OVERRIDES), run, progress=False)
    secs = time.perf_counter() - t0
    _assert_resumed_from_4(run, straight)
    how = "os._exit" if mode == "exit" else "SIGKILL"
    record(f"checkpoint half-written ({how} during the save)",
           f"{how} after half of the step-8 checkpoint was written and flushed",
           "half file never loaded; restart resumes from step 4, ends at step 12, same losses", True,
           "no state; 4 of 12 steps recomputed (5-8)", secs,
           "seconds of the restarted run, in-process, to its finish at step 12",
           f"test_process_killed_during_a_checkpoint_save[{mode}]")


def test_incomplete_file_under_a_checkpoint_name_is_passed_over(train_dataset, tmp_path, straight, capfd):
    """Fault: half of a checkpoint under a final name, step_00000010.pt (a copy that stopped; the atomic save
    never leaves one). Recovery: resume passes over it with a warning line and takes step 8; the run ends at
    step 12 with the losses of an uninterrupted run, and the incomplete file is removed."""
    cfg = tiny_run_config(train_dataset, *OVERRIDES)
    run = tmp_path / "run"
    lifecycle.run(cfg, run, stop_after=KILL_AT, progress=False)  # preempted after the step-8 checkpoint
    ckpts = RunDir(run).checkpoints
    whole = (ckpts / "step_00000008.pt").read_bytes()
    (ckpts / "step_00000010.pt").write_bytes(whole[: len(whole) // 2])
    assert not is_complete(ckpts / "step_00000010.pt")
    capfd.readouterr()
    t0 = time.perf_counter()
    lifecycle.run(cfg, run, progress=False)
    secs = time.perf_counter() - t0
    err = capfd.readouterr().err
    assert f"warning: {ckpts / 'step_00000010.pt'}: incomplete checkpoint (no zip directory), passed over" in err
    rows = {r["step"]: r for r in RunDir(run).metrics()}
    assert rows[KILL_AT][M.TRAIN_RESUMED_AT] == KILL_AT
    for step in range(1, STEPS + 1):
        assert rows[step][M.TRAIN_LOSS] == pytest.approx(straight[step], rel=1e-5), step
    assert [p.name for p in LocalCheckpointer(ckpts).named()] == ["step_00000008.pt", "step_00000012.pt"]
    record("checkpoint file cut short under its final name", "half of step 8's file written as step_00000010.pt",
           "passed over with a warning; resume from step 8, ends at step 12, same losses", True,
           "nothing (the preempted run had checkpointed step 8)", secs,
           "seconds of the resumed run, in-process, to its finish at step 12",
           "test_incomplete_file_under_a_checkpoint_name_is_passed_over")


def test_a_torn_last_metrics_line_is_passed_over(tmp_path):
    """Fault: the process died (or the disk filled) half-way through appending a metrics line. Recovery:
    the run folder still reads; the rows before it stand, and a torn line elsewhere is one line naming it."""
    from rattention.errors import DataError
    from rattention.rundir import RunDir

    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    rd.metrics_path.write_text('{"step": 1, "train/loss": 4.0}\n{"step": 2, "train/loss": 3.5}\n{"step": 3, "tr')
    assert [r["step"] for r in rd.metrics()] == [1, 2] and rd.last_step() == 2
    rd.metrics_path.write_text('{"step": 1, "tr\n{"step": 2, "train/loss": 3.5}\n')
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        rd.metrics()


def test_an_incomplete_ray_train_checkpoint_is_passed_over(tmp_path):
    """Fault: a Ray Train checkpoint folder whose state.pt was cut short. Recovery: resume picks the newest
    complete one."""
    import torch

    from rattention.rundir import RunDir

    rd = RunDir(tmp_path / "run")
    good = rd.ray_storage / "trial" / "checkpoint_2026-01-01_00-00-01" / "state.pt"
    bad = rd.ray_storage / "trial" / "checkpoint_2026-01-01_00-00-02" / "state.pt"
    for p in (good, bad):
        p.parent.mkdir(parents=True)
    torch.save({"step": 4}, good)
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    assert rd.latest_checkpoint() == good
