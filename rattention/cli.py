"""The command line: ``rattention data|train|eval|import-run|demo``.

This is the one module that reaches every package (the demo composes them); nothing imports it.
Heavy imports (ray, mlflow, optuna) happen inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import typer

from rattention.errors import ConfigError, RattentionError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
data_app = typer.Typer(no_args_is_help=True, help="Build datasets: tokenized WebDataset shards.")
app.add_typer(data_app, name="data")


# ----- data commands (pipelines.tokenize, pipelines.synth) -------------------------------------


@data_app.command("prepare")
def data_prepare(
    sources: list[str] = typer.Argument(
        None, help="'stdlib' (default), files, folders or globs (.txt .md .py .jsonl .parquet), or hf:NAME"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to create."),
    vocab_size: int = typer.Option(8192, help="BPE vocabulary size when training a tokenizer."),
    tokenizer: Path | None = typer.Option(None, help="Use this tokenizer.json instead of training one."),
    tokenizer_sample_mb: float = typer.Option(16.0, help="MB of corpus text to train the tokenizer on."),
    val_fraction: float = typer.Option(0.05, help="Fraction of documents (by id hash) in the val split."),
    shard_tokens: int = typer.Option(1_000_000, help="Tokens per shard (a shard closes past this)."),
    text_field: str = typer.Option("text", help="The text field of .jsonl records."),
    parquet_column: str = typer.Option("text", help="The text column of .parquet files."),
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
        params[key] = yaml.safe_load(value)
    return params


@data_app.command("synth")
def data_synth(
    kind: str = typer.Argument(..., help="mqar | niah | passkey | vt"),
    out: Path = typer.Option(..., "--out", "-o", help="Dataset folder to create."),
    samples: int = typer.Option(1000, help="Number of task instances."),
    seq_len: int = typer.Option(1024, help="Tokens per instance."),
    seed: int = typer.Option(0, help="Instance i depends only on (seed, i)."),
    split: str = typer.Option("test", help="Split name of the shards."),
    vocab_size: int | None = typer.Option(None, help="Vocabulary size (EOS = 0), when no --like."),
    like: Path | None = typer.Option(None, help="A prepared dataset: use its tokenizer, vocab and EOS."),
    haystack: str = typer.Option("noise", help="Filler: noise | repeat | corpus (text of --like)."),
    param: list[str] = typer.Option(
        None, "--param", "-p", help="Task parameter KEY=VALUE, repeatable: num_pairs=16 gap=512 depth=0.5"
    ),
    shard_tokens: int = typer.Option(1_000_000, help="Tokens per shard."),
    num_cpus: int | None = typer.Option(None, help="Ray CPUs for generation; default all."),
    address: str | None = typer.Option(None, help="Ray cluster address (else RAY_ADDRESS, else local Ray)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the folder is up to date."),
) -> None:
    """Write a synthetic long-context task (tokens + answer mask) in the dataset shard format."""
    from pipelines.synth import make_config, synth

    cfg = make_config(
        kind=kind, out=out, samples=samples, seq_len=seq_len, seed=seed, split=split, vocab_size=vocab_size,
        like=like, haystack=haystack, params=_parse_params(param or []), shard_tokens=shard_tokens,
        num_cpus=num_cpus, address=address, force=force,
    )
    synth(cfg)



# ----- train / eval / import-run (pipelines.train, rattention.evaluate) -------------------------


# ----- demo -------------------------------------------------------------------------------------


@app.command()
def demo() -> None:
    """Run the largest real job that exists on the embedded default (see README)."""
    from rattention.demo import run_demo

    run_demo()


def main() -> None:
    """Console entry point: user errors print one line and exit 2."""
    try:
        app(standalone_mode=False)
    except RattentionError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
