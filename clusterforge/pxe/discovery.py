"""Machines that PXE-booted but are not in the inventory, kept for `pxe.discovered`."""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

from ..fsutil import write_atomic
from ..inventory import Cluster

_MAC_HYPHEN = re.compile(r"^[0-9a-f]{2}(-[0-9a-f]{2}){5}$")


class Discoveries:
    """state/<cluster>/discovered.json: MAC -> what the machine reported, first and last seen."""

    def __init__(self, state: Path, cluster: Cluster):
        self.path = state / cluster.name / "discovered.json"
        self.cluster = cluster

    def load(self) -> dict[str, dict[str, str]]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def record(self, report: dict[str, str]) -> str | None:
        """Record a report from the menu's discovery request; the MAC, or None if malformed."""
        mac_hyphen = report.get("mac", "").lower()
        if not _MAC_HYPHEN.match(mac_hyphen):
            return None
        mac = mac_hyphen.replace("-", ":")
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        seen = self.load()
        entry = seen.get(mac, {"first_seen": now})
        entry.update({k: v for k, v in report.items() if k != "mac" and v}, last_seen=now)
        seen[mac] = entry
        write_atomic(self.path, json.dumps(seen, indent=2, sort_keys=True) + "\n")
        return mac

    def as_inventory(self) -> str:
        """YAML list entries for the machines not (yet) in the inventory, ready to paste."""
        known = {n.mac for n in self.cluster.nodes}
        lines = []
        for mac, info in sorted(self.load().items()):
            if mac in known:
                continue
            what = ", ".join(f"{k} {info[k]}" for k in ("platform", "manufacturer", "product", "serial")
                             if info.get(k))
            lines.append(f'  - mac: "{mac}"  # seen {info.get("last_seen", "?")}' + (f"; {what}" if what else ""))
            lines.append("    roles: [compute]")
        return "\n".join(lines)
