"""A throwaway 3-member etcd cluster on loopback with mutual TLS, for the agent's unit tests.

Real etcd rather than a mock: the gateway's JSON quirks (omitted defaults, int64 as strings,
streaming watch and keepalive) are exactly what the node code must get right. Members can be
stopped, killed, restarted and wiped one at a time, so failover and the wiped-member rejoin flow
(remove the old id, add it again, start with state "existing") run against the real thing.
"""

from __future__ import annotations

import ctypes
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clusterforge.node.agent.etcd_client import EtcdClient, EtcdError, TLSFiles
from clusterforge.secrets import ca_certificate

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
START_TIMEOUT = 20.0  # seconds for a member (or the cluster) to become healthy; generous for a busy CI host
POLL = 0.05
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path


def make_ca(directory: Path, name: str) -> CA:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca_certificate(key, name, days=1)
    path = directory / "ca.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CA(key, cert, path)


def issue(ca: CA, directory: Path, name: str, ips: tuple[str, ...] = ("127.0.0.1",)) -> TLSFiles:
    """A leaf certificate as the cluster's nodes get one: both usages, loopback SANs."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), *(x509.IPAddress(ipaddress.IPv4Address(ip)) for ip in ips)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # etcd dials its peers (and its own gateway) with the server certificate: both usages.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return TLSFiles(ca=ca.path, cert=cert_path, key=key_path)


def free_ports(count: int) -> list[int]:
    """Ports the kernel says are free; all held open together so none is handed out twice."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    # A pytest run killed hard must not leave etcd members listening behind it. (The signal follows the
    # thread that started the member: members are started from the test's main thread.)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _clean_env() -> dict[str, str]:
    # etcd and etcdctl read ETCD_* / ETCDCTL_* variables as flags: keep the host's environment out.
    return {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}


@dataclass
class Member:
    name: str
    peer_port: int
    client_port: int
    data_dir: Path
    log: Path
    tls: TLSFiles
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    started: float = 0.0  # time.monotonic() of the last start

    @property
    def peer_url(self) -> str:
        return f"https://127.0.0.1:{self.peer_port}"

    @property
    def client_url(self) -> str:
        return f"https://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        if not self.log.exists():
            return f"--- {self.name}: no log"
        tail = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.name} ({self.log}):\n" + "\n".join(tail)


