"""The command line: ``rattention data|train|eval|import-run|sweep|import-sweep|report|ui|demo``.

This is the one module that reaches every package (the demo composes them); nothing imports it.
Heavy imports (ray, mlflow, optuna) happen inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path

import typer

# typer 0.29 carries its own copy of click (typer._click) and no longer uses the click package; its
# usage errors are these classes, not click's. pyproject pins typer exactly for that reason.
from typer._click.exceptions import NoArgsIsHelpError, UsageError

from rattention.errors import ConfigError, RattentionError

# pretty_exceptions_enable=False: no rich traceback panels (main() turns user errors into one line; a
# real bug keeps Python's plain traceback).
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help=__doc__.splitlines()[0])


def _prepare_default(name: str):
    """A ``rattention data prepare`` option's default: the job config's, so the two cannot drift."""
    from pipelines.tokenize import PrepareConfig

    return PrepareConfig.model_fields[name].default


def _synth_default(name: str):
    """A ``rattention data synth`` option's default, from the job config."""
    from pipelines.synth import SynthConfig

    return SynthConfig.model_fields[name].default


data_app = typer.Typer(no_args_is_help=True, help="Build datasets: tokenized WebDataset shards.")
app.add_typer(data_app, name="data")


# ----- data commands (pipelines.tokenize, pipelines.synth) -------------------------------------


