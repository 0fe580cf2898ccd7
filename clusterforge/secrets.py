"""Cluster secrets: generated once into state/<cluster>/ and reused.

Reuse is what makes rendering deterministic: the same inventory and the same state
give byte-identical seeds. Everything read back is checked first: the CA certificate
matches its key, each node certificate verifies against the CA and carries the node's
names, addresses and WireGuard key, and every key parses. What is missing and derivable
is made again (a lost ca.crt from ca.key; a node's certificate from the CA); what is not
(a lost CA key, a damaged WireGuard or munge key) is refused with the way out.

Layout of state/<cluster>/ (0700):
    ca.key ca.crt                 the cluster CA (EC P-256)
    nodes/<aa-bb-cc-dd-ee-ff>/    per node, by MAC: tls.key tls.crt wireguard.key [ceph-mgr.key]
    munge.key k3s-token ceph-fsid ceph/{mon,client.admin,client.bootstrap-osd}.key
    ssh/id_ed25519[.pub]          clusterforge's own key to the nodes
    nodes.json                    names and addresses given to each MAC (identity.py)
    revoked.json crl.pem          revoked node certificates and their CRL (revocation.py)
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import os
import re
import secrets as random
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import fsutil, revocation
from .fsutil import write_atomic
from .inventory import Cluster, Node, Role
from .log import die, info

CERT_DAYS = 3650
RENEW_BEFORE = datetime.timedelta(days=30)  # a certificate this close to its end is made again
MUNGE_KEY_BYTES = 1024
MUNGE_KEY_RANGE = (32, 1024)  # what munged accepts
WIREGUARD_SAN = "urn:clusterforge:wireguard:"  # + the node's public key: the CA vouches for it
CEPH_ENTITIES = ("mon.", "client.admin", "client.bootstrap-osd")
LOCK_TIMEOUT = 120.0


@dataclass(frozen=True)
class NodeSecrets:
    tls_cert: str  # PEM; serverAuth + clientAuth, for etcd peers, clients and the health API
    tls_key: str
    wireguard_private: str  # base64, as `wg` reads it
    wireguard_public: str
    ceph_mgr_key: str  # core nodes: the key of mgr.<name>; "" otherwise
    reissued: bool  # the certificate was (re)made by this run


@dataclass(frozen=True)
class ClusterSecrets:
    ca_cert: str
    munge_key: bytes
    k3s_token: str
    ceph_fsid: str
    ceph_keys: dict[str, str]  # entity -> base64 key, for CEPH_ENTITIES
    operator_ssh_public: str  # clusterforge's own key, so its tools can reach every node
    operator_ssh_private: Path
    nodes: dict[str, NodeSecrets]  # by node name
    crl: str  # PEM: the certificates the CA revoked (nodes removed or replaced)

    def node(self, node: Node) -> NodeSecrets:
        return self.nodes[node.name]


def cluster_state(state_root: Path, cluster: Cluster) -> Path:
    return state_root / cluster.name


def node_dir(state: Path, node: Node) -> Path:
    return state / "nodes" / node.mac_hyphen


@contextmanager
def locked(state: Path) -> Iterator[None]:
    """One render (or state change) of a cluster at a time; the others wait their turn."""
    prepare_dir(state)
    try:
        with fsutil.locked(state / ".lock", f"the state of cluster {state.name}", LOCK_TIMEOUT):
            yield
    except TimeoutError as exc:
        die(str(exc))


def prepare_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)
    except FileExistsError:
        die(f"{path}: exists and is not a directory", hint="--state names a directory for cluster secrets")
    except OSError as exc:
        die(f"{path}: cannot use it for cluster secrets: {exc.strerror}")


def ensure(cluster: Cluster, state_root: Path, rekey: bool = False) -> ClusterSecrets:
    """Load the cluster's secrets, checking them, and generate what is missing.
    The caller holds `locked(state)`."""
    state = cluster_state(state_root, cluster)
    try:
        return _ensure(state, cluster, rekey)
    except OSError as exc:  # a directory where a key belongs, an unreadable file, a full disk
        where = exc.filename or state
        die(f"{where}: {exc.strerror or exc}",
            hint=f"{state} holds the cluster's secrets: its files must be readable and writable")


def _ensure(state: Path, cluster: Cluster, rekey: bool) -> ClusterSecrets:
    prepare_dir(state)
    ca_key, ca_cert = _ensure_ca(state, cluster, rekey)
    ssh_private = state / "ssh" / "id_ed25519"
    nodes = {node.name: _ensure_node(node_dir(state, node), cluster, node, ca_key, ca_cert)
             for node in cluster.nodes}
    munge = _ensure_file(state / "munge.key", lambda: os.urandom(MUNGE_KEY_BYTES), _check_munge)
    return ClusterSecrets(
        ca_cert=_pem(ca_cert),
        munge_key=munge,
        k3s_token=_ensure_file(state / "k3s-token", lambda: random.token_hex(32).encode(),
                               _check_token).decode().strip(),
        ceph_fsid=_ensure_file(state / "ceph-fsid", lambda: str(uuid.uuid4()).encode(), _check_uuid,
                               mode=0o644).decode().strip(),
        ceph_keys={e: _ensure_file(state / "ceph" / f"{e.rstrip('.')}.key", ceph_key,
                                   _check_ceph_key).decode().strip()
                   for e in CEPH_ENTITIES},
        operator_ssh_public=_ensure_ssh_key(ssh_private, f"clusterforge@{cluster.name}"),
        operator_ssh_private=ssh_private,
        nodes=nodes,
        crl=revocation.ensure_crl(state, ca_key, ca_cert),
    )


def forget_node(state: Path, mac_hyphen: str, name: str, why: str) -> None:
    """Delete a node's keys; its certificate is revoked first (the next publish tells the
    cluster), so a machine that is gone cannot use it again."""
    cert = state / "nodes" / mac_hyphen / "tls.crt"
    if _load_cert(cert) is not None:
        revocation.revoke(state, cert.read_text(), name, mac_hyphen.replace("-", ":"), why)
    shutil.rmtree(state / "nodes" / mac_hyphen, ignore_errors=True)


# ---------------------------------------------------------------- files

def _ensure_file(path: Path, make: Callable[[], bytes], check: Callable[[bytes], str | None],
                 mode: int = 0o600) -> bytes:
    if not path.exists():
        prepare_dir(path.parent)
        write_atomic(path, make(), mode=mode)
    data = path.read_bytes()
    problem = check(data)
    if problem:
        die(f"{path}: {problem}", hint="restore it from a backup of state/; or delete it to make a new one "
                                       "(every node then needs its new seed: render, then reinstall)")
    return data


def _check_munge(data: bytes) -> str | None:
    low, high = MUNGE_KEY_RANGE
    return None if low <= len(data) <= high else f"a munge key of {len(data)} bytes (munged needs {low} to {high})"


def _check_token(data: bytes) -> str | None:
    text = data.decode(errors="replace").strip()
    ok = 32 <= len(text) <= 256 and text.isascii() and text.isalnum()
    return None if ok else "not a K3s token (32 to 256 letters and digits)"


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _check_uuid(data: bytes) -> str | None:
    # The canonical form only: uuid.UUID() also takes {...} and urn:uuid:, which Ceph does not.
    text = data.decode(errors="replace").strip()
    return None if _UUID.fullmatch(text) else "not a Ceph fsid (a UUID such as 4b0d...-...)"


def ceph_key() -> bytes:
    """A CephX secret as ceph-authtool writes it: type AES, creation time, 16 random bytes."""
    now = time.time()
    raw = struct.pack("<HIIH", 1, int(now), int((now % 1) * 1e9), 16) + os.urandom(16)
    return base64.b64encode(raw)


def _check_ceph_key(data: bytes) -> str | None:
    try:
        raw = base64.b64decode(data.strip(), validate=True)
        kind, _, _, length = struct.unpack("<HIIH", raw[:12])
        if kind == 1 and length == 16 and len(raw) == 28:
            return None
    except (ValueError, struct.error):
        pass
    return "not a CephX key"


# ---------------------------------------------------------------- the CA

def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _load_cert(path: Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def _ensure_ca(state: Path, cluster: Cluster, rekey: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = state / "ca.key", state / "ca.crt"
    issued = any((state / "nodes").glob("*/tls.crt"))
    if rekey:
        info(f"rekeying cluster {cluster.name}: a new CA; every node needs its new seed (render, then reinstall)")
        for path in (key_path, cert_path, *(state / "nodes").glob("*/tls.crt")):
            path.unlink(missing_ok=True)
    elif key_path.exists():
        key = _load_key(key_path)
        if key is None:
            die(f"{key_path}: not an EC private key (damaged?)",
                hint="restore it from a backup of state/; without it, ./forge render --rekey makes a new CA "
                     "(every node then needs its new seed)")
        cert = _load_cert(cert_path) if cert_path.exists() else None
        why = ("missing" if not cert_path.exists() else "damaged" if cert is None
               else "not made from ca.key" if cert.public_key() != key.public_key()
               else "expiring" if _expiring(cert) else "")
        candidate = _cluster_ca(key, cluster) if why else cert
        assert candidate is not None
        _check_issuer(state, key_path, candidate)
        if why:
            write_atomic(cert_path, _pem(candidate).encode(), mode=0o644)
            info(f"{cert_path}: {why}; made again from {key_path} (the node certificates it issued stay valid)")
        return key, candidate
    elif cert_path.exists() or issued:
        die(f"{key_path} is missing: no certificate of this cluster can be issued or checked",
            hint="restore it from a backup of state/; or re-key the cluster with ./forge render --rekey "
                 "(every node then needs its new seed)")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cluster_ca(key, cluster)
    write_atomic(key_path, _pem_key(key), mode=0o600)
    write_atomic(cert_path, _pem(cert).encode(), mode=0o644)
    return key, cert


def _check_issuer(state: Path, key_path: Path, ca_cert: x509.Certificate) -> None:
    """ca.key is the key that issued the node certificates in state/: when none of them
    verifies against it, it is another CA's key (and reissuing them all would re-key the
    cluster behind the user's back)."""
    issued = False
    for cert in map(_load_cert, (state / "nodes").glob("*/tls.crt")):
        if cert is not None and _issued_by(cert, ca_cert):
            return  # one is enough: the others are checked (and reissued) one by one
        issued = issued or cert is not None
    if issued:
        die(f"{key_path}: did not issue any of the node certificates in {state / 'nodes'}: it is not this "
            "cluster's CA key", hint="restore ca.key from a backup of state/; or re-key the cluster with "
                                     "./forge render --rekey (every node then needs its new seed)")


