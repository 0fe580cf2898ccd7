"""Atomic file and directory writes: every artifact appears whole or not at all."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from .log import die, info
from .run import run

_OCTAL = re.compile(r"\\([0-7]{3})")


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final` to build into; on success move it into
    place (replacing an older output), on any exception (KeyboardInterrupt too)
    remove it. Works for files and directories."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    remove_path(tmp)
    try:
        yield tmp
    except BaseException:
        remove_path(tmp)
        raise
    if not os.path.lexists(tmp):
        raise RuntimeError(f"nothing was produced at {tmp}")
    if os.path.lexists(final) and not final.is_symlink() and final.is_dir() != tmp.is_dir():
        # A file where a directory belongs, or the other way round: not ours to delete.
        remove_path(tmp)
        die(f"{final}: exists and is {'a directory' if final.is_dir() else 'not a directory'}; left as it is",
            hint="move it out of the way")
    # From here on the new output is complete: Ctrl-C waits until it is in place and the
    # old one is gone, so an interrupt never leaves both, or neither, behind.
    with deferred_signals():
        if not tmp.is_dir() and not (final.is_dir() and not final.is_symlink()):
            os.replace(tmp, final)
            return
        # rename(2) cannot replace a non-empty directory: move the old one aside first.
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        if os.path.lexists(final):
            os.rename(final, old)
        os.rename(tmp, final)
        remove_path(old)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then act on them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            raise KeyboardInterrupt(f"signal {caught[0]}")


@contextmanager
def locked(lock_file: Path, what: str, timeout: float = 300.0) -> Iterator[None]:
    """An exclusive lock held for the block: commands that write the same thing take turns."""
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        lock = open(lock_file, "a")
    except OSError as exc:
        die(f"{lock_file}: cannot take the lock of {what}: {exc.strerror}")
    with lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} is locked by another command ({lock_file})") from None
                time.sleep(0.1)  # another command holds it: wait for our turn
        yield


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    if isinstance(data, str):
        data = data.encode()
    with atomic_path(path) as temp:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(temp, mode)  # the umask may have narrowed it


def _remove_stale_siblings(final: Path) -> None:
    """Leftovers of runs that were killed (SIGKILL, power loss) before cleaning up."""
    for marker in (".tmp-", ".old-"):
        for sibling in final.parent.glob(f"{final.name}{marker}*"):
            pid = sibling.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                info(f"removing leftover {sibling}")
                remove_path(sibling)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below path, deepest first (the order to unmount them)."""
    top = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces etc. as octal escapes.
            point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == top or point.startswith(top + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def remove_path(path: Path) -> None:
    """Remove a file or tree; first unmount anything mounted inside it, so that a
    chroot left with /proc or a bind mount never makes rmtree reach the host."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.is_symlink():
        for point in mounts_under(path):
            run(["umount", "--lazy", point])
        shutil.rmtree(path)
    else:
        path.unlink()
