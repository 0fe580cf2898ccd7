"""etcd on the core nodes, formed from the seed's member list with no bootstrap step.

Every core node starts its member with the same initial cluster (the seed's core nodes),
so a majority forms the cluster and no node alone ever does (no split brain). A member
that lost its data rejoins by itself: the others still list it, so it removes its old
member, adds itself anew and starts as "existing". The agent never deletes etcd data: a
data directory that does not belong to this cluster is moved aside, not removed.

Non-core nodes are clients: they need the core members' client URLs and their own
certificate, nothing more. On every node `etcdctl` works for root with no flags.

etcd refuses the certificates the cluster CA revoked (a node removed or replaced): every
node keeps the CA's newest CRL, from its seed, `cluster.publish` or etcd, whichever has
the highest number, and etcd reads it again for every connection.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..seed import CRL, Role, Service
from . import host, pki
from .context import ETCD_CLIENT_PORT, ETCD_PEER_PORT, Ctx
from .core import Plan, State, Status, Step, Wait
from .etcd_client import EtcdError, Member, compare_create_revision, compare_value, op_put

name = "etcd"
needs: tuple[str, ...] = ()

UNIT = "clusterforge-etcd.service"
CONF_DIR = Path("/etc/clusterforge/etcd")
CONFIG = CONF_DIR / "etcd.env"  # the unit's EnvironmentFile
TLS_DIR = CONF_DIR / "tls"  # copies the etcd user can read
ETCDCTL = Path("/usr/local/bin/etcdctl")
CRL_KEY = "/clusterforge/crl"  # the CA's newest CRL (PEM): signed, so it may pass through etcd
OWNER = "etcd"
# Emulated machines stall for seconds; the defaults (100/1000 ms) make them elect forever.
HEARTBEAT_MS = 500
ELECTION_MS = 5000


def data_dir(ctx: Ctx) -> Path:
    return ctx.state_dir / "etcd"


def joined_marker(ctx: Ctx) -> Path:
    """Written once this node's member has served: from then on its data is not optional."""
    return ctx.state_dir / "etcd.joined"


def peer_url(ip: object) -> str:
    return f"https://{ip}:{ETCD_PEER_PORT}"


def client_url(ip: object) -> str:
    return f"https://{ip}:{ETCD_CLIENT_PORT}"


def applies(ctx: Ctx) -> bool:
    return ctx.seed.cluster.enabled(Service.ETCD)


@dataclass(frozen=True)
class Crl:
    """The CA's list of revoked certificates, here and in etcd: numbers of CRLs the CA signed
    (None: none, or not one the CA signed). `cluster.publish` brings a newer one to the core
    nodes; through etcd it reaches every node."""

    local: int | None
    etcd: int | None
    etcd_text: str | None  # what etcd holds (None: nothing), for a compare-and-swap


@dataclass(frozen=True)
class Facts:
    tls_ok: bool  # the etcd user's copies of the node's certificate and key are current
    etcdctl_ok: bool
    config: str | None  # what the config file says now
    data_present: bool  # the member's data (data-dir/member) exists
    joined: bool  # this node's member served before (marker)
    unit: host.Unit
    members: tuple[Member, ...] | None  # None: no member answered
    members_why: str  # why None
    healthy: dict[str, bool]  # core node name -> its member answers with a leader
    crl: Crl = field(default_factory=lambda: Crl(None, None, None))  # recorded facts may lack it


def facts(ctx: Ctx) -> Facts:
    unit = host.units(UNIT)[UNIT]
    members: tuple[Member, ...] | None = None
    why = ""
    try:
        members = tuple(ctx.etcd.member_list())
    except EtcdError as exc:
        why = str(exc)
    healthy = {}
    if members is not None:
        for node in ctx.seed.cluster.with_role(Role.CORE):
            try:
                status = ctx.etcd_probe.status(client_url(node.ip))
                healthy[node.name] = bool(status.leader) and not status.errors
            except EtcdError:
                healthy[node.name] = False
    crl = crl_facts(ctx, reachable=members is not None)
    if not ctx.core:
        return Facts(True, host.file_is(ETCDCTL, etcdctl_wrapper(ctx), 0o755), None, False, False, unit,
                     members, why, healthy, crl)
    tls_ok = all(host.file_is(TLS_DIR / target, host.read(source) or b"", mode, OWNER)
                 for target, source, mode in tls_files(ctx))
    return Facts(
        tls_ok=tls_ok,
        etcdctl_ok=host.file_is(ETCDCTL, etcdctl_wrapper(ctx), 0o755),
        config=host.read_text(CONFIG),
        data_present=(data_dir(ctx) / "member").is_dir(),
        joined=joined_marker(ctx).exists(),
        unit=unit, members=members, members_why=why, healthy=healthy, crl=crl,
    )


def crl_facts(ctx: Ctx, reachable: bool) -> Crl:
    local = host.read_text(ctx.seed.pki(CRL))
    etcd_text = None
    if reachable:
        try:
            kv = ctx.etcd.get(CRL_KEY)
            etcd_text = kv.value.decode(errors="replace") if kv is not None else None
        except EtcdError:
            pass
    return Crl(crl_number(local, ctx.tls.ca), crl_number(etcd_text, ctx.tls.ca), etcd_text)


