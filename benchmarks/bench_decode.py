"""Decode speed through the cache: full, swa w=4096 and rattention w=512 on the ~125M model (bf16, one
GPU) at contexts 4K, 32K and 128K, batch 1 and 64; the eager static step and its CUDA-graph replay
side by side in the same run, with the real cache's bytes beside ``cache_bytes()``.

    python benchmarks/bench_decode.py                  # on a GPU: benchmarks/results/decode-<device>.json
    python benchmarks/bench_decode.py --quick          # tiny model, CPU is fine: proves the script end to end
    python benchmarks/bench_decode.py --count-ops      # CPU: ops one decode step dispatches, torch vs fused path

A 4K prompt is prefilled for real (one parallel pass, last-position logits). For longer contexts the cache
is filled with random values of the right shapes instead: a decode step's time depends only on the cache's
shapes. Prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rattention.cache import BLOCK, ModelCache, cache_bytes  # noqa: E402
from rattention.config import ModelConfig  # noqa: E402
from rattention.generate import EagerStep, GraphStep, stepwise_logits  # noqa: E402
from rattention.model import LM, Attention  # noqa: E402
from rattention.provenance import provenance  # noqa: E402

MODEL_125M = dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=6, n_kv_heads=2, head_dim=128,
                  mlp_hidden=3072, layout="LLLG", dtype="bfloat16")
WINDOWS_125M = {"full": 512, "swa": 4096, "rattention": 512}  # full ignores its window
MODEL_QUICK = dict(vocab_size=256, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, mlp_hidden=128,
                   layout="LLLG", dtype="float32")
WINDOWS_QUICK = {"full": 8, "swa": 32, "rattention": 8}
GiB = 2**30


def build(kind: str, window: int, base: dict, device: torch.device) -> LM:
    """A randomly initialised model of ``kind`` (weights do not change the step's time)."""
    cfg = ModelConfig(**base, kind=kind, window=window)
    torch.manual_seed(0)
    with device:
        return LM(cfg).eval()


def needed_bytes(cfg: ModelConfig, capacity: int, batch: int, prefill: int) -> int:
    """Device memory a cell needs: the cache, the step's fp32 scores (a few copies), the prefill's
    activations and a margin."""
    scores = 4 * batch * cfg.n_heads * capacity * 4
    activations = batch * prefill * (3 * cfg.hidden + 8 * cfg.d_model) * 2
    return cache_bytes(cfg, capacity, batch) + scores + activations + GiB


def fill_random(cache: ModelCache, context: int) -> None:
    """A cache after ``context`` tokens, of the right shapes with random contents."""
    for layer in cache.layers:
        for t in layer.tensors():
            t.normal_()
    cache.length = context
    cache.pos.fill_(context)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, token: torch.Tensor, n: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds for n greedy decode steps (the argmax on device, no host sync between steps)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        token = step(token).argmax(-1)
    sync(device)
    return time.perf_counter() - t0, token


def one_cell(model: LM, context: int, batch: int, args, device: torch.device) -> dict:
    """Prefill (real up to --real-prefill, else random fill), then eager steps, then CUDA-graph steps."""
    cfg = model.cfg
    capacity = context + 2 * (args.warmup + args.steps) + 1
    real = context <= args.real_prefill
    row: dict = {"context": context, "batch": batch, "capacity": capacity,
                 "prefill": "real" if real else "random fill"}
    if device.type == "cuda":
        need, free = needed_bytes(cfg, capacity, batch, context if real else 0), torch.cuda.mem_get_info()[0]
        if need > 0.92 * free:
            return {**row, "skipped": f"needs ~{need / GiB:.0f} GiB, {free / GiB:.0f} GiB free"}
    cache = model.new_cache(batch, capacity=capacity)
    gen = torch.Generator(device).manual_seed(0)
    token = torch.randint(0, cfg.vocab_size, (batch, 1), device=device, generator=gen)
    with torch.no_grad():
        if real:
            prompt = torch.randint(0, cfg.vocab_size, (batch, context), device=device, generator=gen)
            sync(device)
            t0 = time.perf_counter()
            token = model(prompt, cache, logits="last").argmax(-1)
            sync(device)
            row["prefill_s"] = time.perf_counter() - t0
            del prompt
        else:
            fill_random(cache, context)
        row["cache_nbytes"] = cache.nbytes()
        row["cache_bytes_formula"] = cache_bytes(cfg, cache.held_positions, batch)
        row["cache_bytes_at_context"] = cache_bytes(cfg, context, batch)
        eager = EagerStep(model, cache)
        _, token = timed(eager, token, args.warmup, device)
        secs, token = timed(eager, token, args.steps, device)
        row["eager_ms"], row["eager_tok_s"] = 1e3 * secs / args.steps, batch * args.steps / secs
        if device.type == "cuda":
            graph = GraphStep(model, cache, warmup=args.warmup)
            _, token = timed(graph, token, args.warmup + 1, device)  # eager warm-up, then capture + replay
            secs, token = timed(graph, token, args.steps, device)
            row["graph_ms"], row["graph_tok_s"] = 1e3 * secs / args.steps, batch * args.steps / secs
            row["eager_over_graph"] = row["eager_ms"] / row["graph_ms"]
            del graph
    del cache, eager
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def check(model: LM, device: torch.device) -> dict:
    """The static step (eager and CUDA graph) against the parallel forward on a short sequence that wraps
    the smallest ring: max abs logit difference (bf16 on GPU; the fp64 contract is in the tests)."""
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 48), device=device,
                           generator=torch.Generator(device).manual_seed(1))
    with torch.no_grad():
        ref = model(tokens).float()
        out = {"eager_vs_parallel": (stepwise_logits(model, tokens, prefill=16, static=True).float() - ref)
               .abs().max().item()}
        if device.type == "cuda":
            eager = stepwise_logits(model, tokens, prefill=16, static=True)
            graph = stepwise_logits(model, tokens, prefill=16, static=True, cuda_graph=True)
            out["graph_vs_eager"] = (graph.float() - eager.float()).abs().max().item()
    out["logit_scale"] = ref.abs().max().item()
    return out


