"""The run lifecycle: content-addressed identity, a finished run is a no-op, a changed one is a new run."""

from __future__ import annotations

from pathlib import Path

import pytest

from rattention import lifecycle
from rattention.errors import ConfigError, DataError
from rattention.rundir import RunDir
from tests.conftest import tiny_run_config


def test_the_same_run_submitted_twice_trains_once(train_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_run_config(train_dataset, "train.steps=6", "eval.tasks=[]", f"train.out_dir={tmp_path}")
    first = lifecycle.run(cfg, progress=False)
    folders = list(tmp_path.iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("rattention-w8-s0-")
    second = lifecycle.run(cfg, progress=False)
    assert second == first and list(tmp_path.iterdir()) == folders
    assert RunDir(folders[0]).meta()["starts"] == 1  # trained once
    # where it is kept, tracked and logged is not part of the identity; what it computes is
    moved = cfg.model_copy(update={"train": cfg.train.model_copy(update={"log_every": 3})})
    assert lifecycle.run(moved, progress=False) == first
    other = tiny_run_config(train_dataset, "train.steps=6", "eval.tasks=[]", f"train.out_dir={tmp_path}",
                            "train.seed=1")
    lifecycle.run(other, progress=False)
    assert len(list(tmp_path.iterdir())) == 2


def test_identity_covers_config_data_and_code(train_dataset: Path) -> None:
    cfg = tiny_run_config(train_dataset)
    base = lifecycle.run_identity(cfg, "data-a", "code-a")
    assert lifecycle.run_identity(cfg, "data-a", "code-a") == base
    assert lifecycle.run_identity(cfg, "data-b", "code-a") != base
    assert lifecycle.run_identity(cfg, "data-a", "code-b") != base
    assert lifecycle.run_identity(tiny_run_config(train_dataset, "model.window=4"), "data-a", "code-a") != base
    assert lifecycle.run_identity(tiny_run_config(train_dataset, "tracking.experiment=x", "train.out_dir=y"),
                                  "data-a", "code-a") == base
    assert len(lifecycle.code_version()) == 16


def test_a_folder_holding_another_run_is_refused(train_dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    lifecycle.run(tiny_run_config(train_dataset, "train.steps=4", "eval.enabled=false"), run, progress=False)
    with pytest.raises(ConfigError, match=r"holds another run"):
        lifecycle.run(tiny_run_config(train_dataset, "train.steps=5", "eval.enabled=false"), run, progress=False)


def test_missing_dataset_and_file_as_folder_fail_before_training(train_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no manifest"):
        lifecycle.run(tiny_run_config(tmp_path / "nowhere"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"run folder path is a file"):
        lifecycle.run(tiny_run_config(train_dataset), tmp_path / "file", progress=False)
