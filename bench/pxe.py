"""HTTP throughput of the PXE server's HTTP side beside nginx, serving the same netboot files
to 20 concurrent clients on loopback, measured in one run with wrk.

Goal: clusterforge >= 0.8x nginx. Run: .venv/bin/python bench/pxe.py [seconds]
(uses dist/images/netboot/ when built, else generated files of the same sizes).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clusterforge import inventory  # noqa: E402
from clusterforge.pxe.discovery import Discoveries  # noqa: E402
from clusterforge.pxe.http import HttpServer, Installed, make_handler  # noqa: E402
from clusterforge.vm.network import free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLIENTS = 20
NGINX_CONF = """
user root; daemon off; worker_processes 2; pid {prefix}/nginx.pid; error_log {prefix}/error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;
  server {{ listen 127.0.0.1:{port}; root {root}; }} }}
"""


def files(root: Path) -> list[str]:
    """The netboot files as URLs paths under root/images/netboot/ (generated if not built)."""
    netboot = root / "images" / "netboot"
    netboot.mkdir(parents=True)
    built = REPO / "dist" / "images" / "netboot"
    for name, size in (("vmlinuz", 8 << 20), ("initrd.img", 32 << 20), ("root.squashfs", 64 << 20)):
        if (built / name).exists():
            (netboot / name).symlink_to(built / name)
        else:
            (netboot / name).write_bytes(os.urandom(size))
    return [f"/images/netboot/{name}" for name in ("vmlinuz", "initrd.img", "root.squashfs")]


def wrk(url: str, seconds: int) -> float:
    """Bytes per second wrk measured."""
    # A 380 MB squashfs to 20 clients at once takes longer than wrk's default 2 s timeout,
    # after which wrk drops the request from its figures: give each one a minute.
    out = subprocess.run(["wrk", "-t", "2", "-c", str(CLIENTS), "-d", f"{seconds}s", "--timeout", "60s", url],
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out)
    assert match and "Non-2xx" not in out and "Socket errors" not in out, out
    scale = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[match.group(2)]
    return float(match.group(1)) * scale


def main(seconds: int = 10) -> None:
    cluster = inventory.load(REPO / "examples" / "cluster.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = files(root)
        (root / "state").mkdir()
        handler = make_handler(cluster, root, root / "images", Discoveries(root / "state", cluster),
                               Installed(root / "state" / "installed.json"), lambda line: None)
        ours = HttpServer(("127.0.0.1", free_port()), handler)
        threading.Thread(target=ours.serve_forever, daemon=True).start()
        nginx_port = free_port()
        (root / "nginx.conf").write_text(NGINX_CONF.format(prefix=root, port=nginx_port, root=root))
        nginx = subprocess.Popen(["nginx", "-c", str(root / "nginx.conf"), "-p", str(root)])
        try:
            time.sleep(0.5)  # nginx binds within milliseconds; wrk would fail loudly otherwise
            print(f"{CLIENTS} concurrent clients, {seconds}s per run, files: {', '.join(paths)}")
            for path in paths:
                ours_bps = wrk(f"http://127.0.0.1:{ours.server_address[1]}{path}", seconds)
                nginx_bps = wrk(f"http://127.0.0.1:{nginx_port}{path}", seconds)
                print(f"{path:<30} clusterforge {ours_bps / 2**20:8.0f} MiB/s   nginx {nginx_bps / 2**20:8.0f} MiB/s"
                      f"   ratio {ours_bps / nginx_bps:5.2f} (goal >= 0.8)")
        finally:
            nginx.terminate()
            nginx.wait()
            ours.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
