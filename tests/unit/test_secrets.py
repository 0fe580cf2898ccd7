"""Secrets: generated once, private, reused; certificates fit for etcd."""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from clusterforge import inventory, secrets

from .conftest import EXAMPLE, write_inventory


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generated_once_with_private_modes(example: inventory.Cluster, tmp_path: Path) -> None:
    first = secrets.ensure(example, tmp_path)
    state = tmp_path / "lab"
    assert mode(state) == 0o700
    for key in ("ca.key", "munge.key", "k3s-token", "ssh/id_ed25519", "nodes/52-54-00-00-00-11/tls.key",
                "nodes/52-54-00-00-00-11/wireguard.key", "ceph/mon.key", "ceph/client.admin.key",
                "nodes/52-54-00-00-00-11/ceph-mgr.key"):
        assert mode(state / key) == 0o600, key
    assert len((state / "munge.key").read_bytes()) == 1024
    before = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    second = secrets.ensure(example, tmp_path)
    assert all(n.reissued for n in first.nodes.values()) and not any(n.reissued for n in second.nodes.values())
    assert {n: (s.tls_cert, s.tls_key) for n, s in second.nodes.items()} == {
        n: (s.tls_cert, s.tls_key) for n, s in first.nodes.items()}
    assert {p: p.read_bytes() for p in state.rglob("*") if p.is_file()} == before


def test_node_certificate_for_etcd(example: inventory.Cluster, tmp_path: Path) -> None:
    s = secrets.ensure(example, tmp_path)
    ca = x509.load_pem_x509_certificate(s.ca_cert.encode())
    cert = x509.load_pem_x509_certificate(s.nodes["s2"].tls_cert.encode())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"s2", "s2.lab.internal", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))
    assert {"10.0.0.12", "10.99.0.12", "127.0.0.1"} <= {
        str(a) for a in sans.get_values_for_type(x509.IPAddress)}
    # The CA vouches for the node's WireGuard key: peers learning it from etcd check that.
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        secrets.WIREGUARD_SAN + s.nodes["s2"].wireguard_public]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def test_certificate_reissued_when_address_changes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    before = secrets.ensure(inventory.load(EXAMPLE), state)
    moved = write_inventory(tmp_path, EXAMPLE.read_text().replace(
        'mac: "52:54:00:00:00:12"', 'mac: "52:54:00:00:00:12"\n    ip: 10.0.0.20'))
    after = secrets.ensure(inventory.load(moved), state)
    assert after.nodes["s2"].tls_cert != before.nodes["s2"].tls_cert and after.nodes["s2"].reissued
    assert after.nodes["s1"].tls_cert == before.nodes["s1"].tls_cert and not after.nodes["s1"].reissued
    assert after.nodes["s2"].wireguard_private == before.nodes["s2"].wireguard_private
    assert after.ca_cert == before.ca_cert


def test_wireguard_public_key_matches_private(example: inventory.Cluster, tmp_path: Path) -> None:
    import base64

    from cryptography.hazmat.primitives.asymmetric import x25519

    node = secrets.ensure(example, tmp_path).nodes["s1"]
    private = x25519.X25519PrivateKey.from_private_bytes(base64.b64decode(node.wireguard_private))
    assert base64.b64encode(private.public_key().public_bytes_raw()).decode() == node.wireguard_public
