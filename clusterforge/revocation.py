"""Revoked node certificates: the cluster's CRL, kept in state/<cluster>/ beside the CA.

`cluster.remove` and `cluster.replace` revoke the certificate of the node (or the dead
machine) that leaves. The CRL is signed by the cluster CA, so it may travel anywhere (the
seeds, the published tree, etcd): every node checks its signature and takes a CRL only when
its number is higher than the one it has, so nobody can bring a revoked certificate back.
etcd refuses a revoked certificate on both ports; the agents ignore a revoked peer.

    state/<cluster>/revoked.json   serial (hex) -> {"node", "mac", "at", "why"}
    state/<cluster>/crl.pem        the CRL of those serials; made again only when they change,
                                   so rendering twice gives the same bytes
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .fsutil import write_atomic
from .log import die

REVOKED_FILE = "revoked.json"
CRL_FILE = "crl.pem"
CRL_DAYS = 3650  # nodes check the signature and the number; a CRL never expires under them


@dataclass(frozen=True)
class Revoked:
    serial: int
    node: str
    mac: str
    at: str  # ISO 8601, UTC
    why: str


def read_revoked(state: Path) -> dict[int, Revoked]:
    path = state / REVOKED_FILE
    try:
        data = json.loads(path.read_text())
        return {int(serial, 16): Revoked(int(serial, 16), str(r["node"]), str(r["mac"]), str(r["at"]), str(r["why"]))
                for serial, r in data["revoked"].items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        die(f"{path}: unreadable ({type(exc).__name__})",
            hint="it lists the revoked node certificates; restore it from a backup of state/")


def revoke(state: Path, cert_pem: str, node: str, mac: str, why: str) -> Revoked:
    """Add a node certificate to the revoked list (the CRL follows at the next ensure_crl)."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    entry = Revoked(cert.serial_number, node, mac, now.isoformat(), why)
    revoked = {**read_revoked(state), entry.serial: entry}
    body = {"revoked": {f"{s:x}": {"node": r.node, "mac": r.mac, "at": r.at, "why": r.why}
                        for s, r in sorted(revoked.items())}}
    write_atomic(state / REVOKED_FILE, json.dumps(body, indent=2) + "\n", mode=0o600)
    return entry


def ensure_crl(state: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> str:
    """The CRL of the revoked serials, signed by the CA: the one in state/ while it is still
    right, else a new one with the next number."""
    serials = set(read_revoked(state))
    path = state / CRL_FILE
    old = _load(path)
    if old is not None and _signed_by(old, ca_cert) and {r.serial_number for r in old} == serials:
        return path.read_text()
    number = (crl_number(old) + 1) if old is not None else 1
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca_cert.subject)
               .last_update(now - datetime.timedelta(hours=1))
               .next_update(now + datetime.timedelta(days=CRL_DAYS))
               .add_extension(x509.CRLNumber(number), critical=False))
    for serial in sorted(serials):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    write_atomic(path, pem, mode=0o644)
    return pem


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


def is_revoked(crl_pem: str, cert_pem: str) -> bool:
    crl = x509.load_pem_x509_crl(crl_pem.encode())
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    return crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None


def _load(path: Path) -> x509.CertificateRevocationList | None:
    try:
        return x509.load_pem_x509_crl(path.read_bytes())
    except (OSError, ValueError):
        return None


def _signed_by(crl: x509.CertificateRevocationList, ca_cert: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    except (InvalidSignature, TypeError):
        return False