@data_app.command("prepare")
def data_prepare(
    sources: list[str] = typer.Argument(
        None, help="'stdlib' (default), files, folders or globs (.txt .md .py .jsonl .parquet), or hf:NAME"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to create."),
    vocab_size: int = typer.Option(
        _prepare_default("vocab_size"), help="BPE vocabulary size when training a tokenizer."
    ),
    tokenizer: Path | None = typer.Option(None, help="Use this tokenizer.json instead of training one."),
    tokenizer_sample_mb: float = typer.Option(
        _prepare_default("tokenizer_sample_mb"), help="MB of corpus text to train the tokenizer on."
    ),
    val_fraction: float = typer.Option(
        _prepare_default("val_fraction"), help="Fraction of documents (by id hash) in the val split."
    ),
    shard_tokens: int = typer.Option(
        _prepare_default("shard_tokens"), help="Tokens per shard (a shard closes past this)."
    ),
    text_field: str = typer.Option(_prepare_default("text_field"), help="The text field of .jsonl records."),
    parquet_column: str = typer.Option(_prepare_default("parquet_column"), help="The text column of .parquet files."),
    max_files: int | None = typer.Option(None, help="Take only this many files per source (spread evenly)."),
    num_cpus: int | None = typer.Option(None, help="Tokenizer actors (and local Ray CPUs); default all."),
    address: str | None = typer.Option(None, help="Ray cluster address (else RAY_ADDRESS, else local Ray)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the folder is up to date."),
) -> None:
    """Tokenize a corpus into WebDataset shards with a Ray job (a no-op when already built)."""
    from pipelines.tokenize import make_config, prepare

    cfg = make_config(
        out=out, sources=sources or ["stdlib"], vocab_size=vocab_size, tokenizer=tokenizer,
        tokenizer_sample_mb=tokenizer_sample_mb, val_fraction=val_fraction, shard_tokens=shard_tokens,
        text_field=text_field, parquet_column=parquet_column, max_files=max_files, num_cpus=num_cpus,
        address=address, force=force,
    )
    prepare(cfg)


def _parse_params(items: list[str]) -> dict:
    import yaml

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE, e.g. gap=512 or depth=[0.1,0.5]")
        try:
            params[key] = yaml.safe_load(value)
        except yaml.YAMLError:  # a bad value, or a tag such as !!python/object (safe_load builds no objects)
            raise ConfigError(f"--param {item!r}: the value is not a plain YAML value") from None
    return params


@data_app.command("synth")
def data_synth(
    kind: str = typer.Argument(..., help="mqar | niah | passkey | vt | copy"),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to create."),
    samples: int = typer.Option(_synth_default("samples"), help="Number of task instances."),
    seq_len: int = typer.Option(_synth_default("seq_len"), help="Tokens per instance."),
    seed: int = typer.Option(_synth_default("seed"), help="Instance i depends only on (seed, i)."),
    split: str = typer.Option(_synth_default("split"), help="Split name of the shards."),
    val_samples: int = typer.Option(_synth_default("val_samples"),
                                    help="Also write a 'val' split of this many further instances."),
    vocab_size: int | None = typer.Option(None, help="Vocabulary size (EOS = 0), when no --like."),
    like: Path | None = typer.Option(None, help="A prepared dataset: use its tokenizer, vocab and EOS."),
    haystack: str = typer.Option(_synth_default("haystack"), help="Filler: noise | repeat | corpus (text of --like)."),
    param: list[str] = typer.Option(
        None, "--param", "-p", help="Task parameter KEY=VALUE, repeatable: num_pairs=16 gap=512 depth=0.5"
    ),
    shard_tokens: int = typer.Option(_synth_default("shard_tokens"), help="Tokens per shard."),
    num_cpus: int | None = typer.Option(None, help="Ray CPUs for generation; default all."),
    address: str | None = typer.Option(None, help="Ray cluster address (else RAY_ADDRESS, else local Ray)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the folder is up to date."),
) -> None:
    """Write a synthetic long-context task (tokens + answer mask) in the dataset shard format."""
    from pipelines.synth import make_config, synth

    cfg = make_config(
        kind=kind, out=out, samples=samples, seq_len=seq_len, seed=seed, split=split, val_samples=val_samples,
        vocab_size=vocab_size,
        like=like, haystack=haystack, params=_parse_params(param or []), shard_tokens=shard_tokens,
        num_cpus=num_cpus, address=address, force=force,
    )
    synth(cfg)



# ----- train / eval / import-run (pipelines.train, rattention.evaluate) -------------------------


@app.command()
def train(
    config: Path = typer.Argument(..., help="Run config YAML (see configs/)."),
    overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides, e.g. train.lr=3e-4"),
    run_dir: Path = typer.Option(None, "--run-dir", help="Run folder (default: train.out_dir/<run name>)."),
    no_ray: bool = typer.Option(False, "--no-ray", help="Plain torch in this process (torchrun for DDP): no Ray. "
                                "Tracked in MLflow only when tracking.uri or MLFLOW_TRACKING_URI is set; "
                                "else a run folder only (import it later with import-run)."),
) -> None:
    """Train one run on Ray Train, tracked in MLflow (or with --no-ray, in this process).

    The run's folder is named by a hash of its config, data and code: the same command again returns
    a finished run's results without training, or resumes an interrupted run from its checkpoint.
    """
    from pipelines.ray_utils import cluster_address
    from rattention.lifecycle import preflight
    from rattention.run_config import load_run_config

    cfg = load_run_config(config, overrides or [])
    preflight(cfg, run_dir, local=no_ray or cluster_address(cfg.ray.address) is None)
    try:
        if no_ray:
            results = _train_here(cfg, config, run_dir)
        else:
            from pipelines.train import fit

            results = fit(cfg, config, run_dir)
    except KeyboardInterrupt:
        print("interrupted: run marked KILLED; the same command resumes it from its last checkpoint",
              file=sys.stderr)
        raise typer.Exit(130) from None
    if results:
        _print_results(results)


def _train_here(cfg, config: Path, run_dir: Path | None) -> dict:
    """``train --no-ray``: the lifecycle in this process; under torchrun, one rank of the group."""
    import os

    import torch.distributed as dist

    from rattention import metrics as M
    from rattention.lifecycle import run

    tracker = None
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        from pipelines.tracking import MlflowTracker, check_uri

        check_uri(uri, "tracking.uri" if cfg.tracking.uri else "MLFLOW_TRACKING_URI")
        tracker = MlflowTracker(uri, cfg.tracking.experiment, source=config)
    try:
        results = run(cfg, run_dir, tracker=tracker, tags={M.TAG_SOURCE: "local"})
        if dist.is_initialized():  # the ranks leave together: rank 0 is still closing the run (its files, MLflow)
            dist.barrier()         # when the others are done, and a rank that exits early has been seen to abort
        return results if not dist.is_initialized() or dist.get_rank() == 0 else {}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@app.command("eval")
def eval_cmd(
    path: Path = typer.Argument(..., help="A run folder or a checkpoint file."),
    overrides: list[str] = typer.Argument(None, help="Config overrides, e.g. data.path=... eval.tasks=[mqar]"),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    uri: str = typer.Option(None, "--tracking-uri", help="Log into the run's MLflow run at this server."),
) -> None:
    """Evaluate a run folder or checkpoint: quality, copy at distance, tasks, efficiency."""
    from pipelines.evaluate import run_eval

    results, out = run_eval(path, overrides or [], device=device, uri=uri)
    _print_results(results)
    print(f"wrote {out}")


@app.command("import-run")
def import_run_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder written by `rattention train --no-ray`."),
    uri: str = typer.Option(None, "--tracking-uri", help="MLflow server (default: config, "
                            "MLFLOW_TRACKING_URI, or a local server)."),
    experiment: str = typer.Option(None, help="Experiment (default: the run's tracking.experiment)."),
) -> None:
    """Log a run folder into MLflow (a no-op when it was imported before)."""
    from pipelines.import_run import import_run

    print(f"MLflow run {import_run(run_dir, uri, experiment)}")