class EtcdCluster:
    """Members m1..mN on 127.0.0.1; `client()` talks to all of them with a client certificate."""

    def __init__(self, root: Path, size: int = 3):
        self.root = root
        self.token = f"clusterforge-test-{uuid.uuid4().hex[:12]}"
        self.ca = make_ca(root / "pki", "clusterforge test CA")
        self.client_tls = issue(self.ca, root / "pki", "client")
        ports = free_ports(2 * size)
        self.members = [
            Member(name=f"m{i + 1}", peer_port=ports[2 * i], client_port=ports[2 * i + 1],
                   data_dir=root / f"m{i + 1}" / "data", log=root / f"m{i + 1}" / "etcd.log",
                   tls=issue(self.ca, root / "pki", f"m{i + 1}"))
            for i in range(size)
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    def client(self, endpoints: list[str] | None = None, timeout: float = 2.0) -> EtcdClient:
        return EtcdClient(endpoints or self.endpoints, self.client_tls, timeout=timeout)

    def start(self) -> None:
        if not os.access(ETCD, os.X_OK):
            raise AssertionError(f"{ETCD} not found: install etcd-server (listed in host-packages.txt)")
        for m in self.members:
            self.start_member(m.name, wait=False)
        self.wait_healthy()

    def start_member(self, name: str, state: str = "new", wait: bool = True) -> None:
        """Start one member; "existing" is how a wiped member rejoins after member_add."""
        m = self.member(name)
        assert not m.running, f"{name} is already running"
        m.data_dir.mkdir(parents=True, exist_ok=True)
        m.data_dir.chmod(0o700)  # etcd >= 3.4.10 refuses anything looser
        initial = ",".join(f"{o.name}={o.peer_url}" for o in self.members)
        argv = [
            ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
            "--initial-cluster", initial, "--initial-cluster-state", state,
            "--initial-cluster-token", self.token,
            "--client-cert-auth", "--trusted-ca-file", str(m.tls.ca),
            "--cert-file", str(m.tls.cert), "--key-file", str(m.tls.key),
            "--peer-client-cert-auth", "--peer-trusted-ca-file", str(m.tls.ca),
            "--peer-cert-file", str(m.tls.cert), "--peer-key-file", str(m.tls.key),
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--logger", "zap", "--log-outputs", "stderr",
        ]
        m.started = time.monotonic()
        with m.log.open("ab") as log:
            m.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      env=_clean_env(), preexec_fn=_die_with_parent)
        if wait:
            self.wait_healthy()

    def etcdctl(self, *args: str) -> str:
        """etcd's own client, for what the node client deliberately lacks (compaction)."""
        tls = self.client_tls
        argv = [ETCDCTL, "--endpoints", ",".join(self.endpoints), "--cacert", str(tls.ca), "--cert", str(tls.cert),
                "--key", str(tls.key), *args]
        proc = subprocess.run(argv, capture_output=True, text=True, env={**_clean_env(), "ETCDCTL_API": "3"})
        assert proc.returncode == 0, f"etcdctl {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}"
        return proc.stdout

    def stop_member(self, name: str) -> None:
        self._signal(name, signal.SIGTERM)

    def kill_member(self, name: str) -> None:
        self._signal(name, signal.SIGKILL)

    def pause_member(self, name: str) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers (a hung or partitioned node)."""
        proc = self.member(name).proc
        assert proc is not None, f"{name} is not running"
        proc.send_signal(signal.SIGSTOP)

    def resume_member(self, name: str) -> None:
        proc = self.member(name).proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    def wipe_member(self, name: str) -> None:
        m = self.member(name)
        assert not m.running, f"stop {name} before wiping it"
        shutil.rmtree(m.data_dir, ignore_errors=True)

    def _signal(self, name: str, sig: signal.Signals) -> None:
        m = self.member(name)
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(sig)
            try:
                m.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()
        m.proc = None

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Every running member answers a linearizable read and knows the leader; fails showing the logs."""
        deadline = time.monotonic() + timeout
        pending = [m for m in self.members if m.running]
        last = ""
        while pending and time.monotonic() < deadline:
            m = pending[0]
            if not m.running:
                break  # it exited: no point waiting out the deadline
            try:
                client = self.client([m.client_url], timeout=1.0)
                if not client.status(m.client_url).leader:
                    raise EtcdError("no leader yet")
                client.get("/clusterforge-test/health")
                pending.pop(0)
                continue
            except EtcdError as e:
                last = f"{m.name}: {e}"
            time.sleep(POLL)
        if not pending:
            return
        dead = [f"{m.name} exited with {m.proc.returncode}" for m in self.members
                if m.proc is not None and m.proc.poll() is not None]
        raise AssertionError(
            f"etcd test cluster not healthy after {timeout:.0f} s: {last or 'no answer'}"
            + (f"; {', '.join(dead)}" if dead else "") + "\n" + "\n".join(m.log_tail() for m in self.members))

    def ensure_running(self) -> None:
        """Restart whatever a previous test stopped, so each test starts from a healthy cluster."""
        for m in self.members:
            self.resume_member(m.name)
        stopped = [m for m in self.members if not m.running]
        for m in stopped:
            m.proc = None
            self.start_member(m.name, state="existing" if (m.data_dir / "member").exists() else "new", wait=False)
        if stopped:
            self.wait_healthy()

    def close(self) -> None:
        for m in self.members:
            self.kill_member(m.name)
