"""The node's health record: what each service is doing and why, for people and tools.

Written to /run/clusterforge/health.json after every pass (0644: it holds no secret) and
published in etcd under /clusterforge/health/<node> on a lease, so that a node that is down
shows as down: its record expires with it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

from . import host
from .context import Ctx
from .core import PassResult, State, Status
from .etcd_client import EtcdError

HEALTH_PREFIX = "/clusterforge/health/"
RECORD_TTL = 45  # seconds; a few passes, so one slow pass does not make a node look down


def build(ctx: Ctx, result: PassResult, started: float) -> dict[str, Any]:
    me = ctx.me
    return {
        "node": me.name,
        "cluster": ctx.seed.cluster.name,
        "roles": [str(r) for r in me.roles],
        "ip": str(me.ip),
        "healthy": all(s.state in (State.OK, State.OFF) for s in result.statuses.values()),
        "services": {name: s.to_dict() for name, s in result.statuses.items()},
        "leader_roles": sorted(name for name, e in ctx.elections.items() if e.token is not None),
        "last_pass": {"at": round(time.time(), 1), "seconds": round(result.duration, 2),
                      "changed": result.changed[-10:]},
        "agent": {"since": round(started, 1), "hostname": socket.gethostname()},
    }


def write_local(ctx: Ctx, record: dict[str, Any]) -> None:
    host.ensure_dir(ctx.run_dir, 0o755)
    host.write(ctx.run_dir / "health.json", json.dumps(record, indent=2) + "\n", 0o644)


class Publisher:
    """Keeps this node's record in etcd on a lease of its own. publish() puts the newest
    record after a pass; keep() (from a thread of its own, every few seconds) keeps the
    lease alive however long a pass takes, and puts the record again if the lease was lost."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.lease = 0
        self.record: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def publish(self, record: dict[str, Any], statuses: dict[str, Status]) -> None:
        if statuses.get("etcd", Status(State.OFF)).state not in (State.OK, State.DEGRADED):
            return
        with self._lock:
            self.record = record
            self._put()

    def keep(self) -> None:
        with self._lock:
            if self.record is None:
                return
            try:
                if self.lease and self.ctx.etcd.lease_keepalive(self.lease) > 0:
                    return
            except EtcdError:
                return
            self._put()

    def _put(self) -> None:
        try:
            if not self.lease or self.ctx.etcd.lease_keepalive(self.lease) <= 0:
                self.lease = self.ctx.etcd.lease_grant(RECORD_TTL)
            self.ctx.etcd.put(HEALTH_PREFIX + self.ctx.me.name, json.dumps(self.record), lease=self.lease)
        except EtcdError:
            self.lease = 0  # the next try grants a new one


def cluster_records(ctx: Ctx) -> dict[str, dict[str, Any]]:
    """Every node's published record (a node that is down has none)."""
    records = {}
    for kv in ctx.etcd.get_prefix(HEALTH_PREFIX):
        try:
            records[kv.key.removeprefix(HEALTH_PREFIX)] = json.loads(kv.value)
        except ValueError:
            continue
    return records