@functools.lru_cache(maxsize=8)
def _crl_number(pem: str, ca: str, ca_text: str) -> int | None:
    return pki.crl_number(pem, Path(ca))


def crl_number(pem: str | None, ca: Path) -> int | None:
    """Checked with openssl once per CRL and CA, not once per pass."""
    return None if not pem else _crl_number(pem, str(ca), host.read_text(ca) or "")


def tls_files(ctx: Ctx) -> list[tuple[str, Path, int]]:
    tls = ctx.tls
    return [("ca.crt", tls.ca, 0o644), ("node.crt", tls.cert, 0o644), ("node.key", tls.key, 0o600),
            ("crl.pem", ctx.seed.pki(CRL), 0o644)]


def etcdctl_wrapper(ctx: Ctx) -> str:
    tls = ctx.tls
    return (f"#!/bin/sh\n# clusterforge: etcdctl with this cluster's endpoints and this node's certificate.\n"
            f"export ETCDCTL_API=3\n"
            f"export ETCDCTL_ENDPOINTS=\"${{ETCDCTL_ENDPOINTS:-{','.join(ctx.etcd_endpoints())}}}\"\n"
            f"export ETCDCTL_CACERT=\"${{ETCDCTL_CACERT:-{tls.ca}}}\"\n"
            f"export ETCDCTL_CERT=\"${{ETCDCTL_CERT:-{tls.cert}}}\"\n"
            f"export ETCDCTL_KEY=\"${{ETCDCTL_KEY:-{tls.key}}}\"\n"
            f"exec /usr/bin/etcdctl \"$@\"\n")


def config(ctx: Ctx, state: str, initial: dict[str, str]) -> str:
    """etcd's settings as the unit's environment file (ETCD_<FLAG>=value): etcd 3.4 takes its
    CRL only as a flag or from the environment, and a config file would make it ignore both.
    TLS on both ports with client certificates and the CA's CRL; no plaintext listener at all."""
    me = ctx.me
    settings = {
        "name": me.name,
        "data-dir": str(data_dir(ctx)),
        "listen-peer-urls": peer_url(me.ip),
        "listen-client-urls": f"{client_url(me.ip)},{client_url('127.0.0.1')}",
        "initial-advertise-peer-urls": peer_url(me.ip),
        "advertise-client-urls": client_url(me.ip),
        "initial-cluster": ",".join(f"{n}={u}" for n, u in sorted(initial.items())),
        "initial-cluster-state": state,
        "initial-cluster-token": f"clusterforge-{ctx.seed.cluster.name}",
        "heartbeat-interval": HEARTBEAT_MS,
        "election-timeout": ELECTION_MS,
        "cert-file": TLS_DIR / "node.crt",
        "key-file": TLS_DIR / "node.key",
        "trusted-ca-file": TLS_DIR / "ca.crt",
        "client-cert-auth": True,
        # Read again for every new connection: a revoked node is refused from its next one.
        "client-crl-file": TLS_DIR / "crl.pem",
        "peer-cert-file": TLS_DIR / "node.crt",
        "peer-key-file": TLS_DIR / "node.key",
        "peer-trusted-ca-file": TLS_DIR / "ca.crt",
        "peer-client-cert-auth": True,
        "peer-crl-file": TLS_DIR / "crl.pem",
        "auto-compaction-mode": "periodic",
        "auto-compaction-retention": "1h",
        "strict-reconfig-check": True,
        "enable-v2": False,
        "enable-grpc-gateway": True,  # the agent's client speaks the JSON gateway
        "logger": "zap",
        "log-outputs": "stderr",
    }
    return "".join(f"ETCD_{key.upper().replace('-', '_')}={_env_value(value)}\n" for key, value in settings.items())


def _env_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def seed_members(ctx: Ctx) -> dict[str, str]:
    return {n.name: peer_url(n.ip) for n in ctx.seed.cluster.with_role(Role.CORE)}


def plan(ctx: Ctx, f: Facts) -> Plan:
    steps: list[Step] = []
    if not f.etcdctl_ok:
        steps.append(Step("etcd: install etcdctl settings", "etcdctl must work for root with no flags",
                          lambda: host.write(ETCDCTL, etcdctl_wrapper(ctx), 0o755)))
    if not ctx.core:
        return steps or plan_crl(ctx, f)
    if not f.tls_ok:
        steps.append(Step("etcd: install TLS files", "the etcd user reads a copy of the node's certificate",
                          lambda: install_tls(ctx)))
    if steps:
        return steps
    membership = plan_membership(ctx, f)
    if isinstance(membership, Wait) or membership:
        return membership
    if not f.unit.enabled == "enabled" or not f.unit.running:
        return [Step("etcd: start the member", "configured" if f.unit.active != "failed" else
                     f"it stopped ({f.unit.result})", lambda: host.systemctl("enable", "--now", UNIT))]
    if f.unit.running and all(f.healthy.get(n, False) for n in (ctx.me.name,)) and not f.joined:
        return [Step("etcd: remember that this member served", "its data is not optional from now on",
                     lambda: host.write(joined_marker(ctx), f"{time.time():.0f}\n"))]
    return plan_crl(ctx, f)


