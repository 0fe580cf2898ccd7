"""Choose the accelerator by a short real boot, not by the presence of /dev/kvm.

Nested KVM here either aborts (`failed to set MSR`) or spins in the guest forever
(NOTES.md), so the probe boots SeaBIOS under KVM and watches its debug console:
if the BIOS reaches its boot menu within a few seconds, KVM works.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..log import debug
from ..run import spawn

PROBE_SECONDS = 6.0


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    args: tuple[str, ...]

    @property
    def is_kvm(self) -> bool:
        return self.name == "kvm"


KVM = Accel("kvm", ("-accel", "kvm", "-cpu", "host"))
# max, measured against others (bench/tcg_cpu.py; one node to SSH, TCG): qemu64 boots faster
# (71-80 s against 86-103 s) but Debian 12's ceph-mon dies of SIGILL on it; Westmere (SSE4.2,
# POPCNT, no XSAVE) and max without AVX were no faster than max (92 s).
TCG = Accel("tcg", ("-accel", "tcg,thread=multi", "-cpu", "max"))


@functools.cache
def choose() -> Accel:
    forced = os.environ.get("CLUSTERFORGE_ACCEL")
    if forced in ("kvm", "tcg"):
        return KVM if forced == "kvm" else TCG
    # The probe costs seconds when KVM hangs; its answer holds until the host reboots.
    cache = Path(tempfile.gettempdir()) / f"clusterforge-kvm-{_boot_id()}"
    if cache.exists():
        works = cache.read_text() == "yes"
    else:
        works = kvm_works()
        cache.write_text("yes" if works else "no")
    accel = KVM if works else TCG
    debug(f"accelerator: {accel.name}")
    return accel


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def kvm_works() -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="cf-kvm-probe-") as tmp:
        log = Path(tmp) / "debugcon.log"
        proc = spawn(
            ["qemu-system-x86_64", *KVM.args, "-m", "64", "-nodefaults", "-display", "none", "-no-reboot",
             "-chardev", f"file,id=dbg,path={log}", "-device", "isa-debugcon,iobase=0x402,chardev=dbg"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + PROBE_SECONDS
            while time.monotonic() < deadline and proc.poll() is None:
                if log.exists() and b"Booting from" in log.read_bytes():
                    return True
                time.sleep(0.1)
            return False
        finally:
            proc.kill()
            proc.wait()
