"""The plain-torch training loop and its run folder: configs, loss going down, resume, NaN, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rattention import lifecycle
from rattention import metrics as M
from rattention.checkpoint import LocalCheckpointer
from rattention.config import ModelConfig
from rattention.errors import ConfigError, TrainingError
from rattention.faults import Faults
from rattention.logger import LaggedReadings
from rattention.model import LM
from rattention.optim import WarmupCosine, build_optimizer
from rattention.run_config import TrainConfig, dump_run_config, load_run_config
from rattention.rundir import RunDir
from rattention.train import train
from tests.conftest import interrupt_when_training, tiny_run_config, write_token_dataset

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_run_config(path)
    assert cfg.data.seq_len == cfg.model.seq_len


def test_at_least_one_config_shipped() -> None:
    assert any(p.name == "demo.yaml" for p in CONFIGS)


@pytest.mark.parametrize("override, field", [
    ("train.lr=-1", "train.lr:"), ("model.window=-3", "model.window:"), ("model.n_heads=3", "model.n_heads:"),
    ("train.bogus=1", "train.bogus: unknown field"), ("trian.lr=1", "trian: unknown field"),
    ("train.warmup_steps=10000", "train.warmup_steps:"), ("data.seq_len=7", "data.seq_len:"),
    ("eval.buckets=[0,9,3]", "eval.buckets:"), ("model.kind=gla", "model.kind:"), ("lr=3", "override 'lr=3'"),
])
def test_bad_field_is_one_line_naming_it(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_run_config(None, [override])
    msg = str(err.value)
    assert msg.startswith(field) and "\n" not in msg


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 3e-4\n  steps: 10\n  warmup_steps: 2\n")
    cfg = load_run_config(f, ["train.steps=20", "eval.tasks=[mqar,niah]", "tracking.uri=null"])
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 20 and cfg.eval.tasks == ["mqar", "niah"]
    assert cfg.flat()["train.steps"] == 20
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "missing.yaml")


def test_weight_decay_on_matrices_only() -> None:
    model = LM(ModelConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, kind="rattention"))
    decay, no_decay = build_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)].rsplit(".", 1)[-1] for p in decay["params"]}
    kept = {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {"norm_swa", "norm_rla"} <= kept and "weight" in kept  # RMSNorm weights
    assert not decayed & {"norm_swa", "norm_rla"}
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


def test_warmup_then_cosine() -> None:
    f = WarmupCosine(warmup=4, total=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.55)  # half way down the cosine
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


def test_local_run_trains_and_writes_run_folder(train_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_run_config(train_dataset, "train.steps=40")
    results = lifecycle.run(cfg, tmp_path / "run", progress=False)
    rd = RunDir(tmp_path / "run")
    rows = rd.metrics()
    losses = [r[M.TRAIN_LOSS] for r in rows if M.TRAIN_LOSS in r]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # from ~ln 64 = 4.16 well down
    assert rd.status()["status"] == "FINISHED" and rd.status()["step"] == 40
    assert rd.results() == json.loads(json.dumps(results))
    for key in (M.VAL_LOSS, M.val_loss_bucket(0, 8), M.val_loss_bucket(16, None), M.copy_loss(4),
                M.copy_loss(16), M.task_accuracy("mqar", 32), M.task_accuracy("mqar", 128), M.PARAMS,
                M.TRAIN_THROUGHPUT, M.DECODE_THROUGHPUT, M.PEAK_MEMORY, M.cache_bytes_at(32768)):
        assert key in results, key
    assert results[M.VAL_LOSS] < 3.5
    meta = rd.meta()
    assert meta["tags"][M.TAG_KIND] == "rattention" and meta["tags"][M.TAG_WINDOW] == "8"
    # checkpoints: the newest two, each loadable with weights_only=True and holding the whole state
    paths = LocalCheckpointer(rd.checkpoints).paths()
    assert [p.name for p in paths] == ["step_00000032.pt", "step_00000040.pt"]
    state = torch.load(paths[-1], weights_only=True)
    assert {"model", "optimizer", "scheduler", "loader", "rng", "step", "tokens", "config"} <= set(state)
    assert state["step"] == 40 and state["tokens"] == 40 * 4 * 32


def _copy_dataset(folder: Path) -> tuple[Path, list]:
    """A copy-task dataset (tokens + mask.npy) written per the data contract, 31 tokens a sample."""
    import webdataset as wds

    from rattention.data import read_manifest, sha256_file
    from rattention.tasks import TaskVocab, generate

    samples = list(generate("copy", TaskVocab(64, (0,)), 31, seed=5, start=0, stop=24, span=8, gap=4))
    docs = {"train": [s.tokens for s in samples], "val": [s.tokens for s in samples[:4]]}
    write_token_dataset(folder, docs, 64, 0)
    manifest = read_manifest(folder)
    for split, items in (("train", samples), ("val", samples[:4])):
        for i, shard in enumerate(manifest["splits"][split]["shards"]):  # rewrite the shards with the mask
            with wds.TarWriter(str(folder / shard["file"])) as w:
                for j, s in enumerate(items[i::2]):
                    w.write({"__key__": f"doc{i}_{j:05d}", "tokens.npy": s.tokens.astype("uint16"),
                             "mask.npy": s.mask.astype("uint8")})
            shard["sha256"] = sha256_file(folder / shard["file"])
    manifest["sample_fields"] = {"tokens.npy": "token ids", "mask.npy": "1 at answers"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, samples


def test_training_loss_covers_the_answers_only_on_a_masked_dataset(tmp_path: Path) -> None:
    import torch.nn.functional as F

    from rattention.data import loader_for

    folder, samples = _copy_dataset(tmp_path / "copy")
    by_tokens = {s.tokens.astype("uint16").tobytes(): s for s in samples}
    for answer_only in (None, False):
        cfg = tiny_run_config(folder, "train.steps=1", "train.warmup_steps=0", "model.seq_len=31", "eval.enabled=false",
                              f"data.answer_only={'null' if answer_only is None else 'false'}")
        _, result = train(cfg, progress=False)
        # the first step's loss, again by hand: the initial weights on the first batch, scored where the
        # task's own mask (not the loader's targets) says
        torch.manual_seed(cfg.train.seed)
        model = LM(cfg.model)
        inputs, targets = next(iter(loader_for(cfg, "train")))
        with torch.no_grad():
            logits = model(inputs).float()
        ce = F.cross_entropy(logits.transpose(1, 2), torch.where(targets < 0, 0, targets), reduction="none")
        keep = torch.zeros_like(ce, dtype=torch.bool)
        for row in range(len(inputs)):
            s = by_tokens[inputs[row].numpy().astype("uint16").tobytes()]  # one window: a sample and its EOS
            keep[row, torch.as_tensor(s.answer_pos) - 1] = True
        if answer_only is False:
            keep[:] = True
        assert result.losses[1] == pytest.approx(float(ce[keep].mean()), rel=1e-4)
        assert int(keep.sum()) == (8 if answer_only is None else 31) * len(inputs)


def test_resume_continues_the_same_curve(train_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_run_config(train_dataset, "train.steps=12", "train.checkpoint_every=4", "eval.enabled=false")
    lifecycle.run(cfg, tmp_path / "straight", progress=False)
    lifecycle.run(cfg, tmp_path / "resumed", stop_after=6, progress=False)
    assert RunDir(tmp_path / "resumed").status()["status"] == "RUNNING"  # preempted, resumable
    lifecycle.run(cfg, tmp_path / "resumed", progress=False)  # picks up its checkpoint at step 6
    straight = {r["step"]: r for r in RunDir(tmp_path / "straight").metrics()}
    resumed = {r["step"]: r for r in RunDir(tmp_path / "resumed").metrics()}
    assert max(resumed) == 12 and RunDir(tmp_path / "resumed").status()["status"] == "FINISHED"
    assert resumed[6][M.TRAIN_RESUMED_AT] == 6
    for step in range(1, 13):
        assert resumed[step][M.TRAIN_LOSS] == pytest.approx(straight[step][M.TRAIN_LOSS], rel=1e-5), step
    a = torch.load(LocalCheckpointer(tmp_path / "straight" / "checkpoints").paths()[-1], weights_only=True)
    b = torch.load(LocalCheckpointer(tmp_path / "resumed" / "checkpoints").paths()[-1], weights_only=True)
    assert a["loader"] == b["loader"] and a["tokens"] == b["tokens"] == 12 * 4 * 32
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_with_named_step(train_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_run_config(train_dataset, "train.steps=10")
    with pytest.raises(TrainingError, match=r"^step 3: loss is nan"):
        lifecycle.run(cfg, tmp_path / "run", faults=Faults(nan_at_step=3), progress=False)
    status = RunDir(tmp_path / "run").status()
    assert status["status"] == "FAILED" and status["error"].startswith("step 3: loss is nan")


def test_vocab_smaller_than_dataset_is_a_config_error(train_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_run_config(train_dataset, "model.vocab_size=16")
    with pytest.raises(ConfigError, match=r"^model.vocab_size: must be >= the dataset's vocab size \(64\)"):
        lifecycle.run(cfg, tmp_path / "run", progress=False)


def test_lagged_readings_keep_the_newest_queued() -> None:
    r = LaggedReadings()
    for step in (1, 2, 3):
        r.push(step, torch.tensor([float(step), 10.0 * step]))
    assert r.pop(keep=1) == [(1, [1.0, 10.0]), (2, [2.0, 20.0])]  # step 3 stays queued
    assert r.pop(keep=1) == []
    assert r.pop(keep=0) == [(3, [3.0, 30.0])]


def test_steady_tokens_per_s_skips_the_first_interval(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    rows = [(10, 1000, 100.0), (20, 2000, 500.0), (30, 3000, 250.0)]  # the first interval is the warm-up
    rd.metrics_path.write_text("".join(json.dumps({"step": s, M.TRAIN_TOKENS: t, M.TRAIN_TOKENS_PER_S: tps}) + "\n"
                                       for s, t, tps in rows))
    assert rd.steady_tokens_per_s() == pytest.approx(2000 / (1000 / 500 + 1000 / 250))
    rd.metrics_path.write_text(json.dumps({"step": 10, M.TRAIN_TOKENS: 1000, M.TRAIN_TOKENS_PER_S: 9.0}) + "\n")
    assert rd.steady_tokens_per_s() != rd.steady_tokens_per_s()  # NaN: one interval says nothing steady


def test_ctrl_c_marks_the_run_killed(train_dataset: Path, tmp_path: Path) -> None:
    cfg = tiny_run_config(train_dataset, "train.steps=100000", "train.checkpoint_every=8", "eval.enabled=false")
    dump_run_config(cfg, tmp_path / "config.yaml")
    run = tmp_path / "run"
    rc, err = interrupt_when_training(["-m", "rattention", "train", str(tmp_path / "config.yaml"), "--no-ray",
                                       "--run-dir", str(run)], run, after_step=9)
    assert rc == 130 and err.strip().splitlines()[-1].startswith("interrupted: run marked KILLED"), err
    status = RunDir(run).status()
    assert status["status"] == "KILLED" and status["step"] >= 9, status
    assert LocalCheckpointer(run / "checkpoints").load_latest()["step"] >= 8  # what a re-run resumes from
