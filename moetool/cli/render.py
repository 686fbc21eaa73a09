"""Rich rendering helpers and the one way commands report errors."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

# What the libraries print on their own, which the commands replace with their own progress and
# results: progress bars, and log lines that every CPU run prints and that say nothing about the
# user's run. Other warnings (a checkpoint that does not fully load, say) still show.
# MOETOOL_LIBRARY_LOGS=1 keeps the libraries' defaults.
LIBRARY_QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's and transformers' bars
    "TQDM_DISABLE": "1",  # other tqdm bars (datasets', some of lmms-eval's)
}
ROUTINE_LOG_LINES = {
    "DeepSpeed": ("Setting accelerator to CPU",),  # auto-detection on a machine with no GPU
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),  # DeepSpeed's CPU op loader
    # bitsandbytes (imported by peft whenever it is installed) on an AVX512-BF16 CPU without the
    # optional `kernels` package: its own 4-bit CPU path runs instead.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}


class _DropRoutineLines(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_libraries() -> None:
    """Keep third-party progress bars and routine log lines out of the output; called before
    any of those libraries is imported (they read the environment variables on import)."""
    if os.environ.get("MOETOOL_LIBRARY_LOGS") == "1":
        return
    for key, value in LIBRARY_QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name, prefixes in ROUTINE_LOG_LINES.items():
        # A filter, not a level: DeepSpeed's logger factory resets the level when it imports.
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropRoutineLines) for f in logger.filters):
            logger.addFilter(_DropRoutineLines(prefixes))


def print_error(message: str) -> None:
    """The one ``error:`` line (stderr)."""
    # The message is printed as is: "[moe]" in it is a TOML table name, not Rich markup.
    err_console.print("[bold red]error:[/]", escape(message), highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear error to stderr and exit."""
    print_error(message)
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    # Plain stdout so the output pipes into jq untouched by Rich.
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


def billions(n: int | float | None, digits: int = 3) -> str:
    return "-" if n is None else f"{n / 1e9:.{digits}f}B"


def millions(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f}M"


def table(
    title: str,
    columns: list[str],
    rows: list[list[str]],
    caption: str = "",
    justify: str = "right",
) -> Table:
    """A Rich table; the first column is the row label, the others are justified by ``justify``."""
    t = Table(title=title, caption=caption or None, caption_justify="left")
    for i, col in enumerate(columns):
        if i == 0:
            t.add_column(col, justify="left", no_wrap=True)
        else:
            t.add_column(col, justify=justify)
    for row in rows:
        t.add_row(*row)
    return t


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool = True):
    """Send everything written to stdout (libraries' logs and prints included, at the file
    descriptor level) to stderr, so that ``--json`` output stays parseable."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def byte_progress(description: str, disable: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A transient bytes-written progress bar; yields the ``progress(done, total)`` callback that
    the checkpoint writers (upcycle, convert) call."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=disable,
    ) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
