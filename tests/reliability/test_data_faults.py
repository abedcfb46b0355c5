"""Fault injection: the data fails (issue 14, item 6).

Each test damages a real dataset (made by ``rattention data prepare``) the way a disk, a copy or a bad tool
would, runs ``rattention train`` on it as a user would, and asserts the recovery: one line naming the file,
exit status 2, before training starts (no run folder, no MLflow run). Checksums are verified by default;
``data.verify_checksums=false`` skips that read, and the faults a stat or the loader still catch are
tested that way too.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from rattention.data import sha256_file
from rattention.errors import DataError
from rattention.rundir import RunDir
from tests.reliability.faultkit import (
    cli,
    copy_dataset,
    manifest_of,
    one_error_line,
    prepare_dataset,
    record,
    run_config_file,
    write_corpus,
    write_manifest,
)

REFUSED = "nothing: refused before training (no run folder, no MLflow run)"
DETECT = "seconds from the command's start to its one-line error"


@pytest.fixture(scope="module")
def dataset(ray_local, tmp_path_factory) -> Path:
    """A tokenized dataset: 300-token BPE, 12 train and 6 val shards."""
    root = tmp_path_factory.mktemp("data_faults")
    prepare_dataset(root / "ds", write_corpus(root / "corpus"))
    return root / "ds"


def _fresh(dataset: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the dataset to damage, and a run config over it."""
    ds = copy_dataset(dataset, tmp_path / "ds")
    return ds, run_config_file(tmp_path, ds)


def _refused(capsys, cfg: Path, *overrides: str) -> tuple[str, float]:
    code, err, secs = cli(capsys, "train", str(cfg), *overrides, "--no-ray")
    assert code == 2, err
    return one_error_line(err), secs


def _no_run(tmp_path: Path) -> None:
    assert not (tmp_path / "runs").exists(), "a run folder was created for a refused dataset"


def test_shard_with_512_bytes_overwritten_inside(dataset, tmp_path, capsys):
    """Fault: 512 bytes in the middle of a shard replaced by random bytes (same size, valid names).
    Recovery: the default checksum verification refuses it, naming the shard, before training."""
    ds, cfg = _fresh(dataset, tmp_path)
    shard = ds / "train-000005.tar"
    raw = bytearray(shard.read_bytes())
    raw[2048:2560] = np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes()
    shard.write_bytes(bytes(raw))
    assert shard.stat().st_size == manifest_of(ds)["splits"]["train"]["shards"][5]["bytes"]  # only a read finds it
    msg, secs = _refused(capsys, cfg)
    assert msg == f"{shard}: corrupt shard, sha256 differs from the manifest"
    _no_run(tmp_path)
    record("shard corrupt (512 bytes overwritten inside)", "overwrite bytes 2048-2559 of a train shard",
           "one-line error naming the shard, before training", True, REFUSED, secs, DETECT,
           "test_shard_with_512_bytes_overwritten_inside")


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "checksums-skipped"])
def test_truncated_shard(dataset, tmp_path, capsys, verify):
    """Fault: a shard cut to half its length (a copy that stopped). Recovery: refused naming the shard,
    with or without checksum verification (its size is checked against the manifest either way)."""
    ds, cfg = _fresh(dataset, tmp_path)
    shard = ds / "val-000002.tar"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    msg, secs = _refused(capsys, cfg, "eval.enabled=true", *([] if verify else ["data.verify_checksums=false"]))
    assert msg == f"{shard}: corrupt shard, {size // 2} bytes where the manifest says {size} (truncated)"
    _no_run(tmp_path)
    record(f"shard truncated ({'checksums verified' if verify else 'checksums skipped'})",
           "a val shard cut to half its length", "one-line error naming the shard, before training", True,
           REFUSED, secs, DETECT, f"test_truncated_shard[{verify}]")


