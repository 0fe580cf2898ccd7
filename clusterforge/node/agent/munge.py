"""munge: every SLURM node authenticates with the cluster's key from the seed.

The munge package made a key of its own when the image was built. The image never starts
munged, and the agent installs the seed's key before it does, so that key is never used.
munged reads its key when it starts: the agent remembers (in /run, a hash) which key it
last started munged with, and restarts munged when the installed key is another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ...run import run
from ..seed import MUNGE_KEY, Role, Service
from . import host
from .context import Ctx
from .core import Plan, State, Status, Step, Wait

name = "munge"
needs: tuple[str, ...] = ()

KEY = Path("/etc/munge/munge.key")
UNIT = "munge.service"
OWNER = "munge"
KEY_SIZES = (32, 1024)  # what munged accepts
CHECK_TIMEOUT = 10.0


def applies(ctx: Ctx) -> bool:
    return ctx.seed.cluster.enabled(Service.SLURM) and (ctx.core or ctx.me.has(Role.COMPUTE))


@dataclass(frozen=True)
class Facts:
    seed_key: bool  # the seed holds a munge key of a size munged accepts
    installed: bool  # /etc/munge/munge.key is the seed's key, 0400 munge:munge
    unit: host.Unit
    stale: bool  # munged runs, started with another key than the one installed
    works: bool  # munged decodes a credential it encoded (munge -n | unmunge)


def marker(ctx: Ctx) -> Path:
    """The hash of the key munged was last started with (gone at reboot: munged restarts once)."""
    return ctx.run_dir / "munge.key.sha256"


def digest(key: bytes | None) -> str:
    return hashlib.sha256(key or b"").hexdigest() + "\n"


def facts(ctx: Ctx) -> Facts:
    key = host.read(ctx.seed.secret(MUNGE_KEY))
    seed_key = key is not None and KEY_SIZES[0] <= len(key) <= KEY_SIZES[1]
    unit = host.units(UNIT)[UNIT]
    installed = seed_key and host.file_is(KEY, key or b"", 0o400, OWNER)
    stale = unit.running and host.read_text(marker(ctx)) != digest(host.read(KEY))
    return Facts(seed_key, installed, unit, stale, unit.running and round_trip())


def round_trip() -> bool:
    cred = run(["munge", "-n"], check=False, timeout=CHECK_TIMEOUT)
    if cred.returncode != 0:
        return False
    return run(["unmunge"], input=cred.stdout, check=False, timeout=CHECK_TIMEOUT).returncode == 0


def plan(ctx: Ctx, f: Facts) -> Plan:
    if not f.seed_key:
        return Wait(f"munge: the seed has no usable munge key ({ctx.seed.secret(MUNGE_KEY)})")
    if not f.installed:
        return [Step("munge: install the cluster's key", "the key from the seed, never the package's own",
                     lambda: install(ctx))]
    if not f.unit.running:
        why = f"it stopped ({f.unit.result})" if f.unit.active == "failed" else "key installed"
        return [Step("munge: start munged", why, lambda: start(ctx, f.unit))]
    if f.unit.enabled != "enabled":
        return [Step("munge: enable munged", "it starts at boot, before slurmd",
                     lambda: host.systemctl("enable", UNIT))]
    if f.stale:
        return [Step("munge: restart munged", "the installed key is not the one munged started with",
                     lambda: restart(ctx))]
    return []


def install(ctx: Ctx) -> None:
    host.write(KEY, host.read(ctx.seed.secret(MUNGE_KEY)) or b"", 0o400, OWNER)


def start(ctx: Ctx, unit: host.Unit) -> None:
    if unit.active == "failed":
        host.systemctl("reset-failed", UNIT)
    host.systemctl("enable", "--now", UNIT)
    remember(ctx)


def restart(ctx: Ctx) -> None:
    host.systemctl("restart", UNIT)
    remember(ctx)


def remember(ctx: Ctx) -> None:
    host.ensure_dir(ctx.run_dir, 0o755)
    host.write(marker(ctx), digest(host.read(KEY)), 0o600)


def health(ctx: Ctx, f: Facts) -> Status:
    if not f.works:
        return Status(State.FAILED, "munged does not decode a credential it encoded")
    return Status(State.OK, "credentials encode and decode with the cluster's key")
