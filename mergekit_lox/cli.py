"""The `mergekit-lox` command line (typer)."""

from __future__ import annotations

import json
import sys
import traceback
from typing import List, Optional

import click
import typer

app = typer.Typer(
    name="mergekit-lox",
    help="Safety-subspace weight surgery (LoX, LSSF, Safe LoRA) as mergekit merge methods.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_PASSTHROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", help="Show tracebacks on errors."),
):
    """Safety-subspace weight surgery as native mergekit merge methods."""


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """List the project's merge methods: parameters, types, defaults, paper."""
    from mergekit_lox.describe import describe_methods

    described = describe_methods()
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    for method in described:
        typer.echo(f"{method['name']}: {method['pretty_name']} ({method['paper']})")
        roles = ", ".join(method["roles"])
        typer.echo(f"  inputs: base_model + model(s) with role {roles}")
        for p in method["parameters"]:
            typer.echo(f"  {p['name']:<11} {p['type']:<34} default {p['default']!r}  [{p['scope']}]")


def run_recipe(recipe: str, out: str, mergekit_args: Optional[List[str]] = None) -> None:
    """Run a one-document recipe exactly as `mergekit-yaml RECIPE OUT ARGS...` does."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    mergekit_yaml.main(
        args=[recipe, out, *(mergekit_args or [])], prog_name="mergekit-yaml", standalone_mode=False
    )


@app.command(context_settings=_PASSTHROUGH)
def run(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="YAML recipe."),
    out: str = typer.Argument(..., help="Output model directory."),
):
    """Run a recipe like `mergekit-yaml`; any other option goes to mergekit
    (--cuda, --device, --lazy-unpickle, --out-shard-size, --no-copy-tokenizer, ...;
    see `mergekit-yaml --help`)."""
    run_recipe(recipe, out, list(ctx.args))


@app.command()
def demo(
    directory: str = typer.Argument("mergekit-lox-demo", help="Where to build the demo."),
):
    """Build small local models with a planted safety subspace and run the demo chain."""
    from mergekit_lox.demo import run_demo

    run_demo(directory, lambda recipe, out: run_recipe(recipe, out, ["--quiet"]), echo=typer.echo)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: usage errors exit 2, every other failure one `error:` line and 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    try:
        app(args=argv, prog_name="mergekit-lox", standalone_mode=False)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        sys.exit(1)
    except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
        if verbose:
            traceback.print_exc()
        print(f"error: {_one_line(error)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
