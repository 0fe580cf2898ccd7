"""`./forge cluster.publish`: what changed, to the running cluster's core nodes, over SSH.

1. Ask each core node what it has (`python3 -m clusterforge.node.pxepublish state`): its
   published manifest and inventory, its seed's cluster.json and CA.
2. Refuse, before anything is rendered or sent, what a running cluster cannot take in place:
   another cluster, domain, subnet, overlay or VIP, services turned on or off, a new name or
   address for a node it runs, core nodes added or removed, a CA it does not trust; and what
   only cluster.remove and cluster.replace (membership.py) do safely: a running node left
   out, a running node's name on other hardware.
3. Render the inventory for the cluster's own PXE (the iPXE scripts on http://<VIP>:8080) into
   <out>/published/<cluster>/, issuing certificates of new nodes on this host (<out>/<cluster>/
   stays what `pxe.serve` renders); build the netboot files (unless network.pxe is off).
4. List every file to publish with its sha256 (the manifest), and send each core node only
   the files that differ from its manifest, its cluster.json when the core seed (which lists
   every node) changed, and the CA's CRL when it is not the node's, as one tar over the SSH
   connection (pxepublish.receive), to every core node at once.

The decisions (refusals(), decide()) are pure functions of what the nodes said and what was
rendered; the rest is I/O.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from . import render as render_mod
from . import revocation
from .fsutil import write_atomic
from .inventory import HTTP_PORT, Cluster, PxeMode, Role
from .log import die, human_bytes, info
from .node import pxepublish
from .node.pxepublish import Manifest
from .node.seed import NOCLOUD_FILES, ClusterSeed, SeedError
from .paths import Paths
from .pxe.server import NETBOOT_FILES
from .run import CommandError, spawn
from .ssh import Target

PUBLISHED = "published"  # <out>/published/<cluster>/: the tree rendered for the cluster's own PXE
STATE_COMMAND = "python3 -m clusterforge.node.pxepublish state"
RECEIVE_COMMAND = "python3 -m clusterforge.node.pxepublish receive"
SEND_TIMEOUT = 3600.0  # seconds for one node to take in a publish (an image of a few GiB, a slow link)
SHOWN = 8  # paths listed per node before "and N more"


# ---------------------------------------------------------------- reaching the nodes


class Addressed(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def ip(self) -> IPv4Address: ...


N = TypeVar("N", bound=Addressed)


def targets(cluster: Cluster, paths: Paths, nodes: Iterable[N]) -> list[tuple[N, Target]]:
    """SSH targets with clusterforge's key: through the QEMU harness's network namespace when
    runs/<cluster>/ has running machines, else plain SSH to the nodes' addresses (metal).
    `nodes` may be the inventory's or a running cluster's (a node that left the inventory)."""
    key = paths.cluster_state(cluster.name) / "ssh" / "id_ed25519"
    if not key.exists():
        die(f"no SSH key at {key}", hint="this is not the state/ the cluster was rendered from (--state?)")
    nodes = list(nodes)
    if paths.cluster_runs(cluster.name).is_dir():
        from .cli import image_path
        from .vm.cluster import ClusterVMs

        vms = ClusterVMs(cluster, image_path(cluster, paths), paths)
        if any(vms.machine(n).running for n in cluster.nodes if (vms.dir / n.name).is_dir()):
            return [(n, Target(str(n.ip), key, netns=vms.net.netns)) for n in nodes]
    return [(n, Target(str(n.ip), key)) for n in nodes]


@dataclass(frozen=True)
class Remote:
    """What one core node said it has."""

    node: str
    manifest: Manifest | None
    inventory: str | None  # the published inventory.json
    cluster_json: str | None  # /etc/clusterforge/cluster.json (a core node's lists every node)
    ca: str | None
    crl: str | None = None  # the CA's list of revoked certificates the node has

    @classmethod
    def parse(cls, node: str, text: str) -> Remote:
        try:
            d = json.loads(text)
            return cls(node, d["manifest"], d["inventory"], d["cluster_json"], d["ca"], d.get("crl"))
        except (ValueError, KeyError, TypeError):
            die(f"{node} answered the publish's question with something it cannot read",
                hint="is its image older than this checkout? ./forge cluster.sync-agent (QEMU) or reinstall it")

    def running(self) -> ClusterSeed:
        """The cluster as this node runs it: as last published, else as its seed says."""
        text = self.inventory or self.cluster_json or ""
        try:
            return ClusterSeed.from_dict(json.loads(text))
        except (ValueError, KeyError, TypeError, SeedError) as exc:
            die(f"{self.node}: its {'published inventory' if self.inventory else 'cluster.json'} cannot be read "
                f"({type(exc).__name__})", hint="look at it on the node; nothing was sent")


# ---------------------------------------------------------------- the decisions (pure)


def refusals(running: ClusterSeed, new: Cluster, ca: str | None, local_ca: str | None,
             removing: frozenset[str] = frozenset(), retired: frozenset[str] = frozenset()) -> list[str]:
    """What a running cluster cannot take in place, one line each; [] when it can.

    `removing`: names cluster.remove is taking out (they may leave the inventory); `retired`:
    MACs whose machines cluster.replace retired (their names may move to new hardware)."""
    found = []
    if running.name != new.name:
        return [f"the nodes run cluster {running.name}, the inventory is cluster {new.name}"]
    if running.domain != new.domain:
        found.append(f"another domain: {running.domain} on the cluster, {new.domain} in the inventory")
    for what, was, wants in (("subnet", running.network.subnet, new.network.subnet),
                             ("overlay", running.network.overlay, new.network.overlay),
                             ("VIP", running.network.vip, new.network.vip)):
        if was != wants:
            found.append(f"another {what}: {was} on the cluster, {wants} in the inventory")
    changed = [f"{s} {'on' if new.services.enabled[s] else 'off'}" for s in new.services.enabled
               if running.services.get(s, False) != new.services.enabled[s]]
    if changed:
        found.append(f"services turned on or off ({', '.join(changed)}): the running nodes' seeds "
                     "hold no keys for them")
    known = {n.mac: n for n in running.nodes}
    by_name = {n.name: n for n in running.nodes}
    for node in new.nodes:
        old = known.get(node.mac)
        if old is not None and (old.name, old.ip, old.overlay_ip) != (node.name, node.ip, node.overlay_ip):
            found.append(f"{node.mac} runs as {old.name} ({old.ip}, overlay {old.overlay_ip}); the inventory makes "
                         f"it {node.name} ({node.ip}, overlay {node.overlay_ip}): a running node keeps its name "
                         "and address")
        holder = by_name.get(node.name)
        if old is None and holder is not None and holder.mac not in retired:
            found.append(f"{node.name} runs on {holder.mac}; the inventory puts it on {node.mac}: new hardware takes a "
                         f"node's place through ./forge cluster.replace {node.name} --mac {node.mac} (it retires the "
                         "old machine's etcd member, monitor and OSDs, and revokes its certificate)")
    names = {n.name for n in new.nodes}
    gone = [n.name for n in running.nodes if n.name not in names and n.name not in removing
            and not n.has(Role.CORE)]
    if gone:
        them = "it" if len(gone) == 1 else "them"
        found.append(f"{', '.join(gone)} left the inventory, but the cluster runs {them}: "
                     f"./forge cluster.remove {gone[0]} takes a node out safely (drains SLURM, moves its data to the "
                     "other storage nodes, revokes its certificate)")
    core_old = {n.name: n for n in running.with_role(Role.CORE)}
    core_new = {n.name: n for n in new.with_role(Role.CORE)}
    added = [name for name in core_new if name not in core_old]
    removed = [name for name in core_old if name not in core_new]
    if added or removed:
        what = "; ".join(f"{label}: {', '.join(names)}" for label, names in (("added", added), ("removed", removed))
                         if names)
        found.append(f"the core nodes change ({what}): etcd's members and Ceph's monitors cannot change in place "
                     "(a core node's hardware is replaced with ./forge cluster.replace)")
    if ca is not None and local_ca is not None and ca.strip() != local_ca.strip():
        found.append("the cluster trusts another CA than the one in state/ (was it rendered with --rekey, or from "
                     "another state/?)")
    return found


@dataclass(frozen=True)
class Change:
    """What one core node needs."""

    send: tuple[str, ...]  # paths (of the manifest) that differ or are missing there
    delete: tuple[str, ...]  # paths it has that are published no more
    cluster_json: bool  # its cluster.json is not the new core seed
    crl: bool = False  # its CRL is not state/'s

    @property
    def empty(self) -> bool:
        return not (self.send or self.delete or self.cluster_json or self.crl)


def decide(manifest: Manifest, core_seed: str, remote: Remote, cluster: str, crl: str | None = None) -> Change:
    have = remote.manifest or {}
    send = tuple(sorted(p for p, entry in manifest.items() if have.get(p) != entry))
    delete = tuple(sorted(p for p in have if p not in manifest and pxepublish.safe_path(p, cluster)))
    return Change(send, delete, remote.cluster_json != core_seed, crl is not None and remote.crl != crl)


def describe(change: Change, manifest: Manifest) -> str:
    if change.empty:
        return "up to date"
    shown = [*change.send, *(f"-{p}" for p in change.delete)]
    what = ", ".join(shown[:SHOWN]) + (f" and {len(shown) - SHOWN} more" if len(shown) > SHOWN else "")
    size = sum(manifest[p]["size"] for p in change.send)
    parts = [f"sent {len(change.send)} files ({human_bytes(size)})" if change.send else "",
             f"deleted {len(change.delete)}" if change.delete else "", "cluster.json" if change.cluster_json else "",
             "CRL" if change.crl else ""]
    return "; ".join(p for p in parts if p) + (f": {what}" if shown else "")


# ---------------------------------------------------------------- the files


def tree_files(cluster: Cluster, rendered: Path, images: Path | None) -> dict[str, Path]:
    """Every file the cluster's PXE serves, by its path on the nodes: the rendered tree
    (inventory, iPXE scripts, dnsmasq.conf, the seeds as a netboot fetches them) and, unless
    images is None, the image's netboot files and the compressed image. With network.pxe off,
    the inventory only: nothing would serve the rest."""
    c = cluster.name
    files = {f"{c}/inventory.json": rendered / "inventory.json"}
    if cluster.network.pxe == PxeMode.OFF:
        return files
    for path in sorted((rendered / "pxe").rglob("*")):
        if path.is_file():
            files[f"{c}/{path.relative_to(rendered).as_posix()}"] = path
    for node in cluster.nodes:
        for name in NOCLOUD_FILES:
            files[f"{c}/nodes/{node.name}/{name}"] = rendered / "nodes" / node.name / name
    if images is not None:
        for name in (*NETBOOT_FILES, f"{cluster.image_name}.raw.gz"):
            files[f"{pxepublish.IMAGES}/{name}"] = images / name
    return files


class Hashes:
    """sha256 of files, remembered by size and modification time: the image's gigabytes are
    hashed once per build, not once per publish."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.known: dict[str, list[Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
        entry = self.known.get(key)
        if isinstance(entry, list) and entry[:2] == stamp and len(entry) == 3:
            return str(entry[2])
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
        self.known[key] = [*stamp, digest.hexdigest()]
        self.changed = True
        return digest.hexdigest()

    def save(self) -> None:
        if self.changed:
            write_atomic(self.path, json.dumps(self.known, indent=1, sort_keys=True) + "\n")


