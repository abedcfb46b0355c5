"""Ray job: tokenize a corpus into WebDataset shards (``rattention data prepare``).

The driver lists the inputs and trains (or loads) a byte-level BPE tokenizer. Ray Data then reads,
decodes and tokenizes the documents on an actor pool, one tokenizer per actor. The driver writes
the resulting stream into per-split shards in a temporary folder, and renames that folder into place
only once the manifest is written. Shards are written by the driver, not by Ray workers, because
the output folder is a local path of the machine that runs the job (on a cluster a worker's local
disk is somewhere else); tokenizing is the work that scales.

On a cluster (``--address`` or ``RAY_ADDRESS``) the actors open the input files by path, so the
inputs must be on storage every node sees (a shared filesystem, or the same image for ``stdlib``);
the output folder is written on the driver's machine.

Usable as ``ray job submit -- python -m rattention data prepare --out DIR ...``.
"""

from __future__ import annotations

import codecs
import errno
import glob
import hashlib
import io
import json
import os
import shutil
import socket
import sysconfig
import tarfile
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, ValidationError, field_validator

from pipelines.ray_utils import check_reachable, cluster_address
from rattention.data import FORMAT_VERSION, sha256_file
from rattention.errors import ConfigError, DataError, format_validation_error
from rattention.schema import Schema

EOS_TOKEN = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".md", ".py")
ALL_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
SPLITS = ("train", "val")
# OSErrors of a disk that refused a write: full, over quota, read-only, no permission
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
JSONL_CHUNK = 8 << 20  # bytes of a jsonl file per work item
# Work blocks. Each block is one run of work items (see ``bundles``) and one actor call. A block
# costs Ray Data a round trip (10-160 ms measured on 2 cores), so a small corpus gets few:
# BLOCKS_PER_ACTOR per actor, all queued on their actor at once. A large one gets blocks of about
# BLOCK_BYTES of input, so that the last block, which may run alone, stays short (~1 s of a core).
BLOCKS_PER_ACTOR = 4
BLOCK_BYTES = 4 << 20


class PrepareConfig(Schema):
    """Everything that decides the dataset's content (the fingerprint) plus how to run the job."""

    out: Path
    sources: list[str] = Field(default_factory=lambda: ["stdlib"])
    vocab_size: int = Field(8192, ge=257)  # 256 byte tokens + EOS at least
    tokenizer: Path | None = None
    tokenizer_sample_mb: float = Field(16.0, gt=0)
    eos_token: str = EOS_TOKEN
    text_field: str = "text"
    parquet_column: str = "text"
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    shard_tokens: int = Field(500_000, gt=0)
    max_files: int | None = Field(None, gt=0)
    # How to run: not part of the fingerprint.
    num_cpus: int | None = Field(None, gt=0)
    address: str | None = None
    force: bool = False

    @field_validator("sources")
    @classmethod
    def _some_source(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one source: 'stdlib', a path, a glob or hf:NAME")
        return v

    def content_fields(self) -> dict[str, Any]:
        """The fields that decide the output, as plain JSON values."""
        d = self.model_dump(mode="json", exclude={"out", "num_cpus", "address", "force", "tokenizer"})
        return d


def make_config(**kwargs: Any) -> PrepareConfig:
    """Validate keyword arguments into a config; one bad field becomes one ConfigError line."""
    try:
        return PrepareConfig(**kwargs)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


# ----- reading documents ------------------------------------------------------------------------

_replaced = [0]


def _count_and_replace(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _replaced[0] += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error("rattention_count", _count_and_replace)


def decode_bytes(raw: bytes) -> tuple[str, int]:
    """UTF-8 decode with U+FFFD for undecodable bytes; returns (text, number of bytes replaced)."""
    _replaced[0] = 0
    text = raw.decode("utf-8", errors="rattention_count")
    return text, _replaced[0]


@dataclass
class ReadResult:
    """Documents read from one work item, and what was skipped on the way."""

    docs: list[tuple[str, str, int]] = field(default_factory=list)  # (doc id, text, bytes replaced)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def read_item(item: dict[str, Any], text_field: str, parquet_column: str) -> ReadResult:
    """Read the documents of one work item: a text file, a jsonl file or a parquet row group."""
    res = ReadResult()
    kind, path, doc_id = item["kind"], item["path"], item["id"]
    if kind == "text":
        text, bad = decode_bytes(Path(path).read_bytes())
        if text.strip():
            res.docs.append((doc_id, text, bad))
        else:
            res.skip("empty")
    elif kind == "jsonl":
        # A byte range [start, end) of the file; a line belongs to the range holding its first byte.
        start, end = item.get("start", 0), item.get("end", -1)
        with open(path, "rb") as f:
            if start > 0:
                f.seek(start - 1)
                f.readline()
            pos = f.tell()
            while end < 0 or pos < end:
                raw = f.readline()
                if not raw:
                    break
                line_at, pos = pos, pos + len(raw)
                line, bad = decode_bytes(raw)
                if not line.strip():
                    res.skip("empty")
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    res.skip("bad_json")
                    continue
                value = rec.get(text_field) if isinstance(rec, dict) else None
                if not isinstance(value, str):
                    res.skip("missing_field")
                elif not value.strip():
                    res.skip("empty")
                else:
                    res.docs.append((f"{doc_id}@{line_at}", value, bad))
    elif kind == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetFile(path).read_row_group(item["row_group"], columns=[parquet_column])
        for i, value in enumerate(table.column(0).to_pylist()):
            row = item["row_offset"] + i
            if not isinstance(value, str):
                res.skip("missing_field")
            elif not value.strip():
                res.skip("empty")
            else:
                res.docs.append((f"{doc_id}:{row}", value, 0))
    else:  # pragma: no cover - work items are built in this module
        raise DataError(f"{path}: unknown work item kind {kind!r}")
    return res


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The standard library's ``*.py`` sources, tests and site-packages excluded, sorted."""
    files = []
    for folder, dirs, names in os.walk(stdlib_root()):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]  # prune: never walk site-packages
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files)


