"""User-facing errors and atomic writes (stdlib only: the torch-free runtime imports this)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class Pbs2pError(Exception):
    """A problem with the user's input or environment, reported as one line and exit code 2."""


def require_new_output(output: str | os.PathLike, force: bool) -> None:
    """Refuse to overwrite an existing output unless `force` (the commands' --force)."""
    if Path(output).exists() and not force:
        raise Pbs2pError(f"output {output} exists (use --force to overwrite)")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; rename it onto `final` only if the block succeeds.

    On any exception the temporary file or directory is removed, so nothing half-written is left behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod((0o777 if directory else 0o666) & ~umask)  # mkstemp/mkdtemp create owner-only entries
    try:
        yield tmp
        if directory and final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
