"""The PXE server's HTTP side and discovery list, served for real on loopback."""

from __future__ import annotations

import gzip
import random
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from ipaddress import IPv4Address
from pathlib import Path
from typing import IO

import pytest

from clusterforge import inventory
from clusterforge.log import UserError
from clusterforge.node import installer
from clusterforge.pxe.discovery import Discoveries
from clusterforge.pxe.http import LOCAL_BOOT, HttpServer, Installed, make_handler
from clusterforge.pxe.server import check_artifacts, interface_address

from .loopback import get, serving, status


@pytest.fixture
def served(example: inventory.Cluster, rendered: Path, state: Path,
           tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    images = tmp_path / "images"
    (images / "netboot").mkdir(parents=True)
    (images / "netboot" / "vmlinuz").write_bytes(b"kernel" * 1000)
    log: list[str] = []
    # Loopback is nobody's address in the inventory: proxy-mode rules (seeds by install state only).
    handler = make_handler(example, rendered, images, Discoveries(state / "lab", example),
                           Installed(state / "lab"), log.append, seeds_by_address=False)
    with serving(handler) as url:
        yield url, log


def test_scripts_and_files(served: tuple[str, list[str]], rendered: Path) -> None:
    base, _ = served
    assert get(f"{base}/lab/pxe/boot.ipxe") == (rendered / "pxe/boot.ipxe").read_bytes()
    assert get(f"{base}/lab/pxe/mac/52-54-00-00-00-11.ipxe").startswith(b"#!ipxe\n# Node s1")
    assert get(f"{base}/lab/nodes/s1/meta-data") == (rendered / "nodes/s1/meta-data").read_bytes()
    assert status(f"{base}/lab/nodes/s1/seed.iso") == 404  # only what an installer fetches
    assert status(f"{base}/lab/nodes/s9/user-data") == 404
    assert get(f"{base}/images/netboot/vmlinuz") == b"kernel" * 1000
    # An unknown MAC's script is missing, so boot.ipxe falls back to the menu.
    assert status(f"{base}/lab/pxe/mac/52-54-00-99-99-99.ipxe") == 404
    assert status(f"{base}/lab/../../etc/passwd") == 404
    assert status(f"{base}/state/lab/ca.key") == 404


def test_install_report_switches_to_local_boot(served: tuple[str, list[str]]) -> None:
    base, log = served
    assert get(f"{base}/lab/nodes/s2/user-data").startswith(b"#cloud-config")
    assert get(f"{base}/installed/52-54-00-00-00-12") == b"ok\n"
    # Installed: its seed (private keys) is no longer handed to whoever claims its MAC.
    assert status(f"{base}/lab/nodes/s2/user-data") == 404
    assert get(f"{base}/lab/nodes/s1/user-data").startswith(b"#cloud-config")
    assert get(f"{base}/lab/pxe/mac/52-54-00-00-00-12.ipxe") == LOCAL_BOOT
    assert get(f"{base}/lab/pxe/mac/52-54-00-00-00-11.ipxe") != LOCAL_BOOT
    assert status(f"{base}/installed/52-54-00-99-99-99") == 404  # not a node of the cluster
    assert any("s2 installed" in line for line in log)


def test_discovery(served: tuple[str, list[str]], example: inventory.Cluster, state: Path) -> None:
    base, _ = served
    # As iPXE sends it: a uristring leaves "+" as is, and "+" is no space here.
    get(f"{base}/discover?mac=52-54-00-99-99-99&platform=pcbios&product=Standard%20PC%20(Q35+ICH9)&uuid=")
    get(f"{base}/discover?mac=52-54-00-00-00-11&platform=efi")  # a known node: not listed
    assert status(f"{base}/discover?mac=garbage") == 400
    listed = Discoveries(state / "lab", example).as_inventory()
    assert '  - mac: "52:54:00:99:99:99"' in listed
    assert 'platform "pcbios"; product "Standard PC (Q35+ICH9)"' in listed
    assert "52:54:00:00:00:11" not in listed
    import yaml  # the listing is YAML that pastes under nodes:

    assert yaml.safe_load(listed)[0] == {"mac": "52:54:00:99:99:99", "roles": ["compute"]}


def test_refuses_interface_outside_subnet(example: inventory.Cluster) -> None:
    with pytest.raises(UserError, match="interface lo has no address in the cluster's subnet 10.0.0.0/24"):
        interface_address("lo", example)
    with pytest.raises(UserError, match="no network interface 'nope0'"):
        interface_address("nope0", example)


def test_refuses_missing_artifacts(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="netboot artifacts missing") as info:
        check_artifacts(tmp_path, inventory.IMAGE_NAME)
    assert info.value.hint == "build them with: ./forge netboot"


def test_seeds_only_to_the_node_address(example: inventory.Cluster, rendered: Path, state: Path,
                                        tmp_path: Path) -> None:
    """In dhcp mode a node has its static lease: its seed goes to that address only."""
    handler = make_handler(example, rendered, tmp_path, Discoveries(state / "lab", example), Installed(state / "lab"),
                           lambda line: None, seeds_by_address=True)
    server = HttpServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert status(f"{base}/lab/nodes/s1/user-data") == 404  # asked from 127.0.0.1, not 10.0.0.11
        assert status(f"{base}/lab/pxe/boot.ipxe") == 200
    finally:
        server.shutdown()
        server.server_close()


HOSTILE = [
    # A newline (raw and escaped) that would end the YAML comment and inject a core node.
    "mac=52-54-00-aa-00-01&manufacturer=Evil%0A%20%20-%20mac%3A%20%2252%3A54%3A00%3Aee%3Aee%3Aee%22%0A"
    "%20%20%20%20roles%3A%20%5Bcore%2C%20storage%5D",
    "mac=52-54-00-aa-00-02&product=" + "A" * 5000,  # huge: refused whole (too long)
    "mac=52-54-00-aa-00-03%0A&platform=efi",  # a MAC with a trailing newline
    "mac=52-54-00-aa-00-04&serial=%1b%5b2J%00x&unknown=1&other=2",  # control characters, unknown keys
    "mac=52-54-00-AA-00-05&product=" + "B" * 300,  # long, but under the request limit: cut
    "&".join(f"k{i}=v" for i in range(40)) + "&mac=52-54-00-aa-00-06",  # too many fields
]


def test_hostile_discovery_reports(served: tuple[str, list[str]], example: inventory.Cluster,
                                   state: Path) -> None:
    import yaml

    base, _ = served
    codes = [status(f"{base}/discover?{query}") for query in HOSTILE]
    assert codes == [200, 414, 400, 200, 200, 400]
    for i in range(600):  # many MACs: the list is capped
        get(f"{base}/discover?mac=52-54-00-bb-{i // 256:02x}-{i % 256:02x}&platform=efi")
    listed = Discoveries(state / "lab", example).as_inventory()
    entries = yaml.safe_load(listed)
    macs = [e["mac"] for e in entries]
    assert len(macs) == len(set(macs)) == 256
    assert all(set(e) == {"mac", "roles"} and e["roles"] == ["compute"] for e in entries)
    assert "ee:ee:ee" not in {m[-8:] for m in macs}
    for line in listed.splitlines():
        assert all(" " <= c <= "~" for c in line)
        assert len(line) < 400


# ---------------------------------------------------------------- seeds over the network (issue 11)

def serve(cluster: inventory.Cluster, rendered: Path, state: Path, log: list[str],
          seeds_by_address: bool = False) -> tuple[HttpServer, str]:
    handler = make_handler(cluster, rendered, rendered.parent / "images", Discoveries(state, cluster),
                           Installed(state), log.append, seeds_by_address=seeds_by_address)
    server = HttpServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def get_from(source: str, base: str, path: str) -> int:
    """The status of GET path, asked from the local address `source` (any of 127/8 is lo's)."""
    import http.client
    import urllib.parse

    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_seed_served_only_while_the_node_is_due_to_install(tmp_path: Path) -> None:
    """Install nodes: until their install report, and again after pxe.reinstall. Diskless nodes:
    always (they fetch the seed on every boot)."""
    import dataclasses

    from clusterforge import render

    from .conftest import EXAMPLE, write_inventory

    text = EXAMPLE.read_text().replace('mac: "52:54:00:00:00:13"', 'mac: "52:54:00:00:00:13"\n    boot: diskless')
    cluster = inventory.load(write_inventory(tmp_path, text))
    rendered = render.render(cluster, tmp_path / "dist", tmp_path / "state").path
    state = tmp_path / "state" / "lab"
    log: list[str] = []
    server, base = serve(cluster, rendered, state, log)
    try:
        for name in ("s2", "s3"):
            assert status(f"{base}/lab/nodes/{name}/user-data") == 200
        for mac in ("52-54-00-00-00-12", "52-54-00-00-00-13"):
            Installed(state).add(mac)  # s3 cannot report an install, but whatever the file says
        assert status(f"{base}/lab/nodes/s2/user-data") == 404
        assert status(f"{base}/lab/nodes/s2/network-config") == 404
        assert status(f"{base}/lab/nodes/s3/user-data") == 200
        Installed(state).remove("52-54-00-00-00-12")  # what pxe.reinstall does
        assert status(f"{base}/lab/nodes/s2/user-data") == 200
    finally:
        server.shutdown()
        server.server_close()

    # dhcp mode: only to the node's own address. Loopback stands in for the cluster LAN: s1 at 127.0.0.11.
    s1 = dataclasses.replace(cluster.nodes[0], ip=IPv4Address("127.0.0.11"))
    moved = dataclasses.replace(cluster, nodes=(s1, *cluster.nodes[1:]))
    server, base = serve(moved, rendered, state, log, seeds_by_address=True)
    try:
        assert get_from("127.0.0.11", base, "/lab/nodes/s1/user-data") == 200
        assert get_from("127.0.0.12", base, "/lab/nodes/s1/user-data") == 404
        assert get_from("127.0.0.1", base, "/lab/nodes/s1/user-data") == 404
        assert get_from("127.0.0.11", base, "/lab/nodes/s2/user-data") == 404  # not s1's own seed
        assert get_from("127.0.0.11", base, "/lab/nodes/s1/seed.iso") == 404  # only what an installer fetches
    finally:
        server.shutdown()
        server.server_close()


def test_state_damaged_while_serving_is_a_500_and_a_message(example: inventory.Cluster, rendered: Path,
                                                            state: Path, capfd: pytest.CaptureFixture[str]) -> None:
    log: list[str] = []
    server, base = serve(example, rendered, state / "lab", log)
    try:
        (state / "lab" / "pxe-installed.json").write_text('{"52-54-00-00-00-11": true}')
        assert status(f"{base}/lab/pxe/mac/52-54-00-00-00-11.ipxe") == 500
        (state / "lab" / "discovered.json").write_text("[")
        assert status(f"{base}/discover?mac=52-54-00-99-99-99") == 500
        assert status(f"{base}/lab/pxe/boot.ipxe") == 200  # the rest is served on
    finally:
        server.shutdown()
        server.server_close()
    assert any("pxe-installed.json: not a list of MACs" in line for line in log), log
    assert any("discovered.json: unreadable" in line for line in log), log
    assert "Traceback" not in capfd.readouterr().err


def test_request_paths_are_escaped_in_the_log(served: tuple[str, list[str]]) -> None:
    import socket
    import urllib.parse

    base, log = served
    url = urllib.parse.urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=10) as conn:
        conn.sendall(b"GET /\x1b[2J\x07" + b"x" * 500 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := conn.recv(4096):  # until the server closes the connection: it logs before that
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 404")
    line = next(line for line in log if "-> 404" in line)
    assert "\\x1b[2J\\x07" in line and "\x1b" not in line and len(line) < 200


# ---------------------------------------------------------------- a broken image download

@pytest.fixture
def image_site(example: inventory.Cluster, rendered: Path, state: Path,
               tmp_path: Path) -> tuple[type[BaseHTTPRequestHandler], Path, bytes, list[str]]:
    """The PXE server's handler with an image to serve: (handler, the image's path, what it
    unpacks to, the server's log)."""
    payload = random.Random(7).randbytes(3 * 2**20) + bytes(2 * 2**20)
    image = tmp_path / "images" / "image.raw.gz"
    image.parent.mkdir()
    image.write_bytes(gzip.compress(payload))
    log: list[str] = []
    handler = make_handler(example, rendered, image.parent, Discoveries(state / "lab", example),
                           Installed(state / "lab"), log.append, seeds_by_address=False)
    return handler, image, payload, log


def breaking(handler: type[BaseHTTPRequestHandler], breaks: int, then: Callable[[], None] = lambda: None,
             ranges: bool = True) -> type[BaseHTTPRequestHandler]:
    """The handler, but its first `breaks` answers with a file stop halfway (the address served
    from moved to another node), calling then(); ranges=False: a server that ignores Range."""
    left = [breaks]

    class Breaking(handler):  # type: ignore[misc, valid-type]
        def send_stream(self, size: int, f: IO[bytes], head: bool, noted: bool = False, start: int = 0) -> None:
            if not left[0]:
                return super().send_stream(size, f, head, noted, start)  # type: ignore[no-any-return]
            left[0] -= 1
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(size - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            f.seek(start)
            self.wfile.write(f.read((size - start) // 2))
            self.wfile.flush()
            then()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

        def range_start(self, size: int) -> int | None:
            return super().range_start(size) if ranges else 0  # type: ignore[no-any-return]
    return Breaking


def test_the_image_is_served_from_a_byte_on(image_site: tuple[type[BaseHTTPRequestHandler], Path, bytes, list[str]]
                                            ) -> None:
    handler, image, _, _ = image_site
    data = image.read_bytes()
    with serving(handler) as base:
        url = f"{base}/images/image.raw.gz"
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=1000-"}), timeout=10) as r:
            assert (r.status, r.headers["Content-Range"], r.read()) == (
                206, f"bytes 1000-{len(data) - 1}/{len(data)}", data[1000:])
        past = urllib.request.Request(url, headers={"Range": f"bytes={len(data)}-"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(past, timeout=10)
        assert refused.value.code == 416
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=0-9"}), timeout=10) as r:
            assert (r.status, r.read()) == (200, data)  # a form not served: the whole file


@pytest.mark.parametrize("ranges", [True, False], ids=["from where it broke", "server ignores Range"])
def test_a_broken_image_download_goes_on(image_site: tuple[type[BaseHTTPRequestHandler], Path, bytes, list[str]],
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], ranges: bool) -> None:
    handler, _, payload, log = image_site
    monkeypatch.setattr(installer, "RESUME_PAUSE", 0.0)
    disk = tmp_path / "disk"
    disk.write_bytes(b"\xff" * len(payload))
    with serving(breaking(handler, 2, ranges=ranges)) as base:
        assert installer.copy_image(f"{base}/images/image.raw.gz", str(disk)) == len(payload)
    assert disk.read_bytes() == payload
    assert capsys.readouterr().out.count("going on from there") == 2
    assert any(" MiB on (" in line for line in log) == ranges


def test_an_image_changed_under_a_broken_download_is_refused(
        image_site: tuple[type[BaseHTTPRequestHandler], Path, bytes, list[str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    handler, image, payload, _ = image_site
    monkeypatch.setattr(installer, "RESUME_PAUSE", 0.0)
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(len(payload)))

    def republish() -> None:
        image.write_bytes(gzip.compress(payload + b"more"))
    with serving(breaking(handler, 1, then=republish)) as base, pytest.raises(installer.InstallError, match="changed"):
        installer.copy_image(f"{base}/images/image.raw.gz", str(disk))
