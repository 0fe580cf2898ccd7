"""What invoke tasks share: error reporting and the summaries they print."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .inventory import Cluster
from .log import UserError, human_bytes, set_verbose
from .run import CommandError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(task: F) -> F:
    """Print user errors and failed commands as a message and exit 1: never a traceback."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        set_verbose(bool(kwargs.get("verbose")))
        try:
            return task(*args, **kwargs)
        except (UserError, CommandError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted: nothing half-written was left in place", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def render_summary(cluster: Cluster, out: Path) -> str:
    lines = [f"cluster {cluster.name} ({cluster.domain}, {cluster.os}) rendered to {out}/",
             f"  {'node':<8} {'mac':<18} {'ip':<15} {'overlay':<15} {'boot':<9} roles"]
    for n in cluster.nodes:
        lines.append(f"  {n.name:<8} {n.mac:<18} {str(n.ip):<15} {str(n.overlay_ip):<15} "
                     f"{n.boot:<9} {','.join(n.roles)}")
    files = [p for p in sorted(out.rglob("*")) if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    services = [s for s in ("etcd", "ceph", "wireguard", "slurm", "k3s")
                if getattr(cluster.services, s)]
    lines.append(f"  services: {', '.join(services)}")
    lines.append(f"  {len(files)} files, {human_bytes(total)}: inventory.json, "
                 "nodes/<name>/{user-data,meta-data,network-config,seed.iso,autoinstall.yaml}, "
                 "pxe/{boot.ipxe,menu.ipxe,mac/*.ipxe,dnsmasq.conf}")
    return "\n".join(lines)
