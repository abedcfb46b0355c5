"""The synth Ray job writes task instances in the shard format, with the answer mask where it belongs."""

from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds
from typer.testing import CliRunner

from pipelines import synth as synth_job
from pipelines import tokenize
from rattention.cli import app
from rattention.data import IGNORE_INDEX, PackedLoader, iter_samples, read_manifest, sha256_file
from rattention.errors import ConfigError
from rattention.tasks import TaskVocab, generate


def test_mqar_shards_match_the_generator(ray_local, tmp_path):
    out = tmp_path / "mqar"
    params = {"num_pairs": 8, "num_queries": 4, "gap": 100}
    cfg = synth_job.make_config(kind="mqar", out=out, samples=40, seq_len=256, seed=11, vocab_size=512,
                                params=params, shard_tokens=3000)
    m = synth_job.synth(cfg, log=lambda s: None)
    assert m["kind"] == "synthetic" and m["task"] == "mqar" and "mask.npy" in m["sample_fields"]
    shards = m["splits"]["test"]["shards"]
    assert len(shards) == 4 and m["counts"]["documents"] == 40 and m["counts"]["answer_tokens"] == 160
    assert all(sha256_file(out / s["file"]) == s["sha256"] for s in shards)
    expected = list(generate("mqar", TaskVocab(512, (0,)), 256, 11, 0, 40, **params))
    urls = [str(out / s["file"]) for s in shards]
    got = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == [f"mqar{i:09d}" for i in range(40)]
    for g, e in zip(got, expected, strict=True):
        assert g["tokens.npy"].dtype == np.uint16 and np.array_equal(g["tokens.npy"], e.tokens)
        mask = g["mask.npy"].astype(bool)
        assert np.array_equal(mask, e.mask)
        assert e.min_distance() > 100  # every answer beyond a 100-token window
    # same config again: a no-op
    logs: list[str] = []
    synth_job.synth(cfg, log=logs.append)
    assert "up to date" in logs[-1]


def test_niah_on_corpus_haystack_through_the_cli(ray_local, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"t{i}.txt").write_text(f"document {i} says something about topic {i * 7}.\n" * 40)
    like = tmp_path / "like"
    tokenize.prepare(tokenize.make_config(out=like, sources=[str(corpus)], vocab_size=400, val_fraction=0.3),
                     log=lambda s: None)
    out = tmp_path / "niah"
    r = CliRunner().invoke(app, ["data", "synth", "niah", "--out", str(out), "--samples", "6", "--seq-len",
                                 "1024", "--like", str(like), "--haystack", "corpus", "-p", "num_keys=3",
                                 "-p", "depth=0.2"])
    assert r.exit_code == 0, r.output
    m = read_manifest(out)
    assert m["vocab_size"] == read_manifest(like)["vocab_size"] and (out / "tokenizer.json").is_file()
    for s in iter_samples(out, "test"):
        answers = np.flatnonzero(s["mask"])
        assert len(answers) == 3 and answers.min() > 1000  # the query closes the sequence
        assert s["tokens"].max() < m["vocab_size"]


def test_copy_task_with_val_split_trains_on_answers_only(ray_local, tmp_path, train_dataset):
    out = tmp_path / "copy"
    cfg = synth_job.make_config(kind="copy", out=out, samples=12, val_samples=5, seq_len=40, seed=3, vocab_size=256,
                                split="train", params={"span": 16, "gap": 2})
    m = synth_job.synth(cfg, log=lambda s: None)
    assert m["splits"]["train"]["documents"] == 12 and m["splits"]["val"]["documents"] == 5
    assert m["counts"]["answer_tokens"] == 17 * 16
    vocab = TaskVocab(256, (0,))
    val = list(iter_samples(out, "val"))
    # the val split holds further instances (indices 12..16), none of the training ones
    assert [s["key"] for s in val] == [f"copy{i:09d}" for i in range(12, 17)]
    for s, e in zip(val, generate("copy", vocab, 40, 3, 12, 17, span=16, gap=2), strict=True):
        assert np.array_equal(s["tokens"], e.tokens) and np.array_equal(s["mask"].astype(bool), e.mask)

    # one sample fills one window (40 tokens + EOS): each target row keeps the copy's 16 answers only
    expected = list(generate("copy", vocab, 40, 3, 12, 17, span=16, gap=2))
    batches = list(PackedLoader(out, "val", seq_len=40, batch_size=5, infinite=False))
    (inputs, targets), = batches
    for row, e in enumerate(expected):
        assert np.array_equal(inputs[row].numpy(), e.tokens)
        keep = targets[row] != IGNORE_INDEX
        assert np.array_equal(np.flatnonzero(keep.numpy()) + 1, e.answer_pos)  # target t-1 scores token t
        assert np.array_equal(targets[row][keep].numpy(), e.tokens[e.answer_pos])
    # off, the same windows score every token (the EOS closing each sample too)
    (_, plain), = list(PackedLoader(out, "val", seq_len=40, batch_size=5, infinite=False, answer_only=False))
    assert (plain != IGNORE_INDEX).all() and (plain[:, -1] == 0).all()
    # windows that cut across samples carry each sample's mask with it
    (_, cut), = list(PackedLoader(out, "val", seq_len=60, batch_size=8, infinite=False))
    assert cut.shape == (4, 60)  # 205 tokens in windows of 61, the last one padded
    flat_t = cut.flatten()
    stream = np.concatenate([np.append(e.tokens, 0) for e in expected])
    scored = [k * 61 + t + 1 for k in range(4) for t in range(60) if cut[k, t] != IGNORE_INDEX]
    want = [41 * i + int(a) for i, e in enumerate(expected) for a in e.answer_pos]
    assert scored == want and np.array_equal(flat_t[flat_t != IGNORE_INDEX].numpy(), stream[want])
    # a dataset without a mask cannot be scored on answers
    with pytest.raises(ConfigError, match="data.answer_only: .* has no answer mask"):
        PackedLoader(train_dataset, "train", answer_only=True)
    assert not PackedLoader(train_dataset, "train").answer_only


def test_bad_task_parameters_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="param 'gapp': not a parameter of mqar"):
        synth_job.make_config(kind="mqar", out=tmp_path / "x", vocab_size=512, params={"gapp": 3})
    with pytest.raises(ConfigError, match="kind"):
        synth_job.make_config(kind="ruler", out=tmp_path / "x", vocab_size=512)
    with pytest.raises(ConfigError, match="vocab_size"):
        synth_job.make_config(kind="mqar", out=tmp_path / "x")
    with pytest.raises(ConfigError, match="val_samples: the main split is already named 'val'"):
        synth_job.make_config(kind="copy", out=tmp_path / "x", vocab_size=512, split="val", val_samples=4)
    cfg = synth_job.make_config(kind="mqar", out=tmp_path / "x", vocab_size=512, seq_len=32,
                                params={"num_pairs": 16, "gap": 64})
    with pytest.raises(ConfigError, match="seq_len"):
        synth_job.synth(cfg)
    assert not (tmp_path / "x").exists()