def fmt_bytes(n: float) -> str:
    if n < 2**20:
        return f"{n / 2**10:,.1f} KiB"
    return f"{n / 2**20:,.1f} MiB" if n < GiB else f"{n / GiB:,.2f} GiB"


# --count-ops: the bench's model scaled down (same layers, layout, GQA 6:2, windows, dtype and contexts, so the
# same code paths and key-block splits) and the H200 measurement the per-op cost comes from.
MODEL_COUNT = dict(MODEL_125M, vocab_size=256, d_model=96, head_dim=16, mlp_hidden=128)
H200_GRAPH_MS = {  # benchmarks/results/decode-h200.json (commit 65e64e5), CUDA-graph replay, batch 1
    ("full", 4096): 1.599, ("full", 32768): 1.839, ("swa", 4096): 1.664, ("swa", 32768): 1.725,
    ("rattention", 4096): 2.323, ("rattention", 32768): 2.379}
NO_KERNEL_OPS = {"aten::empty", "aten::empty_strided", "aten::_unsafe_view", "aten::detach", "aten::lift_fresh"}


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops dispatched under it, per label (the layer kind being stepped, else "other"), split
    into kernel ops and ops that launch no kernel (views, allocations). A Triton launch counts as one kernel
    op (``triton_launches`` patches the launchers); the aten ops the launcher or the interpreter run inside
    it are not counted."""

    def __init__(self):
        super().__init__()
        self.kernels: Counter = Counter()
        self.free: Counter = Counter()
        self.names: dict[str, Counter] = {}
        self.label, self.paused = "other", False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            name = func._schema.name
            if func.is_view or name in NO_KERNEL_OPS:
                self.free[self.label] += 1
            else:
                self.kernels[self.label] += 1
                self.names.setdefault(self.label, Counter())[name] += 1
        return out

    def launch(self) -> None:
        self.kernels[self.label] += 1
        self.names.setdefault(self.label, Counter())["triton launch"] += 1


@contextlib.contextmanager
def triton_launches(counter: OpCounter):
    """Every Triton kernel launch (compiled or interpreted) counts one op in ``counter``."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}

    def counted(run):
        def wrapped(self, *args, **kwargs):
            counter.launch()
            counter.paused, was = True, counter.paused
            try:
                return run(self, *args, **kwargs)
            finally:
                counter.paused = was
        return wrapped

    for cls, run in originals.items():
        cls.run = counted(run)
    try:
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run


