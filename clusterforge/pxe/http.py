"""The PXE server's HTTP side: iPXE scripts, netboot files, seeds, discovery, install reports.

Layout served (the same URLs the rendered iPXE scripts use):
    /<cluster>/...        the rendered tree (pxe/*.ipxe, nodes/<name>/ seeds)
    /images/...           dist/images/ (netboot/, the compressed image)
    /discover?mac=..      an unknown machine reporting itself (from menu.ipxe)
    /installed/<mac>      the installer reporting success: that node now boots from its disk
    /k3s/<file>           the K3s air-gap bundle's two files, when the inventory names one
                          (nodes fetch it from here; it is never part of the image or a seed)

A node's seed holds its private keys, so it is served only while the node is due to
install (until its install report; `pxe.reinstall` opens it again), or always to a
diskless node, which fetches it on every boot; in dhcp mode only to the node's own
address. Nothing else of a node's folder is served.
"""

from __future__ import annotations

import http.server
import io
import json
import re
import shutil
import sys
import tarfile
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .. import k3sbundle
from ..fsutil import write_atomic
from ..inventory import BootMode, Cluster
from ..log import UserError, die
from ..node.agent.k3s import URL_DIR as K3S_DIR
from ..node.seed import NOCLOUD_FILES
from .discovery import Discoveries

# An installed node's script. UEFI: localboot.efi starts the loader on the node's own
# disk (see factory/netboot.py), because UEFI firmware such as OVMF shows its setup menu
# when iPXE exits instead of trying the next boot device. BIOS, or no loader found:
# exit to the firmware, which boots the next device, the disk. ${base} is set by
# boot.ipxe, the script every machine gets first.
LOCAL_BOOT = b"""#!ipxe
# installed: boot from the local disk
iseq ${platform} efi && chain --autofree ${base}/images/netboot/localboot.efi ||
exit
"""
CHUNK = 1024 * 1024
MAX_QUERY = 1024  # a discovery report is a few hundred bytes
MAX_SHOWN = 120  # characters of a request's path in the log
_MAC_HYPHEN = re.compile(r"[0-9a-f]{2}(?:-[0-9a-f]{2}){5}")


class Installed:
    """MACs whose install finished; their iPXE script becomes 'boot from disk'."""

    def __init__(self, state: Path):
        self.path = state / "pxe-installed.json"
        self._lock = threading.Lock()

    def all(self) -> set[str]:
        try:
            data = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as exc:
            die(f"{self.path}: unreadable ({type(exc).__name__})", hint=_REPAIR)
        if not isinstance(data, list) or not all(isinstance(m, str) and _MAC_HYPHEN.fullmatch(m) for m in data):
            die(f"{self.path}: not a list of MACs (aa-bb-cc-dd-ee-ff)", hint=_REPAIR)
        return set(data)

    def add(self, mac_hyphen: str) -> None:
        with self._lock:
            write_atomic(self.path, json.dumps(sorted(self.all() | {mac_hyphen})) + "\n")

    def remove(self, mac_hyphen: str) -> None:
        with self._lock:
            write_atomic(self.path, json.dumps(sorted(self.all() - {mac_hyphen})) + "\n")


_REPAIR = ("it lists the nodes installed over PXE (which then boot their disks); fix it, or delete it and "
           "every node installs again on its next network boot")


