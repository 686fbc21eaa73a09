"""The ``moetool`` command line: a table of library calls (one module per command group)."""

from __future__ import annotations

import os
import sys

import typer

from moetool._version import __version__
from moetool.cli import (
    convert,
    data,
    evaluation,
    export,
    params,
    predict,
    quickstart,
    recipes,
    routing,
    train,
    upcycle,
)
from moetool.cli.render import print_error, quiet_libraries
from moetool.io import describe_write_error, is_write_error

app = typer.Typer(
    name="moetool",
    help="Turn dense LLaVA-style vision-language models into sparse Mixture-of-Experts models "
    "(MoE-LLaVA), and train, evaluate and measure them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Only commands that work are registered; each issue adds its own.
COMMANDS = {
    "quickstart": quickstart.quickstart,
    "predict": predict.predict,
    "pretrain": train.pretrain,
    "instruct": train.instruct,
    "upcycle": upcycle.upcycle,
    "convert": convert.convert,
    "export": export.export,
    "moe-tune": train.moe_tune,
    "eval": evaluation.eval_command,
    "param-count": params.param_count,
    "recipes": recipes.recipes,
}
GROUPS = {"data": data.app, "routing": routing.app}
for _name, _command in COMMANDS.items():
    app.command(_name)(_command)
for _name, _group in GROUPS.items():
    app.add_typer(_group, name=_name)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moetool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """moetool: MoE-LLaVA from recipe to evaluation."""


def _take_local_rank(argv: list[str]) -> list[str]:
    """Drop the ``--local_rank=N`` the DeepSpeed launcher appends to every worker's arguments,
    keeping N as ``LOCAL_RANK`` (what torch.distributed and DeepSpeed read)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def main() -> None:
    quiet_libraries()
    sys.argv[1:] = _take_local_rank(sys.argv[1:])
    try:
        app()
    except OSError as err:  # a full disk, a quota, a read-only or foreign output: no traceback
        if not is_write_error(err):
            raise
        print_error(describe_write_error(err))
        sys.exit(2)
