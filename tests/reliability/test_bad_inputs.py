"""Bad inputs across the command line, run configs, sweep specs and data sources, as a user types them.

Each case must end in one line on stderr, ``error: ...``, that names the field, file or flag and what is
allowed; exit status 2; no traceback; and nothing written in the working folder (no run folder, MLflow
store, sweep folder or half-built dataset). Each is refused before any compute: no Ray, no training.

The commands run in-process through ``rattention.cli.main``, as the console script does, in a fresh
working folder per case that holds a file ``afile``, an empty folder ``emptydir``, a YAML file carrying a
Python object tag ``evil.yaml``, a run config ``cfg.yaml`` on a real tiny dataset, and a sweep spec
``spec.yaml`` over it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rattention.cli import main
from tests.conftest import tiny_run_config, write_sweep_spec

EVIL = "model: !!python/object/apply:os.system ['echo pwned']\n"
DEAD_URI = "http://127.0.0.1:9"  # the discard port: nothing answers

# (argv, text the error line must hold). CFG, SPEC and DS stand for the files the fixture writes.
CASES: list[tuple[list[str], str]] = [
    # ----- run configs (rattention train) -----
    (["train", "nope.yaml"], "nope.yaml: config file not found"),
    (["train", "CFG", "model.kindd=swa"], "model.kindd: unknown field (did you mean 'kind'?)"),
    (["train", "CFG", "model.kind=foo"], "model.kind: Input should be 'full', 'swa' or 'rattention'"),
    (["train", "CFG", "model.window=-1"], "model.window: must be >= 0"),
    (["train", "CFG", "model.n_heads=3"], "model.d_model: 32 must equal n_heads * head_dim"),
    (["train", "CFG", "model.feature_map=foo"], "model.feature_map: Input should be"),
    (["train", "CFG", "model.d_model=abc"], "model.d_model: Input should be a valid integer"),
    (["train", "CFG", "model.layout=LXG"], "model.layout: letters allowed: L (local), G (global)"),
    (["train", "CFG", "model.seq_len=0"], "model.seq_len: must be > 0"),
    (["train", "CFG", "model.vocab_size=10"], "model.vocab_size: must be >= the dataset's vocab size (64)"),
    (["train", "CFG", "model.rla_norm_init=abc"], "model.rla_norm_init: Input should be a valid number"),
    (["train", "CFG", "train.steps=0"], "train.steps: Input should be greater than 0"),
    (["train", "CFG", "train.steps=true"], "train.steps: must be a number, not a boolean"),
    (["train", "CFG", "train.compile=1"], "train.compile: must be true or false"),
    (["train", "CFG", "train.lr=abc"], "train.lr: Input should be a valid number"),
    (["train", "CFG", "train.lr=-1"], "train.lr: Input should be greater than 0"),
    (["train", "CFG", "train.warmup_steps=500"], "train.warmup_steps: must be <= train.steps"),
    (["train", "CFG", "data.batch_size=0"], "data.batch_size: Input should be greater than 0"),
    (["train", "CFG", "data.path=/nonexistent"], "data.path: /nonexistent"),
    (["train", "CFG", "data.path=afile"], "data.path: afile"),
    (["train", "CFG", "eval.tasks=[foo]"], "eval.tasks: unknown task 'foo'; allowed:"),
    (["train", "CFG", "eval.task_lengths=[0]"], "eval.task_lengths: must be positive multiples"),
    (["train", "CFG", "tracking.uri=notauri"], "tracking.uri: 'notauri' is not a tracking URI"),
    (["train", "CFG", f"tracking.uri={DEAD_URI}"], f"tracking.uri: no MLflow server answers at {DEAD_URI}"),
    (["train", "CFG", "ray.workers=0"], "ray.workers: Input should be greater than 0"),
    (["train", "CFG", "ray.address=notahost"], "ray.address: 'notahost' is not a Ray address"),
    (["train", "CFG", "ray.gpus_per_worker=1"], "ray.gpus_per_worker: 1 GPU per worker asked; this machine has no GPU"),
    (["train", "CFG", "lr=3"], "override 'lr=3': expected section.field=value"),
    (["train", "evil.yaml"], "evil.yaml: line 1: tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"),
    (["train", "CFG", "--no-ray", "train.out_dir=afile"], "train.out_dir: afile is a file"),
    (["train", "CFG", "--no-ray", "--run-dir", "afile"], "--run-dir: afile is a file"),
    (["train", "CFG", "--no-ray", "train.device=cuda"], "train.device: cuda asked; this machine has no GPU"),
    # ----- data prepare / data synth -----
    (["data", "prepare", "--out", "ds", "--vocab-size", "3"], "vocab_size: Input should be greater than or equal"),
    (["data", "prepare", "--out", "ds", "nosuchcorpus"], "nosuchcorpus: no such file or folder"),
    (["data", "prepare", "--out", "ds", "emptydir"], "emptydir: the folder holds no .txt/.md/.py/.jsonl/.parquet"),
    (["data", "prepare", "--out", "afile"], "afile: exists and is not a dataset"),
    (["data", "prepare", "--out", "ds", "--tokenizer", "afile"], "afile: not a tokenizers JSON file"),
    (["data", "prepare", "--out", "ds", "--shard-tokens", "0"], "shard_tokens: Input should be greater than 0"),
    (["data", "prepare", "--out", "ds", "--address", "notahost"], "address: 'notahost' is not a Ray address"),
    (["data", "synth", "foo", "--out", "ds"], "kind: must be one of"),
    (["data", "synth", "mqar", "--out", "ds", "--like", "/nonexistent"], "/nonexistent"),
    (["data", "synth", "mqar", "--out", "ds", "--vocab-size", "3"], "vocab_size: tasks need at least"),
    (["data", "synth", "mqar", "--out", "afile", "--vocab-size", "300"], "afile: exists and is not a dataset"),
    # ----- sweep specs (rattention sweep) -----
    (["sweep", "nope.yaml"], "nope.yaml: sweep spec not found"),
    (["sweep", "SPEC", "kindz=[swa]"], "kindz: unknown field (did you mean 'kinds'?)"),
    (["sweep", "SPEC", "grid.windows=[6]"], "grid.windows: window 6 is not on the block grid"),
    (["sweep", "SPEC", "kinds=[swa,foo]"], "kinds: unknown kind 'foo'"),
    (["sweep", "SPEC", "objective.metric=eval/bogus"], "objective.metric: unknown metric 'eval/bogus'"),
    (["sweep", "SPEC", "seeds=0"], "seeds: must be a count >= 1"),
    (["sweep", "SPEC", "parallel=0"], "parallel: Input should be greater than or equal to 1"),
    (["sweep", "SPEC", "parallel=true"], "parallel: must be a number, not a boolean"),
    (["sweep", "SPEC", "tolerance.kind=foo"], "tolerance.kind: Input should be 'absolute', 'relative' or 'spread'"),
    (["sweep", "SPEC", "resources.gpus=1"], "resources.gpus: trials ask for 1 GPU each; this machine has no GPU"),
    (["sweep", "SPEC", "out_dir=afile"], "out_dir: afile is a file"),
    (["sweep", "SPEC"], f"no MLflow server answers at {DEAD_URI}"),  # the spec's base config tracks there
    (["sweep", "evil.yaml"], "evil.yaml: line 1: tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"),
    # ----- eval, import-run, demo -----
    (["eval", "/nonexistent"], "/nonexistent: no such run folder or checkpoint"),
    (["eval", "afile"], "afile: not a readable checkpoint"),
    (["import-run", "/nonexistent"], "/nonexistent: not a run folder (no config.yaml)"),
    (["import-run", "emptydir"], "emptydir: not a run folder (no config.yaml)"),
    (["demo", "--profile", "bogus"], "Invalid value for '--profile'"),
    (["demo", "--workdir", "afile"], "--workdir: afile is a file"),
]


@pytest.fixture
def workdir(tmp_path, train_dataset, monkeypatch) -> Path:
    """A fresh working folder with the case's inputs; the environment points at no cluster or server."""
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the GPU cases hold on a GPU machine too
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "evil.yaml").write_text(EVIL)
    cfg = tiny_run_config(train_dataset, "ray.local_mode=true").to_dict()
    del cfg["model"]["nope_global"]
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    write_sweep_spec(tmp_path, train_dataset, DEAD_URI, "spec")
    return tmp_path


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workdir, capfd, argv, expected):
    argv = [{"CFG": "cfg.yaml", "SPEC": "spec.yaml"}.get(a, a) for a in argv]
    before = _tree(workdir)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    out, err = capfd.readouterr()
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert _tree(workdir) == before, f"written: {sorted(_tree(workdir) - before)}"

