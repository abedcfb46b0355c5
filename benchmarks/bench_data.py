"""Data pipeline figures: tokenization tokens/s (plain loops vs Ray at 1 and 2 CPUs) and loader tokens/s.

Run: ``.venv/bin/python benchmarks/bench_data.py`` (about 3 minutes on 2 cores). It writes
``benchmarks/results/data.json`` (device, versions, commit, date, load average) and the tables of
``benchmarks/data.md``, and prints the latter. All tokenizer runs use the same trained tokenizer
on the same ``stdlib`` files, one after the other, interleaved over the repeats; each plain loop runs
in a fresh process (``in_fresh_process``), as each Ray job's actors do.

Two plain loops, both one process with no Ray: ``plain_tokenize`` only reads, decodes and encodes
(nothing kept); ``plain_job`` does the job's work, the same actor code called in-process and the
same shard writing (``ShardSink``, sha256 included), so it and the Ray job give the same shards.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the plain loop is one core, like one actor
T = TypeVar("T")


def plain_tokenize(tok_path: Path, items: list[dict], work: Path) -> tuple[int, int, float]:
    """Read, decode and encode every work item in this process, nothing kept: (documents, tokens, seconds).

    The job's reader (``read_item``), and one encode call per block of items, the blocks a one-actor
    job would get (as the actors do).
    """
    from tokenizers import Tokenizer

    from pipelines.tokenize import make_config, read_item, work_blocks

    cfg = make_config(out=work / "unused")  # the job's default text field and parquet column
    t0 = time.perf_counter()
    tok = Tokenizer.from_file(str(tok_path))
    tok.encode_special_tokens = True
    docs = tokens = 0
    for block in work_blocks(items, 1):
        texts = [text for it in json.loads(block)
                 for _, text, _ in read_item(it, cfg.text_field, cfg.parquet_column).docs]
        tokens += sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
        docs += len(texts)
    return docs, tokens, time.perf_counter() - t0


def plain_job(tok_path: Path, items: list[dict], work: Path) -> tuple[int, int, float]:
    """The job's work in this process, no Ray: the actor's code on each block, then the same shard
    writing with sha256 (``ShardSink``); (documents, tokens, seconds)."""
    from pipelines.tokenize import ShardSink, TokenizeActor, make_config, token_dtype, work_blocks

    folder = Path(tempfile.mkdtemp(dir=work, prefix="plain_job_"))
    cfg = make_config(out=folder)  # the job's defaults
    t0 = time.perf_counter()
    actor = TokenizeActor(tok_path.read_text(), cfg.text_field, cfg.parquet_column, cfg.val_fraction)
    sink = ShardSink(folder, cfg.shard_tokens, token_dtype(actor.tok.get_vocab_size()))
    for block in work_blocks(items, 1):
        sink.add(actor({"items": [block]}))
    splits = sink.finish()
    secs = time.perf_counter() - t0
    shutil.rmtree(folder)
    return sum(s["documents"] for s in splits.values()), sum(s["tokens"] for s in splits.values()), secs


def in_fresh_process(fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a fresh process, as each Ray job's actors are.

    Measured on 2 cores: in one long-lived process, each new tokenizer made the next loop slower
    (stdlib: 3.9 s, then 4.5, 4.6, 4.7, 5.3, 5.3 s over six loops; 3.5-3.9 s throughout with one
    tokenizer; 3.8-4.0 s each in fresh processes), which would favour Ray's fresh actors.
    """
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


PLAIN = {  # row label -> function: both are baselines of the target's verdict
    "plain loop, same job (shards, sha256), 1 process": plain_job,
    "plain loop, tokenize only, 1 process": plain_tokenize,
}


def ray_run(tok_path: Path, cpus: int, work: Path, max_files: int | None, scale: int) -> dict[str, Any]:
    """The real ``prepare`` job (``stdlib`` listed ``scale`` times) on the running local Ray."""
    from pipelines.tokenize import make_config, prepare

    out = work / f"ray{cpus}x{scale}"
    cfg = make_config(out=out, sources=["stdlib"] * scale, tokenizer=tok_path, num_cpus=cpus, force=True,
                      max_files=max_files)
    t1 = time.perf_counter()
    m = prepare(cfg, log=lambda s: None)
    secs = time.perf_counter() - t1
    tm = m["timings"]
    steady = m["counts"]["tokens"] / max(1e-9, tm["ray_data_seconds"] - tm["startup_seconds"])
    return {"documents": m["counts"]["documents"], "tokens": m["counts"]["tokens"], "seconds": secs,
            "startup_seconds": tm["startup_seconds"], "steady_tokens_per_s": steady, "out": out}