def _files_of(source: str, suffixes: tuple[str, ...]) -> tuple[list[Path], Path]:
    """Expand one path/folder/glob source into files, and the root their ids are relative to."""
    if glob.has_magic(source):
        matches = sorted(Path(p) for p in glob.glob(source, recursive=True))
        files = [p for p in matches if p.is_file() and p.suffix in suffixes]
        prefix = source.split("*")[0].split("?")[0].split("[")[0]
        root = Path(prefix) if prefix.endswith(os.sep) else Path(prefix).parent
        if not files:
            raise DataError(f"{source}: the glob matches no {'/'.join(suffixes)} file")
        return files, root
    p = Path(source)
    if not p.exists():
        raise DataError(f"{source}: no such file or folder")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
        if not files:
            raise DataError(f"{source}: the folder holds no {'/'.join(suffixes)} file")
        return files, p.parent
    if p.suffix not in suffixes:
        raise DataError(f"{source}: unsupported file type {p.suffix!r}; allowed: {', '.join(suffixes)}")
    return [p], p.parent


def work_item(
    kind: str, path: Path, doc_id: str, row_group: int = 0, row_offset: int = 0, start: int = 0, end: int = -1,
    size: int = 0,
) -> dict[str, Any]:
    """One unit of actor work: a text file, a jsonl byte range or a parquet row group (``size``: bytes)."""
    return {"kind": kind, "path": str(path), "id": doc_id, "row_group": row_group, "row_offset": row_offset,
            "start": start, "end": end, "size": size}


def bundles(items: list[dict[str, Any]], n: int) -> list[list[dict[str, Any]]]:
    """Cut ``items``, in order, into at most ``n`` non-empty runs of about equal bytes.

    Each run is one Ray Data block and one actor call. Cutting by bytes rather than by count keeps
    the pool's last block from being the one that happens to hold the largest files while the
    other actors idle. Runs stay in item order, so the shards' document order is the same whatever
    the number of runs (that is, whatever the cluster's size).
    """
    n = max(1, min(n, len(items)))
    runs: list[list[dict[str, Any]]] = [[]]
    left = sum(it["size"] for it in items)  # bytes of the current run and all later ones
    size = 0  # bytes of the current run
    for k, it in enumerate(items):
        # close the current run once this item would take it past an even share of what is left,
        # keeping one item for each run still to come
        share = left / (n - len(runs) + 1)
        if runs[-1] and len(runs) < n and (size + it["size"] / 2 > share or len(items) - k == n - len(runs)):
            runs.append([])
            left -= size
            size = 0
        runs[-1].append(it)
        size += it["size"]
    return runs


