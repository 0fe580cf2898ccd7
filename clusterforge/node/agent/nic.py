"""The node's link to the cluster LAN: a transmit queue that hangs is reset.

A NIC can stop taking packets from a transmit queue for good while everything else on the
node is fine: the kernel says "NETDEV WATCHDOG: <if>: transmit queue 0 timed out" every few
seconds and the node is cut off. Seen on the shared test cluster with QEMU 7.2's virtio-net
under software emulation and heavy traffic; on metal a driver bug or firmware hang looks
the same. A device reset brings it back: the agent watches the kernel's count of transmit
timeouts on the interface that holds the node's LAN address and, when it grows, unbinds
the NIC from its driver and binds it again (the interface comes back under its name and
systemd-networkd applies its configuration again).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ...run import run
from . import host
from .context import Ctx
from .core import Plan, State, Status, Step, StepFailed

name = "nic"
needs: tuple[str, ...] = ()

SYS_NET = Path("/sys/class/net")
BACK_SECONDS = 60  # for the interface to come back with its address after a reset


def applies(ctx: Ctx) -> bool:
    return True


@dataclass(frozen=True)
class Facts:
    interface: str  # the interface holding the node's LAN address ("" when none does)
    timeouts: int  # the kernel's count of transmit timeouts, over its queues
    seen: int  # the count when the agent last looked (or reset it); -1 on the agent's first look


def marker(ctx: Ctx) -> Path:
    return ctx.run_dir / "nic.tx-timeouts"


def facts(ctx: Ctx) -> Facts:
    interface = lan_interface(str(ctx.me.ip))
    timeouts = tx_timeouts(interface) if interface else 0
    seen = host.read_text(marker(ctx))
    return Facts(interface, timeouts, int(seen) if seen and seen.strip().isdigit() else -1)


def lan_interface(ip: str) -> str:
    out = run(["ip", "-j", "-4", "addr", "show"], check=False).stdout
    for link in json.loads(out or "[]"):
        if any(a.get("local") == ip for a in link.get("addr_info", [])):
            return str(link.get("ifname", ""))
    return ""


def tx_timeouts(interface: str) -> int:
    total = 0
    for counter in (SYS_NET / interface / "queues").glob("tx-*/tx_timeout"):
        text = host.read_text(counter) or "0"
        total += int(text.strip() or 0)
    return total


def plan(ctx: Ctx, f: Facts) -> Plan:
    if not f.interface:
        return []  # no address yet (networkd still at it, or a reset under way): nothing to watch
    if f.seen < 0 or f.timeouts < f.seen:  # first look, or the counter started again with the device
        count = f.timeouts
        return [Step("nic: note the transmit timeouts", f"{f.interface}: {count} so far",
                     lambda: remember(ctx, count))]
    if f.timeouts > f.seen:
        interface, count = f.interface, f.timeouts
        return [Step(f"nic: reset {interface}", f"its transmit queue hung ({count - f.seen} timeouts since the "
                                                "last look); a device reset brings it back",
                     lambda: remember(ctx, tx_timeouts(reset(interface, str(ctx.me.ip)))))]
    return []


def remember(ctx: Ctx, count: int) -> None:
    host.ensure_dir(ctx.run_dir, 0o755)
    host.write(marker(ctx), f"{count}\n", 0o644)


def reset(interface: str, ip: str) -> str:
    """Unbind the NIC from its driver and bind it again; the interface that holds ip after."""
    device = (SYS_NET / interface / "device").resolve()
    driver = (device / "driver").resolve()
    (driver / "unbind").write_text(device.name)
    (driver / "bind").write_text(device.name)
    deadline = time.monotonic() + BACK_SECONDS
    while not (back := lan_interface(ip)):
        if time.monotonic() > deadline:
            raise StepFailed(f"{interface} did not come back with {ip} within {BACK_SECONDS}s after the reset")
        time.sleep(1)  # systemd-networkd configures the interface again
    return back


def health(ctx: Ctx, f: Facts) -> Status:
    if not f.interface:
        return Status(State.WAITING, f"no interface holds {ctx.me.ip} yet")
    return Status(State.OK, f"{f.interface} holds {ctx.me.ip}")
