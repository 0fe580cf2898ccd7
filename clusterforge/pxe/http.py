"""The factory's PXE HTTP side: the shared handler (node/pxeserve.py) over the rendered tree,
dist/images/, and the installed set and discovery list kept in state/<cluster>/.

The factory adds one route of its own: /k3s/<file>, the K3s air-gap bundle's two files when
the inventory names one (nodes fetch it from here; it is never part of the image or a seed).
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO

from .. import k3sbundle
from ..fsutil import write_atomic
from ..inventory import BootMode, Cluster
from ..log import die
from ..node.agent.k3s import URL_DIR as K3S_DIR
from ..node.pxeserve import LOCAL_BOOT, MAC_HYPHEN, BootNode, HttpServer, Served
from ..node.pxeserve import make_handler as make_served_handler
from .discovery import Discoveries

__all__ = ["LOCAL_BOOT", "HttpServer", "Installed", "make_handler", "served"]


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
        if not isinstance(data, list) or not all(isinstance(m, str) and MAC_HYPHEN.fullmatch(m) for m in data):
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


def served(cluster: Cluster, rendered: Path, images: Path, seeds_by_address: bool) -> Served:
    nodes = tuple(BootNode(n.name, n.mac_hyphen, str(n.ip), n.boot == BootMode.DISKLESS) for n in cluster.nodes)
    return Served(cluster.name, nodes, {cluster.name: rendered, "images": images}, seeds_by_address)


def make_handler(cluster: Cluster, rendered: Path, images: Path, discoveries: Discoveries,
                 installed: Installed, log: Callable[[str], None],
                 seeds_by_address: bool = True) -> type[http.server.BaseHTTPRequestHandler]:
    site = served(cluster, rendered, images, seeds_by_address)
    bundle = k3sbundle.require(cluster.services.k3s_bundle) if cluster.services.k3s_bundle else None

    def k3s(rest: list[str]) -> AbstractContextManager[tuple[int, IO[bytes]]] | None:
        if bundle is None or len(rest) != 1 or rest[0] not in bundle.files:
            return None
        return k3sbundle.opened(bundle, rest[0])

    return make_served_handler(lambda: site, installed, discoveries, log, routes={K3S_DIR: k3s})