def manifest_of(files: Mapping[str, Path], hashes: Hashes) -> Manifest:
    manifest = {}
    for rel, path in sorted(files.items()):
        if not path.is_file():
            die(f"{path}: missing; it is to be published as {rel}", hint="./forge netboot builds the image's files")
        mode = "0600" if path.stat().st_mode & 0o077 == 0 else "0644"  # seeds hold private keys
        manifest[rel] = {"sha256": hashes.sha256(path), "size": path.stat().st_size, "mode": mode}
    return manifest


def _add(tar: tarfile.TarFile, name: str, size: int, mode: int, data: IO[bytes]) -> None:
    member = tarfile.TarInfo(name)
    member.size, member.mode, member.mtime = size, mode, 0
    tar.addfile(member, data)


def write_tar(out: IO[bytes], cluster: str, manifest: Manifest, change: Change, files: Mapping[str, Path],
              core_seed: str, crl: str = "") -> None:
    """The publish as pxepublish.receive() reads it: the plan, the files that changed, cluster.json,
    the CRL."""
    plan = json.dumps({"cluster": cluster, "manifest": manifest, "delete": list(change.delete)}).encode()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, pxepublish.PLAN, len(plan), 0o644, io.BytesIO(plan))
        for rel in change.send:
            entry = manifest[rel]
            with open(files[rel], "rb") as f:
                _add(tar, pxepublish.FILES + rel, entry["size"], pxepublish.MODES[entry["mode"]], f)
        if change.cluster_json:
            data = core_seed.encode()
            _add(tar, pxepublish.CLUSTER_JSON, len(data), 0o644, io.BytesIO(data))
        if change.crl:
            data = crl.encode()
            _add(tar, pxepublish.CRL, len(data), 0o644, io.BytesIO(data))


