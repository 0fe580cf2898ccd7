"""Machines that PXE-booted but are not in the inventory, kept for `pxe.discovered`.

A report arrives over the network from whoever asks: it is never trusted. Only a fixed
list of fields is kept, each cut to a length and stripped to printable ASCII; at most
MAX_MACHINES machines are kept (the least recently seen go first); and what is printed
for an operator to paste is built from those checked values, quoted.
"""

from __future__ import annotations

import datetime
import json
import re
import threading
from pathlib import Path

from ..fsutil import write_atomic
from ..inventory import Cluster
from ..log import die

_MAC_HYPHEN = re.compile(r"[0-9a-f]{2}(?:-[0-9a-f]{2}){5}")
# The fields menu.ipxe sends, and the longest value kept of each.
FIELDS = {"platform": 16, "ip": 15, "uuid": 36, "serial": 64, "manufacturer": 64, "product": 64}
MAX_MACHINES = 256
MAX_FILE = 1024**2  # discovered.json: 256 machines take about 100 KiB
STAMPS = ("first_seen", "last_seen")


def clean(value: str, limit: int) -> str:
    """Printable ASCII only (no newline, no control character), at most limit characters."""
    return "".join(c for c in value if " " <= c <= "~")[:limit].strip()


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
        seen = {}
        for mac, entry in list(data.items())[:MAX_MACHINES]:
            if isinstance(mac, str) and _MAC_HYPHEN.fullmatch(mac.replace(":", "-")) and isinstance(entry, dict):
                seen[mac.replace("-", ":")] = {k: clean(str(v), FIELDS.get(k, 32)) for k, v in entry.items()
                                               if k in FIELDS or k in STAMPS}
        return seen

    def record(self, report: dict[str, str]) -> str | None:
        """Record a report from the menu's discovery request; the MAC, or None if malformed."""
        mac_hyphen = report.get("mac", "").lower()
        if not _MAC_HYPHEN.fullmatch(mac_hyphen):
            return None
        mac = mac_hyphen.replace("-", ":")
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        fields = {k: clean(report[k], limit) for k, limit in FIELDS.items() if k in report}
        with self._lock:
            seen = self.load()
            entry = seen.get(mac, {"first_seen": now})
            entry.update({k: v for k, v in fields.items() if v}, last_seen=now)
            seen[mac] = entry
            if len(seen) > MAX_MACHINES:
                newest = sorted(seen, key=lambda m: seen[m].get("last_seen", ""), reverse=True)[:MAX_MACHINES]
                seen = {m: seen[m] for m in newest}
            write_atomic(self.path, json.dumps(seen, indent=2, sort_keys=True) + "\n")
        return mac

    def as_inventory(self) -> str:
        """YAML list entries for the machines not (yet) in the inventory, ready to paste."""
        known = {n.mac for n in self.cluster.nodes}
        lines = []
        for mac, info in sorted(self.load().items()):
            if mac in known:
                continue
            what = "; ".join(f"{k} {json.dumps(clean(info[k], FIELDS[k]))}"
                             for k in ("platform", "manufacturer", "product", "serial") if info.get(k))
            seen = clean(info.get("last_seen", "?"), 32)
            lines.append(f'  - mac: "{mac}"  # seen {seen}' + (f"; {what}" if what else ""))
            lines.append("    roles: [compute]")
        return "\n".join(lines)
