"""The command line: ``rattention data|train|eval|import-run|demo``.

This is the one module that reaches every package (the demo composes them); nothing imports it.
Heavy imports (ray, mlflow, optuna) happen inside the commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import sys

import click
import typer

from rattention.errors import RattentionError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
data_app = typer.Typer(no_args_is_help=True, help="Build datasets: tokenized WebDataset shards.")
app.add_typer(data_app, name="data")


# ----- data commands (pipelines.tokenize, pipelines.synth) -------------------------------------


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