class SweepRunner(StrEnum):
    ray = "ray"
    local = "local"


@app.command()
def sweep(
    spec: Path = typer.Argument(..., help="Sweep spec YAML (see sweeps/)."),
    overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides of the spec, e.g. parallel=2"),
    address: str = typer.Option(None, "--address", help="Ray cluster (else RAY_ADDRESS, else a local Ray)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the sweep's study: finished trials are "
                                "not re-run, interrupted ones resume from their checkpoints."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (trials, resources, cost); run nothing."),
    runner: SweepRunner = typer.Option(SweepRunner.ray, "--runner", help="ray: trials as Ray tasks, tracked in "
                                       "MLflow; local: trial subprocesses on this machine with neither Ray nor "
                                       "MLflow (import the sweep folder later with import-sweep)."),
    gpus: int = typer.Option(None, "--gpus", help="With --runner local: run one trial per GPU on this many GPUs "
                             "(default: 1 when the spec's trials ask for a GPU, else 0: one after another)."),
) -> None:
    """Search for the minimal window per local kind against full attention (or a Pareto study): trials
    in parallel on Ray, every point an Optuna trial, everything in MLflow (or with --runner local, trials
    in subprocesses here and a sweep folder to import)."""
    from sweeps.driver import check_flags
    from sweeps.driver import sweep as run_sweep
    from sweeps.spec import load_spec

    check_flags(runner.value, address, gpus)
    loaded = load_spec(spec, overrides or [])
    try:
        run_sweep(loaded, address=address, resume=resume, dry_run=dry_run, runner=runner.value, gpus=gpus)
    except KeyboardInterrupt:
        left = ("its parent run marked KILLED" if runner is SweepRunner.ray else
                "its running trials stopped and their run folders marked KILLED")
        again = "" if runner is SweepRunner.ray else " --runner local"
        print(f"interrupted: sweep stopped, {left}; `rattention sweep {spec}{again} --resume` continues it",
              file=sys.stderr)
        raise typer.Exit(130) from None


@app.command("import-sweep")
def import_sweep_cmd(
    folder: Path = typer.Argument(..., metavar="SWEEP_FOLDER", help="A sweep folder written by `rattention "
                                  "sweep --runner local` (its sweep.json, answer.json, trials.csv and runs/)."),
    uri: str = typer.Option(None, "--tracking-uri", help="MLflow server (default: MLFLOW_TRACKING_URI, else a "
                            "local server over the runs' tracking.server_dir, .mlflow)."),
) -> None:
    """Log a sweep run without MLflow into MLflow: one parent run (spec, answer, trials) with a child run per
    trial (import-run of each run folder; those imported before are kept). Then `rattention report` works."""
    from pipelines.import_run import import_sweep

    out = import_sweep(folder, uri)
    print(f"MLflow parent run {out['parent_run_id']} in experiment {out['experiment']!r}: {out['children']} trial "
          f"runs ({out['imported']} imported now)")
    print(f"next: rattention report {out['parent_run_id']}" + (f" --tracking-uri {uri}" if uri else ""))


@app.command()
def report(
    sweep_ref: str = typer.Argument(..., metavar="SWEEP_RUN_OR_EXPERIMENT", help="A sweep's parent run id, or "
                                    "an experiment name or id (its latest finished sweep)."),
    uri: str = typer.Option(None, "--tracking-uri", help="MLflow server (default: MLFLOW_TRACKING_URI, else "
                            "the local server over .mlflow, started for the command)."),
    out: Path = typer.Option(None, "--out", help="Folder for the report (default: "
                             ".rattention/reports/<sweep>-<run id>)."),
    log: bool = typer.Option(True, "--log/--no-log", help="Log the files on the sweep's parent run (report/)."),
) -> None:
    """Build a finished sweep's figures (PNG and HTML), comparison table and standalone report.html; print
    the path of report.html."""
    import os

    from dashboards import build_report, find_sweep
    from pipelines import tracking
    from pipelines.ui import DEFAULT_STORE

    store = Path(DEFAULT_STORE)
    if uri:
        tracking.check_uri(uri, "--tracking-uri")
    elif not os.environ.get("MLFLOW_TRACKING_URI") and not (store / "mlflow.db").is_file():
        raise ConfigError(f"--tracking-uri: not given, MLFLOW_TRACKING_URI is unset, and there is no local store "
                          f"{store / 'mlflow.db'} here; pass the sweep's server, or run from the folder holding "
                          "its .mlflow")
    with tracking.tracking_uri(uri or None, store, check=not uri) as live:  # checks MLFLOW_TRACKING_URI
        client = tracking.client(live)
        path = build_report(client, find_sweep(client, sweep_ref), out, log=log)
    print(path)


@app.command()
def ui(
    target: str = typer.Argument(None, metavar="[SWEEP_FOLDER_OR_JOURNAL]", help="With --optuna: a sweep folder, "
                                 "its optuna.journal or an RDB URL (default: the one sweep in .rattention/sweeps)."),
    optuna: bool = typer.Option(False, "--optuna", help="optuna-dashboard on a sweep's study instead of MLflow."),
    store: Path = typer.Option(None, "--store", help="MLflow store folder: mlflow.db + artifacts/ (default: "
                               "MLFLOW_TRACKING_URI if set, else .mlflow)."),
    uri: str = typer.Option(None, "--tracking-uri", help="sqlite:///FOLDER/mlflow.db of a store, or a running "
                            "server's http(s) URI (printed: it serves its own UI)."),
    port: int = typer.Option(None, "--port", help="Port to serve on (default: a free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; another than loopback makes the "
                             "UI reachable from other machines, with no login."),
) -> None:
    """Browse results: the MLflow UI on the platform's store (runs, metrics, artifacts), or with --optuna the
    sweep's Optuna study; prints the address and serves until Ctrl-C."""
    import os

    from pipelines.ui import serve_mlflow, serve_optuna

    if optuna and (store is not None or uri is not None):
        raise ConfigError("--optuna: shows a sweep's Optuna study; --store and --tracking-uri are for the MLflow UI")
    if target is not None and not optuna:
        raise ConfigError(f"{target!r}: a sweep folder or journal goes with --optuna; for MLflow use --store FOLDER")
    try:
        if optuna:
            serve_optuna(target, host=host, port=port)
        else:
            env = os.environ.get("MLFLOW_TRACKING_URI") if store is None and uri is None else None
            serve_mlflow(store, uri or env or None, host=host, port=port)
    except KeyboardInterrupt:  # Ctrl-C is how the UI ends: the server is stopped, nothing is left running
        print("stopped", file=sys.stderr)


def _print_results(results: dict) -> None:
    for k, v in results.items():
        print(f"{k:<36} {v:.6g}" if isinstance(v, float) else f"{k:<36} {v}")



# ----- demo -------------------------------------------------------------------------------------


class Profile(StrEnum):
    full = "full"
    smoke = "smoke"


DEMO_SPECS = {Profile.full: "demo.yaml", Profile.smoke: "demo-smoke.yaml"}  # in sweeps/
SMOKE_FILES = 200  # the smoke profile tokenizes this many stdlib files, not all


@app.command()
def demo(
    profile: Profile = typer.Option(Profile.full, help="full: the demo (about 5 min on 2 cores); smoke: the "
                                    "same path on a smaller task in about a minute, for tests."),
    workdir: Path = typer.Option(Path("."), help="Root of the demo's dataset (data/stdlib), sweep "
                                 "(.rattention/sweeps) and MLflow store (.mlflow)."),
) -> None:
    """The whole pipeline on the stdlib corpus: tokenize it on Ray, search the minimal window of SWA and
    RAttention against full attention (sweeps/demo.yaml), and build the report. A second run reuses the
    dataset and the finished trials."""
    try:
        _demo(profile, workdir)
    except KeyboardInterrupt:
        print("interrupted: the sweep's parent run is marked KILLED; the same command continues it",
              file=sys.stderr)
        raise typer.Exit(130) from None


def _demo(profile: Profile, workdir: Path) -> None:
    """The demo as a composition of the pipeline's parts: tokenize, sweep, report."""
    import time

    from rattention.rundir import ensure_folder
    from sweeps.spec import load_spec

    t0 = time.perf_counter()
    work = ensure_folder(workdir, "--workdir").resolve()
    store = work / ".mlflow"
    spec_path = Path(__file__).resolve().parent.parent / "sweeps" / DEMO_SPECS[profile]
    spec_args = ([f"out_dir={work / '.rattention' / 'sweeps'}"], [f"tracking.server_dir={store}"])
    spec = load_spec(spec_path, *spec_args)  # every value checked before any work
    data = work / "data" / "stdlib"  # where configs/demo.yaml looks: `rattention train configs/demo.yaml` works next

    from pipelines import tracking
    from pipelines.ray_utils import init_ray
    from pipelines.tokenize import make_config, prepare
    from rattention.run_config import load_run_config

    lm = load_run_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")
    corpus = make_config(out=data, sources=["stdlib"], vocab_size=lm.model.vocab_size,
                         max_files=SMOKE_FILES if profile is Profile.smoke else None)
    with tracking.tracking_uri(None, store) as uri:  # one server for the sweep and the report
        print(f"[1/3] tokenizing the standard library into {data} (a Ray Data job)", flush=True)
        init_ray()
        prepare(corpus)

        from sweeps.driver import sweep as run_sweep

        print(f"[2/3] sweep {spec_path.relative_to(Path.cwd()) if spec_path.is_relative_to(Path.cwd()) else spec_path}"
              f" (trials already finished are reused)", flush=True)
        summary = run_sweep(spec, resume=True, closing=False)

        from dashboards import build_report

        print("[3/3] building the report", flush=True)
        report = build_report(uri, summary["parent_run_id"], Path(summary["folder"]) / "report")

    from pipelines.ui import browse_command, rattention_command, shown_path

    here = work == Path.cwd().resolve()
    sweep_data = Path(summary["folder"]) / "data"
    store_arg = "" if here else f" tracking.server_dir={shown_path(store)}"
    cmd = rattention_command()
    print(f"\n{summary['table']}\n")
    print(f"demo ({profile.value}) done in {time.perf_counter() - t0:.0f} s")
    print(f"report: {report}   (a standalone page: open it in a browser)")
    print(f"browse the runs and their artifacts in MLflow: {browse_command(store)}")
    print("next:")
    print(f"  {cmd} train {shown_path(spec.base)} data.path={shown_path(sweep_data)} model.kind=swa "
          f"model.window={max(spec.windows())}{store_arg}   # one more point on the sweep's data, same MLflow")
    print(f"  {cmd} train configs/demo.yaml{'' if here else f' data.path={shown_path(data)}'}{store_arg}"
          "   # a language model on the tokenized standard library")


def main(argv: list[str] | None = None) -> None:
    """Console entry point (also ``python -m rattention``). Every failure ends in one line on stderr:
    usage and config errors exit 2, Ctrl-C exits 130 (``interrupted``; a command that can say what it
    left behind prints that line instead and raises ``typer.Exit(130)``); ``--help`` exits 0.

    It parses and invokes the app itself instead of calling ``app()``, whose main turns a Ctrl-C into a
    bare exit code (130 returned, nothing printed; with ``standalone_mode=False`` the caller exited 0)
    and a usage error into a multi-line panel.
    """
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        with command.make_context("rattention", args) as ctx:
            command.invoke(ctx)
    except NoArgsIsHelpError as err:  # `rattention` or `rattention data` alone: the help, then the error
        if err.message.strip():  # typer's rich help has printed itself already; plain help is the message
            print(err.message)
        _fail("Missing command.")
    except UsageError as err:
        message = err.format_message().rstrip()
        if err.ctx is not None:  # the usage hint on the same line
            message += f"{'' if message.endswith('.') else '.'} Try '{err.ctx.command_path} --help'."
        _fail(message)
    except typer.TyperException as err:  # click's other errors (a file that cannot be opened)
        _fail(err.format_message(), err.exit_code)
    except RattentionError as err:
        _fail(str(err))
    except (KeyboardInterrupt, typer.Abort):  # Ctrl-C (Abort: at a prompt)
        _fail("interrupted", 130)
    except typer.Exit as err:  # --help; or a command that printed its own line, e.g. Ctrl-C's typer.Exit(130)
        sys.exit(err.exit_code)


def _fail(message: str, code: int = 2) -> None:
    """Print ``error: <message>`` (or the interrupt line) as one line on stderr and exit with ``code``."""
    line = " ".join(message.split())
    print(line if code == 130 else f"error: {line}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
