"""QEMU's guest agent: run a command inside a machine without its network.

The fault tests cut a node's link and still need to look inside it (does it still hold
the VIP? does its etcd refuse writes?). qemu-guest-agent in the image listens on a
virtio-serial port; the host side is a UNIX socket in the machine's run directory.
Protocol: JSON lines; guest-sync first (the channel may hold a stale reply), then
guest-exec and guest-exec-status until the process has exited.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path

PORT_NAME = "org.qemu.guest_agent.0"
POLL = 0.2


class GuestAgentError(Exception):
    pass


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def device_args(socket_path: Path) -> list[str]:
    """QEMU options that give the machine the agent's port, served on socket_path."""
    return ["-chardev", f"socket,id=qga,path={socket_path},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vserial",
            "-device", f"virtserialport,bus=vserial.0,chardev=qga,name={PORT_NAME}"]


class GuestAgent:
    def __init__(self, socket_path: Path, timeout: float = 10.0):
        self.path = socket_path
        self.timeout = timeout

    def _call(self, sock: socket.socket, reader: object, command: str, **arguments: object) -> object:
        sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        line = reader.readline()  # type: ignore[attr-defined]
        if not line:
            raise GuestAgentError(f"{self.path}: the guest agent closed the connection")
        reply = json.loads(line)
        if "error" in reply:
            raise GuestAgentError(f"guest agent: {command}: {reply['error'].get('desc', reply['error'])}")
        return reply["return"]

    def run(self, argv: list[str], timeout: float = 120.0) -> Result:
        """Run argv in the guest (PATH is searched) and wait for it; its exit code and output."""
        if not self.path.exists():
            raise GuestAgentError(f"no guest agent socket at {self.path}: is the machine running?")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
            except OSError as exc:
                raise GuestAgentError(f"{self.path}: {exc}") from None
            reader = sock.makefile("rb")
            token = random.randrange(1, 2**31)
            sock.sendall(json.dumps({"execute": "guest-sync", "arguments": {"id": token}}).encode() + b"\n")
            deadline = time.monotonic() + self.timeout
            while True:  # skip replies left in the channel by an earlier client
                line = reader.readline()
                if not line or time.monotonic() > deadline:
                    raise GuestAgentError(f"{self.path}: no answer from the guest agent (is qemu-guest-agent "
                                          "running in the guest?)")
                try:
                    if json.loads(line).get("return") == token:
                        break
                except ValueError:
                    continue
            started = self._call(sock, reader, "guest-exec", path=argv[0], arg=argv[1:],
                                 **{"capture-output": True})
            pid = started["pid"]  # type: ignore[index]
            deadline = time.monotonic() + timeout
            while True:
                status = self._call(sock, reader, "guest-exec-status", pid=pid)
                assert isinstance(status, dict)
                if status.get("exited"):
                    return Result(int(status.get("exitcode", -1)),
                                  base64.b64decode(status.get("out-data", "")).decode(errors="replace"),
                                  base64.b64decode(status.get("err-data", "")).decode(errors="replace"))
                if time.monotonic() > deadline:
                    raise GuestAgentError(f"guest command {argv} still running after {timeout:.0f}s")
                time.sleep(POLL)  # the agent has no way to wait for a process: ask again
