"""`check-cluster`: the whole cluster as a table; exit status 1 when anything is unhealthy.

    check-cluster            the table, then what is not ok and why
    check-cluster --json     the same as http://<VIP>/api/health, for scripts
    check-cluster --wait S   until healthy, at most S seconds (then the table, and its verdict)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .. import seed as seedlib
from .context import Ctx
from .health import cluster_view, table

POLL = 3.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="check-cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the cluster's health as JSON")
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="wait until the cluster is healthy, at most this long")
    args = parser.parse_args(argv)
    try:
        ctx = Ctx(seedlib.load())
    except seedlib.SeedError as exc:
        print(f"check-cluster: {exc}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.wait
    view = cluster_view(ctx)
    while not view["healthy"] and time.monotonic() < deadline:
        time.sleep(POLL)  # the agents publish on their own pace: look again
        view = cluster_view(ctx)
    print(json.dumps(view, indent=2) if args.json else table(view), end="" if not args.json else "\n")
    return 0 if view["healthy"] else 1


if __name__ == "__main__":
    sys.exit(main())
