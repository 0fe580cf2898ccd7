"""Image build times, measured in one run into a scratch output directory:

- cold build (every stage: rootfs, base disk, Packer, raw), with the host's apt cache warm;
- a bare mmdebstrap of the same package set with the same cache: the floor;
- their ratio (goal <= 1.3);
- a no-op rebuild (goal <= 5 s);
- image sizes.

Run: .venv/bin/python bench/build.py   (root; several minutes under TCG)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clusterforge.factory import rootfs  # noqa: E402
from clusterforge.factory.context import BuildContext  # noqa: E402
from clusterforge.factory.pipeline import build_image  # noqa: E402
from clusterforge.log import human_bytes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def timed(label: str, fn):  # type: ignore[no-untyped-def]
    start = time.monotonic()
    result = fn()
    elapsed = time.monotonic() - start
    print(f"{label:<46} {elapsed:8.1f} s", flush=True)
    return result, elapsed


def on_disk(path: Path) -> str:
    return human_bytes(path.stat().st_blocks * 512)


def main() -> None:
    (REPO / "dist").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=REPO / "dist") as tmp:
        ctx = BuildContext.create(out=Path(tmp) / "dist")
        artifacts, cold = timed("cold build (rootfs, disk, Packer, raw)", lambda: build_image(ctx))
        floor_dir = Path(tmp) / "floor"

        def bare() -> None:  # the same packages and the same warm cache, nothing else
            seeded = rootfs.seed_apt_cache(ctx.apt_cache, floor_dir)
            try:
                rootfs.mmdebstrap(ctx, floor_dir)
            finally:
                rootfs.harvest_apt_cache(floor_dir, ctx.apt_cache, seeded)

        _, floor = timed("bare mmdebstrap of the same packages (floor)", bare)
        shutil.rmtree(floor_dir)
        print(f"{'ratio cold / floor (goal <= 1.3)':<46} {cold / floor:8.2f}")
        timed("no-op rebuild (goal <= 5 s)", lambda: build_image(ctx))
        print(f"{'qcow2 (compressed)':<46} {on_disk(artifacts.qcow2):>10}")
        print(f"{'raw (sparse, used)':<46} {on_disk(artifacts.raw):>10}   "
              f"of {human_bytes(artifacts.raw.stat().st_size)}")


if __name__ == "__main__":
    main()
