"""Revoked certificates (issue 20): the CRL kept in state/, the nodes' checks with openssl,
and etcd started with the agent's own settings refusing a revoked certificate (real etcd on
loopback, no restart), the CRL passing through etcd only upwards."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from clusterforge import revocation
from clusterforge.node import seed as seedlib
from clusterforge.node.agent import backup, context, etcd, pki, wireguard
from clusterforge.node.agent.context import Ctx
from clusterforge.node.agent.etcd_client import EtcdClient, EtcdError, TLSFiles
from clusterforge.node.seed import BootMode, Role, Service

from .conftest import FIXED_STATE
from .etcd_cluster import CA, START_TIMEOUT, free_ports, issue, make_ca

ME = "127.0.0.2"  # the member's "LAN" address; it also listens on 127.0.0.1, as on a node


def crl_of(state: Path, ca: CA) -> str:
    return revocation.ensure_crl(state, ca.key, ca.cert)


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return make_ca(tmp_path / "ca", "clusterforge test CA")


def test_the_crl_is_made_once_and_again_only_when_a_certificate_is_revoked(tmp_path: Path, ca: CA) -> None:
    state = tmp_path / "state"
    state.mkdir()
    first = crl_of(state, ca)
    assert crl_of(state, ca) == first  # rendering twice: the same bytes
    assert pki.crl_number(first, ca.path) == 1
    c1, c2 = issue(ca, tmp_path / "pki", "c1"), issue(ca, tmp_path / "pki", "c2")
    revocation.revoke(state, c1.cert.read_text(), "c1", "52:54:00:00:00:51", "cluster.remove")
    second = crl_of(state, ca)
    assert second != first and pki.crl_number(second, ca.path) == 2
    assert revocation.is_revoked(second, c1.cert.read_text()) and not revocation.is_revoked(second, c2.cert.read_text())
    # The nodes' check: c1 refused, c2 still vouched for; without a CRL file, both pass.
    (state / "crl.pem").write_text(second)
    assert pki.check(c1.cert.read_text(), ca.path, crl=state / "crl.pem") is None
    assert pki.check(c2.cert.read_text(), ca.path, crl=state / "crl.pem") is not None
    assert pki.check(c1.cert.read_text(), ca.path) is not None


def test_a_crl_another_ca_signed_is_nothing(tmp_path: Path, ca: CA) -> None:
    other = make_ca(tmp_path / "other", "someone else's CA")
    state = tmp_path / "state"
    state.mkdir()
    theirs = crl_of(state, other)
    assert pki.crl_number(theirs, ca.path) is None
    assert pki.crl_number("-----BEGIN X509 CRL-----\nnot one\n-----END X509 CRL-----\n", ca.path) is None
    # state/'s CRL signed by a CA that is no longer the cluster's (a --rekey) is made again.
    assert pki.crl_number(crl_of(state, ca), ca.path) == 2


# ---------------------------------------------------------------- etcd, as the agent starts it


def loopback_seed(root: Path, ca: CA, crl: str) -> seedlib.Seed:
    """A one-core-node cluster on loopback, with the seed's files where a node has them."""
    tls = issue(ca, root / "issued", "s1", ips=("127.0.0.1", ME))
    pki_dir = root / seedlib.PKI_DIR
    pki_dir.mkdir(parents=True)
    shutil.copy(ca.path, pki_dir / seedlib.CA_CERT)
    shutil.copy(tls.cert, pki_dir / seedlib.NODE_CERT)
    shutil.copy(tls.key, pki_dir / seedlib.NODE_KEY)
    (pki_dir / seedlib.CRL).write_text(crl)
    node = seedlib.SeedNode(name="s1", mac="52:54:00:00:00:11", roles=(Role.CORE,), ip=IPv4Address(ME),
                            overlay_ip=IPv4Address("10.99.0.11"), disks=(), boot=BootMode.INSTALL,
                            fqdn="s1.lab.internal")
    net = seedlib.SeedNetwork(subnet=IPv4Network("127.0.0.0/8"), gateway=IPv4Address("127.0.0.1"),
                              dns=(IPv4Address("127.0.0.1"),), vip=IPv4Address("127.0.0.254"),
                              overlay=IPv4Network("10.99.0.0/24"), boot_server=IPv4Address("127.0.0.3"))
    cluster = seedlib.ClusterSeed(name="lab", domain="lab.internal", os="debian-12", timezone="UTC", network=net,
                                  services={Service.ETCD: True}, nodes=(node,))
    return seedlib.Seed(cluster, seedlib.Identity("lab", "s1"), root)


