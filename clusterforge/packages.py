"""Package sets and the units images disable: data in images/, read and checked here.

Package sets: images/packages/<os>.txt (the OS base of the Debian image), agent.txt (what
the agent needs on any OS) and one <service>.txt per service (node/seed.py's Service).
"""

from __future__ import annotations

import re
from pathlib import Path

from .inventory import Cluster, Service
from .log import die

IMAGES = Path(__file__).resolve().parent.parent / "images"
AGENT_SET = "agent"
_PACKAGE_NAME = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_UNIT_PATTERN = re.compile(r"[A-Za-z0-9@_.*:-]+\.(service|target|timer|socket)")


def read_list(path: Path, pattern: re.Pattern[str]) -> list[str]:
    """One item a line; '#' starts a comment; every item must match pattern."""
    if not path.exists():
        die(f"not found: {path}")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        if not pattern.fullmatch(item):
            die(f"{path}:{number}: not a valid entry: {item!r}", hint="one per line")
        items.append(item)
    return items


def package_set(name: str) -> list[str]:
    return read_list(IMAGES / "packages" / f"{name}.txt", _PACKAGE_NAME)


def image_package_sets(os_base: str) -> tuple[str, ...]:
    """Every set an image of this OS carries: its base, the agent's, every service's."""
    return (os_base, AGENT_SET, *(str(s) for s in Service))


def packages_of(sets: tuple[str, ...]) -> list[str]:
    seen: dict[str, None] = {}
    for name in sets:
        for package in package_set(name):
            seen.setdefault(package, None)
    return list(seen)


def service_packages(cluster: Cluster) -> list[str]:
    """What a node installed by Ubuntu's installer needs: the agent's set and the services on."""
    return packages_of((AGENT_SET, *(str(s) for s in cluster.services.on())))


def unit_patterns() -> list[str]:
    """Units the packages enable that must wait for the agent to configure them."""
    return read_list(IMAGES / "disabled-units.txt", _UNIT_PATTERN)


def disable_units_command(patterns: list[str]) -> str:
    """A shell command that disables the enabled units matching the patterns (systemctl
    disable takes no patterns; list-unit-files does). The patterns are checked: no quoting
    is needed beyond keeping the shell from globbing them."""
    quoted = " ".join(f"'{p}'" for p in patterns)
    return (f"systemctl list-unit-files --state=enabled --no-legend --plain {quoted}"
            " | cut -d' ' -f1 | xargs -r systemctl disable")
