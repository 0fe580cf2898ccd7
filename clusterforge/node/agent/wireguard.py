"""The WireGuard mesh: every node a peer of every other, on the inventory's overlay addresses.

Peers come from the seed (a core node's seed lists every node, another node's the core
nodes and itself) and from etcd: each node publishes its own certificate and endpoint
there, and a peer's WireGuard key and overlay address are taken only from a certificate
the cluster CA signed and has not revoked. A node can publish its own entry, never forge
another's key. What etcd vouches for wins over an older seed (a replaced node comes with
a new key); a removed node's revoked certificate counts for nothing. `wg syncconf` applies
a changed peer list without dropping live sessions. The private key reaches `wg` on
standard input only.
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

from ...run import run
from ..seed import CRL, WIREGUARD_KEY, Service
from . import host, pki
from .context import Ctx
from .core import Plan, State, Status, Step
from .etcd_client import EtcdError

name = "wireguard"
needs: tuple[str, ...] = ()

IFACE = "wg0"
PORT = 51871  # not 51820: K3s's flannel may run WireGuard on that one
KEEPALIVE = 25  # seconds: keeps handshakes fresh, so a dead peer shows
HANDSHAKE_FRESH = 180  # seconds: WireGuard re-handshakes every two minutes under traffic
NODES_PREFIX = "/clusterforge/nodes/"


def applies(ctx: Ctx) -> bool:
    return ctx.seed.cluster.enabled(Service.WIREGUARD)


@dataclass(frozen=True)
class Peer:
    name: str
    public_key: str
    endpoint: str  # ip:port on the cluster LAN
    overlay_ip: str


@dataclass(frozen=True)
class Facts:
    link: bool  # wg0 exists
    up: bool
    addresses: tuple[str, ...]  # on wg0, CIDR
    public_key: str  # of the interface ("" if none); never the private key
    port: int
    peers: dict[str, tuple[str, str, int]]  # public key -> (endpoint, allowed ips, latest handshake)
    published: dict[str, Peer]  # from certificates in etcd the CA vouches for (checked, not revoked)
    mine_published: bool  # my certificate and endpoint are in etcd as they should be
    etcd_reachable: bool
    now: int


def facts(ctx: Ctx) -> Facts:
    link = run(["ip", "-j", "addr", "show", "dev", IFACE], check=False)
    info = json.loads(link.stdout or "[]") if link.returncode == 0 else []
    addresses = tuple(f"{a['local']}/{a['prefixlen']}" for e in info for a in e.get("addr_info", [])
                      if a.get("family") == "inet")
    up = bool(info) and "UP" in info[0].get("flags", [])
    public, port, peers = "", 0, {}
    if info:
        lines = run(["wg", "show", IFACE, "dump"]).stdout.splitlines()
        if lines:
            head = lines[0].split("\t")  # private key, public key, port, fwmark: the first never kept
            public, port = head[1], int(head[2])
            for line in lines[1:]:
                p = line.split("\t")
                peers[p[0]] = (p[2], p[3], int(p[4]))
    published: dict[str, Peer] = {}
    mine_published, reachable = False, True
    try:
        published, mine_published = read_published(ctx)
    except EtcdError:
        reachable = False
    return Facts(bool(info), up, addresses, public, port, peers, published, mine_published, reachable,
                 int(time.time()))


def read_published(ctx: Ctx) -> tuple[dict[str, Peer], bool]:
    """Peers from etcd, each from a certificate the CA signed and has not revoked."""
    entries: dict[str, dict[str, str]] = {}
    for kv in ctx.etcd.get_prefix(NODES_PREFIX):
        node, _, field = kv.key.removeprefix(NODES_PREFIX).partition("/")
        entries.setdefault(node, {})[field] = kv.value.decode(errors="replace")
    peers = {}
    crl = host.read_text(ctx.seed.pki(CRL)) or ""
    for node, entry in entries.items():
        if node == ctx.me.name or "cert" not in entry or "endpoint" not in entry:
            continue
        cert = vouched(entry["cert"], crl, ctx)
        if cert is None or cert.name != node or not cert.wireguard_key or not cert.overlay_ip:
            continue  # not vouched for by the CA (or revoked), or not for this name: ignored
        peers[node] = Peer(node, cert.wireguard_key, entry["endpoint"], cert.overlay_ip)
    mine = entries.get(ctx.me.name, {})
    own_cert = (host.read_text(ctx.tls.cert) or "").strip()
    mine_ok = mine.get("cert", "").strip() == own_cert and mine.get("endpoint") == my_endpoint(ctx)
    return peers, mine_ok


@functools.lru_cache(maxsize=256)
def _vouched(pem: str, crl: str, ca: str, overlay: IPv4Network) -> pki.Vouched | None:
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as f:  # openssl reads the CRL from a file
        f.write(crl)
        f.flush()
        return pki.check(pem, Path(ca), overlay, crl=Path(f.name) if crl else None)


def vouched(pem: str, crl: str, ctx: Ctx) -> pki.Vouched | None:
    """pki.check once per certificate and CRL, not once per pass."""
    return _vouched(pem, crl, str(ctx.tls.ca), ctx.seed.cluster.network.overlay)


def my_endpoint(ctx: Ctx) -> str:
    return f"{ctx.me.ip}:{PORT}"


def wanted_peers(ctx: Ctx, f: Facts) -> dict[str, Peer]:
    peers = {n.name: Peer(n.name, n.wireguard_public, f"{n.ip}:{PORT}", str(n.overlay_ip))
             for n in ctx.seed.cluster.nodes if n.name != ctx.me.name and n.wireguard_public}
    peers.update(f.published)  # vouched for by the CA now: newer than any seed
    return peers


def config(ctx: Ctx, peers: dict[str, Peer]) -> str:
    """wg's configuration, without the private key (added on the way to `wg`'s stdin)."""
    lines = [f"ListenPort = {PORT}", ""]
    for peer in sorted(peers.values(), key=lambda p: p.name):
        lines += ["[Peer]", f"# {peer.name}", f"PublicKey = {peer.public_key}", f"Endpoint = {peer.endpoint}",
                  f"AllowedIPs = {peer.overlay_ip}/32", f"PersistentKeepalive = {KEEPALIVE}", ""]
    return "\n".join(lines)


def plan(ctx: Ctx, f: Facts) -> Plan:
    address = f"{ctx.me.overlay_ip}/{ctx.seed.cluster.network.overlay.prefixlen}"
    if not f.link:
        return [Step("wireguard: create wg0", "the mesh interface is missing",
                     lambda: run(["ip", "link", "add", IFACE, "type", "wireguard"]))]
    peers = wanted_peers(ctx, f)
    have = {key: (endpoint, allowed) for key, (endpoint, allowed, _) in f.peers.items()}
    want = {p.public_key: (p.endpoint, f"{p.overlay_ip}/32") for p in peers.values()}
    if f.public_key != ctx.me.wireguard_public or f.port != PORT or have != want:
        why = ("set the key and port" if f.public_key != ctx.me.wireguard_public or f.port != PORT
               else f"peers changed ({len(want)} wanted, {len(have)} configured)")
        return [Step("wireguard: apply the peer list", why, lambda: apply_config(ctx, config(ctx, peers)))]
    if address not in f.addresses:
        return [Step("wireguard: set the overlay address", address,
                     lambda: run(["ip", "addr", "replace", address, "dev", IFACE]))]
    if not f.up:
        return [Step("wireguard: bring wg0 up", "configured", lambda: run(["ip", "link", "set", IFACE, "up"]))]
    if f.etcd_reachable and not f.mine_published:
        return [Step("wireguard: publish my certificate and endpoint", "nodes beyond my seed find me there",
                     lambda: publish(ctx))]
    return []


def apply_config(ctx: Ctx, text: str) -> None:
    private = (ctx.seed.secret(WIREGUARD_KEY)).read_text().strip()
    conf = text.replace("ListenPort", f"PrivateKey = {private}\nListenPort", 1)
    # On standard input: never in argv or a file. A failure's message repeats no input.
    run(["wg", "syncconf", IFACE, "/dev/stdin"], input=f"[Interface]\n{conf}")


def publish(ctx: Ctx) -> None:
    ctx.etcd.put(f"{NODES_PREFIX}{ctx.me.name}/cert", Path(ctx.tls.cert).read_bytes())
    ctx.etcd.put(f"{NODES_PREFIX}{ctx.me.name}/endpoint", my_endpoint(ctx))


def health(ctx: Ctx, f: Facts) -> Status:
    peers = wanted_peers(ctx, f)
    stale = [p.name for p in peers.values()
             if f.now - f.peers.get(p.public_key, ("", "", 0))[2] > HANDSHAKE_FRESH]
    if stale and len(stale) == len(peers):
        return Status(State.WAITING, f"no handshake yet with any of {len(peers)} peers")
    if stale:
        return Status(State.DEGRADED, f"{len(peers) - len(stale)} of {len(peers)} peers answer "
                                      f"({', '.join(sorted(stale))} silent)")
    return Status(State.OK, f"{len(peers)} peers, all with a recent handshake")
