"""An HTTP handler served for real on loopback, and a client for it (the PXE tests share it)."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler

from clusterforge.node.pxeserve import HttpServer


@contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """The handler on a free loopback port, for the with block; yields its base URL."""
    server = HttpServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
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
