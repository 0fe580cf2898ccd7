"""The PXE server's HTTP side, one handler for both servers: the factory's `pxe.serve` and the
core nodes of a formed cluster (the agent's pxe service). Standard library only.

Layout served (the same URLs the rendered iPXE scripts use):
    /<cluster>/...        the rendered tree (pxe/*.ipxe, nodes/<name>/ seeds)
    /images/...           the image's netboot files and the compressed image
    /discover?mac=..      an unknown machine reporting itself (from menu.ipxe)
    /installed/<mac>      the installer reporting success: that node now boots from its disk
    /<route>/...          what a server adds (the factory: /k3s/<file>, the K3s air-gap bundle)

A node's seed holds its private keys, so it is served only while the node is due to
install (until its install report; a reinstall opens it again), or always to a diskless
node, which fetches it on every boot; in dhcp mode only to the node's own address (its
static lease). Nothing else of a node's folder is served.

What changes at run time is kept behind two small stores: the installed set (MACs whose
install finished) and the discovery list. The factory keeps them in files of state/, the
cluster in etcd; both check a report the same way, here.
"""

from __future__ import annotations

import datetime
import functools
import http.server
import io
import os
import re
import shutil
import sys
import tarfile
import urllib.parse
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from ..log import UserError
from .seed import NOCLOUD_FILES

HTTP_PORT = 8080  # where a PXE server's HTTP side listens; the iPXE scripts point at it
IPXE_DIR = Path("/usr/lib/ipxe")  # Debian's ipxe package: what firmware fetches over TFTP
IPXE_FILES = ("undionly.kpxe", "ipxe.efi")  # BIOS, UEFI
IMAGES = "images"  # the URL folder of the image's files

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
RANGE = re.compile(r"bytes=(\d{1,18})-")  # the one form of Range served: from a byte to the end
MAC_HYPHEN = re.compile(r"[0-9a-f]{2}(?:-[0-9a-f]{2}){5}")

# ---------------------------------------------------------------- discovery reports
# A report arrives over the network from whoever asks: it is never trusted. Only these
# fields are kept, each cut to a length and stripped to printable ASCII, at most
# MAX_MACHINES machines (the least recently seen go first).

FIELDS = {"platform": 16, "ip": 15, "uuid": 36, "serial": 64, "manufacturer": 64, "product": 64}
STAMPS = ("first_seen", "last_seen")
MAX_MACHINES = 256


def clean(value: str, limit: int) -> str:
    """Printable ASCII only (no newline, no control character), at most limit characters."""
    return "".join(c for c in value if " " <= c <= "~")[:limit].strip()


def report_mac(report: Mapping[str, str]) -> str | None:
    """The reporting machine's MAC (aa:bb:..), or None when the report has no valid one."""
    mac_hyphen = report.get("mac", "").lower()
    return mac_hyphen.replace("-", ":") if MAC_HYPHEN.fullmatch(mac_hyphen) else None


def merged(entry: Mapping[str, str] | None, report: Mapping[str, str]) -> dict[str, str]:
    """A machine's record with a new report taken in: the kept fields, cleaned; first and last seen."""
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    fields = {k: clean(report[k], limit) for k, limit in FIELDS.items() if k in report}
    result = dict(entry) if entry is not None else {"first_seen": now}
    result.update({k: v for k, v in fields.items() if v}, last_seen=now)
    return result


def sanitized(data: Mapping[Any, Any]) -> dict[str, dict[str, str]]:
    """Stored records as read back (a file may be hand-edited, a key written by anyone):
    valid MACs only, known fields only, every value cleaned; at most MAX_MACHINES."""
    seen = {}
    for mac, entry in list(data.items())[:MAX_MACHINES]:
        if isinstance(mac, str) and MAC_HYPHEN.fullmatch(mac.replace(":", "-")) and isinstance(entry, dict):
            seen[mac.replace("-", ":")] = {k: clean(str(v), FIELDS.get(k, 32)) for k, v in entry.items()
                                           if k in FIELDS or k in STAMPS}
    return seen