def count_step(model: LM, context: int, fused: bool) -> tuple[OpCounter, Counter]:
    """The ops of one static decode step (batch 1) at ``context`` (random-filled cache), torch path or fused;
    also the number of layers of each kind."""
    capacity = context + 2 * (3 + 20) + 1  # as one_cell's reserved cache
    cache = model.new_cache(1, capacity=capacity)
    fill_random(cache, context)
    for layer in cache.layers:  # a filled ring: valid S, keys of a normal scale
        if getattr(layer, "state", None) is not None:
            layer.state.mul_(0.1)
    token = torch.zeros(1, 1, dtype=torch.long)
    counter = OpCounter()
    kinds = Counter(block.attn.kind for block in model.blocks)
    for block in model.blocks:
        def labelled(x, layer, at, _block=block, _step=block.decode_step):
            counter.label = _block.attn.kind
            try:
                return _step(x, layer, at)
            finally:
                counter.label = "other"
        block.decode_step = labelled
    Attention.fused_decode = fused
    try:
        with torch.no_grad():
            model.decode_step(token, cache)  # one step untimed, uncounted: lazy set-up (Triton compile)
            with triton_launches(counter), counter:
                model.decode_step(token, cache)
    finally:
        Attention.fused_decode = None
        for block in model.blocks:
            del block.decode_step
    return counter, kinds


