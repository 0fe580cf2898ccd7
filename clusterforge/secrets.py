"""Cluster secrets: generated once into state/<cluster>/ and reused.

Reuse is what makes rendering deterministic: the same inventory and the same
state give byte-identical seeds. A node certificate is reissued only when the
names or addresses it must carry change.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import secrets as random
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .fsutil import write_atomic
from .inventory import Cluster, Node

CERT_DAYS = 3650
MUNGE_KEY_BYTES = 1024


@dataclass(frozen=True)
class NodeSecrets:
    tls_cert: str  # PEM; serverAuth + clientAuth, for etcd peers, clients and the gateway
    tls_key: str
    wireguard_private: str  # base64, as `wg` reads it
    wireguard_public: str


@dataclass(frozen=True)
class ClusterSecrets:
    ca_cert: str
    munge_key: bytes
    k3s_token: str
    ceph_fsid: str
    operator_ssh_public: str  # clusterforge's own key, so its tools can reach every node
    operator_ssh_private: Path
    nodes: dict[str, NodeSecrets]


def ensure(cluster: Cluster, state_root: Path) -> ClusterSecrets:
    """Load the cluster's secrets, generating what is missing."""
    state = state_root / cluster.name
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)
    ca_key, ca_cert = _ensure_ca(state, cluster)
    ssh_private = state / "ssh" / "id_ed25519"
    nodes = {node.name: _ensure_node(state / "nodes" / node.name, cluster, node, ca_key, ca_cert)
             for node in cluster.nodes}
    return ClusterSecrets(
        ca_cert=ca_cert.public_bytes(serialization.Encoding.PEM).decode(),
        munge_key=_ensure_file(state / "munge.key", lambda: os.urandom(MUNGE_KEY_BYTES)),
        k3s_token=_ensure_file(state / "k3s-token", lambda: random.token_hex(32).encode()).decode(),
        ceph_fsid=_ensure_file(state / "ceph-fsid", lambda: str(uuid.uuid4()).encode(),
                               mode=0o644).decode(),
        operator_ssh_public=_ensure_ssh_key(ssh_private, f"clusterforge@{cluster.name}"),
        operator_ssh_private=ssh_private,
        nodes=nodes,
    )


def _ensure_file(path: Path, make, mode: int = 0o600) -> bytes:  # type: ignore[no-untyped-def]
    if not path.exists():
        write_atomic(path, make(), mode=mode)
    return path.read_bytes()


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ensure_ca(state: Path, cluster: Cluster) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = state / "ca.key", state / "ca.crt"
    if key_path.exists() and cert_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"clusterforge {cluster.name} CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_atomic(key_path, _pem_key(key), mode=0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return key, cert


def _node_names(cluster: Cluster, node: Node) -> x509.SubjectAlternativeName:
    dns = [node.name, cluster.fqdn(node), "localhost"]
    ips = [node.ip, node.overlay_ip, ipaddress.IPv4Address("127.0.0.1")]
    return x509.SubjectAlternativeName(
        [x509.DNSName(d) for d in dns] + [x509.IPAddress(i) for i in ips])


def _ensure_node(state: Path, cluster: Cluster, node: Node,
                 ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> NodeSecrets:
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)
    sans = _node_names(cluster, node)
    cert_path, key_path = state / "tls.crt", state / "tls.key"
    if not _cert_matches(cert_path, key_path, sans):
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node.name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(sans, critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # etcd's gateway dials peers with its server certificate: it needs both usages.
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write_atomic(key_path, _pem_key(key), mode=0o600)
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    wg_private = _ensure_file(
        state / "wireguard.key",
        lambda: base64.b64encode(x25519.X25519PrivateKey.generate().private_bytes_raw()) + b"\n",
    ).decode().strip()
    public = x25519.X25519PrivateKey.from_private_bytes(base64.b64decode(wg_private)).public_key()
    return NodeSecrets(
        tls_cert=cert_path.read_text(), tls_key=key_path.read_text(),
        wireguard_private=wg_private,
        wireguard_public=base64.b64encode(public.public_bytes_raw()).decode(),
    )


def _cert_matches(cert_path: Path, key_path: Path, sans: x509.SubjectAlternativeName) -> bool:
    if not (cert_path.exists() and key_path.exists()):
        return False
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(have) == set(sans)


def _ensure_ssh_key(private: Path, comment: str) -> str:
    public = private.with_name(private.name + ".pub")
    if not (private.exists() and public.exists()):
        private.parent.mkdir(parents=True, exist_ok=True)
        private.parent.chmod(0o700)
        key = ed25519.Ed25519PrivateKey.generate()
        write_atomic(private, key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption()), mode=0o600)
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH)
        write_atomic(public, line + f" {comment}\n".encode(), mode=0o644)
    return public.read_text().strip()