def test_shard_missing_from_disk(dataset, tmp_path, capsys):
    """Fault: a shard listed in the manifest deleted. Recovery: refused naming it, before training."""
    ds, cfg = _fresh(dataset, tmp_path)
    shard = ds / "train-000011.tar"
    shard.unlink()
    msg, secs = _refused(capsys, cfg, "data.verify_checksums=false")
    assert msg == f"{shard}: shard listed in the manifest is missing"
    _no_run(tmp_path)
    record("shard missing from disk", "a train shard deleted", "one-line error naming the shard, before training",
           True, REFUSED, secs, DETECT, "test_shard_missing_from_disk")


def _rewrite_with_id(shard: Path, token_id: int) -> str:
    """Rewrite ``shard`` with its first document's 4th token set to ``token_id`` and return that document's
    key; the manifest is then updated to the new sha256 and size, as a tool that wrote bad ids would."""
    members = []
    with tarfile.open(shard) as tf:
        for m in tf:
            members.append((m, tf.extractfile(m).read()))  # type: ignore[union-attr]
    first = next(m for m, _ in members if m.name.endswith(".tokens.npy"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for m, data in members:
            if m is first:
                toks = np.load(io.BytesIO(data))
                toks[3] = token_id
                b = io.BytesIO()
                np.save(b, toks)
                data = b.getvalue()
                m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())
    return first.name.split(".")[0]


def _fix_manifest(ds: Path, split: str, index: int) -> None:
    manifest = manifest_of(ds)
    entry = manifest["splits"][split]["shards"][index]
    entry["sha256"], entry["bytes"] = sha256_file(ds / entry["file"]), (ds / entry["file"]).stat().st_size
    write_manifest(ds, manifest)


def test_token_ids_beyond_the_vocab(dataset, tmp_path, capsys):
    """Fault: a shard whose manifest entry is consistent (sha256, size) but one of whose documents holds
    id 300 = vocab_size (a tool that wrote bad ids). Recovery: the verification read refuses it naming the
    shard and document, before training; with checksums skipped, the loader refuses the document when it
    reads it (one line, run FAILED), never an embedding IndexError."""
    ds, cfg = _fresh(dataset, tmp_path)
    shard = ds / "train-000002.tar"
    key = _rewrite_with_id(shard, 300)
    _fix_manifest(ds, "train", 2)
    msg, secs = _refused(capsys, cfg)
    assert msg == f"{shard}: document {key!r} holds token id 300, outside the manifest's vocab_size 300"
    _no_run(tmp_path)
    record("token ids beyond the vocab", "one id set to vocab_size in a shard, manifest sha256 made to match",
           "one-line error naming the shard and document, before training", True, REFUSED, secs, DETECT,
           "test_token_ids_beyond_the_vocab")
    # the same dataset with checksums skipped: the loader reads the document during training and stops
    code, err, _ = cli(capsys, "train", str(cfg), "data.verify_checksums=false", "train.steps=200", "--no-ray")
    assert code == 2 and one_error_line(err) == (f"{shard}: document {key!r} holds token id 300, outside the "
                                                 f"manifest's vocab_size 300")
    (run,) = (tmp_path / "runs").iterdir()
    assert RunDir(run).status()["status"] == "FAILED" and not RunDir(run).results_path.exists()


def test_manifest_checksum_mismatch(dataset, tmp_path, capsys):
    """Fault: the manifest's sha256 of a shard does not match the (intact) file. Recovery: refused naming the
    shard, before training. ``data.verify_checksums=false`` then trains (the skip is honoured), and a
    non-boolean value for it is refused rather than coerced."""
    ds, cfg = _fresh(dataset, tmp_path)
    manifest = manifest_of(ds)
    shards = manifest["splits"]["train"]["shards"]
    shards[7]["sha256"] = shards[6]["sha256"]
    write_manifest(ds, manifest)
    msg, secs = _refused(capsys, cfg)
    assert msg == f"{ds / shards[7]['file']}: corrupt shard, sha256 differs from the manifest"
    _no_run(tmp_path)
    record("manifest checksum mismatch", "a shard's sha256 in manifest.json replaced by another's",
           "one-line error naming the shard, before training", True, REFUSED, secs, DETECT,
           "test_manifest_checksum_mismatch")
    msg, _ = _refused(capsys, cfg, "data.verify_checksums=0")
    assert msg.startswith("data.verify_checksums: must be true or false, got 0")
    code, err, _ = cli(capsys, "train", str(cfg), "data.verify_checksums=false", "--no-ray")
    assert code == 0, err


def _other_tokenizer(path: Path, vocab: int) -> None:
    from pipelines.tokenize import train_tokenizer

    texts = [f"another corpus, line {i}: tokens of quite another kind {i * 31}" for i in range(200)]
    train_tokenizer(iter(texts), vocab).save(str(path))


def test_tokenizer_that_does_not_match_the_manifest(dataset, tmp_path, capsys):
    """Fault: tokenizer.json replaced by another tokenizer (280 tokens). Recovery: train refuses it naming
    the file, before training; and where the manifest's sha256 was edited to match, the vocabulary size
    still gives it away."""
    ds, cfg = _fresh(dataset, tmp_path)
    _other_tokenizer(ds / "tokenizer.json", 280)
    msg, secs = _refused(capsys, cfg, "data.verify_checksums=false")
    assert msg.startswith(f"{ds / 'tokenizer.json'}: does not match the manifest (sha256 differs)")
    manifest = manifest_of(ds)
    manifest["tokenizer"]["sha256"] = sha256_file(ds / "tokenizer.json")
    write_manifest(ds, manifest)
    msg, _ = _refused(capsys, cfg)
    assert msg == f"{ds / 'tokenizer.json'}: a vocabulary of 280 tokens, where the manifest says vocab_size 300"
    _no_run(tmp_path)
    record("tokenizer.json does not match the manifest", "tokenizer.json replaced by a 280-token tokenizer",
           "one-line error naming tokenizer.json, before training", True, REFUSED, secs, DETECT,
           "test_tokenizer_that_does_not_match_the_manifest")


def test_synth_like_keeps_tokenizer_and_vocab_together(dataset, tmp_path, capsys):
    """Fault: ``data synth --like`` given a contradicting --vocab-size, or a --like dataset whose tokenizer
    does not match its manifest. Recovery: each refused in one line before any Ray work, nothing written;
    a plain --like copies the tokenizer byte for byte with the vocab it belongs to."""
    out = tmp_path / "mqar"
    code, err, _ = cli(capsys, "data", "synth", "mqar", "--out", str(out), "--like", str(dataset),
                       "--vocab-size", "999", "--samples", "4", "--seq-len", "256")
    assert code == 2 and one_error_line(err) == (f"vocab_size: --like {dataset} sets the vocabulary (300 tokens), "
                                                 f"got --vocab-size 999; give one of the two")
    bad = copy_dataset(dataset, tmp_path / "bad")
    _other_tokenizer(bad / "tokenizer.json", 280)
    code, err, secs = cli(capsys, "data", "synth", "mqar", "--out", str(out), "--like", str(bad), "--samples", "4",
                          "--seq-len", "256")
    assert code == 2 and one_error_line(err).startswith(f"{bad / 'tokenizer.json'}: does not match the manifest")
    assert not out.exists() and not list(tmp_path.glob(".mqar.tmp-*"))
    code, err, _ = cli(capsys, "data", "synth", "mqar", "--out", str(out), "--like", str(dataset), "--samples", "4",
                       "--seq-len", "256", "--num-cpus", "1")
    assert code == 0, err
    made = manifest_of(out)
    assert made["vocab_size"] == 300 and made["tokenizer"]["sha256"] == manifest_of(dataset)["tokenizer"]["sha256"]
    assert sha256_file(out / "tokenizer.json") == sha256_file(dataset / "tokenizer.json")
    record("synth --like with a mismatched tokenizer", "--like a dataset whose tokenizer.json was replaced",
           "one-line error naming tokenizer.json, nothing written", True, "nothing: refused before any Ray work",
           secs, DETECT, "test_synth_like_keeps_tokenizer_and_vocab_together")


def test_corpus_too_small_for_a_validation_split(ray_local, tmp_path, capsys):
    """Fault: a corpus of 3 documents at val_fraction 0.05, so none falls in val. Recovery: data prepare says
    so in one warning line; a run that evaluates on val is refused before compute naming eval.enabled; one
    with evaluation off trains."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (corpus / name).write_text(f"a short document called {name}, said a few times over. " * 30)
    logs: list[str] = []
    from pipelines import tokenize

    tokenize.prepare(tokenize.make_config(out=tmp_path / "ds", sources=[str(corpus)], vocab_size=300,
                                          val_fraction=0.05), log=logs.append)
    assert manifest_of(tmp_path / "ds")["splits"]["val"]["documents"] == 0  # the fault: no val documents
    warnings = [ln for ln in logs if ln.startswith("warning: ")]
    assert len(warnings) == 1 and f"{tmp_path / 'ds'}: split 'val' is empty" in warnings[0], logs
    cfg = run_config_file(tmp_path, tmp_path / "ds")
    t0 = time.perf_counter()
    msg, _ = _refused(capsys, cfg, "eval.enabled=true")
    secs = time.perf_counter() - t0
    assert msg.startswith(f"eval.enabled: the run evaluates on split 'val' of {tmp_path / 'ds'}, which has no "
                          "documents")
    _no_run(tmp_path)
    code, err, _ = cli(capsys, "train", str(cfg), "eval.enabled=false", "train.steps=4", "--no-ray")
    assert code == 0, err
    record("corpus too small for a validation split", "3 documents at val_fraction 0.05",
           "a warning line at prepare; a run evaluating on val refused before compute", True, REFUSED, secs,
           DETECT, "test_corpus_too_small_for_a_validation_split")


def test_corrupt_shard_on_the_ray_path_fails_before_ray_train(dataset, tmp_path, ray_local, mlflow_server):
    """Fault: a corrupt shard, trained on Ray Train (``rattention train`` without --no-ray). Recovery: the
    driver refuses it before any Ray Train worker starts and before an MLflow run is created."""
    import mlflow

    from pipelines.train import fit
    from rattention.run_config import load_run_config

    ds, cfg_path = _fresh(dataset, tmp_path)
    shard = ds / "train-000000.tar"
    raw = bytearray(shard.read_bytes())
    raw[3000:3512] = bytes(512)
    shard.write_bytes(bytes(raw))
    cfg = load_run_config(cfg_path, [f"tracking.uri={mlflow_server}", "tracking.experiment=reliability-ray-data"])
    t0 = time.perf_counter()
    with pytest.raises(DataError) as err:
        fit(cfg, cfg_path, progress=False)
    secs = time.perf_counter() - t0
    assert str(err.value) == f"{shard}: corrupt shard, sha256 differs from the manifest"
    _no_run(tmp_path)
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("reliability-ray-data")
    assert exp is None or not client.search_runs([exp.experiment_id])
    record("shard corrupt, Ray Train path", "512 bytes zeroed inside a shard; rattention train on Ray",
           "one-line error naming the shard before Ray Train starts, no MLflow run", True,
           "nothing: no run folder, no MLflow run, no Ray Train worker", secs,
           "seconds from fit() to the error (Ray already up)",
           "test_corrupt_shard_on_the_ray_path_fails_before_ray_train")


def test_rows_are_json(tmp_path, monkeypatch):
    """The recorder writes one JSON object a line where asked, and nothing otherwise."""
    from tests.reliability import faultkit

    monkeypatch.delenv(faultkit.ROWS_ENV, raising=False)
    faultkit.record("f", "i", "e", True, "l", 0.5, "r", "t")  # no file named: nothing written
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setenv(faultkit.ROWS_ENV, str(rows))
    faultkit.record("f", "i", "e", True, "l", 0.5, "r", "t")
    assert [json.loads(x)["fault"] for x in rows.read_text().splitlines()] == ["f"]