def send(target: Target, cluster: str, manifest: Manifest, change: Change, files: Mapping[str, Path],
         core_seed: str, crl: str = "") -> None:
    """One tar over the SSH connection's stdin; the node writes each file to a temporary name
    and renames it into place, and its manifest last."""
    argv = target.argv(RECEIVE_COMMAND)
    # The node's words go to a file: communicate() cannot follow a stdin we wrote and closed.
    with tempfile.TemporaryFile() as said:
        proc = spawn(argv, stdin=subprocess.PIPE, stdout=said, stderr=subprocess.STDOUT)
        assert proc.stdin is not None
        try:
            with proc.stdin:
                write_tar(proc.stdin, cluster, manifest, change, files, core_seed, crl)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the node stopped reading: its own words say why
        try:
            proc.wait(timeout=SEND_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise CommandError(argv, None, "", f"timed out after {SEND_TIMEOUT:.0f}s") from None
        if proc.returncode != 0:
            said.seek(0)
            raise CommandError(argv, proc.returncode, said.read().decode(errors="replace"))


# ---------------------------------------------------------------- the command


@dataclass(frozen=True)
class Published:
    lines: list[str]  # per core node what was sent, or that nothing was
    missed: list[str]  # core nodes that did not answer: they have the previous publish


def publish(cluster: Cluster, paths: Paths, removing: frozenset[str] = frozenset()) -> Published:
    """`removing`: the names cluster.remove is taking out of the running cluster."""
    core = cluster.with_role(Role.CORE)
    if not core:
        die(f"cluster {cluster.name} has no core node to serve its PXE")
    remotes: dict[str, tuple[Target, Remote]] = {}
    unreachable = []
    for node, target in targets(cluster, paths, core):
        try:
            answer = target.run(STATE_COMMAND, timeout=120)
        except CommandError as exc:
            unreachable.append(f"{node.name}: not reachable over SSH ({str(exc).splitlines()[-1][:120]})")
            continue
        remotes[node.name] = (target, Remote.parse(node.name, answer.stdout))
    if not remotes:
        die(f"no core node of cluster {cluster.name} answers over SSH:\n  " + "\n  ".join(unreachable),
            hint="is the cluster running? (./forge cluster.status for a QEMU cluster)")
    local_ca = _read(paths.cluster_state(cluster.name) / "ca.crt")
    retired = frozenset(r.mac for r in revocation.read_revoked(paths.cluster_state(cluster.name)).values())
    problems = sorted({line for _, remote in remotes.values()
                       for line in refusals(remote.running(), cluster, remote.ca, local_ca, removing, retired)})
    if problems:
        die("the running cluster cannot take this inventory in place; nothing was rendered or sent:\n  - "
            + "\n  - ".join(problems),
            hint="publish only what a running cluster can take: new or removed non-core nodes, changed boot modes "
                 "and roles of non-core nodes, network.pxe, a new image")

    site = render_mod.Site(cluster.network.vip, HTTP_PORT)
    rendered = render_mod.render(cluster, paths.out / PUBLISHED, paths.state, site).path
    images = None
    if cluster.network.pxe != PxeMode.OFF:
        from .cli import build_netboot

        build_netboot(paths)
        images = paths.images
    files = tree_files(cluster, rendered, images)
    hashes = Hashes(paths.out / PUBLISHED / f".{cluster.name}.sha256.json")
    manifest = manifest_of(files, hashes)
    hashes.save()
    core_seed = (rendered / "inventory.json").read_text()  # a core node's cluster.json is the same file
    crl = (paths.cluster_state(cluster.name) / revocation.CRL_FILE).read_text()  # made by the render

    changes = {name: decide(manifest, core_seed, remote, cluster.name, crl) for name, (_, remote) in remotes.items()}
    sending = {name: change for name, change in changes.items() if not change.empty}
    # Every core node at once: each takes the files in at the pace of its own network, CPU and disk.
    with ThreadPoolExecutor(max_workers=max(1, len(sending))) as pool:
        for name in sending:
            info(f"{name}: sending ...")
        sent = [pool.submit(send, remotes[name][0], cluster.name, manifest, change, files, core_seed, crl)
                for name, change in sending.items()]
    for future in sent:
        future.result()  # the first failure, naming its node; the others were sent all the same
    lines = [f"{name}: {describe(change, manifest)}" for name, change in changes.items()]
    if all(line.endswith(": up to date") for line in lines):
        lines = [f"nothing changed, nothing sent ({', '.join(remotes)} up to date)"]
    if cluster.network.pxe == PxeMode.OFF:
        lines.append("network.pxe is off: the core nodes keep the inventory, no boot files")
    lines += [f"{line}: publish again once it is up" for line in unreachable]
    return Published(lines, unreachable)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def first_answer(cluster: Cluster, paths: Paths, command: str) -> str:
    """The output of command on the first core node that answers."""
    tried = []
    for node, target in targets(cluster, paths, cluster.with_role(Role.CORE)):
        try:
            return target.run(command, timeout=60).stdout
        except CommandError as exc:
            tried.append(f"{node.name}: {str(exc).splitlines()[-1][:120]}")
    die(f"no core node of cluster {cluster.name} answers:\n  " + "\n  ".join(tried),
        hint="is the cluster running? (./forge cluster.status for a QEMU cluster)")
