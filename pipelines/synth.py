"""Ray job: write a synthetic long-context task as a dataset (``rattention data synth KIND``).

Same folder layout and shards as ``pipelines.tokenize``, one sample per task instance, plus
``mask.npy`` (uint8, 1 at answer tokens). ``val_samples`` adds a ``val`` split of further instances
(indices after the main split's), so that a run can train on the task and validate on held-out ones.
The generation itself is ``rattention.tasks`` (pure numpy, reused by evaluation); Ray Data runs it over
sample-index ranges, and the driver writes the shards.
"""

from __future__ import annotations

import inspect
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, ValidationError

from pipelines.tokenize import (
    SplitWriter,
    check_existing,
    fingerprint_of,
    publish,
    temp_folder,
    token_dtype,
    write_manifest,
)
from rattention.data import FORMAT_VERSION, check_tokenizer, iter_samples, read_manifest, sha256_file
from rattention.errors import ConfigError, DataError, format_validation_error
from rattention.schema import Schema
from rattention.tasks import TASKS, TaskVocab, generate, task_parameters

MASK_DOC = "uint8 per token, 1 where the token is an answer: score the prediction of tokens[t] from tokens[:t]"


class SynthConfig(Schema):
    """A synthetic task dataset: task kind and parameters, sizes, and the vocabulary to draw from."""

    kind: str
    out: Path
    samples: int = Field(1000, gt=0)
    seq_len: int = Field(1024, gt=0)
    seed: int = 0
    split: str = "test"
    val_samples: int = Field(0, ge=0)  # also a "val" split of this many instances (indices samples..)
    vocab_size: int | None = Field(None, gt=0)
    like: Path | None = None  # a prepared dataset: its tokenizer, vocab and EOS (and haystack text)
    haystack: str = "noise"  # noise | repeat | corpus (text from `like`)
    params: dict[str, Any] = Field(default_factory=dict)
    shard_tokens: int = Field(1_000_000, gt=0)
    num_cpus: int | None = Field(None, gt=0)
    address: str | None = None
    force: bool = False


def make_config(**kwargs: Any) -> SynthConfig:
    """Validate into a SynthConfig, checking the kind and its parameter names; one-line ConfigError."""
    try:
        cfg = SynthConfig(**kwargs)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    if cfg.kind not in TASKS:
        raise ConfigError(f"kind: must be one of {', '.join(TASKS)}, got {cfg.kind!r}")
    allowed = task_parameters(cfg.kind)
    for name in cfg.params:
        if name not in allowed:
            raise ConfigError(f"param {name!r}: not a parameter of {cfg.kind}; allowed: {', '.join(allowed)}")
    if cfg.haystack not in ("noise", "repeat", "corpus"):
        raise ConfigError(f"haystack: must be noise, repeat or corpus, got {cfg.haystack!r}")
    if cfg.haystack == "corpus" and cfg.like is None:
        raise ConfigError("haystack: 'corpus' needs --like DATASET to take the text from")
    if cfg.like is None and cfg.vocab_size is None:
        raise ConfigError("vocab_size: give --vocab-size or --like DATASET")
    if cfg.val_samples and cfg.split == "val":
        raise ConfigError("val_samples: the main split is already named 'val'; name it otherwise (e.g. train)")
    return cfg


def _corpus_haystack(like: Path, max_tokens: int = 1_000_000) -> np.ndarray:
    """Real text for the haystack: documents of the dataset's val split (or train), EOS-joined."""
    manifest = read_manifest(like)
    split = "val" if manifest["splits"].get("val", {}).get("shards") else "train"
    parts, n = [], 0
    for s in iter_samples(like, split):
        parts.append(s["tokens"].astype(np.int64))
        parts.append(np.asarray([manifest["eos_id"]], np.int64))
        n += len(s["tokens"]) + 1
        if n >= max_tokens:
            break
    return np.concatenate(parts)


def _gen_batch(
    batch: dict[str, np.ndarray], kind: str, vocab: TaskVocab, seq_len: int, seed: int, params: dict[str, Any]
) -> dict[str, list]:
    out: dict[str, list] = {"index": [], "tokens": [], "mask": []}
    dtype = token_dtype(vocab.vocab_size)
    for i in batch["id"]:
        (s,) = generate(kind, vocab, seq_len, seed, int(i), int(i) + 1, **params)
        out["index"].append(int(i))
        out["tokens"].append(s.tokens.astype(dtype).tobytes())
        out["mask"].append(s.mask.astype(np.uint8).tobytes())
    return out