def _issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def _expiring(cert: x509.Certificate) -> bool:
    return cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC) + RENEW_BEFORE


def _cluster_ca(key: ec.EllipticCurvePrivateKey, cluster: Cluster) -> x509.Certificate:
    return ca_certificate(key, f"clusterforge {cluster.name} CA")


def ca_certificate(key: ec.EllipticCurvePrivateKey, common_name: str, days: int = CERT_DAYS) -> x509.Certificate:
    """A self-signed CA certificate for key: signs certificates and CRLs, no intermediate."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )


# ---------------------------------------------------------------- nodes

def node_names(cluster: Cluster, node: Node, wireguard_public: str) -> x509.SubjectAlternativeName:
    """What a node certificate vouches for: names, addresses, and its WireGuard key (so a
    peer learning the key from etcd can check the CA signed it)."""
    dns = [node.name, cluster.fqdn(node), "localhost"]
    ips = [node.ip, node.overlay_ip, ipaddress.IPv4Address("127.0.0.1")]
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns] + [x509.IPAddress(i) for i in ips]
    names.append(x509.UniformResourceIdentifier(WIREGUARD_SAN + wireguard_public))
    return x509.SubjectAlternativeName(names)


def _ensure_node(state: Path, cluster: Cluster, node: Node,
                 ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> NodeSecrets:
    prepare_dir(state)
    wg_private = _ensure_file(
        state / "wireguard.key",
        lambda: base64.b64encode(x25519.X25519PrivateKey.generate().private_bytes_raw()) + b"\n",
        _check_wireguard).decode().strip()
    public = base64.b64encode(x25519.X25519PrivateKey.from_private_bytes(base64.b64decode(wg_private))
                              .public_key().public_bytes_raw()).decode()
    sans = node_names(cluster, node, public)
    cert_path, key_path = state / "tls.crt", state / "tls.key"
    reissued = not _cert_valid(cert_path, key_path, sans, ca_cert)
    if reissued:
        key = _load_key(key_path) or ec.generate_private_key(ec.SECP256R1())
        write_atomic(key_path, _pem_key(key), mode=0o600)
        write_atomic(cert_path, _pem(_node_cert(node, key, sans, ca_key, ca_cert)).encode(), mode=0o644)
    mgr = ""
    if node.has(Role.CORE):
        mgr = _ensure_file(state / "ceph-mgr.key", ceph_key, _check_ceph_key).decode()
    return NodeSecrets(tls_cert=cert_path.read_text(), tls_key=key_path.read_text(), wireguard_private=wg_private,
                       wireguard_public=public, ceph_mgr_key=mgr, reissued=reissued)


def _check_wireguard(data: bytes) -> str | None:
    try:
        if len(base64.b64decode(data.strip(), validate=True)) == 32:
            return None
    except ValueError:
        pass
    return "not a WireGuard private key (32 bytes in base64)"


def _node_cert(node: Node, key: ec.EllipticCurvePrivateKey, sans: x509.SubjectAlternativeName,
               ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node.name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(sans, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # etcd dials its peers with its server certificate: it needs both usages.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _cert_valid(cert_path: Path, key_path: Path, sans: x509.SubjectAlternativeName,
                ca_cert: x509.Certificate) -> bool:
    """The certificate parses, matches its key, is signed by this CA and names the node as it is."""
    if not (cert_path.exists() and key_path.exists()):
        return False
    cert, key = _load_cert(cert_path), _load_key(key_path)
    if cert is None or key is None or cert.public_key() != key.public_key():
        return False
    if not _issued_by(cert, ca_cert):
        return False
    try:
        have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    return set(have) == set(sans) and not _expiring(cert)


def _ensure_ssh_key(private: Path, comment: str) -> str:
    public = private.with_name(private.name + ".pub")
    if not (private.exists() and public.exists()):
        prepare_dir(private.parent)
        key = ed25519.Ed25519PrivateKey.generate()
        write_atomic(private, key.private_bytes(serialization.Encoding.PEM,
                                                serialization.PrivateFormat.OpenSSH,
                                                serialization.NoEncryption()), mode=0o600)
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                             serialization.PublicFormat.OpenSSH)
        write_atomic(public, line + f" {comment}\n".encode(), mode=0o644)
    try:
        loaded = serialization.load_ssh_private_key(private.read_bytes(), password=None)
        derived = loaded.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    except (ValueError, TypeError):
        die(f"{private}: not an OpenSSH private key (damaged?)",
            hint="delete it and its .pub to make a new one; every node then needs its new seed")
    # What goes into every seed is derived from the private key, never read as it is.
    text = f"{derived.decode()} {comment}"
    if public.read_bytes() != (text + "\n").encode():
        info(f"{public}: did not match {private}; written again from it")
        write_atomic(public, text + "\n", mode=0o644)
    return text
