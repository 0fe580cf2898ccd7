"""Render a generated 1,000-node inventory and print how long each part takes.

Goal: a full render (state already generated) under 2 s on the 2-core build machines.
Run: ./forge bench.render   (or .venv/bin/python bench/render.py)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clusterforge import inventory, render, secrets  # noqa: E402

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJbHTlu4gELWONj09/8k0fELB1uY3ZQjNOtCF0TcxLV bench"


def generate(path: Path, count: int) -> None:
    lines = ["cluster: {name: big}", "network: {subnet: 10.0.0.0/16, overlay: 10.200.0.0/16}",
             f'access: {{ssh_authorized_keys: ["{KEY}"]}}', "nodes:"]
    for i in range(count):
        mac = f"52:54:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
        if i < 3:
            lines.append(f'  - {{mac: "{mac}", roles: [core, storage], disks: [/dev/sdb]}}')
        else:
            ip = f"10.0.{4 + i // 250}.{1 + i % 250}"
            lines.append(f'  - {{mac: "{mac}", roles: [compute], name: n{i:04d}, ip: {ip}}}')
    path.write_text("\n".join(lines) + "\n")


def timed(label: str, fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = fn()
    print(f"{label:<40} {time.perf_counter() - start:7.3f} s")
    return result


def main(count: int = 1000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root / "big.yaml", count)
        cluster = timed(f"load + validate {count} nodes", lambda: inventory.load(root / "big.yaml"))
        timed("generate secrets (cold, once per cluster)",
              lambda: secrets.ensure(cluster, root / "state"))
        timed("render, secrets kept (goal < 2 s)",
              lambda: render.render(cluster, root / "dist", root / "state"))
        start = time.perf_counter()
        cluster = inventory.load(root / "big.yaml")
        render.render(cluster, root / "dist", root / "state")
        print(f"{'load + render end to end (goal < 2 s)':<40} {time.perf_counter() - start:7.3f} s")
        files = sum(1 for p in (root / "dist").rglob("*") if p.is_file())
        print(f"{'files written':<40} {files:7d}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
