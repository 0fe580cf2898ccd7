"""What every service module is handed: the seed, where the agent keeps things, etcd."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import seed as seedlib
from ..seed import CA_CERT, NODE_CERT, NODE_KEY, Role, Seed
from . import host
from .election import Election
from .etcd_client import EtcdClient, TLSFiles

STATE_DIR = Path("/var/lib/clusterforge")  # the agent's own state (etcd data, markers)
RUN_DIR = Path("/run/clusterforge")  # what the agent publishes about this node (health.json)
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_TIMEOUT = 5.0  # per request; emulated machines answer in tens of milliseconds
PROBE_TIMEOUT = 2.0  # asking one member how it is: a down member must not stall a pass
# Under software emulation a busy member's TLS handshake and answer take seconds (seen: 2-6 s
# while the cluster forms); with 2 s it was reported down while it served.
PROBE_TIMEOUT_EMULATED = 8.0
ELECTION_TTL = 15  # seconds: a paused or cut-off holder loses a singleton after this
# Under software emulation one etcd answer can take seconds when the machines are busy: a
# holder keeps its lease through that rather than hand the role round the cluster.
ELECTION_TTL_EMULATED = 30


@dataclass
class Ctx:
    seed: Seed
    state_dir: Path = STATE_DIR
    run_dir: Path = RUN_DIR
    _etcd: EtcdClient | None = field(default=None, repr=False)
    _probe: EtcdClient | None = field(default=None, repr=False)
    _elections: dict[str, Election] = field(default_factory=dict, repr=False)
    _seed_said: str = field(default="", repr=False)

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
            timeout = PROBE_TIMEOUT_EMULATED if host.emulated() else PROBE_TIMEOUT
            self._probe = EtcdClient(self.etcd_endpoints(), self.tls, timeout=timeout)
        return self._probe

    def election(self, name: str) -> Election:
        if name not in self._elections:
            ttl = ELECTION_TTL_EMULATED if host.emulated() else ELECTION_TTL
            self._elections[name] = Election(self.etcd, name, self.me.name, ttl=ttl)
        return self._elections[name]

    @property
    def elections(self) -> dict[str, Election]:
        return self._elections

    def reload_seed(self) -> str:
        """Take in the seed as `./forge cluster.publish` rewrote it (a core node's cluster.json
        lists every node: new nodes, their keys); a line to log when something happened, else "".

        Only what a running node can take in place: a seed that names another node, moves the
        network, turns services on or off or changes the core nodes (etcd's members, the
        endpoints this context holds) is left aside, and said so once."""
        try:
            new = seedlib.load(self.seed.root)
        except seedlib.SeedError as exc:
            return self._say(f"agent: keeping the seed it started with: {exc}")
        if new == self.seed:
            return self._say("")
        old = self.seed.cluster
        core = [(n.name, n.ip) for n in old.with_role(Role.CORE)]
        refused = ("it names another node" if new.identity != self.seed.identity else
                   "the network moved" if _fixed(new.cluster.network) != _fixed(old.network) else
                   "the services changed" if new.cluster.services != old.services else
                   "the core nodes changed" if [(n.name, n.ip) for n in new.cluster.with_role(Role.CORE)] != core
                   else "")
        if refused:
            return self._say(f"agent: the seed in {self.seed.root} changed, not taken in: {refused} "
                             "(a running node keeps its seed's cluster; restart the agent to read it anyway)")
        self.seed = new
        self._say("")
        return f"agent: seed reloaded: {len(new.cluster.nodes)} nodes (was {len(old.nodes)})"

    def _say(self, line: str) -> str:
        """A line once, not every pass."""
        if line == self._seed_said:
            return ""
        self._seed_said = line
        return line


def _fixed(net: seedlib.SeedNetwork) -> tuple[object, ...]:
    """What of the network a running cluster cannot change (cluster.publish refuses it too)."""
    return net.subnet, net.overlay, net.vip
