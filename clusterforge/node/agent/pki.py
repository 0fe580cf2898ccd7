"""Certificates seen by a node: checked against the cluster CA and its list of revoked
certificates with openssl (the node has no Python crypto library), and read for what the
CA vouches for."""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from ...run import run
from ..seed import WIREGUARD_SAN


@dataclass(frozen=True)
class Vouched:
    name: str  # the certificate's common name: the node's name
    ips: tuple[IPv4Address, ...]
    wireguard_key: str
    overlay_ip: str = ""


MAX_CRL = 1024**2  # a CRL of ten thousand revoked certificates is about 400 KiB


def check(pem: str, ca: Path, overlay: object = None, crl: Path | None = None) -> Vouched | None:
    """What a certificate says, if the CA signed it for TLS clients and has not revoked it
    (with `crl`, the CA's list); None otherwise."""
    if "BEGIN CERTIFICATE" not in pem or len(pem) > 8192:
        return None
    revoked = ["-crl_check", "-CRLfile", str(crl)] if crl is not None and crl.exists() else []
    verify = run(["openssl", "verify", "-CAfile", str(ca), *revoked, "-purpose", "sslclient"], input=pem,
                 check=False)
    if verify.returncode != 0 or not verify.stdout.strip().endswith("OK"):
        return None
    text = run(["openssl", "x509", "-noout", "-subject", "-ext", "subjectAltName", "-nameopt", "RFC2253"],
               input=pem, check=False).stdout
    cn = re.search(r"subject=.*?CN=([a-z0-9-]+)", text)
    ips = tuple(IPv4Address(ip) for ip in re.findall(r"IP Address:([0-9.]+)", text))
    key = re.search(re.escape(WIREGUARD_SAN) + r"([A-Za-z0-9+/=]{44})", text)
    if cn is None:
        return None
    overlay_ip = ""
    if overlay is not None:
        overlay_ip = next((str(ip) for ip in ips if ip in overlay), "")  # type: ignore[operator]
    return Vouched(cn.group(1), ips, key.group(1) if key else "", overlay_ip)


def crl_number(pem: str, ca: Path) -> int | None:
    """The number of a CRL the CA signed (higher is newer); None for anything else."""
    if "BEGIN X509 CRL" not in pem or len(pem) > MAX_CRL:
        return None
    out = run(["openssl", "crl", "-CAfile", str(ca), "-noout", "-crlnumber"], input=pem, check=False)
    number = re.search(r"crlNumber=(?:0x)?([0-9A-Fa-f]+)", out.stdout)
    if out.returncode != 0 or "verify OK" not in out.stdout + out.stderr or number is None:
        return None
    return int(number.group(1), 16)