def loader_rate(path: Path, seq_len: int, batch_size: int, num_workers: int, seconds: float) -> float:
    """Packed tokens/s the PackedLoader delivers to the caller (training stream, shuffled)."""
    from rattention.data import PackedLoader

    loader = PackedLoader(path, "train", seq_len=seq_len, batch_size=batch_size, seed=0,
                          num_workers=num_workers)
    it = iter(loader)
    next(it)  # worker start-up excluded
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, _ = next(it)
        n += x.numel()
    return n / (time.perf_counter() - t0)


def paired_ratio(plain: list[float], ray: list[float], level: float = 0.9, resamples: int = 10_000,
                 seed: int = 0) -> tuple[float, float, float]:
    """The plain loop's time over the Ray job's, from interleaved pairs (repeat i of each, run within
    a minute or two of each other): geometric mean of the pair ratios and a seeded bootstrap ``level``
    interval of it. Pairing cancels this VM's drift between repeats; the interval is the noise left."""
    logs = [math.log(p / r) for p, r in zip(plain, ray, strict=True)]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(logs, k=len(logs))) for _ in range(resamples))
    lo, hi = means[int((1 - level) / 2 * resamples)], means[int((1 + level) / 2 * resamples) - 1]
    return math.exp(statistics.fmean(logs)), math.exp(lo), math.exp(hi)


def _verdicts(rows: list[dict]) -> tuple[list[str], dict]:
    """Per scale: Ray (2 CPUs, running Ray) against each plain loop; and the rows by key.

    The estimate is ``paired_ratio`` over the interleaved pairs. "No slower" is met when Ray is faster
    (the whole 90% interval above 1x) or equal within noise (the interval holds 1x), and missed only
    when Ray is measurably slower (the whole interval below 1x); fewer than 3 pairs are not judged.
    Best-of and medians are shown beside.
    """
    best = {(r["scale"], r["kind"], r["cpus"], r.get("cold", False)): r for r in rows}
    med = {k: statistics.median(r["runs_seconds"]) for k, r in best.items()}
    lines = []
    for scale in sorted({r["scale"] for r in rows}):
        ray2 = (scale, "ray", 2, False)
        parts = []
        for label, kind in (("the same job", "plain_job"), ("tokenizing only", "plain_tokenize")):
            plain = (scale, kind, 1, False)
            n = len(best[ray2]["runs_seconds"])
            gm, lo, hi = paired_ratio(best[plain]["runs_seconds"], best[ray2]["runs_seconds"])
            wins = sum(p >= r for p, r in zip(best[plain]["runs_seconds"], best[ray2]["runs_seconds"], strict=True))
            verdict = ("too few repeats to judge (--repeats 5 or more)" if n < 3 else "Ray faster: met"
                       if lo > 1 else "Ray slower: NOT met" if hi < 1 else "equal within noise, no slower: met")
            parts.append(
                f"against {label}, {gm:.3f}x over {n} interleaved pairs (90% interval {lo:.3f}-{hi:.3f}x; "
                f"Ray faster in {wins} of {n}; best-of {best[plain]['seconds'] / best[ray2]['seconds']:.3f}x, "
                f"medians {med[plain] / med[ray2]:.3f}x): {verdict}")
        lines.append(f"scale {scale}: " + "; ".join(parts))
    return lines, best


