"""Package sets and unit lists: data in images/, read here."""

from __future__ import annotations

from pathlib import Path

from .inventory import Cluster

IMAGES = Path(__file__).resolve().parent.parent / "images"
SERVICES = ("etcd", "ceph", "slurm", "wireguard", "k3s")


def read_list(path: Path) -> list[str]:
    """One item a line; '#' starts a comment."""
    items = []
    for line in path.read_text().splitlines():
        item = line.split("#", 1)[0].strip()
        if item:
            items.append(item)
    return items


def package_set(name: str) -> list[str]:
    return read_list(IMAGES / "packages" / f"{name}.txt")


def service_packages(cluster: Cluster) -> list[str]:
    """The packages an installed node needs for the services the inventory enables."""
    wanted = ["chrony", "python3-yaml", "jq"]
    for service in SERVICES:
        if getattr(cluster.services, service):
            wanted += [p for p in package_set(service) if p not in wanted]
    return wanted


def disabled_units() -> list[str]:
    """Units the packages enable that must wait for the agent to configure them."""
    return read_list(IMAGES / "disabled-units.txt")