def work_blocks(items: list[dict[str, Any]], n_actors: int) -> list[str]:
    """The Ray Data blocks of a job on ``n_actors`` actors: runs of work items (``bundles``), as JSON."""
    total = sum(it["size"] for it in items)
    return [json.dumps(run) for run in bundles(items, max(BLOCKS_PER_ACTOR * n_actors, -(-total // BLOCK_BYTES)))]


def resolve_sources(cfg: PrepareConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Turn the configured sources into work items and a description (with sizes and mtimes).

    Raises DataError for a missing path, an empty match or a parquet file without the column.
    """
    items: list[dict[str, Any]] = []
    described: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for source in cfg.sources:
        if source.startswith("hf:"):
            raise DataError(f"{source}: Hugging Face sources cannot be mixed with file sources")
        if source == "stdlib":
            files, root = stdlib_files(), stdlib_root().parent
            if cfg.max_files is not None and len(files) > cfg.max_files:
                stride = len(files) / cfg.max_files
                files = [files[int(i * stride)] for i in range(cfg.max_files)]
        else:
            files, root = _files_of(source, ALL_SUFFIXES)
        desc: dict[str, Any] = {"source": source, "files": []}
        real_root = root.resolve()
        for f in files:
            rel = f.resolve().relative_to(real_root).as_posix()
            n = seen.get(rel, 0)
            seen[rel] = n + 1
            doc_id = rel if n == 0 else f"{rel}~{n}"
            st = f.stat()
            desc["files"].append([doc_id, st.st_size, st.st_mtime_ns])
            kind = {".jsonl": "jsonl", ".parquet": "parquet"}.get(f.suffix, "text")
            if kind == "parquet":
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(f)
                if cfg.parquet_column not in pf.schema_arrow.names:
                    raise DataError(
                        f"{f}: no column {cfg.parquet_column!r}; columns: {', '.join(pf.schema_arrow.names)}"
                    )
                offset = 0
                for rg in range(pf.num_row_groups):
                    items.append(work_item(kind, f, doc_id, row_group=rg, row_offset=offset,
                                           size=pf.metadata.row_group(rg).total_byte_size))
                    offset += pf.metadata.row_group(rg).num_rows
            elif kind == "jsonl":  # large files in byte ranges, so several actors share them
                items.extend(work_item(kind, f, doc_id, start=a, end=min(a + JSONL_CHUNK, st.st_size),
                                       size=min(JSONL_CHUNK, st.st_size - a))
                             for a in range(0, max(1, st.st_size), JSONL_CHUNK))
            else:
                items.append(work_item(kind, f, doc_id, size=st.st_size))
        described.append(desc)
    return items, described


# ----- tokenizer --------------------------------------------------------------------------------


def train_tokenizer(texts: Iterator[str], vocab_size: int, eos_token: str = EOS_TOKEN) -> Any:
    """Train a byte-level BPE (``tokenizers``) with ``eos_token`` as its only special token (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ConfigError(f"vocab_size: must be >= 257 (256 byte tokens + EOS), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _sample_texts(items: list[dict[str, Any]], cfg: PrepareConfig) -> Iterator[str]:
    """Up to ``tokenizer_sample_mb`` of text, from work items spread evenly over the corpus."""
    budget = int(cfg.tokenizer_sample_mb * 1e6)
    total = sum(it["size"] for it in items)
    stride = max(1, -(-total // budget))  # every stride-th item when the corpus exceeds the budget
    used = 0
    for it in items[::stride]:
        for _, text, _ in read_item(it, cfg.text_field, cfg.parquet_column).docs:
            yield text
            used += len(text)
        if used >= budget:
            return


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (the data contract)."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def split_of(doc_id: str, val_fraction: float) -> str:
    """Stable train/val assignment from a hash of the document id."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")
    return "val" if h < val_fraction * 2**64 else "train"


def doc_key(doc_id: str) -> str:
    """The WebDataset ``__key__`` of a document: hex, so it never holds a dot."""
    return hashlib.sha1(doc_id.encode()).hexdigest()[:24]


def _no_restarts() -> dict[str, Any]:
    """The tokenizer actors' remote args: no restarts. With the tokenizer among its constructor arguments in
    the object store, a restartable actor makes Ray's core worker print an error-looking line on every job;
    a dead tokenizer fails the job instead, and the same command builds the dataset again (idempotent)."""
    return {"max_restarts": 0}


class TokenizeActor:
    """Ray Data actor: reads, decodes and tokenizes a batch of work items; one tokenizer per actor."""

    def __init__(self, tokenizer_json: str, text_field: str, parquet_column: str, val_fraction: float):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per actor; Ray supplies the parallelism
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_str(tokenizer_json)
        self.tok.encode_special_tokens = True  # a literal "<|endoftext|>" in text is text, not EOS
        self.dtype = token_dtype(self.tok.get_vocab_size())
        self.text_field, self.parquet_column, self.val_fraction = text_field, parquet_column, val_fraction

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """One block: a row per document (key, split, token bytes, bytes replaced), in order, then a row
        per skip reason (its count in ``replaced``)."""
        started = time.time()  # when this actor began the block: the driver times the pool's start-up
        docs: list[tuple[str, str, int]] = []
        skipped: dict[str, int] = {}
        for item in (it for run in batch["items"] for it in json.loads(run)):
            res = read_item(item, self.text_field, self.parquet_column)
            docs.extend(res.docs)
            for reason, n in res.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + n
        # one encode call per block, not per file: 6-15% less CPU on stdlib (3 in-process pairs)
        encs = self.tok.encode_batch_fast([t for _, t, _ in docs], add_special_tokens=False) if docs else []
        rows = [(doc_key(doc_id), split_of(doc_id, self.val_fraction),
                 np.asarray(enc.ids, dtype=self.dtype).tobytes(), bad, "")
                for (doc_id, _, bad), enc in zip(docs, encs, strict=True)]
        rows += [("", "", b"", n, reason) for reason, n in skipped.items()]
        out = {c: [r[i] for r in rows] for i, c in enumerate(("key", "split", "tokens", "replaced", "skipped"))}
        return {**out, "started": [started] * len(rows)}


# ----- writing shards ---------------------------------------------------------------------------


class SplitWriter:
    """Writes one split's samples into ``{split}-{index:06d}.tar`` shards of about ``shard_tokens``.

    A WebDataset shard is a plain tar whose member ``KEY.NAME.npy`` is field ``NAME.npy`` of sample
    ``KEY``, so the standard library writes it: the job's driver then never imports ``webdataset``,
    which imports torch (1.1-1.7 s of a core, measured, competing with the actors on a small machine).
    """

    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._tar = tarfile.open(self.folder / name, "w")  # noqa: SIM115 (open across writes)
        self.shards.append({"file": name, "documents": 0, "tokens": 0})

    def write(self, key: str, arrays: dict[str, np.ndarray], n_tokens: int) -> None:
        """Write one sample: ``__key__`` plus ``NAME.npy`` arrays (``tokens`` counts toward size)."""
        if self._tar is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            self.close()
            self._open()
        assert self._tar is not None
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            member = tarfile.TarInfo(f"{key}.{name}.npy")
            # fixed metadata (mtime 0, no owner): the tar bytes, and sha256, are a function of the content
            member.size, member.mode, member.mtime = buf.tell(), 0o444, 0
            buf.seek(0)
            self._tar.addfile(member, buf)
        self.shards[-1]["documents"] += 1
        self.shards[-1]["tokens"] += n_tokens

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def finish(self) -> dict[str, Any]:
        """Close the last shard and return this split's manifest entry (with each shard's sha256)."""
        self.close()
        for s in self.shards:
            s["sha256"] = sha256_file(self.folder / s["file"])
            s["bytes"] = (self.folder / s["file"]).stat().st_size
        return {
            "shards": self.shards,
            "documents": sum(s["documents"] for s in self.shards),
            "tokens": sum(s["tokens"] for s in self.shards),
        }


class ShardSink:
    """Writes the actors' output, batch by batch and in order, into per-split shards; sums the counts."""

    def __init__(self, folder: Path, shard_tokens: int, dtype: np.dtype):
        self.writers = {s: SplitWriter(folder, s, shard_tokens) for s in SPLITS}
        self.dtype = dtype
        self.skipped: dict[str, int] = {}
        self.replaced = self.replaced_docs = 0
        self.first_call = float("inf")  # earliest time an actor started a block

    def add(self, batch: dict[str, Any]) -> None:
        """One batch of ``TokenizeActor`` output (columns as lists or numpy arrays)."""
        if len(batch["started"]):
            self.first_call = min(self.first_call, float(np.min(batch["started"])))
        for key, split, raw, rep, skip in zip(
            batch["key"], batch["split"], batch["tokens"], batch["replaced"], batch["skipped"], strict=True
        ):
            if skip:
                self.skipped[str(skip)] = self.skipped.get(str(skip), 0) + int(rep)
                continue
            arr = np.frombuffer(raw, dtype=self.dtype)
            self.writers[str(split)].write(str(key), {"tokens": arr}, len(arr))
            self.replaced += int(rep)
            self.replaced_docs += int(rep > 0)

    def finish(self) -> dict[str, Any]:
        """Close every shard; each split's manifest entry (``SplitWriter.finish``)."""
        return {s: w.finish() for s, w in self.writers.items()}


def fingerprint_of(obj: Any) -> str:
    """sha256 of a JSON value with sorted keys: the identity of a dataset's inputs and config."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def check_existing(out: Path, fingerprint: str, force: bool, log: Any = print) -> dict[str, Any] | None:
    """Return the manifest if ``out`` already holds this exact dataset, complete; else None (build).

    A dataset with another fingerprint, or with a shard missing, is rebuilt (and replaced only once
    the new one is complete). A non-empty folder that is not a dataset is never overwritten.
    """
    mpath = out / "manifest.json"
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not mpath.exists():
        raise DataError(f"{out}: exists and is not a dataset (no manifest.json); choose another --out")
    if force:
        return None
    manifest = json.loads(mpath.read_text())
    if manifest.get("fingerprint") != fingerprint:
        log(f"{out}: inputs or config changed (fingerprint {str(manifest.get('fingerprint'))[:12]} -> "
            f"{fingerprint[:12]}), rebuilding")
        return None
    missing = [s["file"] for sp in manifest.get("splits", {}).values() for s in sp["shards"]
               if not (out / s["file"]).exists()]
    if missing:
        log(f"{out / missing[0]}: shard listed in the manifest is missing, rebuilding")
        return None
    resized = [s["file"] for sp in manifest.get("splits", {}).values() for s in sp["shards"]
               if "bytes" in s and (out / s["file"]).stat().st_size != s["bytes"]]
    if resized:
        log(f"{out / resized[0]}: shard is not the size the manifest records (truncated?), rebuilding")
        return None
    return manifest


def publish(tmp: Path, out: Path) -> None:
    """Move a finished temp folder into place; an old dataset (under --force) is swapped out first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    (tmp / ".owner").unlink(missing_ok=True)
    if out.exists():
        trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)


def temp_folder(out: Path) -> Path:
    """A hidden sibling of ``out`` to build in: never mistaken for a dataset, same filesystem.

    It holds an ``.owner`` file (host and pid); temp folders of ``out`` left by a killed run on
    this host are removed here.
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{err.filename or out.parent}: cannot create the dataset's folder ({err.strerror})") from None
    host = socket.gethostname()
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        owner = stale / ".owner"
        try:
            o_host, o_pid = owner.read_text().split(":")
        except (OSError, ValueError):
            continue
        if o_host == host and not _alive(int(o_pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        (tmp / ".owner").write_text(f"{host}:{os.getpid()}")
    except OSError as err:  # a read-only or full disk, or no permission: before any tokenizing
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{out.parent}: cannot write the dataset here ({err.strerror})") from None
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----- the job ----------------------------------------------------------------------------------


def _load_tokenizer(cfg: PrepareConfig, items: list[dict[str, Any]]) -> Any:
    from tokenizers import Tokenizer

    if cfg.tokenizer is not None:
        if not cfg.tokenizer.is_file():
            raise DataError(f"{cfg.tokenizer}: tokenizer file not found")
        try:
            tok = Tokenizer.from_file(str(cfg.tokenizer))
        except Exception as err:  # tokenizers raises plain Exception on a bad file
            raise DataError(f"{cfg.tokenizer}: not a tokenizers JSON file ({err})") from None
        if tok.token_to_id(cfg.eos_token) is None:
            raise ConfigError(f"eos_token: {cfg.eos_token!r} is not in the vocabulary of {cfg.tokenizer}")
        return tok
    return train_tokenizer(_sample_texts(items, cfg), cfg.vocab_size, cfg.eos_token)


def prepare(cfg: PrepareConfig, log: Any = print) -> dict[str, Any]:
    """Build the dataset ``cfg.out`` (or find it already built) and return its manifest."""
    if cfg.tokenizer is None and cfg.vocab_size < 257:
        raise ConfigError(f"vocab_size: must be >= 257 (256 byte tokens + EOS), got {cfg.vocab_size}")
    if len(cfg.sources) == 1 and cfg.sources[0].startswith("hf:"):
        return prepare_hf(cfg, log)
    items, described = resolve_sources(cfg)
    source = {"sources": cfg.sources,
              "inputs": [{"source": d["source"], "files": len(d["files"])} for d in described]}
    return _build(cfg, items, described, source, log)


def _fingerprint(cfg: PrepareConfig, inputs: Any) -> str:
    return fingerprint_of({
        "format_version": FORMAT_VERSION,
        "config": cfg.content_fields(),
        "tokenizer_sha256": sha256_file(cfg.tokenizer) if cfg.tokenizer and cfg.tokenizer.is_file() else None,
        "inputs": inputs,
    })


def _build(
    cfg: PrepareConfig, items: list[dict[str, Any]], inputs: Any, source: dict[str, Any], log: Any
) -> dict[str, Any]:
    """Fingerprint, then (unless up to date) tokenize into a temp folder and publish it."""
    t0 = time.perf_counter()
    fingerprint = _fingerprint(cfg, inputs)
    existing = check_existing(cfg.out, fingerprint, cfg.force, log)
    if existing is not None:
        log(f"{cfg.out}: up to date (fingerprint {fingerprint[:12]}), nothing to do")
        return existing
    if address := cluster_address(cfg.address):
        check_reachable(address)  # before the tokenizer's training, not after
    tmp = temp_folder(cfg.out)
    try:
        tok = _load_tokenizer(cfg, items)
        tok.save(str(tmp / "tokenizer.json"))
        manifest = _tokenize_to_shards(cfg, items, tmp, tok)
        manifest.update(source=source, config=cfg.content_fields(), fingerprint=fingerprint)
        write_manifest(tmp, manifest)
        publish(tmp, cfg.out)
    except OSError as err:  # the disk filled up or refused a write: the temp folder goes, nothing is published
        if err.errno not in WRITE_ERRNOS:
            raise
        raise DataError(f"{cfg.out}: cannot write the dataset ({err.strerror}"
                        f"{f': {err.filename}' if err.filename else ''}); nothing was published") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    secs = time.perf_counter() - t0
    c = manifest["counts"]
    for name, split in manifest["splits"].items():
        if split["documents"] == 0:  # a corpus too small for the split: said, never silent
            log(f"warning: {cfg.out}: split {name!r} is empty (none of the {c['documents']} documents fell in "
                f"it at val_fraction {cfg.val_fraction}); a run that trains or evaluates on it is refused; use "
                f"more documents or another --val-fraction")
    n_shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    log(
        f"prepared {cfg.out}: {c['documents']} documents, {c['tokens']} tokens, {n_shards} shards, "
        f"{secs:.1f} s, {c['tokens'] / secs:,.0f} tokens/s"
        + (f"; skipped {c['skipped']}" if c["skipped"] else "")
        + (f"; {c['replaced_bytes']} undecodable bytes replaced" if c["replaced_bytes"] else "")
    )
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` (the last file of a dataset, so its presence means complete)."""
    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    path = folder / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def _tokenize_to_shards(
    cfg: PrepareConfig, items: list[dict[str, Any]], tmp: Path, tok: Any
) -> dict[str, Any]:
    """Run the Ray Data tokenization and write the shards into ``tmp``; return the manifest body."""
    import ray

    from pipelines.ray_utils import cluster_cpus, init_ray

    init_ray(cfg.address, cfg.num_cpus)
    # never more actors than the cluster has CPUs: a pool waiting for actors that cannot start would hang
    n_actors = max(1, min(cfg.num_cpus or cluster_cpus(), cluster_cpus(), len(items)))
    ctx = ray.data.DataContext.get_current()
    old_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # deterministic shard content
    try:
        rows = [{"items": block} for block in work_blocks(items, n_actors)]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        with warnings.catch_warnings():  # Ray 2.60 (pinned) deprecates remote args and names no replacement
            warnings.filterwarnings("ignore", message=r"`ray_remote_args_fn` is deprecated")
            ds = ds.map_batches(
                TokenizeActor,
                fn_constructor_kwargs={
                    "tokenizer_json": tok.to_str(),
                    "text_field": cfg.text_field,
                    "parquet_column": cfg.parquet_column,
                    "val_fraction": cfg.val_fraction,
                },
                batch_size=None,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=n_actors, max_tasks_in_flight_per_actor=BLOCKS_PER_ACTOR),
                num_cpus=1,
                ray_remote_args_fn=_no_restarts,
            )
        vocab = tok.get_vocab_size()
        dtype = token_dtype(vocab)
        sink = ShardSink(tmp, cfg.shard_tokens, dtype)
        t_start = time.time()
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            sink.add(batch)
        t_end = time.time()
    finally:
        ctx.execution_options.preserve_order = old_order
    splits = sink.finish()
    n_docs = sum(s["documents"] for s in splits.values())
    if n_docs == 0:
        raise DataError(
            f"{', '.join(cfg.sources)}: the corpus holds no documents "
            f"({sum(sink.skipped.values())} skipped: {sink.skipped or 'none'})"
        )
    return {
        "format_version": FORMAT_VERSION,
        "kind": "corpus",
        "tokenizer": {"file": "tokenizer.json", "sha256": sha256_file(tmp / "tokenizer.json")},
        "vocab_size": vocab,
        "eos_id": tok.token_to_id(cfg.eos_token),
        "eos_token": cfg.eos_token,
        "dtype": dtype.name,
        "sample_fields": {"tokens.npy": f"{dtype.name} token ids of one document, no EOS"},
        "splits": splits,
        "counts": {
            "work_items": len(items),
            "documents": n_docs,
            "tokens": sum(s["tokens"] for s in splits.values()),
            "skipped": sink.skipped,
            "replaced_bytes": sink.replaced,
            "documents_with_replaced_bytes": sink.replaced_docs,
        },
        "timings": {  # seconds of the Ray Data stage: until an actor starts its first block, and in all
            "actors": n_actors,
            "blocks": len(rows),
            "startup_seconds": round(max(0.0, min(sink.first_call, t_end) - t_start), 3),  # clocks of nodes may skew
            "ray_data_seconds": round(t_end - t_start, 3),
        },
    }


def prepare_hf(cfg: PrepareConfig, log: Any = print) -> dict[str, Any]:
    """A Hugging Face ``datasets`` source, ``hf:NAME[:CONFIG][@SPLIT]``, when installed and reachable.

    The rows are spilled to a jsonl file so the same readers and actors handle them; the
    fingerprint is the dataset's own (``datasets`` fingerprint and row count), not the spill's.
    """
    spec = cfg.sources[0][3:]
    spec, _, hf_split = spec.partition("@")
    name, _, hf_config = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"hf:{name}: the 'datasets' library is not installed; use local files or 'stdlib'"
        ) from None
    try:
        hf = datasets.load_dataset(name, hf_config or None, split=hf_split or "train")
    except Exception as err:
        raise DataError(f"hf:{name}: cannot load ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if cfg.text_field not in hf.column_names:
        raise DataError(f"hf:{name}: no column {cfg.text_field!r}; columns: {', '.join(hf.column_names)}")
    inputs = {"hf": cfg.sources[0], "fingerprint": getattr(hf, "_fingerprint", None), "rows": len(hf)}
    existing = check_existing(cfg.out, _fingerprint(cfg, inputs), cfg.force, log)
    if existing is not None:
        log(f"{cfg.out}: up to date, nothing to do")
        return existing
    spill_dir = temp_folder(Path(f"{cfg.out}.hf"))
    try:
        spill = spill_dir / f"{name.replace('/', '_')}.jsonl"
        with open(spill, "w") as f:
            for row in hf:
                f.write(json.dumps({cfg.text_field: row[cfg.text_field]}) + "\n")
        size = spill.stat().st_size
        items = [work_item("jsonl", spill, name, start=a, end=min(a + JSONL_CHUNK, size),
                           size=min(JSONL_CHUNK, size - a))
                 for a in range(0, max(1, size), JSONL_CHUNK)]
        return _build(cfg, items, inputs, {"sources": cfg.sources, "rows": len(hf)}, log)
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)


def _read_tar_tokens(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Plain tarfile reader of a shard's (key, tokens): used by the benchmark and debugging."""
    with tarfile.open(path) as tf:
        for m in tf:
            if m.name.endswith(".tokens.npy"):
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                yield m.name.split(".")[0], np.load(io.BytesIO(data))