def synth(cfg: SynthConfig, log: Any = print) -> dict[str, Any]:
    """Build (or find already built) the task dataset ``cfg.out``; return its manifest."""
    import ray

    from pipelines.ray_utils import cluster_cpus, init_ray

    t0 = time.perf_counter()
    like_manifest = read_manifest(cfg.like) if cfg.like else None
    if like_manifest is not None:
        if cfg.vocab_size is not None and cfg.vocab_size != like_manifest["vocab_size"]:
            raise ConfigError(f"vocab_size: --like {cfg.like} sets the vocabulary ({like_manifest['vocab_size']} "
                              f"tokens), got --vocab-size {cfg.vocab_size}; give one of the two")
        check_tokenizer(cfg.like, like_manifest)  # the tokenizer copied must be the one its vocab describes
    like_tokenizer = (like_manifest or {}).get("tokenizer")  # None: --like a dataset of bare ids
    vocab_size = like_manifest["vocab_size"] if like_manifest else cfg.vocab_size
    eos_id = like_manifest["eos_id"] if like_manifest else 0
    vocab = TaskVocab(int(vocab_size), reserved=(int(eos_id),))
    content = cfg.model_dump(mode="json", exclude={"out", "num_cpus", "address", "force", "like"})
    content.update(format_version=FORMAT_VERSION, vocab_size=vocab_size, eos_id=eos_id,
                   like_fingerprint=like_manifest["fingerprint"] if like_manifest else None)
    fingerprint = fingerprint_of(content)
    existing = check_existing(cfg.out, fingerprint, cfg.force, log)
    if existing is not None:
        log(f"{cfg.out}: up to date (fingerprint {fingerprint[:12]}), nothing to do")
        return existing
    # Fail on bad parameters here, in one line, rather than inside a Ray worker.
    params = dict(cfg.params)
    if cfg.haystack != "noise" and "haystack" in inspect.signature(TASKS[cfg.kind]).parameters:
        params["haystack"] = _corpus_haystack(cfg.like) if cfg.haystack == "corpus" else cfg.haystack
    try:
        next(generate(cfg.kind, vocab, cfg.seq_len, cfg.seed, 0, 1, **params))
    except TypeError as err:
        raise ConfigError(f"params: {err}") from None

    tmp = temp_folder(cfg.out)
    try:
        if cfg.like and like_tokenizer:
            shutil.copy(Path(cfg.like) / like_tokenizer.get("file", "tokenizer.json"), tmp / "tokenizer.json")
        init_ray(cfg.address, cfg.num_cpus)
        n_tasks = max(1, min(cfg.num_cpus or cluster_cpus(), cfg.samples))
        ctx = ray.data.DataContext.get_current()
        old_order = ctx.execution_options.preserve_order
        ctx.execution_options.preserve_order = True
        dtype = token_dtype(int(vocab_size))
        writers = {cfg.split: SplitWriter(tmp, cfg.split, cfg.shard_tokens)}
        if cfg.val_samples:
            writers["val"] = SplitWriter(tmp, "val", cfg.shard_tokens)
        total = cfg.samples + cfg.val_samples
        answer_tokens = 0
        try:
            ds = ray.data.range(total, override_num_blocks=min(total, 8 * n_tasks)).map_batches(
                _gen_batch,
                fn_kwargs={"kind": cfg.kind, "vocab": vocab, "seq_len": cfg.seq_len, "seed": cfg.seed,
                           "params": params},
                batch_size=64,
                batch_format="numpy",
                num_cpus=1,
            )
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i, raw, mraw in zip(batch["index"], batch["tokens"], batch["mask"], strict=True):
                    toks = np.frombuffer(raw, dtype=dtype)
                    mask = np.frombuffer(mraw, dtype=np.uint8)
                    answer_tokens += int(mask.sum())
                    writer = writers[cfg.split if int(i) < cfg.samples else "val"]
                    writer.write(f"{cfg.kind}{int(i):09d}", {"tokens": toks, "mask": mask}, len(toks))
        finally:
            ctx.execution_options.preserve_order = old_order
        splits = {name: w.finish() for name, w in writers.items()}
        for name, want in ((cfg.split, cfg.samples), ("val", cfg.val_samples)):
            if name in splits and splits[name]["documents"] != want:
                raise DataError(f"{cfg.out}: wrote {splits[name]['documents']} of {want} {name} samples")
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": "synthetic",
            "task": cfg.kind,
            "source": {"task": cfg.kind, "params": cfg.params, "haystack": cfg.haystack,
                       "like": str(cfg.like) if cfg.like else None},
            "tokenizer": ({"file": "tokenizer.json", "sha256": sha256_file(tmp / "tokenizer.json")}
                          if cfg.like and like_tokenizer else None),
            "vocab_size": int(vocab_size),
            "eos_id": int(eos_id),
            "dtype": dtype.name,
            "markers": vocab.markers,
            "seq_len": cfg.seq_len,
            "sample_fields": {"tokens.npy": f"{dtype.name} token ids, exactly seq_len of them",
                              "mask.npy": MASK_DOC},
            "splits": splits,
            "counts": {"documents": sum(p["documents"] for p in splits.values()),
                       "tokens": sum(p["tokens"] for p in splits.values()), "answer_tokens": answer_tokens},
            "config": content,
            "fingerprint": fingerprint,
        }
        write_manifest(tmp, manifest)
        publish(tmp, cfg.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    secs = time.perf_counter() - t0
    val = f" (+{cfg.val_samples} in val)" if cfg.val_samples else ""
    log(f"synthesised {cfg.out}: {cfg.samples}{val} {cfg.kind} samples of {cfg.seq_len} tokens, "
        f"{sum(len(p['shards']) for p in splits.values())} shards, {secs:.1f} s")
    return manifest
