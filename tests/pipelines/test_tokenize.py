"""The tokenize Ray job on a real local Ray: counts, checksums, idempotence, bad input, plain webdataset."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from tokenizers import Tokenizer

from pipelines.tokenize import (
    SplitWriter,
    bundles,
    doc_key,
    make_config,
    prepare,
    read_item,
    resolve_sources,
    split_of,
    stdlib_files,
    temp_folder,
    work_item,
)
from rattention.data import read_manifest, sha256_file
from rattention.errors import ConfigError, DataError

N_STDLIB = 24


@pytest.fixture(scope="module")
def stdlib_ds(ray_local, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("ds") / "stdlib"
    logs: list[str] = []
    cfg = make_config(out=out, max_files=N_STDLIB, vocab_size=600, shard_tokens=30_000, val_fraction=0.2,
                      num_cpus=2)
    prepare(cfg, log=logs.append)
    return out, logs


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mixed") / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "latin1.txt").write_bytes("caf\u00e9 ".encode("latin-1") + b"ol\xff\xfe and more text\n" * 3)
    (d / "empty.md").write_text("")
    (d / "blank.txt").write_text("  \n\n")
    (d / "sub" / "code.py").write_text("def f(x):\n    return x + 1\n" * 20)
    (d / "notes.md").write_text("# Title\n\nSome *markdown* text.\n")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    lines = [
        json.dumps({"text": "first record"}),
        json.dumps({"body": "no text field"}),
        "{not json",
        "",
        json.dumps({"text": "second record <|endoftext|> with a literal special token"}),
        json.dumps({"text": 42}),
    ]
    (d / "records.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"text": ["parquet row one", None, "parquet row three"]}), d / "rows.parquet")
    return d


def test_stdlib_manifest_counts_and_checksums(stdlib_ds):
    out, logs = stdlib_ds
    m = read_manifest(out)
    assert m["vocab_size"] == 600 and m["dtype"] == "uint16" and m["eos_id"] == 0
    assert m["tokenizer"]["sha256"] == sha256_file(out / "tokenizer.json")
    c = m["counts"]
    assert c["work_items"] == N_STDLIB
    assert c["documents"] + sum(c["skipped"].values()) == N_STDLIB
    assert c["documents"] == sum(m["splits"][s]["documents"] for s in ("train", "val"))
    assert c["tokens"] == sum(m["splits"][s]["tokens"] for s in ("train", "val"))
    assert len(m["splits"]["train"]["shards"]) >= 4  # shard_tokens is honoured
    for split in ("train", "val"):
        for shard in m["splits"][split]["shards"]:
            assert shard["file"].startswith(f"{split}-") and shard["file"].endswith(".tar")
            assert sha256_file(out / shard["file"]) == shard["sha256"]
    # no temp folders left behind, summary line printed
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    assert "documents" in logs[-1] and "tokens/s" in logs[-1]


def test_plain_webdataset_reads_the_tokenizer_tokens(stdlib_ds):
    """No project code: webdataset + the saved tokenizer give back each source file's tokens."""
    out, _ = stdlib_ds
    m = json.loads((out / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    cfg = make_config(out=out, max_files=N_STDLIB)
    items, _ = resolve_sources(cfg)
    by_key = {doc_key(it["id"]): it for it in items}
    urls = [str(out / s["file"]) for sp in m["splits"].values() for s in sp["shards"]]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        assert set(sample) >= {"__key__", "tokens.npy"} and "." not in sample["__key__"]
        arr = sample["tokens.npy"]
        assert arr.dtype == np.uint16
        it = by_key[sample["__key__"]]
        text = Path(it["path"]).read_text(encoding="utf-8", errors="replace")
        assert arr.tolist() == tok.encode(text, add_special_tokens=False).ids
        assert Path(sample["__url__"]).name.startswith(split_of(it["id"], 0.2) + "-")
        seen += 1
    assert seen == m["counts"]["documents"]


def test_rerun_is_a_noop(stdlib_ds):
    out, _ = stdlib_ds
    before = (out / "manifest.json").read_text()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    logs: list[str] = []
    cfg = make_config(out=out, max_files=N_STDLIB, vocab_size=600, shard_tokens=30_000, val_fraction=0.2)
    prepare(cfg, log=logs.append)
    assert "up to date" in logs[-1]
    assert (out / "manifest.json").read_text() == before
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes

    # a folder that is not a dataset is never overwritten
    (out.parent / "mine").mkdir()
    (out.parent / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a dataset"):
        prepare(make_config(out=out.parent / "mine", max_files=N_STDLIB))
    assert (out.parent / "mine" / "notes.txt").read_text() == "keep me"


def test_existing_tokenizer_gives_identical_tokens(stdlib_ds, tmp_path):
    out, _ = stdlib_ds
    cfg = make_config(out=tmp_path / "again", max_files=N_STDLIB, tokenizer=out / "tokenizer.json",
                      shard_tokens=30_000, val_fraction=0.2)
    m2 = prepare(cfg, log=lambda s: None)
    m1 = read_manifest(out)
    assert m2["tokenizer"]["sha256"] == m1["tokenizer"]["sha256"]
    for split in ("train", "val"):
        assert m2["splits"][split]["tokens"] == m1["splits"][split]["tokens"]
        # same inputs, same tokenizer: byte-identical shards (ordered Ray output, fixed tar mtime)
        assert [s["sha256"] for s in m2["splits"][split]["shards"]] == [
            s["sha256"] for s in m1["splits"][split]["shards"]
        ]


def test_mixed_folder_counts_bad_input(ray_local, mixed_folder, tmp_path):
    out = tmp_path / "mixed"
    m = prepare(make_config(out=out, sources=[str(mixed_folder)], vocab_size=300, val_fraction=0.0),
                log=lambda s: None)
    c = m["counts"]
    # documents: latin1.txt, code.py, notes.md, 2 jsonl records, 2 parquet rows
    assert c["documents"] == 7
    assert c["skipped"] == {"empty": 3, "missing_field": 3, "bad_json": 1}
    assert c["replaced_bytes"] == 3 * 2 + 1  # "\xff\xfe" per line, and the latin-1 "\xe9"
    assert c["documents_with_replaced_bytes"] == 1
    assert m["splits"]["val"]["documents"] == 0 and m["splits"]["train"]["documents"] == 7
    # a literal "<|endoftext|>" in text is encoded as text, so EOS never appears inside documents
    for sample in wds.WebDataset([str(out / s["file"]) for s in m["splits"]["train"]["shards"]],
                                 shardshuffle=False).decode():
        assert m["eos_id"] not in sample["tokens.npy"].tolist()
    # another config on the same folder rebuilds it (swapped in when complete); --force rebuilds anyway
    logs: list[str] = []
    m2 = prepare(make_config(out=out, sources=[str(mixed_folder)], vocab_size=300, val_fraction=0.5),
                 log=logs.append)
    assert "rebuilding" in logs[0] and logs[-1].startswith(f"prepared {out}")
    assert m2["fingerprint"] != m["fingerprint"] and m2["splits"]["val"]["documents"] > 0
    prepare(make_config(out=out, sources=[str(mixed_folder)], vocab_size=300, val_fraction=0.5, force=True),
            log=logs.append)
    assert logs[-1].startswith(f"prepared {out}")
    assert read_manifest(out)["fingerprint"] == m2["fingerprint"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "tokenizer.json"] + [s["file"] for sp in m2["splits"].values() for s in sp["shards"]]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["mixed"]  # no temp or old folders left


def test_one_line_errors(ray_local, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        prepare(make_config(out=tmp_path / "a", sources=[str(tmp_path / "missing")]))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.jsonl").write_text('{"other": 1}\n')
    with pytest.raises(DataError, match="no documents"):
        prepare(make_config(out=tmp_path / "b", sources=[str(empty)]), log=lambda s: None)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="vocab_size"):
        prepare(make_config(out=tmp_path / "c", sources=[str(empty)], vocab_size=100))
    with pytest.raises(ConfigError, match="val_fraction"):
        make_config(out=tmp_path / "d", val_fraction=1.5)


def test_hf_source_without_datasets_is_one_line(ray_local, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: ``import datasets`` fails
    with pytest.raises(DataError, match="'datasets' library is not installed"):
        prepare(make_config(out=tmp_path / "e", sources=["hf:wikitext"]))


def test_hf_source_through_datasets(ray_local, tmp_path, monkeypatch):
    """``hf:NAME`` loads through ``datasets`` (here a local folder, offline): rows become documents."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    pytest.importorskip("datasets")
    folder = tmp_path / "rows"
    folder.mkdir()
    texts = [f"row {i}: " + "word " * i for i in range(40)]
    rows = [{"body": t, "n": i} for i, t in enumerate(texts)] + [{"body": "  ", "n": -1}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = make_config(out=tmp_path / "out", sources=[f"hf:{folder}"], text_field="body", vocab_size=300,
                      val_fraction=0.0)
    m = prepare(cfg, log=lambda s: None)
    assert m["counts"]["documents"] == 40 and m["counts"]["skipped"] == {"empty": 1}
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    got = sorted(tok.decode(s["tokens.npy"].tolist()) for s in wds.WebDataset(
        [str(tmp_path / "out" / sh["file"]) for sh in m["splits"]["train"]["shards"]], shardshuffle=False
    ).decode())
    assert got == sorted(texts)
    logs: list[str] = []
    prepare(cfg, log=logs.append)
    assert logs and "up to date" in logs[-1]
    with pytest.raises(DataError, match="no column 'text'; columns: body, n"):
        prepare(make_config(out=tmp_path / "x", sources=[f"hf:{folder}"]), log=lambda s: None)


def test_interrupted_run_leaves_nothing_that_looks_complete(ray_local, mixed_folder, tmp_path, monkeypatch):
    def boom(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(SplitWriter, "finish", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(make_config(out=tmp_path / "ds", sources=[str(mixed_folder)], vocab_size=300),
                log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_temp_folders_of_killed_runs_are_removed(tmp_path):
    """A run killed outright leaves a hidden temp folder; the next run on that output removes it."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    stale, live = tmp_path / ".ds.tmp-dead0000", tmp_path / ".ds.tmp-live0000"
    for folder, pid in ((stale, dead), (live, os.getpid())):
        folder.mkdir()
        (folder / "train-000000.tar").write_bytes(b"partial")
        (folder / ".owner").write_text(f"{host}:{pid}")
    tmp = temp_folder(tmp_path / "ds")
    assert not stale.exists() and live.exists() and tmp.name.startswith(".ds.tmp-")
    assert (tmp / ".owner").read_text() == f"{host}:{os.getpid()}"


def test_stdlib_listing_excludes_tests_and_site_packages():
    files = stdlib_files()
    assert len(files) > 300
    parts = {p for f in files for p in f.parts}
    assert not parts & {"test", "tests", "site-packages", "idle_test"}
    assert sum(f.stat().st_size for f in files) > 8e6


def test_cli_error_is_one_line(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    r = subprocess.run(
        [sys.executable, "-m", "rattention.cli", "data", "prepare", str(tmp_path / "nope"), "--out",
         str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such file or folder"]


def test_dead_cluster_address_is_one_line_and_quick(tmp_path):
    """A --address where nothing listens fails at once, in one line (ray.init alone retries for minutes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed
    (tmp_path / "a.txt").write_text("some text\n")
    r = subprocess.run(
        [sys.executable, "-m", "rattention.cli", "data", "prepare", str(tmp_path / "a.txt"), "--out",
         str(tmp_path / "o"), "--address", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: address: nothing answers at '127.0.0.1:{port}'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("chunk", [1, 7, 30, 1000])
def test_jsonl_byte_ranges_partition_the_lines(tmp_path, chunk):
    """Any chunking of a jsonl file reads every line exactly once (a line goes to the range of its first byte)."""
    lines = [json.dumps({"text": "x" * n}) if n else "" for n in (3, 0, 17, 1, 40, 2, 0, 9)] + ["{bad"]
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(lines) + "\n")
    size = f.stat().st_size
    whole = read_item(work_item("jsonl", f, "r.jsonl"), "text", "text")
    parts = [read_item(work_item("jsonl", f, "r.jsonl", start=a, end=min(a + chunk, size)), "text", "text")
             for a in range(0, size, chunk)]
    assert [d for p in parts for d in p.docs] == whole.docs and len(whole.docs) == 6
    skipped: dict[str, int] = {}
    for p in parts:
        for k, v in p.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    assert skipped == whole.skipped == {"empty": 2, "bad_json": 1}


@pytest.mark.parametrize("n", [1, 3, 8, 40, 100])
def test_bundles_keep_order_and_balance_bytes(n):
    """Runs are contiguous, non-empty and in order; apart from the run holding an outsize file, their byte
    totals differ by at most two ordinary files."""
    rng = np.random.default_rng(n)
    items = [{"id": i, "size": int(s)} for i, s in enumerate(rng.integers(0, 50_000, size=40))]
    items[5]["size"] = 400_000  # one outsize file
    runs = bundles(items, n)
    assert [it["id"] for run in runs for it in run] == list(range(40))
    assert len(runs) == min(n, 40) and all(runs)
    totals = [sum(it["size"] for it in run) for run in runs]
    # a run with the outsize file may exceed the others by it; the rest stay within two ordinary files
    others = [t for t, run in zip(totals, runs, strict=True) if all(it["id"] != 5 for it in run)]
    if len(others) > 1:
        assert max(others) - min(others) <= 2 * 50_000
