"""One QEMU machine driven over QMP, with its serial console logged to a file.

`Machine` is a context manager that always cleans up: whatever happens inside,
on exit QEMU is gone. Waits are on QMP events and console patterns, never fixed
sleeps. Every failure names the machine's log files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from ..run import in_netns, spawn, which
from . import accel as accel_mod
from .guest import GuestAgent, device_args

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")


UNIX_PATH_MAX = 108  # sun_path in struct sockaddr_un, on Linux
GREETING_TIMEOUT = 5.0  # seconds for QEMU's QMP greeting once connected


class Monitor(QEMUMonitorProtocol):
    """The legacy QMP client, whose connect() would wait forever for a greeting from a monitor
    that is serving another client."""

    def connect_within(self, timeout: float) -> None:
        self._qmp.await_greeting = self._qmp.negotiate = True
        self._sync(self._qmp.connect(self._address), timeout)


class MachineError(Exception):
    """A machine did not do what was expected; the message names its logs."""


@dataclass(frozen=True)
class Drive:
    path: Path
    format: str = "qcow2"
    media: str = "disk"  # disk | cdrom | usb
    readonly: bool = False
    bootindex: int | None = None
    serial: str = ""  # shows as /dev/disk/by-id/virtio-<serial> in the guest


@dataclass(frozen=True)
class Nic:
    mac: str
    netdev: str  # the -netdev value without its id, e.g. "user,net=10.0.0.0/24"
    model: str = "virtio-net-pci"
    bootindex: int | None = None


@dataclass(frozen=True)
class MachineSpec:
    name: str
    memory_mb: int = 1536
    cpus: int = 1
    firmware: str = "bios"  # bios | uefi
    drives: tuple[Drive, ...] = ()
    nics: tuple[Nic, ...] = ()
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    netns: str | None = None  # run QEMU inside this network namespace
    extra: tuple[str, ...] = ()


@dataclass
class Timeline:
    """When a machine reached each phase, in seconds since QEMU started."""

    started: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)
    at: float = field(default_factory=time.time)  # wall-clock power-on, to line up with the nodes' clocks

    def mark(self, phase: str) -> None:
        self.phases.setdefault(phase, round(time.monotonic() - self.started, 2))


class Machine:
    def __init__(self, spec: MachineSpec, rundir: Path, accel: accel_mod.Accel | None = None):
        self.spec = spec
        self.dir = rundir / spec.name
        self.accel = accel or accel_mod.choose()
        self.console_log = self.dir / "console.log"
        self.qemu_log = self.dir / "qemu.log"
        self.qmp_log = self.dir / "qmp.log"
        self.console_socket = self.dir / "console.sock"
        self.qmp_socket = self.dir / "qmp.sock"
        self.guest_socket = self.dir / "qga.sock"
        self.pidfile = self.dir / "qemu.pid"
        if len(bytes(self.console_socket)) >= UNIX_PATH_MAX:
            raise MachineError(f"{self.console_socket}: a UNIX socket path must be shorter than "
                               f"{UNIX_PATH_MAX} bytes; use a shorter run directory or machine name")
        self.timeline = Timeline()
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QEMUMonitorProtocol | None = None
        self._console_offset = 0

    # ------------------------------------------------------------ lifecycle

    def argv(self) -> list[str]:
        s = self.spec
        argv = [which("qemu-system-x86_64"), "-name", s.name, *self.accel.args,
                "-machine", "q35", "-m", str(s.memory_mb), "-smp", str(s.cpus),
                "-nodefaults", "-display", "none", "-no-user-config",
                "-chardev", f"socket,id=mon,path={self.qmp_socket},server=on,wait=off",
                "-mon", "chardev=mon,mode=control", "-pidfile", str(self.pidfile),
                "-chardev", f"socket,id=con,path={self.console_socket},server=on,wait=off,"
                            f"logfile={self.console_log},logappend=on",
                "-serial", "chardev:con",
                "-device", "virtio-rng-pci", *device_args(self.guest_socket)]
        if s.firmware == "bios":
            # SeaBIOS (and the iPXE ROM it runs) mirror their screen to COM1: the firmware and
            # network boot show in the console log. The port is read as a little-endian integer.
            sercon = self.dir / "sercon-port.bin"
            sercon.write_bytes((0x3F8).to_bytes(2, "little"))
            argv += ["-fw_cfg", f"name=etc/sercon-port,file={sercon}"]
        if s.firmware == "uefi":
            vars_copy = self.dir / "OVMF_VARS.fd"
            if not vars_copy.exists():
                shutil.copyfile(OVMF_VARS, vars_copy)
            argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}"]
        if any(d.media == "usb" for d in s.drives):
            argv += ["-device", "qemu-xhci,id=xhci"]
        for i, d in enumerate(s.drives):
            argv += ["-drive", f"if=none,id=drive{i},file={d.path},format={d.format}"
                               + (",readonly=on" if d.readonly or d.media == "cdrom" else "")]
            boot = f",bootindex={d.bootindex}" if d.bootindex is not None else ""
            boot += f",serial={d.serial}" if d.serial else ""
            device = {"disk": "virtio-blk-pci", "cdrom": "ide-cd", "usb": "usb-storage,bus=xhci.0"}[d.media]
            argv += ["-device", f"{device},drive=drive{i}{boot}"]
        for i, n in enumerate(s.nics):
            boot = f",bootindex={n.bootindex}" if n.bootindex is not None else ""
            argv += ["-netdev", f"{n.netdev},id=net{i}",
                     "-device", f"{n.model},netdev=net{i},mac={n.mac}{boot}"]
        if s.kernel:
            argv += ["-kernel", str(s.kernel), "-append", s.append]
            if s.initrd:
                argv += ["-initrd", str(s.initrd)]
        argv += list(s.extra)
        return in_netns(s.netns, argv)

    def start(self) -> Machine:
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.qmp_socket, self.console_socket, self.guest_socket, self.pidfile):
            stale.unlink(missing_ok=True)
        argv = self.argv()
        (self.dir / "qemu.cmdline").write_text(shlex.join(argv) + "\n")
        self._console_offset = self.console_log.stat().st_size if self.console_log.exists() else 0
        with open(self.qemu_log, "ab") as log:
            self._proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        self.timeline = Timeline()
        self._connect(timeout=30)
        self.timeline.mark("qemu")
        return self

    def attach(self) -> Machine:
        """Connect to a machine a previous command started (QEMU outlives the command)."""
        if self.pid() is None:
            raise self.error("not running")
        self._connect(timeout=10)
        return self

    def _connect(self, timeout: float) -> None:
        # QEMU is the QMP server, so any later command can connect to a running machine. It
        # serves one client at a time: a second one is accepted but greeted only when the first
        # leaves, so each try waits a bounded time for the greeting.
        deadline = time.monotonic() + timeout
        while True:
            if self.qmp_socket.exists():
                qmp = Monitor(str(self.qmp_socket))
                try:
                    qmp.connect_within(GREETING_TIMEOUT)
                    self._qmp = qmp
                    return
                except Exception as exc:  # noqa: BLE001 - not listening yet, or busy
                    last = exc
                    qmp.close()
            else:
                last = FileNotFoundError(self.qmp_socket)
            if self._proc is not None and self._proc.poll() is not None:
                raise self.error(f"QEMU exited with status {self._proc.returncode} before QMP was up")
            if time.monotonic() > deadline:
                if self._proc is None:  # attached: the machine runs, another command holds its monitor
                    raise self.error(f"QMP did not greet within {timeout:.0f}s: another command may hold "
                                     f"{self.qmp_socket} ({type(last).__name__}: {last})")
                self.kill()
                raise self.error(f"QMP did not answer within {timeout:.0f}s ({last})")
            time.sleep(0.1)  # the socket appears once QEMU has parsed its options

    def close(self) -> None:
        """Disconnect, leaving the machine running."""
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception:  # noqa: BLE001 - closing a dead monitor may fail in many ways
                pass
            self._qmp = None

    def pid(self) -> int | None:
        """The QEMU process id if it is running."""
        if self._proc is not None:
            return self._proc.pid if self._proc.poll() is None else None
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else b""
        return pid if b"qemu-system" in cmdline else None

    def __enter__(self) -> Machine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def running(self) -> bool:
        return self.pid() is not None

    def kill(self) -> None:
        """Hard power-off; always leaves no QEMU process behind."""
        self.close()
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            if self._proc is not None:
                self._proc.wait()
            else:
                while Path(f"/proc/{pid}").exists() and self.pid() is not None:
                    time.sleep(0.05)  # not our child: nothing to wait() on
        self.pidfile.unlink(missing_ok=True)
        self._write_timeline()

    def shutdown(self, timeout: float = 120) -> None:
        """ACPI power-off, waiting for the guest; then quit. Kills if the guest ignores it."""
        if not self.running:
            self.kill()
            return
        try:
            self.qmp("system_powerdown")
            self.wait_event("SHUTDOWN", timeout=timeout)
            self.qmp("quit")
        except MachineError:
            pass
        finally:
            deadline = time.monotonic() + 10
            while self.running and time.monotonic() < deadline:
                time.sleep(0.1)  # QEMU is exiting after quit
            self.kill()

    # ------------------------------------------------------------ QMP

    def qmp(self, command: str, **args: Any) -> Any:
        if self._qmp is None:
            raise self.error(f"QMP {command}: the machine is not running")
        try:
            reply = self._qmp.cmd(command, **args)
        except Exception as exc:
            raise self.error(f"QMP {command} failed: {exc}") from None
        self._log_qmp({"command": command, "arguments": args, "return": reply})
        return reply

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        assert self._qmp is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self._qmp.pull_event(wait=left)
            except Exception:  # noqa: BLE001 - a timeout or a closed socket: both mean "not seen"
                break
            if event is None:
                continue
            self._log_qmp(event)
            if event.get("event") == name:
                return event
        raise self.error(f"QMP event {name} not seen within {timeout:.0f}s")

    @property
    def guest(self) -> GuestAgent:
        """The machine's guest agent: commands inside it even when its network is cut."""
        return GuestAgent(self.guest_socket)

    def set_link(self, up: bool) -> None:
        for i in range(len(self.spec.nics)):
            self.qmp("set_link", name=f"net{i}", up=up)

    def status(self) -> str:
        return str(self.qmp("query-status")["status"])

    def _log_qmp(self, entry: dict[str, Any]) -> None:
        with open(self.qmp_log, "a") as f:
            f.write(json.dumps({"t": round(time.monotonic() - self.timeline.started, 2), **entry}) + "\n")

    # ------------------------------------------------------------ console

    def console_text(self) -> str:
        """What the serial console printed since this start."""
        if not self.console_log.exists():
            return ""
        with open(self.console_log, "rb") as f:
            f.seek(self._console_offset)
            return f.read().decode(errors="replace")

    def wait_console(self, pattern: str, timeout: float, phase: str | None = None) -> re.Match[str]:
        """Wait until the console (since start) matches pattern; fail early if QEMU exits."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.console_text())
            if match:
                if phase:
                    self.timeline.mark(phase)
                return match
            if not self.running:
                raise self.error(f"QEMU exited while waiting for /{pattern}/ on the console")
            if time.monotonic() > deadline:
                raise self.error(f"/{pattern}/ not seen on the console within {timeout:.0f}s")
            time.sleep(0.25)  # the log file is the console's only interface: poll it

    # ------------------------------------------------------------ reporting

    def error(self, message: str) -> MachineError:
        tail = "\n".join(self.console_text().splitlines()[-15:])
        return MachineError(
            f"{self.spec.name}: {message}\n  console: {self.console_log}\n  qemu:    {self.qemu_log}\n"
            f"  qmp:     {self.qmp_log}\n  cmdline: {self.dir / 'qemu.cmdline'}"
            + (f"\n  last console lines:\n{tail}" if tail else ""))

    def _write_timeline(self) -> None:
        if self.dir.exists():
            (self.dir / "timeline.json").write_text(json.dumps(self.timeline.phases, indent=2) + "\n")


def boot_phases() -> Sequence[tuple[str, str]]:
    """Console patterns of the phases a node's boot goes through, in order."""
    return (
        ("firmware", r"SeaBIOS|BdsDxe|UEFI|iPXE"),
        ("kernel", r"Linux version \d"),
        ("multi-user", r"Reached target .*Multi-User System|login: "),
        ("seed", r"Cloud-init v\. [\d.]+ finished"),
    )
