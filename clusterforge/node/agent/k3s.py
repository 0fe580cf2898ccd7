"""K3s from the user's air-gap bundle: servers on the core nodes, agents on the compute nodes,
on the cluster's etcd (mutual TLS, the node's own certificate) and over the WireGuard mesh.

The bundle (the k3s binary and the air-gap images tarball) never travels inside the image or
the seed. The agent finds it beside them: a disk labelled CF-K3S (mounted read-only), the
copy an installer left in /var/lib/clusterforge/k3s/, or the boot server's /k3s/ over HTTP
(diskless nodes). Without one K3s is "not verified: no bundle", a wait, never a fake.

One server starts first (the first core node in inventory order) and the others wait until a
K3s API answers: servers that share a datastore must not race to create its bootstrap data.
K3s's embedded etcd is never used (it would take 2379/2380, which the cluster's etcd holds);
its bundled Traefik and ServiceLB are off (port 80 serves the health API). Nothing here ever
runs a k3s binary to learn about it: its version is read from the file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ...run import CommandError, run
from ..seed import K3S_TOKEN, Role, SeedNode, Service
from . import host, wireguard
from .context import STATE_DIR, Ctx
from .core import Plan, State, Status, Step, StepFailed, Wait

name = "k3s"
needs: tuple[str, ...] = ("wireguard", "etcd")

# The bundle, as the factory ships it and the node finds it (declared once: k3sbundle.py,
# factory/iso.py, pxe/http.py and vm/cluster.py use these).
BINARY = "k3s"
IMAGES = ("k3s-airgap-images-amd64.tar", "k3s-airgap-images-amd64.tar.gz", "k3s-airgap-images-amd64.tar.zst")
LABEL = "CF-K3S"  # volume label of a drive holding the bundle's files at its top
MEDIUM_DIR = "clusterforge/k3s"  # on the installer medium (ISO, USB stick)
URL_DIR = "k3s"  # on the PXE server: http://<boot server>:<port>/k3s/<file>
BOOT_HTTP_PORT = 8080  # the PXE server's HTTP port (inventory.HTTP_PORT; a unit test holds them equal)
LOCAL_DIR = "k3s"  # under the agent's state directory: the installer's copy
ELF_X86_64 = 0x3E
VERSION = re.compile(rb"v1\.(\d+)\.(\d+)\+k3s(\d+)")

# What the bundle becomes on the node (K3s's air-gap layout).
INSTALLED = Path("/usr/local/bin/k3s")
KUBECTL = Path("/usr/local/bin/kubectl")  # -> k3s: root's kubectl reads /etc/rancher/k3s/k3s.yaml
IMAGES_DIR = Path("/var/lib/rancher/k3s/agent/images")
CONF_DIR = Path("/etc/rancher/k3s")
CONFIG = CONF_DIR / "config.yaml"
DROP_INS = CONF_DIR / "config.yaml.d"  # the user's own settings, read after CONFIG
KUBECONFIG = CONF_DIR / "k3s.yaml"  # written by K3s servers: cluster-admin, root only
TLS_DIR = CONF_DIR / "datastore"  # copies of the node's certificate for K3s's etcd client
BY_LABEL = Path("/dev/disk/by-label") / LABEL
SERVER_UNIT, AGENT_UNIT = "k3s.service", "k3s-agent.service"
API_PORT = 6443
KUBELET_HEALTHZ = "http://127.0.0.1:10248/healthz"
PROBE_TIMEOUT = 2.0
DOWNLOAD_TIMEOUT = 60.0
CHUNK = 4 * 1024**2
SCAN_LIMIT = 64 * 1024**2  # the version sits in the binary's read-only data, near its start


def applies(ctx: Ctx) -> bool:
    return ctx.seed.cluster.enabled(Service.K3S) and (ctx.core or ctx.me.has(Role.COMPUTE))


def unit(ctx: Ctx) -> str:
    return SERVER_UNIT if ctx.core else AGENT_UNIT


def first_server(ctx: Ctx) -> SeedNode:
    return ctx.seed.cluster.with_role(Role.CORE)[0]


def mount_point(ctx: Ctx) -> Path:
    return ctx.run_dir / "k3s-bundle"


def joined_marker(ctx: Ctx) -> Path:
    """Written once K3s ran here: from then on this node starts it without waiting for another."""
    return ctx.state_dir / "k3s.joined"


def boot_server_url(ctx: Ctx) -> str:
    return f"http://{ctx.seed.cluster.network.boot_server}:{BOOT_HTTP_PORT}/{URL_DIR}"


# ---------------------------------------------------------------- the binary, read not run

def binary_version(stream: IO[bytes]) -> str:
    """The K3s version an x86-64 k3s binary carries ("v1.30.4+k3s1"); "" for anything else."""
    head = stream.read(20)
    if head[:4] != b"\x7fELF" or len(head) < 20 or int.from_bytes(head[18:20], "little") != ELF_X86_64:
        return ""
    data, read = head, len(head)
    while True:
        match = VERSION.search(data)
        if match is not None and match.end() < len(data):  # not cut short at the chunk's end
            return match.group(0).decode()
        chunk = stream.read(min(CHUNK, SCAN_LIMIT - read)) if read < SCAN_LIMIT else b""
        if not chunk:
            return match.group(0).decode() if match is not None else ""
        read += len(chunk)
        data = data[-64:] + chunk


_versions: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> version: a pass reads no 64 MiB


def file_version(path: Path) -> str:
    try:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _versions:
            with open(path, "rb") as f:
                _versions[key] = binary_version(f)
        return _versions[key]
    except OSError:
        return ""


# ---------------------------------------------------------------- facts

@dataclass(frozen=True)
class Source:
    """Where this node finds the bundle."""

    where: str  # a directory on this node, or the boot server's URL
    files: dict[str, int]  # file name -> size
    version: str = ""  # the binary's K3s version ("" over HTTP: not read before it is fetched)

    @property
    def images(self) -> str:
        return next(n for n in IMAGES if n in self.files)


@dataclass(frozen=True)
class Facts:
    device: str  # a CF-K3S drive that is not mounted yet ("" when none)
    source: Source | None
    looked: tuple[str, ...]  # where the bundle was looked for, for the reason a person reads
    binary_size: int  # of /usr/local/bin/k3s, -1 when missing
    binary_version: str  # "" when missing or not a K3s binary
    images: dict[str, int]  # air-gap tarballs in the images directory: name -> size
    kubectl: str  # where /usr/local/bin/kubectl points ("" when missing)
    tls_ok: bool  # the datastore certificate copies are current (servers)
    config: str | None
    unit: host.Unit
    default_route: bool
    joined: bool  # K3s ran on this node before
    servers_up: dict[str, bool]  # core node -> its K3s API answers (asked while mine could start)
    kubelet_ok: bool
    nodes: dict[str, bool] | None  # K3s node -> Ready (servers, while running); None: not known
    nodes_why: str


def dir_source(directory: Path) -> Source | None:
    """A directory holding the bundle's files, if it holds a K3s binary and images."""
    try:
        files = {n: (directory / n).stat().st_size for n in (BINARY, *IMAGES) if (directory / n).is_file()}
    except OSError:
        return None
    if BINARY not in files or not any(n in files for n in IMAGES):
        return None
    version = file_version(directory / BINARY)
    return Source(str(directory), files, version) if version else None