def over_cap(seen: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The MACs to drop so that at most MAX_MACHINES remain: the least recently seen."""
    newest = sorted(seen, key=lambda m: seen[m].get("last_seen", ""), reverse=True)
    return newest[MAX_MACHINES:]


# ---------------------------------------------------------------- what a server is handed


class StoreError(Exception):
    """A store cannot be read or written now (etcd unreachable, a damaged file): the request
    gets a 500 and the server's log says why; nothing is served on a guess."""


class InstalledStore(Protocol):
    def all(self) -> set[str]: ...  # MACs (aa-bb-..) whose install finished

    def add(self, mac_hyphen: str) -> None: ...


class DiscoveryStore(Protocol):
    def record(self, report: dict[str, str]) -> str | None: ...  # the MAC, or None if malformed


@dataclass(frozen=True)
class BootNode:
    name: str
    mac_hyphen: str
    ip: str
    diskless: bool


@dataclass(frozen=True)
class Served:
    """What a server serves right now: one cluster's rendered tree and the image's files."""

    cluster: str
    nodes: tuple[BootNode, ...]
    roots: Mapping[str, Path]  # the URL's first folder -> a directory: <cluster>, images
    seeds_by_address: bool  # dhcp mode: a seed goes to its node's static address only

    @functools.cached_property
    def by_ip(self) -> dict[str, str]:
        return {n.ip: n.name for n in self.nodes}

    @functools.cached_property
    def by_mac(self) -> dict[str, BootNode]:
        return {n.mac_hyphen: n for n in self.nodes}

    @functools.cached_property
    def by_name(self) -> dict[str, BootNode]:
        return {n.name: n for n in self.nodes}


# A route of a server's own: the rest of the path -> an opener of (size, stream), None: 404.
Route = Callable[[list[str]], AbstractContextManager[tuple[int, IO[bytes]]] | None]
FAILURES: tuple[type[Exception], ...] = (StoreError, UserError)  # a store's trouble: 500, served on


def make_handler(served: Callable[[], Served | None], installed: InstalledStore, discoveries: DiscoveryStore,
                 log: Callable[[str], None],
                 routes: Mapping[str, Route] | None = None) -> type[http.server.BaseHTTPRequestHandler]:
    """served() is asked per request (None: nothing to serve, every path is a 404), so a server
    whose files are replaced while it runs serves the new ones."""
    extra: dict[str, Route] = dict(routes or {})

    def seed_allowed(site: Served, node_name: str, file: str, client: str) -> bool:
        node = site.by_name.get(node_name)
        if node is None or file not in NOCLOUD_FILES:
            return False
        if site.seeds_by_address and client != node.ip:
            return False
        return node.diskless or node.mac_hyphen not in installed.all()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "clusterforge-pxe"
        site: Served | None = None

        def who(self) -> str:
            ip = self.client_address[0]
            names = self.site.by_ip if self.site is not None else {}
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
                self.site = served()
                self.answer(head)
            except FAILURES as exc:  # a store that cannot answer: say so, keep serving
                log(f"{self.who()}: {self.shown()}: {exc}")
                self.reply(500, b"server error (see the PXE server's log)\n", "text/plain", head)

        def answer(self, head: bool) -> None:
            site = self.site
            url = urllib.parse.urlsplit(self.path)
            parts = [p for p in url.path.split("/") if p]
            if site is None:
                return self.reply(404, b"not found\n", "text/plain", head)
            if parts[:1] == ["discover"]:
                return self.discover(url.query, head)
            if parts[:1] == ["installed"] and len(parts) == 2 and parts[1] in site.by_mac:
                installed.add(parts[1])
                log(f"{self.who()}: {site.by_mac[parts[1]].name} installed; it boots from its disk from now on")
                return self.reply(200, b"ok\n", "text/plain", head)
            if (len(parts) == 4 and parts[0] == site.cluster and parts[1:3] == ["pxe", "mac"]
                    and parts[3].removesuffix(".ipxe") in installed.all()):
                return self.reply(200, LOCAL_BOOT, "text/plain", head)
            if parts[:1] and parts[0] in extra:
                opener = extra[parts[0]](parts[1:])
                if opener is None:
                    return self.reply(404, b"not found\n", "text/plain", head)
                try:
                    with opener as (size, data):
                        return self.send_stream(size, data, head)
                except (OSError, ValueError, tarfile.TarError) as exc:  # what it reads changed under us
                    log(f"{self.who()}: {self.shown()}: cannot be read: {exc}")
                    return self.reply(500, b"server error (see the PXE server's log)\n", "text/plain", head)
            path = self.resolve(site, parts)
            if path is None:
                return self.reply(404, b"not found\n", "text/plain", head)
            self.send_file(path, head)

        def discover(self, query: str, head: bool) -> None:
            if len(query) > MAX_QUERY:
                return self.reply(414, b"report too long\n", "text/plain", head)
            # iPXE's uristring escapes no "+", so it means itself, not a space.
            query = query.replace("+", "%2B")
            try:
                report = {k: v[0] for k, v in urllib.parse.parse_qs(query, max_num_fields=16).items()}
            except ValueError:
                return self.reply(400, b"too many fields\n", "text/plain", head)
            mac = discoveries.record(report)
            if mac is None:
                return self.reply(400, b"no valid mac\n", "text/plain", head)
            log(f"{self.who()}: unknown machine {mac} reported itself")
            return self.reply(200, b"#!ipxe\n", "text/plain", head)

        def resolve(self, site: Served, parts: list[str]) -> Path | None:
            if not parts or parts[0] not in site.roots or any(p in ("..", ".") for p in parts):
                return None
            if parts[0] == site.cluster and parts[1:2] == ["nodes"] and (
                    len(parts) != 4 or not seed_allowed(site, parts[2], parts[3], self.client_address[0])):
                return None
            path = site.roots[parts[0]].joinpath(*parts[1:])
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
            try:
                f = open(path, "rb")
            except OSError:  # replaced or removed between the check and now
                return self.reply(404, b"not found\n", "text/plain", head)
            with f:
                size = os.fstat(f.fileno()).st_size
                start = self.range_start(size)
                if start is None:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return log(f"{self.who()}: {self.shown()}: range past its end -> 416")
                self.send_stream(size, f, head, path.suffix in (".ipxe", ".efi"), start)

        def range_start(self, size: int) -> int | None:
            """Where to start, from a "Range: bytes=N-" header (an installer picking up a broken
            download); None: past the end. Other forms of Range get the whole file."""
            asked = RANGE.fullmatch(self.headers.get("Range", "").strip())
            if asked is None or int(asked[1]) == 0:
                return 0
            return int(asked[1]) if int(asked[1]) < size else None

        def send_stream(self, size: int, f: IO[bytes], head: bool, noted: bool = False, start: int = 0) -> None:
            """size bytes of f (a file's from start on: 206 and Content-Range when start > 0)."""
            self.send_response(206 if start else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            if head:
                return
            try:
                self.wfile.flush()
                if isinstance(getattr(f, "raw", None), io.FileIO):
                    self.connection.sendfile(f, offset=start)  # sendfile(2): the kernel copies, not Python
                else:  # a file inside a tarball
                    shutil.copyfileobj(f, self.wfile, CHUNK)
            except (BrokenPipeError, ConnectionResetError):
                log(f"{self.who()}: {self.shown()} interrupted")
                return
            if size > CHUNK or noted:
                part = f" from {start / 2**20:.1f} MiB on" if start else ""
                log(f"{self.who()}: sent {self.shown()}{part} ({(size - start) / 2**20:.1f} MiB)")

    return Handler


class HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # a rack of machines powering on at once

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client going away is no error
            super().handle_error(request, client_address)  # type: ignore[arg-type]
