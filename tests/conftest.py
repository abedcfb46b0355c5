"""Shared fixtures: a tiny tokenized dataset, a real MLflow server on 127.0.0.1, a local Ray.

Session-scoped so the whole suite pays each start-up once. Append new fixtures; keep these.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

TRAIN_VOCAB = 64
TRAIN_EOS = 0


def write_token_dataset(folder: Path, docs: dict[str, list[np.ndarray]], vocab_size: int, eos_id: int) -> Path:
    """A dataset folder per the data contract: manifest.json, tokenizer.json, {split}-{i:06d}.tar shards."""
    import webdataset as wds

    from rattention.data import FORMAT_VERSION, sha256_file

    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, items in docs.items():
        shards = []
        for i in range(2):  # two shards per split, so two ranks each get one
            name = f"{split}-{i:06d}.tar"
            part = items[i::2]
            with wds.TarWriter(str(folder / name)) as w:
                for j, toks in enumerate(part):
                    w.write({"__key__": f"doc{i}_{j:05d}", "tokens.npy": toks.astype(np.uint16)})
            shards.append({"file": name, "sha256": sha256_file(folder / name), "documents": len(part),
                           "tokens": int(sum(len(t) for t in part))})
        splits[split] = {"shards": shards, "documents": sum(s["documents"] for s in shards),
                         "tokens": sum(s["tokens"] for s in shards)}
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "test"}}))
    manifest = {"format_version": FORMAT_VERSION, "source": {"sources": ["synthetic test"]},
                "tokenizer": {"file": "tokenizer.json", "sha256": sha256_file(folder / "tokenizer.json")},
                "vocab_size": vocab_size, "eos_id": eos_id, "splits": splits,
                "fingerprint": "test-" + "0" * 59, "created": "2025-01-01T00:00:00Z"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


@pytest.fixture(scope="session")
def train_dataset(tmp_path_factory) -> Path:
    """Learnable synthetic documents over 64 ids: phrases from a small fixed set, repeated (loss drops fast)."""
    rng = np.random.default_rng(0)
    phrases = [rng.integers(1, TRAIN_VOCAB, size=rng.integers(4, 9)) for _ in range(12)]

    def doc() -> np.ndarray:
        return np.concatenate([phrases[k] for k in rng.integers(0, len(phrases), size=rng.integers(8, 30))])

    docs = {"train": [doc() for _ in range(200)], "val": [doc() for _ in range(40)]}
    return write_token_dataset(tmp_path_factory.mktemp("train_dataset"), docs, TRAIN_VOCAB, TRAIN_EOS)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """URI of a real MLflow server (SQLite backend) on 127.0.0.1, for the whole session."""
    from pipelines.tracking import local_server

    with local_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 4 logical CPUs (2 DDP workers plus room), shut down at the end."""
    import ray

    from pipelines.ray_utils import init_ray

    resources = init_ray(num_cpus=4, dashboard=True)  # as pipelines.train starts it
    yield resources
    ray.shutdown()


TINY_MODEL = ["model.vocab_size=64", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
              "model.head_dim=16", "model.n_layers=2", "model.layout=LG", "model.window=8", "model.seq_len=32"]


def tiny_run_config(dataset: Path, *overrides: str):
    """A run config of a 2-layer, d_model 32, T=32, w=8 model on ``dataset``: trains in about a second."""
    from rattention.run_config import load_run_config

    base = [f"data.path={dataset}", *TINY_MODEL, "data.batch_size=4", "train.steps=24", "train.lr=1e-2",
            "train.warmup_steps=2", "train.log_every=1", "train.checkpoint_every=8", "eval.buckets=[0,8,16]",
            "eval.val_batches=4", "eval.decode_tokens=8", "eval.copy_samples=4", "eval.tasks=[mqar]",
            "eval.task_samples=4", "ray.cpus_per_worker=1"]
    return load_run_config(None, [*base, *overrides])


def interrupt_when_training(cmd: list[str], run_dir: Path, after_step: int, env: dict[str, str] | None = None,
                            timeout: float = 180.0) -> tuple[int, str]:
    """Run ``cmd``, send it SIGINT (Ctrl-C) once ``run_dir`` has logged ``after_step``, and return its exit
    code and stderr. Fails the test if training never gets there."""
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from rattention.rundir import RunDir

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryFile("w+") as err:
        # SIGINT back to its default in the child: a shell's background job (and so a pytest started from
        # one) has SIGINT ignored, the child would inherit that, and Python would install no Ctrl-C handler.
        proc = subprocess.Popen([sys.executable, *cmd], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + timeout
            while not any(r["step"] >= after_step for r in RunDir(run_dir).metrics()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    err.seek(0)
                    raise AssertionError(f"training never reached step {after_step} (exit {proc.poll()}): "
                                         f"{err.read()[-2000:]}")
                time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
        err.seek(0)
        return rc, err.read()


def write_sweep_spec(tmp: Path, dataset: Path, uri: str, name: str, **fields) -> Path:
    """A sweep spec of the 2-layer T=32 model over windows 4, 8, 16 (every trial trains in about a second); the
    sweep tests and ``benchmarks/bench_sweep.py`` run it. ``fields`` override the spec's."""
    import yaml

    base = tmp / f"{name}-base.yaml"
    cfg = tiny_run_config(dataset, "train.steps=12", "train.checkpoint_every=6", "eval.tasks=[]",
                          "eval.decode_tokens=0", f"tracking.uri={uri}").to_dict()
    del cfg["model"]["nope_global"]  # resolved by kind per trial, as in a hand-written config
    base.write_text(yaml.safe_dump(cfg))
    spec = {"name": name, "base": str(base), "kinds": ["swa", "rattention"],
            "grid": {"windows": [4, 8, 16], "block": 4}, "objective": {"metric": "eval/val_loss_pos_16_end"},
            "tolerance": {"kind": "absolute", "value": 10.0}, "seeds": 2, "parallel": 2,
            "out_dir": str(tmp / "sweeps"), **fields}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
