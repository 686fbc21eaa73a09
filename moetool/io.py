"""Output discipline: write to a temporary path, rename when complete, never clobber silently;
hold what a library prints unasked."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


class OutputExistsError(FileExistsError):
    pass


class UnsafeOverwriteError(ValueError):
    """Replacing an output would delete one of the command's own inputs."""


def inputs_inside(out: str | Path, inputs: Iterable[str | Path | None]) -> list[Path]:
    """The ``inputs`` that ``out`` is or contains: removing ``out`` would delete them."""
    root = Path(out).resolve()
    found = []
    for item in inputs:
        if item is None:
            continue
        path = Path(item).resolve()
        if path == root or root in path.parents:
            found.append(Path(item))
    return found


def check_overwrite(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an output that is, or contains, one of ``inputs``: replacing it would delete
    what the command reads. Raises ``UnsafeOverwriteError`` naming them."""
    inside = inputs_inside(out, inputs)
    if inside:
        names = ", ".join(str(p) for p in inside)
        raise UnsafeOverwriteError(
            f"{out} contains this command's input {names}: writing there would replace it; "
            "choose another output directory"
        )


# Errors that mean "this location cannot take the write", not a bug: reported as one error line.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def is_write_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in WRITE_ERRNOS


def describe_write_error(err: BaseException) -> str:
    """One line for a failed write: the reason and the file (an ``OSError``), else the message.
    A full disk or quota says what to do about it."""
    if not isinstance(err, OSError) or err.errno is None:
        return str(err) or type(err).__name__
    where = f" ({err.filename})" if err.filename else ""
    hint = ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free space there (or choose another output) and run again"
    elif err.errno == errno.EROFS:
        hint = "; choose an output on a writable filesystem"
    return f"{err.strerror}{where}{hint}"


def check_free_space(path: str | Path, needed: int) -> None:
    """Raise ``OSError(ENOSPC)`` before writing ``needed`` bytes under ``path`` (the nearest
    existing folder is measured) when its filesystem has less free: a write known to fail is not
    started."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: writing needs {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free",
            str(path),
        )


def default_dir_mode() -> int:
    """The permission bits ``mkdir`` gives a new directory under the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


@contextlib.contextmanager
def atomic_output_dir(
    out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()
) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out``.

    Refuses an existing ``out`` unless ``overwrite``, and an ``out`` that is or contains one of
    ``inputs``; on failure the temporary directory is removed and ``out`` is left as it was.
    The directory gets the umask's permissions (as ``mkdir`` would), not ``mkdtemp``'s 0700.
    """
    out = Path(out)
    check_overwrite(out, inputs)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    tmp.chmod(default_dir_mode())
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
