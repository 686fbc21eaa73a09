"""Output discipline: write to a temporary path, rename when complete, never clobber silently;
hold what a library prints unasked."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out``.

    Refuses an existing ``out`` unless ``overwrite``; on failure the temporary directory is
    removed and ``out`` is left as it was.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


@contextlib.contextmanager
def held_output(stream: str) -> Iterator[io.StringIO]:
    """Hold what is printed to ``sys.stdout`` or ``sys.stderr`` (``stream``) in the block, at
    the Python level; if the block raises, the held text goes to the real stream first, so
    nothing that explains the failure is lost."""
    held = io.StringIO()
    redirect = {"stdout": contextlib.redirect_stdout, "stderr": contextlib.redirect_stderr}
    try:
        with redirect[stream](held):
            yield held
    except BaseException:
        getattr(sys, stream).write(held.getvalue())
        raise
