"""Machines that PXE-booted but are not in the inventory, kept for `pxe.discovered`.

A report arrives over the network from whoever asks: it is never trusted. The checks are
the node code's (node/pxeserve.py), the same for the factory's list, kept here in
state/<cluster>/discovered.json, and the cluster's, kept in etcd: only a fixed list of fields
is kept, each cut to a length and stripped to printable ASCII; at most MAX_MACHINES machines
are kept (the least recently seen go first); and what is printed for an operator to paste is
built from those checked values, quoted.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..fsutil import write_atomic
from ..inventory import Cluster
from ..log import die
from ..node.pxeserve import FIELDS, MAX_MACHINES, STAMPS, clean, merged, over_cap, report_mac, sanitized

__all__ = ["FIELDS", "MAX_MACHINES", "STAMPS", "Discoveries", "clean", "listing"]

MAX_FILE = 1024**2  # discovered.json: 256 machines take about 100 KiB


class Discoveries:
    """state/<cluster>/discovered.json: MAC -> what the machine reported, first and last seen."""

    def __init__(self, state: Path, cluster: Cluster):
        self.path = state / "discovered.json"
        self.cluster = cluster
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict[str, str]]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_FILE + 1)
            if len(raw) > MAX_FILE:
                die(f"{self.path}: larger than {MAX_FILE} bytes, which no list of {MAX_MACHINES} machines is",
                    hint="delete it to start the list of unknown machines afresh")
            data = json.loads(raw)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            die(f"{self.path}: unreadable ({type(exc).__name__})",
                hint="it only lists machines that booted unknown; delete it to start the list afresh")
        if not isinstance(data, dict):
            die(f"{self.path}: not a JSON object", hint="delete it to start the list of unknown machines afresh")
        return sanitized(data)

    def record(self, report: dict[str, str]) -> str | None:
        """Record a report from the menu's discovery request; the MAC, or None if malformed."""
        mac = report_mac(report)
        if mac is None:
            return None
        with self._lock:
            seen = self.load()
            seen[mac] = merged(seen.get(mac), report)
            for old in over_cap(seen):
                del seen[old]
            write_atomic(self.path, json.dumps(seen, indent=2, sort_keys=True) + "\n")
        return mac

    def as_inventory(self) -> str:
        """YAML list entries for the machines not (yet) in the inventory, ready to paste."""
        return listing(self.load(), (n.mac for n in self.cluster.nodes))


def listing(seen: Mapping[str, Mapping[str, str]], known: Iterable[str]) -> str:
    """Inventory entries for the machines seen (already sanitized) that are not known, each
    value quoted inside a comment: a report cannot add a line to what is pasted."""
    known = set(known)
    lines = []
    for mac, info in sorted(seen.items()):
        if mac in known:
            continue
        what = "; ".join(f"{k} {json.dumps(clean(info[k], FIELDS[k]))}"
                         for k in ("platform", "manufacturer", "product", "serial") if info.get(k))
        seen_at = clean(info.get("last_seen", "?"), 32)
        lines.append(f'  - mac: "{mac}"  # seen {seen_at}' + (f"; {what}" if what else ""))
        lines.append("    roles: [compute]")
    return "\n".join(lines)
