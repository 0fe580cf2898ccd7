"""`python -m clusterforge.pxe --inventory PATH --interface IF [...]`: the PXE server as a
plain process, for running it inside a network namespace (the QEMU cluster, the VM tests)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..inventory import load
from ..log import UserError
from .server import PxeServer


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m clusterforge.pxe")
    parser.add_argument("--inventory", required=True)
    parser.add_argument("--interface", required=True)
    parser.add_argument("--mode", default="dhcp")
    parser.add_argument("--dist", default="dist")
    parser.add_argument("--state", default="state")
    parser.add_argument("--runs", default="runs")
    args = parser.parse_args()
    try:
        PxeServer(load(args.inventory), args.interface, args.mode, Path(args.dist), Path(args.state),
                  Path(args.runs)).serve()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