def count_ops(contexts: list[int]) -> dict:
    """--count-ops: kernel ops per decode step and per layer kind, torch path (before) against the fused
    local-layer step (after), and the batch-1 H200 ms/step they predict."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused step runs on CPU tensors in the interpreter
    torch.set_num_threads(1)
    rows = []
    for kind, window in WINDOWS_125M.items():
        model = build(kind, window, MODEL_COUNT, torch.device("cpu"))
        for context in contexts:
            for path, fused in (("torch", False), ("fused", True)):
                counter, kinds = count_step(model, context, fused)
                per_layer = {k: counter.kernels[k] // n for k, n in kinds.items()}
                rows.append({"kind": kind, "window": window, "context": context, "path": path,
                             "ops_per_step": sum(counter.kernels.values()), "ops_per_layer": per_layer,
                             "layers": dict(kinds), "ops_other": counter.kernels["other"],
                             "no_kernel_ops": sum(counter.free.values()),
                             "op_names": {k: dict(v) for k, v in counter.names.items()}})
    full_4k = next(r for r in rows if r["kind"] == "full" and r["context"] == 4096 and r["path"] == "torch")
    per_op_ms = H200_GRAPH_MS[("full", 4096)] / full_4k["ops_per_step"]
    for r in rows:
        r["predicted_h200_b1_ms"] = r["ops_per_step"] * per_op_ms
        r["measured_h200_b1_ms"] = H200_GRAPH_MS.get((r["kind"], r["context"])) if r["path"] == "torch" else None
    return {"per_op_ms": per_op_ms, "rows": rows, "model": MODEL_COUNT}


def count_table(result: dict) -> str:
    """Markdown: ops per step and per layer kind, before (torch) and after (fused), with the prediction."""
    cols = ["kind", "w", "context", "path", "ops/step", "ops per layer (kind: ops x layers)", "ops outside layers",
            "predicted H200 b1 ms/step", "measured (torch path)"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        layers = ", ".join(f"{k}: {v} x {r['layers'][k]}" for k, v in r["ops_per_layer"].items())
        measured = f"{r['measured_h200_b1_ms']:.2f}" if r["measured_h200_b1_ms"] else "-"
        lines.append(f"| {r['kind']} | {'-' if r['kind'] == 'full' else r['window']} | {r['context']:,} | "
                     f"{r['path']} | {r['ops_per_step']} | {layers} | {r['ops_other']} | "
                     f"{r['predicted_h200_b1_ms']:.2f} | {measured} |")
    return "\n".join(lines)


def table(rows: list[dict], kinds: dict[str, int]) -> str:
    """Markdown table, one row per cell; "vs full" is tokens/s over full's in the same cell."""
    full = {(r["context"], r["batch"]): r for r in rows if r["kind"] == "full" and "skipped" not in r}
    cols = ["kind", "w", "context", "batch", "prefill", "eager ms/step", "graph ms/step", "eager/graph",
            "tok/s", "vs full", "cache (real)", "cache_bytes()"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        label = r["kind"] + (" (fused step)" if r.get("path") == "fused" else "")
        cells = [label, "-" if r["kind"] == "full" else str(kinds[r["kind"]]), f"{r['context']:,}",
                 str(r["batch"]), r["prefill"]]
        if "skipped" in r:
            lines.append("| " + " | ".join(cells + [f"skipped: {r['skipped']}"] + [""] * 6) + " |")
            continue
        graph = "graph_ms" in r
        speed = "graph_tok_s" if graph else "eager_tok_s"
        base = full.get((r["context"], r["batch"]))
        cells += [f"{r['eager_ms']:.3f}", f"{r['graph_ms']:.3f}" if graph else "-",
                  f"{r['eager_over_graph']:.1f}x" if graph else "-", f"{r[speed]:,.0f}",
                  f"{r[speed] / base[speed]:.2f}x" if base else "-",
                  fmt_bytes(r["cache_nbytes"]), fmt_bytes(r["cache_bytes_formula"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, small contexts and batches (CPU is fine)")
    ap.add_argument("--kinds", default="full,swa,rattention")
    ap.add_argument("--contexts", default=None, help="comma-separated; default 4096,32768,131072 (quick: 64,256)")
    ap.add_argument("--batches", default=None, help="comma-separated; default 1,64 (quick: 1,4)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per cell (default 20, quick 5)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before each timing")
    ap.add_argument("--real-prefill", type=int, default=None,
                    help="prefill for real up to this context, fill randomly above (default 4096, quick 64)")
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--paths", default=None,
                    help="local layers' decode step: torch, fused or both (default torch,fused on CUDA, torch on "
                         "CPU; the fused Triton step runs on CPU only under TRITON_INTERPRET=1)")
    ap.add_argument("--count-ops", action="store_true",
                    help="count the ops of one decode step per layer kind (CPU, scaled-down model), torch path "
                         "against the fused local step, and predict H200 batch-1 ms/step from the counts")
    args = ap.parse_args()
    if args.count_ops:
        contexts = [int(c) for c in (args.contexts or "4096,32768").split(",")]
        t0 = time.time()
        result = count_ops(contexts)
        notes = [
            f"model: the bench's ~125M shape scaled down {MODEL_COUNT}; windows {WINDOWS_125M}; batch 1; "
            "one static decode step (eager) on CPU, the fused step under TRITON_INTERPRET=1",
            "ops: aten ops dispatched (TorchDispatchMode), views and allocations left out (they launch no "
            "kernel); a Triton launch counts as one",
            f"PREDICTION FROM COUNTS, not a measurement: H200 ms/step = ops x {1e3 * result['per_op_ms']:.2f} us, "
            "the per-op cost of full at 4K (1.599 ms graph replay / its op count); it ignores bytes (right at "
            "batch 1, where the step is bound by kernel count) and prices the fused kernel like any other op",
            "measured: benchmarks/results/decode-h200.json (commit 65e64e5; swa then copied a tail of its ring, "
            "since f99df46 it splits it in blocks of 241)",
        ]
        record = {"benchmark": "decode-count-ops", "provenance": provenance(), **result, "notes": notes,
                  "wall_s": round(time.time() - t0, 1)}
        out = args.out or ROOT / "benchmarks" / "results" / "decode-count-ops.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {out} ({record['wall_s']} s)\n")
        print(count_table(result))
        print("\n" + "\n".join(f"- {n}" for n in notes))
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    quick = args.quick
    base, windows = (MODEL_QUICK, WINDOWS_QUICK) if quick else (MODEL_125M, WINDOWS_125M)
    contexts = [int(c) for c in (args.contexts or ("64,256" if quick else "4096,32768,131072")).split(",")]
    batches = [int(b) for b in (args.batches or ("1,4" if quick else "1,64")).split(",")]
    args.steps = args.steps or (5 if quick else 20)
    args.real_prefill = args.real_prefill if args.real_prefill is not None else (64 if quick else 4096)
    kinds = {k: windows[k] for k in args.kinds.split(",")}
    prov = provenance()
    slug = "cpu" if device.type == "cpu" else prov["device"].lower().replace("nvidia", "").split()[0]
    out = args.out or ROOT / "benchmarks" / "results" / f"decode-{'quick-' if quick else ''}{slug}.json"

    t_start = time.time()
    rows, checks = [], {}
    paths = (args.paths or ("torch,fused" if device.type == "cuda" else "torch")).split(",")
    for kind, window in kinds.items():
        model = build(kind, window, base, device)
        for path in paths if kind != "full" else ["torch"]:  # full has no local layer
            Attention.fused_decode = path == "fused"
            name = kind if path == "torch" else f"{kind}+fused"
            try:
                checks[name] = check(model, device)
            except Exception as err:  # noqa: BLE001 - a path that fails is reported, the others still run
                checks[name] = {"error": " ".join(str(err).split())[:200]}
                print(f"{name}: check failed: {checks[name]['error']}", flush=True)
                continue
            print(f"{name}: check {checks[name]}", flush=True)
            for batch in batches:
                for context in contexts:
                    t0 = time.time()
                    try:
                        row = one_cell(model, context, batch, args, device)
                    except torch.cuda.OutOfMemoryError as err:
                        row = {"context": context, "batch": batch, "prefill": "-",
                               "skipped": f"out of memory ({str(err).splitlines()[0][:80]})"}
                        gc.collect()
                        torch.cuda.empty_cache()
                    rows.append({"kind": kind, "path": path, "window": window, **row})
                    print(f"{name} ctx {context} batch {batch}: {time.time() - t0:.1f}s "
                          f"{ {k: v for k, v in row.items() if k.endswith(('_ms', 'skipped'))} }", flush=True)
        Attention.fused_decode = None
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    mismatched = [r for r in rows if "cache_nbytes" in r and r["cache_nbytes"] != r["cache_bytes_formula"]]
    notes = [
        f"model: {'tiny (--quick)' if quick else '~125M'} {base}; windows {kinds}; greedy steps, argmax on device",
        f"ms/step: one decode step of the whole batch (= ms per token per sequence); tok/s = batch / step time; "
        f"{args.steps} timed steps after {args.warmup} warm-up steps per cell",
        f"prefill: contexts <= {args.real_prefill} prefilled for real (one parallel pass, last-position logits); "
        "longer ones random-filled caches of the same shapes",
        "graph: the static step captured once in a CUDA graph and replayed; eager: the same step called directly; "
        "(fused step): the local layers' one-launch Triton decode step (kernels.local_decode, fused=True), "
        "otherwise the torch path"
        + (" (CPU run: no graph column)" if device.type == "cpu" else ""),
        f"cache (real) = ModelCache.nbytes() of the reserved cache (capacity = context + "
        f"{2 * (args.warmup + args.steps) + 1} steps, rounded up to whole {BLOCK}-position blocks); "
        "cache_bytes() at that capacity: "
        + ("equal in every cell" if not mismatched else f"MISMATCH in {len(mismatched)} cells"),
        f"checks (max abs logit diff, static step vs parallel forward and graph vs eager): {checks}",
    ]
    record = {"benchmark": "decode", "provenance": prov, "args": {k: str(v) for k, v in vars(args).items()},
              "model": base, "windows": kinds, "rows": rows, "checks": checks, "notes": notes,
              "wall_s": round(time.time() - t_start, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote {out} ({record['wall_s']} s); device {prov['device']}, torch {prov['torch']}, "
          f"triton {prov['triton']}, commit {prov['commit']}, {prov['date']}\n")
    print(table(rows, kinds))
    print("\n" + "\n".join(f"- {n}" for n in notes))
    if mismatched:
        sys.exit("bench_decode: ModelCache.nbytes() differs from cache_bytes() (see the table)")


if __name__ == "__main__":
    main()