def make_handler(cluster: Cluster, rendered: Path, images: Path, discoveries: Discoveries,
                 installed: Installed, log: Callable[[str], None],
                 seeds_by_address: bool = True) -> type[http.server.BaseHTTPRequestHandler]:
    names = {str(n.ip): n.name for n in cluster.nodes}
    macs = {n.mac_hyphen: n.name for n in cluster.nodes}
    nodes = {n.name: n for n in cluster.nodes}
    roots = {cluster.name: rendered, "images": images}
    bundle = k3sbundle.require(cluster.services.k3s_bundle) if cluster.services.k3s_bundle else None

    def seed_allowed(node_name: str, file: str, client: str) -> bool:
        node = nodes.get(node_name)
        if node is None or file not in NOCLOUD_FILES:
            return False
        if seeds_by_address and client != str(node.ip):
            return False
        return node.boot == BootMode.DISKLESS or node.mac_hyphen not in installed.all()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "clusterforge-pxe"

        def who(self) -> str:
            ip = self.client_address[0]
            return f"{names[ip]} ({ip})" if ip in names else ip

        def shown(self) -> str:
            """The request's path for the log: it comes from the network, so escaped and cut."""
            return repr(self.path[:MAX_SHOWN])[1:-1] + ("..." if len(self.path) > MAX_SHOWN else "")

        def log_message(self, format: str, *args: object) -> None:
            pass  # requests are logged once, with what was sent, by reply()

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self.do_GET(head=True)

        def do_GET(self, head: bool = False) -> None:  # noqa: N802
            try:
                self.answer(head)
            except UserError as exc:  # state/ damaged while serving: say so, keep serving
                log(f"{self.who()}: {self.shown()}: {exc}")
                self.reply(500, b"server error (see the PXE server's log)\n", "text/plain", head)

        def answer(self, head: bool) -> None:
            url = urllib.parse.urlsplit(self.path)
            parts = [p for p in url.path.split("/") if p]
            if parts[:1] == ["discover"]:
                if len(url.query) > MAX_QUERY:
                    return self.reply(414, b"report too long\n", "text/plain", head)
                # iPXE's uristring escapes no "+", so it means itself, not a space.
                query = url.query.replace("+", "%2B")
                try:
                    report = {k: v[0] for k, v in urllib.parse.parse_qs(query, max_num_fields=16).items()}
                except ValueError:
                    return self.reply(400, b"too many fields\n", "text/plain", head)
                mac = discoveries.record(report)
                if mac is None:
                    return self.reply(400, b"no valid mac\n", "text/plain", head)
                log(f"{self.who()}: unknown machine {mac} reported itself")
                return self.reply(200, b"#!ipxe\n", "text/plain", head)
            if parts[:1] == ["installed"] and len(parts) == 2 and parts[1] in macs:
                installed.add(parts[1])
                log(f"{self.who()}: {macs[parts[1]]} installed; it boots from its disk from now on")
                return self.reply(200, b"ok\n", "text/plain", head)
            if (len(parts) == 4 and parts[0] == cluster.name and parts[1:3] == ["pxe", "mac"]
                    and parts[3].removesuffix(".ipxe") in installed.all()):
                return self.reply(200, LOCAL_BOOT, "text/plain", head)
            if parts[:1] == [K3S_DIR]:
                if bundle is None or len(parts) != 2 or parts[1] not in bundle.files:
                    return self.reply(404, b"not found\n", "text/plain", head)
                try:
                    with k3sbundle.opened(bundle, parts[1]) as (size, data):
                        return self.send_stream(size, data, head)
                except (OSError, tarfile.TarError) as exc:  # the bundle changed under us
                    log(f"{self.who()}: {self.shown()}: the K3s bundle cannot be read: {exc}")
                    return self.reply(500, b"server error (see the PXE server's log)\n", "text/plain", head)
            path = self.resolve(parts)
            if path is None:
                return self.reply(404, b"not found\n", "text/plain", head)
            self.send_file(path, head)

        def resolve(self, parts: list[str]) -> Path | None:
            if not parts or parts[0] not in roots or any(p in ("..", ".") for p in parts):
                return None
            if parts[0] == cluster.name and parts[1:2] == ["nodes"] and (
                    len(parts) != 4 or not seed_allowed(parts[2], parts[3], self.client_address[0])):
                return None
            path = roots[parts[0]].joinpath(*parts[1:])
            return path if path.is_file() else None

        def reply(self, code: int, body: bytes, kind: str, head: bool) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            if code != 200:
                log(f"{self.who()}: {self.shown()} -> {code}")

        def send_file(self, path: Path, head: bool) -> None:
            with open(path, "rb") as f:
                self.send_stream(path.stat().st_size, f, head, path.suffix in (".ipxe", ".efi"))

        def send_stream(self, size: int, f: IO[bytes], head: bool, noted: bool = False) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if head:
                return
            try:
                self.wfile.flush()
                if isinstance(getattr(f, "raw", None), io.FileIO):
                    self.connection.sendfile(f)  # sendfile(2): the kernel copies, not Python
                else:  # a file inside a tarball
                    shutil.copyfileobj(f, self.wfile, CHUNK)
            except (BrokenPipeError, ConnectionResetError):
                log(f"{self.who()}: {self.shown()} interrupted")
                return
            if size > CHUNK or noted:
                log(f"{self.who()}: sent {self.shown()} ({size / 2**20:.1f} MiB)")

    return Handler


class HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # a rack of machines powering on at once

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client going away is no error
            super().handle_error(request, client_address)  # type: ignore[arg-type]