def plan_crl(ctx: Ctx, f: Facts) -> list[Step]:
    """The newest CRL the CA signed, here and in etcd: a lower number never replaces a higher."""
    local, remote = f.crl.local, f.crl.etcd
    if remote is not None and (local is None or remote > local):
        text = f.crl.etcd_text or ""
        return [Step("etcd: take the newer CRL from etcd", f"number {remote} (this node had {local})",
                     lambda: host.write(ctx.seed.pki(CRL), text, 0o644))]
    if local is not None and f.members is not None and (remote is None or local > remote):
        old = f.crl.etcd_text
        return [Step("etcd: publish the CRL", f"number {local}; every node takes it from etcd",
                     lambda: publish_crl(ctx, old))]
    return []


def publish_crl(ctx: Ctx, old: str | None) -> None:
    """Put this node's CRL in etcd unless another node changed it meanwhile (the next pass
    compares again)."""
    text = host.read_text(ctx.seed.pki(CRL)) or ""
    compare = compare_create_revision(CRL_KEY, 0) if old is None else compare_value(CRL_KEY, old)
    ctx.etcd.txn([compare], [op_put(CRL_KEY, text)], [])


def plan_membership(ctx: Ctx, f: Facts) -> Plan:
    """The config to start with, and the membership changes that must come first."""
    me, mine = ctx.me.name, peer_url(ctx.me.ip)
    if f.data_present:
        # The member exists: its initial-* settings are ignored from now on; the others
        # (timeouts, TLS) follow this agent's version, and a change restarts the member.
        state, initial = initial_settings(f.config) or ("existing", seed_members(ctx))
        if f.config == config(ctx, state, initial):
            return []
        def update() -> None:
            write_config(ctx, state, initial)
            host.systemctl("try-restart", UNIT)

        return [Step("etcd: update config", "settings changed; restarting the member", update)]
    if f.members is None:
        if f.joined:
            return Wait("etcd: this member's data is gone and no other member answers; waiting for the "
                        f"cluster to rejoin it ({f.members_why})")
        wanted = config(ctx, "new", seed_members(ctx))
        if f.config == wanted:
            return []
        return [Step("etcd: write config", "first start: the seed's core nodes form the cluster",
                     lambda: write_config(ctx, "new", seed_members(ctx)))]
    listed = next((m for m in f.members if mine in m.peer_urls), None)
    if listed is not None and listed.client_urls:
        member = listed
        return [Step("etcd: remove my old member", "its data was lost; it rejoins as a new member",
                     lambda: ctx.etcd.member_remove(member.id))]
    if listed is None:
        return [Step("etcd: add me as a member", "the cluster runs without me and my data is gone",
                     lambda: ctx.etcd.member_add([mine]))]
    if listed.name:  # an initial member that never started: the cluster is forming with me in it
        state, initial = "new", seed_members(ctx)
    else:  # added as a new member: join the running cluster
        state = "existing"
        initial = {(m.name or me): m.peer_urls[0] for m in f.members if m.peer_urls}
    if f.config == config(ctx, state, initial):
        return []
    return [Step("etcd: write config", f"join as {'a new member' if state == 'existing' else 'an initial member'}",
                 lambda: write_config(ctx, state, initial))]


def initial_settings(text: str | None) -> tuple[str, dict[str, str]] | None:
    """The initial-cluster settings the environment file was written with."""
    env = dict(line.split("=", 1) for line in (text or "").splitlines() if "=" in line)
    try:
        members = dict(item.split("=", 1) for item in env["ETCD_INITIAL_CLUSTER"].split(","))
        return env["ETCD_INITIAL_CLUSTER_STATE"], members
    except (ValueError, KeyError):
        return None


def write_config(ctx: Ctx, state: str, initial: dict[str, str]) -> None:
    host.ensure_dir(data_dir(ctx), 0o700, OWNER)
    host.write(CONFIG, config(ctx, state, initial), 0o644)


def install_tls(ctx: Ctx) -> None:
    host.ensure_dir(TLS_DIR, 0o750, f"root:{OWNER}")
    for target, source, mode in tls_files(ctx):
        host.write(TLS_DIR / target, host.read(source) or b"", mode, OWNER)


def health(ctx: Ctx, f: Facts) -> Status:
    core = [n.name for n in ctx.seed.cluster.with_role(Role.CORE)]
    up = [n for n in core if f.healthy.get(n)]
    down = [n for n in core if n not in up]
    if f.members is None or len(up) <= len(core) // 2:
        detail = f" ({', '.join(down)} unreachable)" if down else ""
        return Status(State.WAITING, f"waiting for quorum: {len(up)} of {len(core)} members reachable{detail}")
    if down:
        return Status(State.DEGRADED, f"{len(up)} of {len(core)} members healthy ({', '.join(down)} down)")
    return Status(State.OK, f"{len(up)} of {len(core)} members healthy")