def write_markdown(result: dict, path: Path) -> None:
    """benchmarks/data.md: the tables and the verdicts against the targets."""
    rows, loader = result["tokenize"], result["loader"]
    verdicts, best = _verdicts(rows)
    slowest_loader = min(r["tokens_per_s"] for r in loader)
    lines = [
        "# Data pipeline figures",
        "",
        f"Command: `{result['command']}`.",
        "",
        f"Recorded {result['date']} at commit {result['commit']} on {result['device']}, "
        f"{result['cpu_count']} CPUs (load average {result['load_average'][0]:.1f} at start, "
        f"{result['load_average_end'][0]:.1f} at the end, this benchmark included); "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
        "",
        f"Corpus: `{result['corpus']['source']}`, {result['corpus']['files']} files, "
        f"{result['corpus']['mb']} MB, listed `scale` times; byte-level BPE, vocab 8192 (trained once, "
        f"{result['tokenizer_train_seconds']:.1f} s, not timed below).",
        "",
        "## Tokenization",
        "",
        "| scale | path | documents | tokens | seconds | tokens/s | vs same job | vs tokenize only "
        "| actor start-up s | steady tokens/s | every run, s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        job = best[(r["scale"], "plain_job", 1, False)]["seconds"]
        tok = best[(r["scale"], "plain_tokenize", 1, False)]["seconds"]
        lines.append(
            f"| {r['scale']} | {r['path']} | {r['documents']} | {r['tokens']} | {r['seconds']:.2f} | "
            f"{r['tokens_per_s']:,.0f} | {job / r['seconds']:.2f}x | {tok / r['seconds']:.2f}x | "
            + (f"{r['startup_seconds']:.1f} | {r['steady_tokens_per_s']:,.0f} |" if r["kind"] == "ray" else "- | - |")
            + " " + ", ".join(f"{x:.2f}" for x in sorted(r["runs_seconds"])) + " |")
    first = min(r["scale"] for r in rows)
    cold = best.get((first, "ray", 2, True))
    ray2, plain = best[(first, "ray", 2, False)], best[(first, "plain_tokenize", 1, False)]
    ups = [r["startup_seconds"] for r in rows if r["kind"] == "ray"]
    overhead = ray2["seconds"] - ray2["tokens"] / ray2["steady_tokens_per_s"]
    lines += [
        "",
        "Paths. *Plain loop, same job*: one process, no Ray, the job's own work: the actor class called "
        "in-process on each block (read, decode, encode, document keys and splits), then the same shard "
        "writing and sha256 as the Ray job's driver; it gives the same shards. *Plain loop, tokenize only*: "
        "read, decode and encode, one encode call per block, nothing kept. *Ray Data prepare*: the whole "
        "`prepare` job on a running local Ray: listing, fingerprint, Ray Data (actor start-up included), "
        "shard writing, sha256 and manifest. Starting Ray itself took "
        + ", ".join(f"{v:.1f} s ({k} CPU)" for k, v in result["ray_init_seconds"].items())
        + " and is not included. The driver's and the plain loops' imports are outside every timing (the "
        "actors' are inside: they are their start-up). *Actor start-up* is the time from the "
        "start of Ray Data's execution until the first actor starts tokenizing (a worker process, `import "
        "ray.data`, the tokenizer); *steady* is all the tokens over the time after that. Best of "
        f"{result['repeats']} runs per row, interleaved (every run in the last column: this VM's speed "
        "drifts between runs).",
        "",
        "*First job on a fresh Ray*: the first Ray Data job a cluster runs also starts Ray Data's own "
        "cluster-wide actors (a stats actor, an autoscaling coordinator, an actor-location tracker), each a "
        "worker process; on 2 cores those spawns compete with the tokenizer actors. They persist for the "
        "cluster's lifetime, so every later job, the usual case on a cluster that jobs are submitted to, "
        "runs without them. The other Ray rows are such later jobs.",
        "",
        "Target: the Ray path (2 CPUs) no slower than the plain loop on 2 cores. Measured, end to end, on "
        "a running Ray, as the plain loop's time over the Ray job's. " + ". ".join(verdicts) + "."
        + (f" The first job on a fresh Ray, scale {first}: "
           f"{best[(first, 'plain_job', 1, False)]['seconds'] / cold['seconds']:.2f}x against the same job."
           if cold else "")
        + f" Each job's actors took {min(ups):.1f}-{max(ups):.1f} s to start: a worker process with `import "
        "ray` (about 0.35 s of a core), then `import ray.data` (about 0.5 s, pandas included) when the actor "
        f"class arrives. Past that the 2-CPU pool ran at {ray2['steady_tokens_per_s'] / plain['tokens_per_s']:.2f}x "
        f"the tokenize-only loop's rate at scale {first}; the rest of the Ray job, {overhead:.1f} s, is that "
        "start-up, the last block and the manifest.",
        "",
        "## Loader (PackedLoader, shuffled training stream, packed tokens handed to the caller)",
        "",
        "| seq_len | batch | DataLoader workers | packed tokens/s |",
        "|---:|---:|---:|---:|",
    ]
    for r in loader:
        lines.append(f"| {r['seq_len']} | {r['batch_size']} | {r['num_workers']} | {r['tokens_per_s']:,.0f} |")
    lines += [
        "",
        f"Target: never the bottleneck. Training on 2 CPU cores consumes 6-10K tokens/s (`benchmarks/cpu.md`; "
        f"the demo's Ray Train runs show 3.7-4.0K), so take ~30K tokens/s as a ceiling for any CPU run; the "
        f"slowest loader setting gives {slowest_loader:,.0f} "
        f"tokens/s, {slowest_loader / 30_000:,.0f}x that ({'met' if slowest_loader > 30_000 else 'NOT met'}).",
        "",
        f"JSON: `{result['json']}`.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-files", type=int, default=None, help="stdlib subset (default: all files)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per tokenization row; the best is kept")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 4],
                    help="corpus sizes: stdlib listed this many times (1 is the target's corpus)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "data.json"))
    ap.add_argument("--markdown", default=str(Path(__file__).parent / "data.md"))
    ap.add_argument("--render-only", action="store_true", help="rewrite the markdown from the JSON")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.render_only:
        write_markdown(json.loads(Path(args.out).read_text()), Path(args.markdown))
        return

    from pipelines.tokenize import _sample_texts, make_config, resolve_sources, train_tokenizer
    from rattention.provenance import provenance

    load = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        cfg = make_config(out=work / "x", max_files=args.max_files)
        items, _ = resolve_sources(cfg)
        corpus_mb = sum(it["size"] for it in items) / 1e6
        t0 = time.perf_counter()
        tok = train_tokenizer(_sample_texts(items, cfg), 8192)
        t_train = time.perf_counter() - t0
        tok_path = work / "tokenizer.json"
        tok.save(str(tok_path))

        import ray

        from pipelines.ray_utils import init_ray

        best: dict[tuple[int, str], dict] = {}
        runs: dict[tuple[int, str], list[float]] = {}

        def keep(row: dict) -> None:
            key = (row["scale"], row["path"])
            runs.setdefault(key, []).append(row["seconds"])
            if key not in best or row["seconds"] < best[key]["seconds"]:
                best[key] = row
            best[key]["runs_seconds"] = list(runs[key])  # every run, in repeat order (the pairs)

        ray_init: dict[int, float] = {}
        for rep in range(args.repeats):  # interleaved, so a burst of load hits every row alike
            print(f"repeat {rep + 1}/{args.repeats}", flush=True)
            plain_tokens = {}
            for scale in args.scales:
                for label, fn in PLAIN.items():
                    docs, tokens, secs = in_fresh_process(fn, tok_path, items * scale, work)
                    assert plain_tokens.setdefault(scale, tokens) == tokens, (label, tokens)  # same result
                    keep({"scale": scale, "path": label, "kind": fn.__name__, "cpus": 1, "documents": docs,
                          "tokens": tokens, "seconds": secs, "tokens_per_s": tokens / secs})
            for cpus in (1, 2):
                t0 = time.perf_counter()
                init_ray(num_cpus=cpus)
                ray_init[cpus] = time.perf_counter() - t0
                # The first Ray Data job on a fresh Ray also starts Ray Data's own cluster actors (stats,
                # autoscaling coordinator, actor-location tracker), once per cluster: its own row. The
                # other rows are jobs on a running Ray, as jobs submitted to a cluster are.
                plan = [(args.scales[0], True)] + [(scale, False) for scale in args.scales]
                for scale, cold in plan:
                    r = ray_run(tok_path, cpus, work, args.max_files, scale)
                    if cpus == 2 and scale == args.scales[0]:
                        loader_ds = r["out"]  # the loader's figures read this dataset
                    assert r["tokens"] == plain_tokens[scale], (r["tokens"], plain_tokens[scale])  # same result
                    keep({"scale": scale, "path": f"Ray Data prepare, {cpus} CPU"
                          + (", first job on a fresh Ray" if cold else ""), "kind": "ray", "cpus": cpus,
                          "cold": cold, "documents": r["documents"], "tokens": r["tokens"], "seconds": r["seconds"],
                          "tokens_per_s": r["tokens"] / r["seconds"], "startup_seconds": r["startup_seconds"],
                          "steady_tokens_per_s": r["steady_tokens_per_s"]})
                ray.shutdown()
        order = {"plain_job": 0, "plain_tokenize": 1, "ray": 2}
        rows = sorted(best.values(), key=lambda r: (r["scale"], order[r["kind"]], r["cpus"], not r.get("cold")))
        loader = []
        for seq_len, bs, nw in ((256, 16, 0), (1024, 8, 0), (1024, 8, 2)):
            loader.append({"seq_len": seq_len, "batch_size": bs, "num_workers": nw,
                           "tokens_per_s": loader_rate(loader_ds, seq_len, bs, nw, seconds=5.0)})
        cmd = "python benchmarks/bench_data.py" + (f" --max-files {args.max_files}" if args.max_files else "") + (
            f" --repeats {args.repeats}" if args.repeats != 1 else "") + (
            f" --scales {' '.join(map(str, args.scales))}" if args.scales != [1, 4] else "")
        result = {
            **provenance(),
            "command": cmd,
            "load_average": load,
            "versions": {p: version(p) for p in ("ray", "tokenizers", "webdataset", "numpy", "torch")},
            "corpus": {"source": "stdlib" + (f" (max_files={args.max_files})" if args.max_files else ""),
                       "files": len(items), "mb": round(corpus_mb, 2)},
            "tokenizer_train_seconds": t_train,
            "repeats": args.repeats,
            "ray_init_seconds": ray_init,
            "tokenize": rows,
            "loader": loader,
            "json": os.path.relpath(args.out, Path(__file__).parent.parent),
            "note": "Ray seconds cover the whole prepare job (listing, fingerprint, Ray Data tokenize, shard "
                    "writing, sha256, manifest); Ray start-up is reported apart. Tokenizer training excluded. "
                    "plain_job: the same per-block actor code and shard writing in one process, no Ray.",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result["load_average_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, Path(args.markdown))
    print(Path(args.markdown).read_text())


if __name__ == "__main__":
    main()