@dataclasses.dataclass
class Member:
    """One etcd member on loopback, started with exactly the environment file the agent writes."""

    ctx: Ctx
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(["/usr/bin/etcd"], env={**clean, **self.env}, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                client_of(self.ctx, self.ctx.tls).put("/up", "1")
                return
            except EtcdError:
                assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def member(tmp_path: Path, ca: CA, monkeypatch: pytest.MonkeyPatch) -> Iterator[Member]:
    """The agent's etcd settings on loopback: ports moved to free ones, TLS copies in a scratch folder."""
    state = tmp_path / "state"
    state.mkdir()
    seed = loopback_seed(tmp_path / "seed", ca, crl_of(state, ca))
    peer, client = free_ports(2)
    monkeypatch.setattr(etcd, "ETCD_PEER_PORT", peer)
    monkeypatch.setattr(etcd, "ETCD_CLIENT_PORT", client)
    monkeypatch.setattr(context, "ETCD_CLIENT_PORT", client)
    monkeypatch.setattr(etcd, "TLS_DIR", tmp_path / "tls")
    ctx = Ctx(seed, state_dir=tmp_path / "agent")
    etcd.TLS_DIR.mkdir()
    for target, source, _ in etcd.tls_files(ctx):
        shutil.copy(source, etcd.TLS_DIR / target)
    etcd.data_dir(ctx).mkdir(parents=True, mode=0o700)
    env_file = etcd.config(ctx, "new", etcd.seed_members(ctx))
    running = Member(ctx, dict(line.split("=", 1) for line in env_file.splitlines()), tmp_path / "etcd.log")
    try:
        running.start()
        yield running
    finally:
        running.kill()


def client_of(ctx: Ctx, tls: TLSFiles) -> EtcdClient:
    return EtcdClient([f"https://127.0.0.1:{etcd.ETCD_CLIENT_PORT}"], tls, timeout=3.0)


def test_etcd_refuses_a_revoked_certificate_from_its_next_connection(member: Member, ca: CA, tmp_path: Path) -> None:
    ctx, log = member.ctx, member.log
    c1 = issue(ca, tmp_path / "pki", "c1")
    assert client_of(ctx, c1).put("/clusterforge/x", "from c1")
    revocation.revoke(ctx.state_dir.parent / "state", c1.cert.read_text(), "c1", "52:54:00:00:00:51", "test")
    # What the agent does with a newer CRL: into the seed's pki/, then etcd's copy. No restart.
    (ctx.seed.pki(seedlib.CRL)).write_text(crl_of(ctx.state_dir.parent / "state", ca))
    shutil.copy(ctx.seed.pki(seedlib.CRL), etcd.TLS_DIR / "crl.pem")
    with pytest.raises(EtcdError):
        client_of(ctx, c1).get("/clusterforge/x")
    assert client_of(ctx, ctx.tls).get("/clusterforge/x") is not None  # everyone else still gets in
    text = log.read_text()
    assert "revoked" in text
    assert "unrecognized environment variable" not in text, "a setting the agent writes is not one etcd knows"


def test_the_crl_goes_through_etcd_only_upwards(member: Member, ca: CA, tmp_path: Path) -> None:
    ctx = member.ctx
    state = ctx.state_dir.parent / "state"
    facts = etcd.facts(ctx)
    assert (facts.crl.local, facts.crl.etcd) == (1, None)
    assert [s.name for s in etcd.plan_crl(ctx, facts)] == ["etcd: publish the CRL"]
    etcd.plan_crl(ctx, facts)[0].apply()
    assert etcd.facts(ctx).crl.etcd == 1 and etcd.plan_crl(ctx, etcd.facts(ctx)) == []
    # A newer CRL reaches etcd (a core node that got it from cluster.publish) ...
    revocation.revoke(state, issue(ca, tmp_path / "pki", "c9").cert.read_text(), "c9", "52:54:00:00:00:59", "test")
    newer = crl_of(state, ca)
    client_of(ctx, ctx.tls).put(etcd.CRL_KEY, newer)
    facts = etcd.facts(ctx)
    assert (facts.crl.local, facts.crl.etcd) == (1, 2)
    step = etcd.plan_crl(ctx, facts)[0]
    assert step.name == "etcd: take the newer CRL from etcd"
    step.apply()
    assert ctx.seed.pki(seedlib.CRL).read_text() == newer
    # ... and an older one, or one the CA did not sign, never replaces it.
    (tmp_path / "fresh").mkdir()
    for stale in (crl_of(tmp_path / "fresh", ca), "-----BEGIN X509 CRL-----\nforged\n-----END X509 CRL-----\n"):
        client_of(ctx, ctx.tls).put(etcd.CRL_KEY, stale)
        facts = etcd.facts(ctx)
        assert facts.crl.local == 2
        assert [s.name for s in etcd.plan_crl(ctx, facts)] == ["etcd: publish the CRL"]
        etcd.plan_crl(ctx, facts)[0].apply()
        assert client_of(ctx, ctx.tls).get(etcd.CRL_KEY).value.decode() == newer  # type: ignore[union-attr]


def test_a_certificate_is_read_for_its_serial(ca: CA, tmp_path: Path) -> None:
    c1 = issue(ca, tmp_path / "pki", "c1")
    serial = x509.load_pem_x509_certificate(c1.cert.read_bytes()).serial_number
    entry = revocation.revoke(tmp_path, c1.cert.read_text(), "c1", "52:54:00:00:00:51", "cluster.remove")
    assert entry.serial == serial and revocation.read_revoked(tmp_path)[serial].node == "c1"


# ---------------------------------------------------------------- the mesh's peers from etcd


class TestMeshPeers:
    """Peers from the certificates nodes publish in etcd: vouched for by the cluster's CA (the
    fixed test state's, whose node certificates carry WireGuard keys), newer than a seed, and
    never a revoked one."""

    @pytest.fixture
    def ca(self) -> CA:
        state = FIXED_STATE / "lab"
        key = serialization.load_pem_private_key((state / "ca.key").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return CA(key, x509.load_pem_x509_certificate((state / "ca.crt").read_bytes()), state / "ca.crt")

    def test_published_certificates_make_peers_until_revoked(self, member: Member, ca: CA, tmp_path: Path) -> None:
        ctx = member.ctx
        nodes = FIXED_STATE / "lab" / "nodes"
        certs = {name: (nodes / mac / "tls.crt").read_text() for name, mac in (("s2", "52-54-00-00-00-12"),
                                                                                ("s3", "52-54-00-00-00-13"))}
        etcd_client = client_of(ctx, ctx.tls)
        for name, cert in certs.items():
            etcd_client.put(f"{wireguard.NODES_PREFIX}{name}/cert", cert)
            etcd_client.put(f"{wireguard.NODES_PREFIX}{name}/endpoint", f"10.0.0.{name[1:]}:51871")
        etcd_client.put(f"{wireguard.NODES_PREFIX}s4/cert", certs["s2"])  # another's certificate: not s4's
        etcd_client.put(f"{wireguard.NODES_PREFIX}s4/endpoint", "10.0.0.14:51871")
        peers, _ = wireguard.read_published(ctx)
        assert sorted(peers) == ["s2", "s3"]
        assert peers["s3"].overlay_ip == "10.99.0.13"
        # A seed that still lists s2 with its old machine's key: what the CA vouches for now wins.
        stale = dataclasses.replace(ctx.seed.cluster, nodes=(*ctx.seed.cluster.nodes, dataclasses.replace(
            ctx.seed.cluster.nodes[0], name="s2", wireguard_public="b" * 43 + "=")))
        ctx.seed = dataclasses.replace(ctx.seed, cluster=stale)
        facts = dataclasses.replace(wireguard_facts(), published=peers)
        assert wireguard.wanted_peers(ctx, facts)["s2"].public_key == peers["s2"].public_key
        # s3 revoked: the next CRL leaves it out of every mesh.
        revocation.revoke(tmp_path, certs["s3"], "s3", "52:54:00:00:00:13", "cluster.remove")
        ctx.seed.pki(seedlib.CRL).write_text(crl_of(tmp_path, ca))
        peers, _ = wireguard.read_published(ctx)
        assert sorted(peers) == ["s2"]


def wireguard_facts() -> wireguard.Facts:
    return wireguard.Facts(link=True, up=True, addresses=(), public_key="", port=0, peers={}, published={},
                           mine_published=False, etcd_reachable=True, now=0)


def test_a_snapshot_restores_as_the_readme_says(member: Member, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's hourly snapshot, taken through the node's own etcdctl wrapper, restored the
    README's way (the values of the member's own environment file) into a new data directory:
    the data comes back."""
    ctx = member.ctx
    client_of(ctx, ctx.tls).put("/clusterforge/before", "kept")
    wrapper = tmp_path / "etcdctl"
    wrapper.write_text(etcd.etcdctl_wrapper(ctx))
    wrapper.chmod(0o755)
    monkeypatch.setattr(backup, "ETCDCTL", wrapper)
    monkeypatch.setattr(backup, "ETCD_CLIENT_PORT", etcd.ETCD_CLIENT_PORT)
    assert [s.name for s in backup.plan(ctx, backup.facts(ctx))] == ["backup: etcd snapshot"]  # type: ignore[union-attr]
    backup.plan(ctx, backup.facts(ctx))[0].apply()  # type: ignore[index]
    facts = backup.facts(ctx)
    assert len(facts.snapshots) == 1 and backup.plan(ctx, facts) == []  # the next one in an hour
    snapshot = backup.folder(ctx) / facts.snapshots[0].name
    assert snapshot.stat().st_mode & 0o777 == 0o600
    member.kill()
    data = Path(member.env["ETCD_DATA_DIR"])
    data.rename(data.with_name("etcd.lost"))
    env = member.env
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
    subprocess.run(["/usr/bin/etcdctl", "snapshot", "restore", str(snapshot), "--name", env["ETCD_NAME"],
                    "--initial-cluster", env["ETCD_INITIAL_CLUSTER"],
                    "--initial-cluster-token", env["ETCD_INITIAL_CLUSTER_TOKEN"],
                    "--initial-advertise-peer-urls", env["ETCD_INITIAL_ADVERTISE_PEER_URLS"], "--data-dir", str(data)],
                   check=True, capture_output=True, env={**clean, "ETCDCTL_API": "3"})
    data.chmod(0o700)
    member.start()
    assert client_of(ctx, ctx.tls).get("/clusterforge/before").value == b"kept"  # type: ignore[union-attr]
