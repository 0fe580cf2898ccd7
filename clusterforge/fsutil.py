"""Atomic file and directory writes: every artifact appears whole or not at all."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temp_sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of final; on success it replaces final, on any error
    (Ctrl-C included) it is removed and final is left as it was.

    For a directory, the old one is moved aside first and deleted after the swap.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_sibling(final)
    remove(temp)
    try:
        yield temp
        if temp.is_dir() and final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            remove(old)
            final.rename(old)
            temp.rename(final)
            remove(old)
        else:
            temp.replace(final)
    except BaseException:
        if temp.exists() or temp.is_symlink():
            remove(temp)
        raise


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    if isinstance(data, str):
        data = data.encode()
    with atomic_path(path) as temp:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(temp, mode)  # the umask may have narrowed it


def clean_stale_temps(directory: Path) -> None:
    """Remove temporaries left by an interrupted run (another pid, killed hard)."""
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name):
                remove(entry)
