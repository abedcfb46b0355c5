"""The demo's figures: its wall time on this machine, its answer table, how far the windows below each
kind's minimum fall short of the bar against the baseline's seed spread, and the paper's figure as a PNG.

    python benchmarks/bench_demo.py                        # runs `rattention demo` in a fresh folder, timed
    python benchmarks/bench_demo.py --workdir DIR --wall-s S --command "make demo (clean clone)"
                                                           # records a demo already run in DIR (S seconds)

Writes benchmarks/results/demo.json, the `demo` section of benchmarks/demo.md and benchmarks/demo-paper.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from rattention.provenance import provenance, write_section  # noqa: E402


def run_demo(workdir: Path, profile: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rattention", "demo", "--profile", profile, "--workdir", str(workdir)],
                   cwd=HERE.parent, check=True)
    return time.perf_counter() - t0


def separation(trials: list[dict], answer: dict) -> list[dict]:
    """Per kind: the largest window below its minimum, its mean objective, and its distance past the bar in
    units of the baseline's seed spread."""
    bar = answer["bar"]
    out = []
    for k in answer["kinds"]:
        below = sorted({int(t["window"]) for t in trials if t["kind"] == k["kind"] and t["value"] != ""
                        and k["minimal"] is not None and int(t["window"]) < k["minimal"]})
        if not below:
            out.append({"kind": k["kind"], "minimal": k["minimal"], "below": None})
            continue
        w = below[-1]
        vals = [float(t["value"]) for t in trials if t["kind"] == k["kind"] and int(t["window"]) == w
                and t["value"] != ""]
        mean = sum(vals) / len(vals)
        short = mean - bar["threshold"]
        spread = bar["baseline_spread"]
        out.append({"kind": k["kind"], "minimal": k["minimal"], "below": w, "below_mean": mean,
                    "short_of_bar": short, "baseline_spread": spread,
                    "in_spreads": short / spread if spread > 0 else float("inf")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="A folder the demo already ran in (else a fresh temp one).")
    ap.add_argument("--wall-s", type=float, help="With --workdir: the demo's measured wall time.")
    ap.add_argument("--command", default=None, help="With --workdir: the command that was timed.")
    ap.add_argument("--profile", default="full", choices=["full", "smoke"])
    args = ap.parse_args()
    if args.workdir is None:
        work = Path(tempfile.mkdtemp(prefix="rattention-demo-"))
        wall, command = run_demo(work, args.profile), f"rattention demo --profile {args.profile} --workdir {work}"
    else:
        work, wall, command = args.workdir, args.wall_s, args.command or "rattention demo"
    sweep = next((work / ".rattention" / "sweeps").glob("*/answer.json")).parent
    answer = json.loads((sweep / "answer.json").read_text())
    import csv

    with (sweep / "trials.csv").open() as f:
        trials = list(csv.DictReader(f))
    sep = separation(trials, answer)
    png = HERE / "demo-paper.png"
    shutil.copyfile(sweep / "report" / "paper.png", png)
    record = {**provenance(), "command": command, "wall_s": wall, "sweep_wall_s": answer["wall_s"],
              "trials": answer["trials"], "trained": answer["trained"], "rule": answer["rule"],
              "kinds": answer["kinds"], "separation": sep, "table": answer["table"]}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "demo.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"{record['device']}, torch {record['torch']}, {record['cpu_count']} cores, commit {record['commit']}, "
             f"{record['date']}. `{command}`: **{wall / 60:.1f} min** wall"
             + (f" (the sweep {answer['wall_s']:.0f} s, {answer['trials']} trials)" if wall else ""), "",
             answer["table"], "", "Separation: the largest window below each kind's minimum, against the bar "
             f"({answer['rule']}):", "",
             "| kind | minimal window | window below | its mean | short of the bar by | in baseline spreads |",
             "|---|---|---|---|---|---|"]
    for s in sep:
        if s["below"] is None:
            lines.append(f"| {s['kind']} | {s['minimal']} | - (the grid's smallest) | - | - | - |")
        else:
            lines.append(f"| {s['kind']} | {s['minimal']} | {s['below']} | {s['below_mean']:.4f} | "
                         f"{s['short_of_bar']:.4f} nats | {s['in_spreads']:.3g} |")
    lines += ["", "![the paper's figure of this run](demo-paper.png)"]
    text = "\n".join(lines)
    write_section(HERE / "demo.md", "demo", text, title="# The demo (`make demo`)")
    print(text)


if __name__ == "__main__":
    main()
