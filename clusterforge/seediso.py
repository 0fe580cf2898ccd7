"""NoCloud seed ISOs (volume label `cidata`), built with pycdlib.

pycdlib stamps every date with time.time(); a seed must be byte-identical from
one render to the next, so the clock it sees is frozen while it builds.
"""

from __future__ import annotations

import io
import time as systime
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pycdlib
import pycdlib.dates
import pycdlib.headervd
import pycdlib.pycdlib
import pycdlib.utils

SEED_EPOCH = 1704067200  # 2024-01-01T00:00:00Z: the date every seed carries
SEED_FILES = ("user-data", "meta-data", "network-config")
_PATCHED_MODULES = (pycdlib.dates, pycdlib.headervd, pycdlib.pycdlib, pycdlib.utils)


class _FrozenTime(types.ModuleType):
    """The time module as pycdlib should see it: always SEED_EPOCH, in UTC."""

    def __init__(self) -> None:
        super().__init__("time")

    def __getattr__(self, name: str) -> object:
        return getattr(systime, name)

    @staticmethod
    def time() -> float:
        return float(SEED_EPOCH)

    @staticmethod
    def localtime(secs: float | None = None) -> systime.struct_time:
        return systime.gmtime(SEED_EPOCH if secs is None else secs)


@contextmanager
def _frozen_clock() -> Iterator[None]:
    clock = _FrozenTime()
    saved = [(m, m.time) for m in _PATCHED_MODULES]  # type: ignore[attr-defined]
    for module in _PATCHED_MODULES:
        module.time = clock  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for module, original in saved:
            module.time = original  # type: ignore[attr-defined]


def iso9660_name(name: str) -> str:
    return "/" + name.upper().replace("-", "_")[:8] + ".;1"


def seed_iso_bytes(files: dict[str, bytes]) -> bytes:
    iso = pycdlib.PyCdlib()
    out = io.BytesIO()
    with _frozen_clock():
        iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
        for name in sorted(files):
            data = files[name]
            iso.add_fp(io.BytesIO(data), len(data), iso9660_name(name), rr_name=name,
                       joliet_path="/" + name)
        iso.write_fp(out)
    iso.close()
    return out.getvalue()


def write_seed_iso(path: Path, files: dict[str, bytes]) -> None:
    path.write_bytes(seed_iso_bytes(files))


def read_seed_iso(path: Path) -> tuple[str, dict[str, bytes]]:
    """The volume label and the files (by Rock Ridge name) of a seed ISO."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        label = iso.pvd.volume_identifier.decode().strip()
        files = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_file():
                name = child.rock_ridge.name().decode()
                buf = io.BytesIO()
                iso.get_file_from_iso_fp(buf, rr_path="/" + name)
                files[name] = buf.getvalue()
        return label, files
    finally:
        iso.close()
