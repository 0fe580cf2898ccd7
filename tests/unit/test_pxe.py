"""The PXE server's HTTP side and discovery list, served for real on loopback."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterforge import inventory
from clusterforge.log import UserError
from clusterforge.pxe.discovery import Discoveries
from clusterforge.pxe.http import LOCAL_BOOT, HttpServer, Installed, make_handler
from clusterforge.pxe.server import check_artifacts, interface_address


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
    server = HttpServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return bytes(reply.read())


def status(url: str) -> int:
    try:
        get(url)
        return 200
    except urllib.error.HTTPError as exc:
        return exc.code


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
