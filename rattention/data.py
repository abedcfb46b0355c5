"""The training data loader: packs a tokenized WebDataset folder into (seq_len+1)-token windows.

A dataset folder (see DESIGN.md, "Data contract") holds ``manifest.json``, ``tokenizer.json`` and
shards ``{split}-{index:06d}.tar`` whose samples are single documents (``tokens.npy``). The loader
reads them with ``webdataset`` and packs them on the fly::

    stream = doc_a + [EOS] + doc_b + [EOS] + ...     (per reader, across epochs)
    window = stream[k*(L+1) : (k+1)*(L+1)]           inputs = window[:-1], targets = window[1:]

Readers. Every (rank, DataLoader worker) pair is one reader with its own stream:
``reader = rank * num_workers + worker``. With at least as many shards as readers, reader r reads
the shards ``order[r::R]`` of each epoch; with fewer, every reader reads every shard and keeps the
documents whose position in the epoch is ``r mod R`` (document-level split). Either way, each epoch
gives every document to exactly one reader.

Order. Training (``infinite=True``, the default for ``train``) permutes the shards per epoch (one
permutation shared by all readers, seeded by ``seed`` and the epoch) and shuffles documents in a
seeded buffer per reader; it never ends. Evaluation (``infinite=False``) reads shards in order
without shuffling, one pass, and pads the last window (inputs EOS, targets ``IGNORE_INDEX``);
ranks may then get different numbers of batches, so reduce evaluation metrics once at the end.

Answers. A synthetic task dataset (``rattention data synth``) carries ``mask.npy`` per sample, 1 at
answer tokens. With ``answer_only`` (the default for such a dataset) the mask is packed alongside the
tokens and every target that is not an answer becomes ``IGNORE_INDEX``, so the loss (training and
validation alike) is the loss on the answers alone.

Position. A reader's position is ``(epoch, document, offset)``: the next window starts at token
``offset`` of the ``document``-th document of that epoch's order (EOS counted as its last token).
``state_dict()`` records the position after the last batch *handed to the caller* (prefetched
batches do not count), so ``load_state_dict()`` resumes without repeating or skipping a token.
Each rank saves and restores its own loader state. ``seq_len`` and ``batch_size`` may change on
resume; ``seed`` and the number of readers may not.

This module imports only numpy at import time; torch and ``webdataset`` are imported when
iterating, so a GPU box without webdataset can import it, and Ray workers that only need
``sha256_file`` do not pay for torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rattention.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Load and sanity-check ``manifest.json`` of a dataset folder (DataError naming the file)."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise DataError(f"{mpath}: no manifest; build the dataset with `rattention data prepare`")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{mpath}: not valid JSON ({err})") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{mpath}: format_version {version!r}, this loader reads {FORMAT_VERSION}")
    return manifest


def shard_paths(path: str | Path, split: str, verify: bool = False) -> list[Path]:
    """The shard files of ``split``, in manifest order. Each must exist and have the manifest's size
    (a cheap stat that catches a truncated shard); with ``verify``, each is read once against its
    sha256 and its token ids checked (``verify_shard``)."""
    manifest = read_manifest(path)
    splits = manifest.get("splits", {})
    if split not in splits:
        raise DataError(f"{Path(path) / MANIFEST}: no split {split!r}; splits: {', '.join(splits)}")
    out = []
    for shard in splits[split]["shards"]:
        p = Path(path) / shard["file"]
        if not p.is_file():
            raise DataError(f"{p}: shard listed in the manifest is missing")
        size = p.stat().st_size
        if "bytes" in shard and size != shard["bytes"]:
            raise DataError(f"{p}: corrupt shard, {size} bytes where the manifest says {shard['bytes']} "
                            f"({'truncated' if size < shard['bytes'] else 'grown'})")
        if verify:
            verify_shard(p, shard, manifest.get("vocab_size"))
        out.append(p)
    if not out:
        raise DataError(f"{Path(path) / MANIFEST}: split {split!r} has no documents (no shards); the corpus "
                        f"was too small for it: rebuild the dataset with more documents")
    return out


class _HashingReader:
    """A binary file read through sha256: ``tarfile`` streams the shard, and the digest covers every byte."""

    def __init__(self, f: Any):
        self.f, self.sha = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        block = self.f.read(n)
        self.sha.update(block)
        return block


def verify_shard(p: Path, entry: dict[str, Any], vocab_size: int | None) -> None:
    """Read one shard once: its sha256 must be the manifest's, it must parse as a tar of ``.npy``
    samples, and every ``tokens.npy`` must hold integer ids below ``vocab_size``. DataError naming it."""
    import tarfile

    if not entry.get("sha256"):
        raise DataError(f"{p}: the manifest lists no sha256 for this shard; set data.verify_checksums=false "
                        f"to train without checking it")
    unreadable = beyond = None
    with open(p, "rb") as f:
        reader = _HashingReader(f)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tf:  # type: ignore[call-overload]
                for m in tf:
                    if beyond is None and m.name.endswith(".tokens.npy"):
                        toks = _npy(tf.extractfile(m).read())  # type: ignore[union-attr]
                        if toks.dtype.kind not in "ui":
                            beyond = f"document {m.name.split('.')[0]!r} holds {toks.dtype} values, not token ids"
                        elif toks.size:
                            lo, hi = int(toks.min()), int(toks.max())
                            if lo < 0 or (vocab_size is not None and hi >= vocab_size):
                                beyond = (f"document {m.name.split('.')[0]!r} holds token id {lo if lo < 0 else hi}"
                                          f", outside the manifest's vocab_size {vocab_size}")
        except Exception as err:  # noqa: BLE001 - whatever a damaged tar or .npy raises, the file is corrupt
            unreadable = f"{type(err).__name__}: {err}"
        while reader.read(1 << 20):  # the tar's end padding: the digest covers the whole file
            pass
    if reader.sha.hexdigest() != entry["sha256"]:
        raise DataError(f"{p}: corrupt shard, sha256 differs from the manifest")
    if unreadable:
        raise DataError(f"{p}: corrupt shard, cannot be read ({unreadable})")
    if beyond:
        raise DataError(f"{p}: {beyond}")


def tokenizer_vocab(tokenizer_json: dict[str, Any]) -> tuple[int | None, dict[str, int]]:
    """(vocab size, id of every added token) of a Hugging Face ``tokenizer.json``, read as plain JSON
    (no ``tokenizers`` import); the size is None when the file holds no vocabulary."""
    model = tokenizer_json.get("model") if isinstance(tokenizer_json, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, list):  # Unigram: [piece, score] pairs, the id is the position
        vocab = {str(entry[0]): i for i, entry in enumerate(vocab)}
    if not isinstance(vocab, dict) or not vocab:
        return None, {}
    ids = {str(k): int(v) for k, v in vocab.items()}
    ids.update({t["content"]: int(t["id"]) for t in tokenizer_json.get("added_tokens") or []
                if isinstance(t, dict) and "content" in t and "id" in t})
    return max(ids.values()) + 1, ids


def check_tokenizer(path: str | Path, manifest: dict[str, Any] | None = None) -> None:
    """The dataset's tokenizer file must be the one its tokens were made with: the manifest's sha256,
    and (when the file holds a vocabulary) its vocab size and EOS id. DataError naming the file."""
    manifest = manifest if manifest is not None else read_manifest(path)
    declared = manifest.get("tokenizer")
    if not declared:
        return  # a synthetic dataset over bare ids has no tokenizer
    tpath = Path(path) / declared.get("file", "tokenizer.json")
    if not tpath.is_file():
        raise DataError(f"{tpath}: tokenizer listed in the manifest is missing")
    if declared.get("sha256") and sha256_file(tpath) != declared["sha256"]:
        raise DataError(f"{tpath}: does not match the manifest (sha256 differs): the tokens were made with "
                        f"another tokenizer; put the dataset's own tokenizer.json back or rebuild the dataset")
    try:
        size, ids = tokenizer_vocab(json.loads(tpath.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, KeyError) as err:
        raise DataError(f"{tpath}: not a tokenizers JSON file ({type(err).__name__})") from None
    vocab = manifest.get("vocab_size")
    if size is not None and vocab is not None and size != int(vocab):
        raise DataError(f"{tpath}: a vocabulary of {size} tokens, where the manifest says vocab_size {vocab}")
    eos_token, eos_id = manifest.get("eos_token"), manifest.get("eos_id")
    if size is not None and eos_token is not None and eos_id is not None and ids.get(eos_token) != int(eos_id):
        raise DataError(f"{tpath}: EOS token {eos_token!r} has id {ids.get(eos_token)}, where the manifest "
                        f"says eos_id {eos_id}")


def verify_dataset(path: str | Path, splits: list[str], checksums: bool = True) -> dict[str, Any]:
    """Check a dataset before training on it, and return its manifest. Always: the manifest, the tokenizer
    (``check_tokenizer``), and that every shard of ``splits`` exists with its recorded size. With
    ``checksums`` (``data.verify_checksums``, the default), every shard is also read once: its sha256,
    its samples and its token ids (``verify_shard``). A fault raises DataError naming the file."""
    manifest = read_manifest(path)
    check_tokenizer(path, manifest)
    for split in splits:
        shard_paths(path, split, verify=checksums)
    return manifest


def loader_for(cfg: Any, split: str, rank: int = 0, world: int = 1, infinite: bool | None = None) -> PackedLoader:
    """The packed-window loader of a run config (``rattention.run_config.RunConfig``) for this rank."""
    return PackedLoader(cfg.data.path, split=split, seq_len=cfg.seq_len, batch_size=cfg.data.batch_size,
                        seed=cfg.train.seed, rank=rank, world_size=world, infinite=infinite,
                        answer_only=getattr(cfg.data, "answer_only", None))


def has_answer_mask(manifest: dict[str, Any]) -> bool:
    """Whether a dataset's samples carry ``mask.npy`` (1 at answer tokens): synthetic task datasets do."""
    return "mask.npy" in (manifest.get("sample_fields") or {})


