"""What every service module is handed: the seed, where the agent keeps things, etcd."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..seed import CA_CERT, NODE_CERT, NODE_KEY, Role, Seed
from .election import Election
from .etcd_client import EtcdClient, TLSFiles

STATE_DIR = Path("/var/lib/clusterforge")  # the agent's own state (etcd data, markers)
RUN_DIR = Path("/run/clusterforge")  # what the agent publishes about this node (health.json)
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_TIMEOUT = 5.0  # per request; emulated machines answer in tens of milliseconds
PROBE_TIMEOUT = 2.0  # asking one member how it is: a down member must not stall a pass
ELECTION_TTL = 15  # seconds: a paused or cut-off holder loses a singleton after this


@dataclass
class Ctx:
    seed: Seed
    state_dir: Path = STATE_DIR
    run_dir: Path = RUN_DIR
    _etcd: EtcdClient | None = field(default=None, repr=False)
    _probe: EtcdClient | None = field(default=None, repr=False)
    _elections: dict[str, Election] = field(default_factory=dict, repr=False)

    @property
    def me(self):  # type: ignore[no-untyped-def]
        return self.seed.me

    @property
    def core(self) -> bool:
        return self.seed.me.has(Role.CORE)

    @property
    def tls(self) -> TLSFiles:
        return TLSFiles(ca=self.seed.pki(CA_CERT), cert=self.seed.pki(NODE_CERT), key=self.seed.pki(NODE_KEY))

    def etcd_endpoints(self) -> list[str]:
        """The core nodes' client URLs; a core node asks its own member first."""
        core = [f"https://{n.ip}:{ETCD_CLIENT_PORT}" for n in self.seed.cluster.with_role(Role.CORE)]
        if self.core:
            mine = f"https://{self.me.ip}:{ETCD_CLIENT_PORT}"
            core = [mine] + [u for u in core if u != mine]
        return core

    @property
    def etcd(self) -> EtcdClient:
        if self._etcd is None:
            self._etcd = EtcdClient(self.etcd_endpoints(), self.tls, timeout=ETCD_TIMEOUT)
        return self._etcd

    @property
    def etcd_probe(self) -> EtcdClient:
        """For per-member status: short timeouts."""
        if self._probe is None:
            self._probe = EtcdClient(self.etcd_endpoints(), self.tls, timeout=PROBE_TIMEOUT)
        return self._probe

    def election(self, name: str) -> Election:
        if name not in self._elections:
            self._elections[name] = Election(self.etcd, name, self.me.name, ttl=ELECTION_TTL)
        return self._elections[name]

    @property
    def elections(self) -> dict[str, Election]:
        return self._elections
