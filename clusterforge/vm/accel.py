"""Choose the accelerator by a short real boot, not by the presence of /dev/kvm.

Nested KVM here either aborts (`failed to set MSR`) or spins in the guest forever
(NOTES.md); on some hosts SeaBIOS boots under KVM and then the Linux kernel spins before
its first message. So the probe boots a Linux kernel of the node image (the factory's
root filesystem has one) with no root filesystem, under KVM: if it reaches its "cannot
mount root" panic within a few seconds (about one under working KVM), KVM works. With no
kernel to boot yet, it is TCG, which always works.
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

PROBE_SECONDS = 15.0
# Kernels the probe can boot, in a build output folder (dist/ or --out): the factory's root
# filesystem and the netboot files.
KERNELS = ("cache/rootfs/boot/vmlinuz-*", "images/netboot/vmlinuz")


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
def choose(out: Path | None = None) -> Accel:
    """KVM when a Linux kernel boots under it, else TCG. `out`: the build output folder whose
    kernels to probe with, besides the repository's dist/."""
    forced = os.environ.get("CLUSTERFORGE_ACCEL")
    if forced in ("kvm", "tcg"):
        return KVM if forced == "kvm" else TCG
    # The probe costs seconds when KVM hangs; its answer holds until the host reboots.
    cache = Path(tempfile.gettempdir()) / f"clusterforge-kvm-probe-{_boot_id()}"
    if cache.exists():
        works = cache.read_text() == "yes"
    else:
        kernel = next((k for k in kernels(out) if k.is_file()), None)
        if kernel is None:
            debug("accelerator: tcg (no kernel to probe KVM with yet)")
            return TCG
        works = kvm_works(kernel)
        cache.write_text("yes" if works else "no")
    accel = KVM if works else TCG
    debug(f"accelerator: {accel.name}")
    return accel


def kernels(out: Path | None) -> list[Path]:
    from ..paths import REPO

    folders = [f for f in (out, REPO / "dist") if f is not None]
    return [k for folder in folders for pattern in KERNELS for k in sorted(folder.glob(pattern))]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def kvm_works(kernel: Path) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="cf-kvm-probe-") as tmp:
        log = Path(tmp) / "serial.log"
        proc = spawn(
            ["qemu-system-x86_64", *KVM.args, "-m", "256", "-nodefaults", "-display", "none", "-no-reboot",
             "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1", "-serial", f"file:{log}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + PROBE_SECONDS
            while time.monotonic() < deadline:
                if log.exists() and b"Kernel panic" in log.read_bytes():
                    return True  # booted as far as a kernel with no root filesystem goes
                if proc.poll() is not None:
                    return False  # QEMU gave up (failed to set MSR ...)
                time.sleep(0.1)
            return False
        finally:
            proc.kill()
            proc.wait()