def dataset_vocab(path: str | Path) -> int | None:
    """The dataset's vocab size from its manifest (None when it does not say)."""
    v = read_manifest(path).get("vocab_size")
    return int(v) if v is not None else None


def dataset_fingerprint(path: str | Path) -> str:
    """The dataset's manifest fingerprint: what a run's identity records of its data."""
    return str(read_manifest(path).get("fingerprint", "unknown"))


def _npy(raw: bytes, where: str | None = None) -> np.ndarray:
    """A sample's ``.npy`` field; with ``where`` (its shard and key), a damaged one is a DataError naming it."""
    if where is None:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        raise DataError(f"{where}: corrupt sample, not a .npy array ({err})") from None


def iter_shard(path: Path) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__`` plus bytes per field) of one shard, via webdataset.

    A shard that cannot be read raises DataError naming it.
    """
    import webdataset as wds

    pipeline = wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())
    try:
        yield from pipeline
    except (DataError, GeneratorExit):
        raise
    except Exception as err:
        raise DataError(f"{path}: corrupt shard, cannot be read ({type(err).__name__}: {err})") from None


def iter_samples(path: str | Path, split: str, verify: bool = False) -> Iterator[dict[str, Any]]:
    """Every sample of a split in stored order, its ``.npy`` fields decoded: for evaluation sets.

    Yields dicts like ``{"key": str, "tokens": ndarray, "mask": ndarray}`` (synthetic tasks also
    carry ``mask``: 1 where a token is an answer to predict).
    """
    for shard in shard_paths(path, split, verify):
        for s in iter_shard(shard):
            out: dict[str, Any] = {"key": s["__key__"]}
            for k, v in s.items():
                if k.endswith("npy"):
                    out[k[: -len(".npy")]] = _npy(v)
                elif k == "json":
                    out["meta"] = json.loads(v)
            yield out


class PackedLoader:
    """Iterate ``(inputs, targets)`` LongTensor batches of shape ``(batch_size, seq_len)``.

    Args:
        path: dataset folder (``manifest.json`` + shards).
        split: ``"train"`` or ``"val"`` (any split in the manifest).
        seq_len: tokens per row; each row comes from one window of ``seq_len + 1`` tokens.
        batch_size: rows per batch (per rank).
        seed: decides shard permutations and document shuffling; same seed, same stream.
        rank, world_size: this process's place among data-parallel ranks; default from
            ``torch.distributed`` when it is initialised (as under Ray Train), else 0 and 1.
        num_workers: DataLoader worker processes per rank (0 reads in this process).
        shuffle_buffer: documents held for shuffling (training only).
        infinite: endless stream resampled by epoch (default: ``split == "train"``); otherwise
            one deterministic pass, no shuffle, the last window padded.
        verify: check every shard's sha256 against the manifest first (DataError naming the file).
        answer_only: score only answer tokens (targets off the dataset's ``mask.npy`` become
            ``IGNORE_INDEX``); None: on when the dataset carries a mask.
    """

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        seq_len: int = 256,
        batch_size: int = 8,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        infinite: bool | None = None,
        verify: bool = False,
        answer_only: bool | None = None,
    ):
        if seq_len < 1:
            raise ConfigError(f"seq_len: must be >= 1, got {seq_len}")
        if batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {num_workers}")
        if rank is None or world_size is None:
            d_rank, d_world = _dist_rank_world()
            rank = d_rank if rank is None else rank
            world_size = d_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank: must be in [0, world_size={world_size}), got {rank}")
        self.path, self.split = Path(path), split
        self.manifest = read_manifest(path)
        self.shards = shard_paths(path, split, verify)
        self.eos_id = int(self.manifest["eos_id"])
        self.vocab_size = self.manifest.get("vocab_size")  # every id is checked below it as documents are read
        masked = has_answer_mask(self.manifest)
        if answer_only and not masked:
            raise ConfigError(f"data.answer_only: {self.path} has no answer mask (mask.npy; made by rattention data "
                              f"synth), so there are no answers to score; set it false or null")
        self.answer_only = masked if answer_only is None else bool(answer_only)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer = shuffle_buffer
        self.infinite = (split == "train") if infinite is None else infinite
        self.num_readers = world_size * max(1, num_workers)
        self.readers = [rank * max(1, num_workers) + w for w in range(max(1, num_workers))]
        self._positions: dict[int, tuple[int, int, int]] = {r: (0, 0, 0) for r in self.readers}

    # ----- position ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: per reader ``(epoch, document, offset)`` after the last batch taken."""
        return {
            "version": 1,
            "split": self.split,
            "seed": self.seed,
            "num_readers": self.num_readers,
            "positions": {str(r): list(p) for r, p in self._positions.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state_dict()``; the seed, split and reader layout must match."""
        for key in ("split", "seed", "num_readers"):
            if state.get(key) != getattr(self, key):
                raise ConfigError(
                    f"loader state {key}: saved {state.get(key)!r}, this loader has {getattr(self, key)!r}"
                )
        positions = {int(r): tuple(p) for r, p in state["positions"].items()}
        if set(positions) != set(self.readers):
            raise ConfigError(f"loader state positions: readers {sorted(positions)}, expected {self.readers}")
        self._positions = positions  # type: ignore[assignment]

    # ----- the document stream -------------------------------------------------------------------

    def epoch_shards(self, epoch: int) -> list[Path]:
        """The shard order of an epoch, shared by all readers."""
        if not self.infinite:
            return list(self.shards)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[i] for i in perm]

    def documents(self, reader: int, epoch: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        """``(key, raw sample)`` of one reader's share of an epoch, in its final order; the sample maps
        field names (``tokens.npy``, ``mask.npy``) to their raw bytes."""
        import webdataset as wds

        order = self.epoch_shards(epoch)
        R = self.num_readers
        if len(order) >= R:
            stream = (s for shard in order[reader::R] for s in iter_shard(shard))
        else:  # fewer shards than readers: split by document position instead
            stream = (s for i, s in enumerate(s for shard in order for s in iter_shard(shard)) if i % R == reader)
        pairs = ((s["__key__"], s) for s in stream)
        if self.infinite and self.shuffle_buffer > 1:
            rng = random.Random(f"{self.seed}-{epoch}-{reader}")
            pairs = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(pairs)
        yield from pairs

    def windows(self, reader: int, start: tuple[int, int, int]) -> Iterator[tuple[np.ndarray, tuple[int, int, int]]]:
        """Packed windows of ``seq_len + 1`` tokens from ``start``, each with the position after it.

        In finite mode the last window is padded with ``IGNORE_INDEX``.
        """
        for win, _, pos in self.masked_windows(reader, start):
            yield win, pos

    def masked_windows(self, reader: int, start: tuple[int, int, int]
                       ) -> Iterator[tuple[np.ndarray, np.ndarray | None, tuple[int, int, int]]]:
        """Like ``windows``, with each window's answer mask packed the same way (EOS and padding are not
        answers); the mask is None unless ``answer_only``."""
        L1 = self.seq_len + 1
        epoch, doc, offset = start
        buf = np.empty(L1, dtype=np.int64)
        mbuf = np.zeros(L1, dtype=bool) if self.answer_only else None
        fill = 0
        while True:
            n_docs = 0
            for i, (key, sample) in enumerate(self.documents(reader, epoch)):
                n_docs += 1
                if i < doc:
                    continue
                where = f"{sample.get('__url__', self.path)}: document {key!r}"
                toks = _npy(sample["tokens.npy"], where)
                if self.vocab_size is not None and toks.size and int(toks.max()) >= self.vocab_size:
                    raise DataError(f"{where} holds token id {int(toks.max())}, outside the manifest's vocab_size "
                                    f"{self.vocab_size}")
                mask = None
                if mbuf is not None:
                    if "mask.npy" not in sample:
                        raise DataError(f"{self.path}: sample {key!r} has no mask.npy, though the manifest lists one")
                    mask = _npy(sample["mask.npy"]).astype(bool)
                n = len(toks) + 1  # the document and its EOS
                pos = offset if i == doc else 0
                while pos < n:
                    take = min(L1 - fill, n - pos)
                    end = pos + take
                    if end == n:
                        buf[fill : fill + take - 1] = toks[pos:]
                        buf[fill + take - 1] = self.eos_id
                    else:
                        buf[fill : fill + take] = toks[pos:end]
                    if mbuf is not None and mask is not None:
                        mbuf[fill : fill + take] = False
                        stop = min(end, n - 1)  # the EOS is no answer
                        mbuf[fill : fill + stop - pos] = mask[pos:stop]
                    fill += take
                    pos = end
                    if fill == L1:
                        nxt = (epoch, i, pos) if pos < n else (epoch, i + 1, 0)
                        yield buf.copy(), None if mbuf is None else mbuf.copy(), nxt
                        fill = 0
            if not self.infinite:
                if fill:
                    buf[fill:] = IGNORE_INDEX
                    if mbuf is not None:
                        mbuf[fill:] = False
                    yield buf.copy(), None if mbuf is None else mbuf.copy(), (epoch + 1, 0, 0)
                return
            if n_docs == 0:
                raise DataError(
                    f"{self.path}: split {self.split!r} gives reader {reader} of {self.num_readers} no "
                    f"documents; use fewer ranks x workers or more documents"
                )
            epoch, doc, offset = epoch + 1, 0, 0

    def batches(self, reader: int, start: tuple[int, int, int]) -> Iterator[tuple[int, tuple, Any, Any]]:
        """``(reader, position_after, inputs, targets)`` batches of one reader."""
        rows: list[np.ndarray] = []
        masks: list[np.ndarray] = []
        pos = start
        for win, mask, pos in self.masked_windows(reader, start):
            rows.append(win)
            if mask is not None:
                masks.append(mask)
            if len(rows) == self.batch_size:
                yield reader, pos, *self._to_tensors(rows, masks)
                rows, masks = [], []
        if rows:
            yield reader, pos, *self._to_tensors(rows, masks)

    def _to_tensors(self, rows: list[np.ndarray], masks: list[np.ndarray] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        w = torch.from_numpy(np.stack(rows))
        inputs = w[:, :-1].clone()
        inputs[inputs == IGNORE_INDEX] = self.eos_id
        targets = w[:, 1:].clone()
        if masks:  # answer_only: a target counts only where it is an answer
            targets[~torch.from_numpy(np.stack(masks))[:, 1:]] = IGNORE_INDEX
        return inputs, targets

    # ----- iteration -----------------------------------------------------------------------------

    def iter_with_source(self) -> Iterator[tuple[int, Any, Any]]:
        """Like iterating the loader, but yields ``(reader, inputs, targets)`` (for tests/debugging)."""
        if self.num_workers == 0:
            (r,) = self.readers
            it: Iterator = self.batches(r, self._positions[r])
        else:
            import torch.utils.data as tud

            it = iter(
                tud.DataLoader(
                    _worker_streams(self, dict(self._positions)),
                    batch_size=None,
                    num_workers=self.num_workers,
                    prefetch_factor=2,
                )
            )
        for reader, pos, inputs, targets in it:
            self._positions[reader] = tuple(pos)  # type: ignore[assignment]
            yield reader, inputs, targets
        if not self.infinite:  # a finished pass: the next pass starts from the beginning again
            self._positions = {r: (0, 0, 0) for r in self.readers}

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for _, inputs, targets in self.iter_with_source():
            yield inputs, targets


def _worker_streams(loader: PackedLoader, positions: dict[int, tuple[int, int, int]]) -> Any:
    """The torch IterableDataset a DataLoader worker runs: the batches of its own reader."""
    cls = globals().get("_WorkerStreams") or __getattr__("_WorkerStreams")  # imports torch
    ds = cls()
    ds.loader, ds.positions = loader, positions
    return ds


def __getattr__(name: str) -> Any:
    """Create ``_WorkerStreams`` (a torch IterableDataset) on first use, so that importing this
    module does not import torch, while the class still pickles by name for spawned workers."""
    if name != "_WorkerStreams":
        raise AttributeError(name)
    import torch.utils.data as tud

    class _WorkerStreams(tud.IterableDataset):
        loader: PackedLoader
        positions: dict[int, tuple[int, int, int]]

        def __iter__(self) -> Iterator[tuple[int, tuple, Any, Any]]:
            info = tud.get_worker_info()
            reader = self.loader.readers[0 if info is None else info.id]
            return self.loader.batches(reader, self.positions[reader])

    _WorkerStreams.__qualname__ = name  # pickles as rattention.data._WorkerStreams
    globals()[name] = _WorkerStreams
    return _WorkerStreams


def _dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def pack_documents(docs: list[np.ndarray], seq_len: int, eos_id: int) -> list[np.ndarray]:
    """Reference packing (no padding): the full windows of ``doc + [EOS]`` concatenated."""
    stream = np.concatenate([np.append(np.asarray(d, dtype=np.int64), eos_id) for d in docs])
    n = len(stream) // (seq_len + 1)
    return list(stream[: n * (seq_len + 1)].reshape(n, seq_len + 1))