def _head_size(url: str) -> int | None:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"),  # noqa: S310 - the boot server
                                    timeout=PROBE_TIMEOUT) as reply:
            return int(reply.headers.get("Content-Length", "-1"))
    except (OSError, ValueError):  # URLError and HTTPError are OSErrors
        return None


def http_source(base: str) -> Source | None:
    """The boot server's copy of the bundle (the PXE server serves it when the inventory has one)."""
    files: dict[str, int] = {}
    for file in (BINARY, *IMAGES):
        size = _head_size(f"{base}/{file}")
        if size is None and file == BINARY:
            return None
        if size is not None and size >= 0:
            files[file] = size
            if file != BINARY:
                break
    return Source(base, files) if len(files) == 2 else None


def _get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT, context=context) as reply:  # noqa: S310
            return reply.status, reply.read(64)
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def api_answers(ip: object) -> bool:
    """K3s's supervisor answers /ping (no credentials) once the server runs. Its certificate is
    K3s's own CA's, which this node does not hold yet: nothing secret is sent, so unverified."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    status, body = _get(f"https://{ip}:{API_PORT}/ping", context)
    return status == 200 and body.startswith(b"pong")


def ready_nodes() -> tuple[dict[str, bool] | None, str]:
    """K3s's nodes and whether each is Ready, asked with K3s's own kubectl (servers only)."""
    try:
        proc = run([str(INSTALLED), "kubectl", "get", "nodes", "-o", "json", "--request-timeout=10s"],
                   env={"KUBECONFIG": str(KUBECONFIG)}, check=False, timeout=30)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            return None, lines[-1][:200] if lines else f"kubectl exited with {proc.returncode}"
        items = json.loads(proc.stdout).get("items", [])
    except (CommandError, ValueError, AttributeError) as exc:  # a timeout, or output that is not JSON
        return None, str(exc).splitlines()[0][:200]
    nodes = {}
    for item in items:
        conditions = item.get("status", {}).get("conditions", [])
        nodes[item["metadata"]["name"]] = any(c.get("type") == "Ready" and c.get("status") == "True"
                                              for c in conditions)
    return nodes, ""


def facts(ctx: Ctx) -> Facts:
    mounted = os.path.ismount(mount_point(ctx))
    device = str(BY_LABEL) if BY_LABEL.exists() and not mounted else ""
    binary_size = INSTALLED.stat().st_size if INSTALLED.is_file() else -1
    installed_version = file_version(INSTALLED) if binary_size >= 0 else ""
    images = {p.name: p.stat().st_size for p in IMAGES_DIR.iterdir() if p.name in IMAGES} \
        if IMAGES_DIR.is_dir() else {}
    looked = [f"a disk labelled {LABEL}", str(ctx.state_dir / LOCAL_DIR)]
    source = (dir_source(mount_point(ctx)) if mounted else None) or dir_source(ctx.state_dir / LOCAL_DIR)
    if source is None and not device and (not installed_version or not images):
        # Over the network only while something is missing: a converged node asks nobody.
        looked.append(boot_server_url(ctx))
        source = http_source(boot_server_url(ctx))
    state = host.units(unit(ctx))[unit(ctx)]
    routes = json.loads(run(["ip", "-j", "-4", "route", "show", "default"], check=False).stdout or "[]")
    servers_up: dict[str, bool] = {}
    if installed_version and images and not state.running:  # asked only when it could start
        servers_up = {n.name: api_answers(n.ip) for n in ctx.seed.cluster.with_role(Role.CORE)
                      if n.name != ctx.me.name}
    kubelet_ok = state.running and _get(KUBELET_HEALTHZ)[0] == 200
    nodes, why = ready_nodes() if ctx.core and state.running else (None, "")
    link = os.readlink(KUBECTL) if KUBECTL.is_symlink() else ("(a file)" if KUBECTL.exists() else "")
    tls_ok = all(host.file_is(TLS_DIR / target, host.read(source_) or b"", mode)
                 for target, source_, mode in tls_files(ctx)) if ctx.core else True
    return Facts(device=device, source=source, looked=tuple(looked), binary_size=binary_size,
                 binary_version=installed_version, images=images, kubectl=link, tls_ok=tls_ok,
                 config=host.read_text(CONFIG), unit=state, default_route=bool(routes),
                 joined=joined_marker(ctx).exists(), servers_up=servers_up, kubelet_ok=kubelet_ok,
                 nodes=nodes, nodes_why=why)


def tls_files(ctx: Ctx) -> list[tuple[str, Path, int]]:
    tls = ctx.tls
    return [("ca.crt", tls.ca, 0o644), ("node.crt", tls.cert, 0o644), ("node.key", tls.key, 0o600)]


# ---------------------------------------------------------------- configuration

def config(ctx: Ctx) -> str:
    """/etc/rancher/k3s/config.yaml. No secret in it: the token stays in the seed's file."""
    me, net = ctx.me, ctx.seed.cluster.network
    mesh = ctx.seed.cluster.enabled(Service.WIREGUARD)
    lines = [
        "# Written by the clusterforge agent, which rewrites it. Settings of your own go in",
        f"# {DROP_INS}/*.yaml (read after this file; restart {unit(ctx)} after changing them).",
        f"token-file: {ctx.seed.secret(K3S_TOKEN)}",
        f"node-name: {me.name}",
        # Node-to-node traffic (flannel's VXLAN included) on the mesh's addresses.
        f"node-ip: {me.overlay_ip if mesh else me.ip}",
    ]
    if mesh:
        lines.append(f"flannel-iface: {wireguard.IFACE}")
    if not ctx.core:
        return "\n".join([*lines, f"server: https://{net.vip}:{API_PORT}"]) + "\n"
    lines += [
        # The cluster's etcd as the datastore: K3s starts no etcd of its own.
        f'datastore-endpoint: "{",".join(ctx.etcd_endpoints())}"',
        f"datastore-cafile: {TLS_DIR / 'ca.crt'}",
        f"datastore-certfile: {TLS_DIR / 'node.crt'}",
        f"datastore-keyfile: {TLS_DIR / 'node.key'}",
        "# Port 80 serves clusterforge's health API: no bundled ingress, no service load balancer.",
        "disable:",
        "  - traefik",
        "  - servicelb",
        "tls-san:",
        f"  - {net.vip}",
        f"  - {me.ip}",
        f"  - {me.fqdn}",
        'write-kubeconfig-mode: "0600"',
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plan

def plan(ctx: Ctx, f: Facts) -> Plan:
    if f.device:
        return [Step("k3s: mount the bundle", f"{f.device} holds the air-gap bundle", lambda: mount(ctx, f.device))]
    src = f.source
    binary_ok = bool(f.binary_version) and (src is None or (
        src.files[BINARY] == f.binary_size and src.version in ("", f.binary_version)))
    images_ok = bool(f.images) if src is None else f.images.get(src.images) == src.files[src.images]
    if src is None and not (binary_ok and images_ok):
        return Wait(f"not verified: no bundle (looked at {', '.join(f.looked)})")
    steps: list[Step] = []
    if src is not None:
        source = src  # for the closures
        if not binary_ok:
            why = f"{src.version or 'K3s'} from {src.where}" + (f" (was {f.binary_version})" if f.binary_version
                                                                 else "")
            steps.append(Step("k3s: install the binary", why, lambda: install_binary(ctx, source, f.unit.running)))
        if not images_ok:
            steps.append(Step("k3s: install the air-gap images", f"{src.images} from {src.where}",
                              lambda: install_images(ctx, source, f.unit.running)))
    if ctx.core and f.kubectl != BINARY:
        steps.append(Step("k3s: link kubectl", "kubectl works for root with no flags", link_kubectl))
    if ctx.core and not f.tls_ok:
        steps.append(Step("k3s: install the datastore TLS files", "K3s reaches etcd with this node's certificate",
                          lambda: install_tls(ctx)))
    wanted = config(ctx)
    if f.config != wanted:
        steps.append(Step("k3s: write config.yaml", "first start" if f.config is None else "settings changed",
                          lambda: write_config(ctx, wanted, f.unit.running)))
    if steps:
        return steps
    if not f.default_route:
        return Wait("K3s needs a default route and this node has none")
    if f.unit.active == "activating":
        return Wait(f"{unit(ctx)} is starting")
    if not f.unit.running:
        first = first_server(ctx)
        if first.name != ctx.me.name and not f.joined and not any(f.servers_up.values()):
            return Wait(f"waiting for the first K3s server, {first.name}, to answer at https://{first.ip}:{API_PORT}"
                        " (one server starts before the others)")
        role = "server" if ctx.core else "agent"
        why = "configured" if f.unit.active != "failed" else f"it stopped ({f.unit.result})"
        return [Step(f"k3s: start the {role}", why, lambda: host.systemctl("start", "--no-block", unit(ctx)))]
    if f.kubelet_ok and not f.joined:
        return [Step("k3s: remember that K3s ran here", "from now on it starts without waiting for another server",
                     lambda: host.write(joined_marker(ctx), f"{time.time():.0f}\n"))]
    return []


# ---------------------------------------------------------------- steps

def mount(ctx: Ctx, device: str) -> None:
    mount_point(ctx).mkdir(parents=True, exist_ok=True)
    run(["mount", "-o", "ro,nosuid,nodev", device, str(mount_point(ctx))])


def _open(source: Source, file: str) -> IO[bytes]:
    if source.where.startswith("http://"):
        return urllib.request.urlopen(f"{source.where}/{file}", timeout=DOWNLOAD_TIMEOUT)  # type: ignore[no-any-return]  # noqa: S310
    return open(Path(source.where) / file, "rb")


def fetch(source: Source, file: str, target: Path, mode: int) -> None:
    """Copy one file of the bundle into place: whole and checked, or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, _open(source, file) as data:
            shutil.copyfileobj(data, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
        size = os.path.getsize(tmp)
        if size != source.files[file]:
            raise StepFailed(f"{source.where}/{file}: {size} bytes arrived, {source.files[file]} expected")
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_binary(ctx: Ctx, source: Source, running: bool) -> None:
    fetch(source, BINARY, INSTALLED, 0o755)
    if not file_version(INSTALLED):
        raise StepFailed(f"{source.where}/{BINARY} is not a K3s binary (no version found in it)")
    if running:
        host.systemctl("try-restart", "--no-block", unit(ctx))


def install_images(ctx: Ctx, source: Source, running: bool) -> None:
    fetch(source, source.images, IMAGES_DIR / source.images, 0o644)
    for other in IMAGES:  # K3s imports every tarball there: no stale one beside the new
        if other != source.images:
            (IMAGES_DIR / other).unlink(missing_ok=True)
    if running:  # K3s imports them when it starts
        host.systemctl("try-restart", "--no-block", unit(ctx))


def link_kubectl() -> None:
    tmp = KUBECTL.with_name(f".{KUBECTL.name}.new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(BINARY)
    os.replace(tmp, KUBECTL)


def install_tls(ctx: Ctx) -> None:
    host.ensure_dir(TLS_DIR, 0o700)
    for target, source, mode in tls_files(ctx):
        host.write(TLS_DIR / target, host.read(source) or b"", mode)


def write_config(ctx: Ctx, text: str, running: bool) -> None:
    host.ensure_dir(CONF_DIR, 0o755)
    DROP_INS.mkdir(mode=0o755, exist_ok=True)  # where a person's own settings go
    host.write(CONFIG, text, 0o600)
    if running:
        host.systemctl("try-restart", "--no-block", unit(ctx))


def copy_from_medium(medium: Path, root: Path) -> bool:
    """For the installer: the bundle on the installer medium (<medium>/clusterforge/k3s/) copied
    into the installed system's /var/lib/clusterforge/k3s/, where the agent finds it. False when
    the medium carries none."""
    source = dir_source(medium / MEDIUM_DIR)
    if source is None:
        return False
    target = root / STATE_DIR.relative_to("/") / LOCAL_DIR
    for file in source.files:
        fetch(source, file, target / file, 0o755 if file == BINARY else 0o644)
    return True


# ---------------------------------------------------------------- health

def health(ctx: Ctx, f: Facts) -> Status:
    version = {"version": f.binary_version}
    if not f.kubelet_ok:
        return Status(State.WAITING, f"kubelet not healthy yet ({KUBELET_HEALTHZ})", detail=version)
    if not ctx.core:
        return Status(State.OK, f"agent {f.binary_version} running, kubelet healthy", detail=version)
    if f.nodes is None:
        return Status(State.WAITING, f"the K3s API does not answer yet: {f.nodes_why}", detail=version)
    expected = [n.name for n in ctx.seed.cluster.nodes if n.has(Role.CORE) or n.has(Role.COMPUTE)]
    names = expected + sorted(set(f.nodes) - set(expected))
    not_ready = [n for n in names if not f.nodes.get(n)]
    detail = {"nodes": {n: f.nodes.get(n, False) for n in names}, **version}
    ready = len(names) - len(not_ready)
    if ctx.me.name in not_ready:
        return Status(State.WAITING, f"this node is not Ready yet ({ready} of {len(names)} Ready)", detail=detail)
    if not_ready:
        return Status(State.DEGRADED, f"{ready} of {len(names)} nodes Ready ({', '.join(not_ready)} not Ready)",
                      detail=detail)
    return Status(State.OK, f"{ready} of {len(names)} nodes Ready", detail=detail)
