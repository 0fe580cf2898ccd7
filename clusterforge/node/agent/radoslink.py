"""A connection to the Ceph monitors that the agent keeps open between passes.

`ceph status` from the command line starts Python and librados each time: seconds of CPU
on an emulated machine, every pass. librados itself (python3-rados, from the image's Ceph
packages) answers the same monitor commands in milliseconds once connected.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Any

CONF = "/etc/ceph/ceph.conf"
ASOK = "/var/run/ceph/ceph-{daemon}.asok"  # a daemon's admin socket, on its own node
CONNECT_TIMEOUT = 10  # seconds: a monitor quorum that does not answer in this time is not there
COMMAND_TIMEOUT = 20


class RadosError(Exception):
    pass


class Link:
    def __init__(self, name: str, keyring: Path):
        self.name = name
        self.keyring = keyring
        self._cluster: Any = None

    def _connect(self) -> Any:
        import rados  # python3-rados: on the nodes only, from the image's Ceph packages

        # connect()'s own timeout argument is ignored by python3-rados: librados waits for
        # client_mount_timeout (300 s by default), which would stall a pass for five minutes.
        cluster = rados.Rados(conffile=CONF, name=self.name, conf={
            "keyring": str(self.keyring), "client_mount_timeout": str(CONNECT_TIMEOUT),
            "rados_mon_op_timeout": str(COMMAND_TIMEOUT), "rados_osd_op_timeout": str(COMMAND_TIMEOUT)})
        try:
            cluster.connect()
        except rados.Error as exc:
            try:
                cluster.shutdown()
            except rados.Error:
                pass
            raise RadosError(f"no monitor quorum answers {self.name} ({exc})") from None
        return cluster

    def command(self, prefix: str, **args: Any) -> Any:
        """A monitor command's JSON answer; RadosError when there is no quorum or it refuses."""
        import rados

        if not Path(CONF).exists() or not self.keyring.exists():
            raise RadosError(f"not configured yet ({CONF}, {self.keyring})")
        if self._cluster is None:
            self._cluster = self._connect()
        try:
            ret, out, errs = self._cluster.mon_command(json.dumps({"prefix": prefix, "format": "json", **args}),
                                                       b"", timeout=COMMAND_TIMEOUT)
        except rados.Error as exc:
            self.close()
            raise RadosError(f"{prefix}: {exc}") from None
        if ret != 0:
            raise RadosError(f"{prefix}: {errs or ret}")
        return json.loads(out) if out else None

    def reachable(self) -> str:
        """"" when the monitors answer this entity, else why not."""
        try:
            self.command("mon stat")
            return ""
        except RadosError as exc:
            return str(exc)

    def close(self) -> None:
        if self._cluster is not None:
            try:
                self._cluster.shutdown()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close in many ways
                pass
            self._cluster = None


def daemon(name: str, prefix: str, timeout: float = COMMAND_TIMEOUT) -> Any:
    """A command to a local daemon's admin socket (`ceph daemon NAME PREFIX`), spoken directly:
    the command as JSON and a NUL; the answer's length (4 bytes, big-endian), then JSON."""
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(timeout)
            sock.connect(ASOK.format(daemon=name))
            sock.sendall(json.dumps({"prefix": prefix, "format": "json"}).encode() + b"\0")
            head = _read(sock, 4)
            return json.loads(_read(sock, struct.unpack(">I", head)[0]) or b"null")
    except (OSError, ValueError, struct.error) as exc:
        raise RadosError(f"{name}'s admin socket: {exc}") from None


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise OSError("closed before the whole answer")
        data += chunk
    return data
