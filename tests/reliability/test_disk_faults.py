"""Fault injection: a read-only output folder and a disk that fills up (issue 14, item 9).

The folders are real mounts: a read-only tmpfs, and a tmpfs sized to fill up part-way through a run or a
dataset build. (Tests run as root here, where a chmod would not stop a write; without the right to mount,
the tests skip and say so.) The recovery expected: one line naming the path, exit status 2, before any
compute where the fault is there from the start; nothing left that looks complete; and, once space is
freed, the same command carries on from the last complete checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from rattention import lifecycle
from rattention import metrics as M
from rattention.checkpoint import LocalCheckpointer, is_complete, load_checkpoint
from rattention.rundir import RunDir
from tests.conftest import tiny_run_config
from tests.reliability.faultkit import cli, one_error_line, record, remount, tmpfs, write_corpus

PAGE = 4096
OVERRIDES = ("train.steps=12", "train.checkpoint_every=4", "eval.enabled=false")


def _config(tmp_path: Path, dataset: Path, out_dir: Path, name: str = "run.yaml") -> Path:
    cfg = tiny_run_config(dataset, *OVERRIDES, f"train.out_dir={out_dir}")
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def _pages(folder: Path) -> int:
    """Bytes a tmpfs gives the files under ``folder``: whole pages per file."""
    return sum(-(-f.stat().st_size // PAGE) * PAGE for f in folder.rglob("*") if f.is_file())


@pytest.mark.parametrize("where", ["train.out_dir", "--run-dir"])
def test_read_only_output_folder(train_dataset, tmp_path, capsys, where):
    """Fault: the run's folder is on a read-only filesystem. Recovery: one line naming the path, exit 2,
    before any training."""
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        cfg = _config(tmp_path, train_dataset, ro / "runs" if where == "train.out_dir" else tmp_path / "runs")
        extra = ["--run-dir", str(ro / "run")] if where == "--run-dir" else []
        code, err, secs = cli(capsys, "train", str(cfg), *extra, "--no-ray")
        msg = one_error_line(err)
        assert code == 2 and msg.startswith(str(ro)) and msg.endswith("(Read-only file system)"), msg
        assert not (tmp_path / "runs").exists()
    record(f"read-only output folder ({where})", "the run folder on a read-only tmpfs mount",
           "one-line error naming the path, before training", True, "nothing: refused before training", secs,
           "seconds from the command's start to its one-line error", f"test_read_only_output_folder[{where}]")


def test_read_only_dataset_folder(tmp_path, capsys):
    """Fault: ``data prepare --out`` on a read-only filesystem. Recovery: one line naming the folder, exit 2,
    before the tokenizer is trained or Ray started."""
    corpus = write_corpus(tmp_path / "corpus", documents=6)
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        code, err, secs = cli(capsys, "data", "prepare", str(corpus), "--out", str(ro / "ds"), "--vocab-size", "300")
        assert code == 2 and one_error_line(err) == f"{ro}: cannot write the dataset here (Read-only file system)"
    record("read-only dataset folder (data prepare --out)", "--out on a read-only tmpfs mount",
           "one-line error naming the folder, before tokenizing", True, "nothing: refused before tokenizing",
           secs, "seconds from the command's start to its one-line error", "test_read_only_dataset_folder")


def test_disk_fills_up_during_training(train_dataset, tmp_path, capsys):
    """Fault: the run folder's filesystem fills up at the step-8 checkpoint (a tmpfs with room for one
    checkpoint and a half). Recovery: one line naming the checkpoint's path, exit 2; the run is FAILED, with
    no results, no temporary file and only complete checkpoints; with space freed, the same command resumes
    from step 4 and finishes at step 12."""
    # size the tmpfs from the same run's folder at its first checkpoint, measured on the ordinary disk
    probe = tmp_path / "probe"
    lifecycle.run(tiny_run_config(train_dataset, *OVERRIDES), probe, stop_after=4, progress=False)
    ckpt = (probe / "checkpoints" / "step_00000004.pt").stat().st_size
    size = _pages(probe) + ckpt // 2 + 4 * PAGE
    with tmpfs(tmp_path / "small", str(size)) as small:
        cfg = _config(tmp_path, train_dataset, small / "runs")
        code, err, _ = cli(capsys, "train", str(cfg), "--no-ray")
        msg = one_error_line(err)
        (run,) = (small / "runs").iterdir()
        rd = RunDir(run)
        assert code == 2 and msg == (f"{rd.checkpoints / 'step_00000008.pt'}: cannot write the checkpoint "
                                     "(No space left on device)")
        assert rd.status()["status"] == "FAILED" and rd.status()["error"] == msg
        assert not rd.results_path.exists() and not list(run.rglob("*.tmp"))
        kept = LocalCheckpointer(rd.checkpoints).named()
        assert [p.name for p in kept] == ["step_00000004.pt"] and all(is_complete(p) for p in kept)
        assert load_checkpoint(kept[0])["step"] == 4
        remount(small, "16m")  # the user frees space
        code, err, secs = cli(capsys, "train", str(cfg), "--no-ray")
        assert code == 0, err
        rows = {r["step"]: r for r in rd.metrics()}
        assert rows[4][M.TRAIN_RESUMED_AT] == 4 and rd.status()["status"] == "FINISHED" and rd.status()["step"] == 12
    record("disk full during training", f"run folder on a {size // 1024} KiB tmpfs: full at the step-8 checkpoint",
           "one-line error naming the checkpoint path; FAILED, nothing complete-looking; resumes after freeing "
           "space", True, "no state; 4 of 12 steps recomputed (5-8)", secs,
           "seconds of the re-run command (space freed), in-process, to its finish at step 12",
           "test_disk_fills_up_during_training")


def test_disk_fills_up_during_data_prepare(ray_local, tmp_path, capsys):
    """Fault: ``data prepare --out`` on a 40 KiB tmpfs, which fills up while the shards are written.
    Recovery: one line naming the dataset folder, exit 2, nothing published and no temporary folder left;
    with space freed, the same command builds the dataset."""
    corpus = write_corpus(tmp_path / "corpus")
    with tmpfs(tmp_path / "small", "40k") as small:
        out = small / "ds"
        argv = ["data", "prepare", str(corpus), "--out", str(out), "--vocab-size", "300", "--shard-tokens", "1500"]
        code, err, _ = cli(capsys, *argv)
        assert code == 2 and one_error_line(err) == (f"{out}: cannot write the dataset (No space left on device); "
                                                     "nothing was published")
        assert list(small.iterdir()) == []  # neither the dataset nor its temporary folder
        remount(small, "16m")
        t0 = time.perf_counter()
        code, err, _ = cli(capsys, *argv)
        secs = time.perf_counter() - t0
        assert code == 0, err
        assert (out / "manifest.json").is_file() and len(list(out.glob("train-*.tar"))) > 1
    record("disk full during data prepare", "--out on a 40 KiB tmpfs, full while shards are written",
           "one-line error naming the folder; nothing published; rebuilds after freeing space", True,
           "nothing (the build is redone from the corpus)", secs,
           "seconds of the re-run data prepare (space freed, Ray up)", "test_disk_fills_up_during_data_prepare")
