"""Render an inventory into every node's seed and the PXE server's files.

One strict Jinja2 environment; one template per kind of file, with role and
service conditionals inside. Output goes to a temporary directory swapped in
only when complete, under a lock per cluster.
"""

from __future__ import annotations

import gzip
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from . import fsutil, identity, templates
from . import secrets as secrets_mod
from .fsutil import atomic_path
from .inventory import HTTP_PORT, Cluster, Node, PxeMode, Role
from .log import die
from .node import layout
from .node import seed as seedlib
from .node.seed import Service
from .packages import disable_units_command, service_packages, unit_patterns
from .paths import writable_dir
from .seediso import seed_iso_bytes
from .templates import TemplateError

__all__ = ["Rendered", "Site", "TemplateError", "dnsmasq_conf", "render", "render_template"]

TEMPLATE_DIRS = (templates.ROOT / "autoinstall", templates.ROOT / "pxe")
_ENV = templates.environment(TEMPLATE_DIRS)


def render_template(name: str, **context: Any) -> str:
    return templates.render(_ENV, name, **context)


@dataclass(frozen=True)
class Site:
    """Where the PXE server's HTTP side is reachable."""

    address: IPv4Address
    port: int = HTTP_PORT

    @property
    def base_url(self) -> str:
        return f"http://{self.address}:{self.port}"


@dataclass(frozen=True)
class Rendered:
    path: Path  # <out>/<cluster>/
    changes: identity.Changes
    reissued: tuple[str, ...]  # nodes whose certificate this render issued


def render(cluster: Cluster, out_root: Path, state_root: Path, site: Site | None = None,
           rekey: bool = False) -> Rendered:
    """Write <out_root>/<cluster>/ whole; a failure leaves the previous output untouched."""
    site = site or Site(cluster.network.boot_server)
    writable_dir(out_root, "--out")
    writable_dir(state_root, "--state")
    state = secrets_mod.cluster_state(state_root, cluster)
    final = out_root / cluster.name
    try:
        with secrets_mod.locked(state), fsutil.locked(out_root / f".{cluster.name}.lock", f"{final}"):
            records = identity.Records.read(state)
            changes = identity.changes(cluster.nodes, records)
            secrets = secrets_mod.ensure(cluster, state_root, rekey=rekey)
            files = render_files(cluster, secrets, site, previous=final)
            with atomic_path(final) as tmp:
                write_tree(tmp, files)
                if (final / REPORT_DIR).is_dir():  # the last verification's report is not rendered: keep it
                    shutil.copytree(final / REPORT_DIR, tmp / REPORT_DIR)
                # Before the swap: the tree swapped in never names nodes state/ does not record.
                _check_records(records, cluster.nodes)
                records.write(cluster.nodes)
    except OSError as exc:  # a full disk, a read-only mount, a directory where a file belongs
        die(f"{exc.filename or final}: {exc.strerror or exc}",
            hint=f"{final} and {state} must be writable; the previous render (if any) is untouched")
    reissued = tuple(name for name, s in secrets.nodes.items() if s.reissued)
    return Rendered(final, changes, reissued)


def _check_records(records: identity.Records, nodes: tuple[Node, ...]) -> None:
    """No two MACs recorded with one name or address. The inventory is loaded (and its names
    given) before this render took the lock: another render in between may have given them
    to other MACs."""
    merged = {**{mac: (r.name, r.ip) for mac, r in records.by_mac.items()}, **{n.mac: (n.name, n.ip) for n in nodes}}
    for index, what in ((0, "name"), (1, "address")):
        owner: dict[object, str] = {}
        for mac, record in sorted(merged.items()):
            if record[index] in owner:
                die(f"{records.path}: {owner[record[index]]} and {mac} would both be recorded with the {what} "
                    f"{record[index]}", hint="state/ changed while this command ran (another render of the "
                                             "cluster?): run the command again")
            owner[record[index]] = mac


REPORT_DIR = "report"  # <out>/<cluster>/report/: written by `./forge verify`, kept across renders

# A rendered tree: relative path -> (content, file mode). Rendering is pure; writing is I/O.
Files = dict[str, tuple[bytes, int]]
PRIVATE = 0o600  # what holds a node's private keys
PUBLIC = 0o644


def cluster_seed(cluster: Cluster, secrets: secrets_mod.ClusterSecrets, nodes: tuple[Node, ...]) -> seedlib.ClusterSeed:
    """The cluster as the given nodes' seed describes it (seed.py declares the layout)."""
    net = cluster.network
    return seedlib.ClusterSeed(
        name=cluster.name, domain=cluster.domain, os=str(cluster.os), timezone=cluster.timezone,
        network=seedlib.SeedNetwork(**{f: getattr(net, f) for f in seedlib.SeedNetwork.__dataclass_fields__}),
        services=dict(cluster.services.enabled),
        nodes=tuple(seedlib.SeedNode(name=n.name, mac=n.mac, roles=n.roles, ip=n.ip, overlay_ip=n.overlay_ip,
                                     disks=n.disks, boot=n.boot, fqdn=cluster.fqdn(n),
                                     wireguard_public=secrets.node(n).wireguard_public if cluster.services.wireguard
                                     else "")
                    for n in nodes),
        ceph_fsid=secrets.ceph_fsid if cluster.services.ceph else "",
        k3s_bundle=cluster.services.k3s_bundle is not None,
    )


def render_files(cluster: Cluster, secrets: secrets_mod.ClusterSecrets, site: Site, previous: Path) -> Files:
    everyone = cluster_seed(cluster, secrets, cluster.nodes)
    files: Files = {"inventory.json": (everyone.to_json().encode(), PUBLIC)}
    core = cluster.with_role(Role.CORE)
    shared = dict(cluster=cluster, secrets=secrets, site=site,
                  ssh_keys=[*cluster.ssh_authorized_keys, secrets.operator_ssh_public],
                  operator=seedlib.OPERATOR, operator_uid=seedlib.OPERATOR_UID)
    if cluster.os != "debian-12":  # the Ubuntu autoinstall carries the node package itself
        from .factory.payload import payload_bytes

        shared["packages"] = service_packages(cluster)
        shared["disable_units"] = disable_units_command(unit_patterns())
        shared["payload"] = gzip.compress(payload_bytes(), mtime=0)
    for node in cluster.nodes:
        # Core nodes seed etcd and know every node; the others know the core nodes and
        # themselves, so a seed stays small however large the cluster (the rest is in etcd).
        seen = cluster.nodes if node.has(Role.CORE) else tuple(n for n in cluster.nodes if n in core or n == node)
        cluster_json = cluster_seed(cluster, secrets, seen).to_json()
        files.update(_node_files(node, cluster_json, shared, previous / "nodes" / node.name))
    files.update(_pxe_files(cluster, site))
    return files


def write_tree(root: Path, files: Files) -> None:
    """Create the tree; files are written by a thread pool, since creating thousands of
    small files is bound by the filesystem's latency, not by the CPU."""
    root.mkdir()
    for directory in sorted({str(Path(name).parent) for name in files} - {"."}):
        (root / directory).mkdir(parents=True, exist_ok=True)

    def write(item: tuple[str, tuple[bytes, int]]) -> None:
        name, (data, mode) = item
        fd = os.open(root / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            os.write(fd, data)
            os.fchmod(fd, mode)  # the umask may have narrowed it
        finally:
            os.close(fd)

    with ThreadPoolExecutor(max_workers=WRITERS) as pool:
        list(pool.map(write, files.items()))


WRITERS = 8


@dataclass(frozen=True)
class SeedFile:
    """One file cloud-init writes on the node: single-line secrets as JSON strings, text as
    YAML blocks, binary as base64."""

    path: str
    mode: str
    content: str | bytes

    @property
    def block(self) -> bool:
        return isinstance(self.content, str) and self.content.count("\n") > 1


def seed_files(cluster: Cluster, node: Node, secrets: secrets_mod.ClusterSecrets, cluster_json: str) -> list[SeedFile]:
    """Who gets which key: each secret reaches only the nodes that use it."""
    own = secrets.node(node)
    conf, pki, sec = str(seedlib.CONFIG_DIR), f"{seedlib.CONFIG_DIR}/{seedlib.PKI_DIR}", \
        f"{seedlib.CONFIG_DIR}/{seedlib.SECRETS_DIR}"
    identity_json = seedlib.Identity(cluster=cluster.name, node=node.name).to_json()
    files = [
        SeedFile(f"{conf}/{seedlib.CLUSTER_JSON}", "0644", cluster_json),
        SeedFile(f"{conf}/{seedlib.IDENTITY_JSON}", "0644", identity_json),
        SeedFile(f"{pki}/{seedlib.CA_CERT}", "0644", secrets.ca_cert),
        SeedFile(f"{pki}/{seedlib.NODE_CERT}", "0644", own.tls_cert),
        SeedFile(f"{pki}/{seedlib.NODE_KEY}", "0600", own.tls_key),
        SeedFile(f"{pki}/{seedlib.CRL}", "0644", secrets.crl),
    ]
    on = cluster.services.enabled
    wanted: list[tuple[bool, str, str | bytes]] = [
        (on[Service.WIREGUARD], seedlib.WIREGUARD_KEY, own.wireguard_private + "\n"),
        (on[Service.SLURM], seedlib.MUNGE_KEY, secrets.munge_key),
        (on[Service.K3S] and (node.has(Role.CORE) or node.has(Role.COMPUTE)), seedlib.K3S_TOKEN,
         secrets.k3s_token + "\n"),
        (on[Service.CEPH] and node.has(Role.CORE), seedlib.CEPH_MON_KEY, secrets.ceph_keys["mon."] + "\n"),
        (on[Service.CEPH] and node.has(Role.CORE), seedlib.CEPH_ADMIN_KEY, secrets.ceph_keys["client.admin"] + "\n"),
        (on[Service.CEPH] and node.has(Role.CORE), seedlib.CEPH_MGR_KEY, own.ceph_mgr_key + "\n"),
        # Core nodes put it in the monitors' first auth database; storage nodes use it.
        (on[Service.CEPH] and (node.has(Role.STORAGE) or node.has(Role.CORE)), seedlib.CEPH_BOOTSTRAP_OSD_KEY,
         secrets.ceph_keys["client.bootstrap-osd"] + "\n"),
    ]
    files += [SeedFile(f"{sec}/{name}", "0600", content) for wanted_, name, content in wanted if wanted_]
    return files


def _node_files(node: Node, cluster_json: str, shared: dict[str, Any], previous: Path) -> Files:
    cluster: Cluster = shared["cluster"]
    context = dict(shared, node=node, fqdn=cluster.fqdn(node),
                   files=seed_files(cluster, node, shared["secrets"], cluster_json))
    seed = {name: render_template(f"{name}.j2", **context) for name in seedlib.NOCLOUD_FILES}
    prefix = f"nodes/{node.name}/"
    seed_bytes = {name: text.encode() for name, text in seed.items()}
    files = {
        prefix + "user-data": (seed_bytes["user-data"], PRIVATE),
        prefix + "meta-data": (seed_bytes["meta-data"], PUBLIC),
        prefix + "network-config": (seed_bytes["network-config"], PUBLIC),
        prefix + "seed.iso": (_seed_iso(seed_bytes, previous), PRIVATE),
    }
    if "payload" in shared:
        autoinstall = render_template("autoinstall.yaml.j2", **context, user_data=seed["user-data"],
                                      network_config=seed["network-config"])
        files[prefix + "autoinstall.yaml"] = (autoinstall.encode(), PRIVATE)
    return files


def _seed_iso(files: dict[str, bytes], previous: Path) -> bytes:
    """The node's seed ISO; the previous render's when its files are unchanged (the ISO is a
    pure function of them, and building one costs about a millisecond)."""
    try:
        if all((previous / name).read_bytes() == data for name, data in files.items()):
            return (previous / "seed.iso").read_bytes()
    except OSError:
        pass
    return seed_iso_bytes(files)


def _pxe_files(cluster: Cluster, site: Site) -> Files:
    base = dict(cluster=cluster, base_url=site.base_url)
    files: Files = {
        "pxe/boot.ipxe": (render_template("boot.ipxe.j2", **base).encode(), PUBLIC),
        "pxe/menu.ipxe": (render_template("menu.ipxe.j2", **base).encode(), PUBLIC),
        "pxe/dnsmasq.conf": (dnsmasq_conf(cluster, site, mode=served_mode(cluster)).encode(), PUBLIC),
    }
    for node in cluster.nodes:
        script = render_template("node.ipxe.j2", **base, node=node, image_name=cluster.image_name,
                                 kernel_args=layout.KERNEL_ARGS)
        files[f"pxe/mac/{node.mac_hyphen}.ipxe"] = (script.encode(), PUBLIC)
    return files


def served_mode(cluster: Cluster) -> PxeMode:
    """The DHCP mode a PXE server of this cluster runs in unless told otherwise: the inventory's
    network.pxe, dhcp when the cluster serves none itself (off)."""
    return PxeMode.DHCP if cluster.network.pxe == PxeMode.OFF else cluster.network.pxe


def dnsmasq_conf(cluster: Cluster, site: Site, mode: str) -> str:
    return render_template("dnsmasq.conf.j2", cluster=cluster, mode=mode,
                           pool=dhcp_pool(cluster, site),
                           boot_url=f"{site.base_url}/{cluster.name}/pxe/boot.ipxe")


def dhcp_pool(cluster: Cluster, site: Site) -> tuple[IPv4Address, IPv4Address] | None:
    """The longest run of free addresses in the subnet's top quarter: leases for machines
    not in the inventory, so they can boot the menu and be discovered. None when the subnet
    has no free address at all (then only the inventory's machines get one)."""
    net = cluster.network
    used = {int(a) for a in (net.gateway, net.vip, net.boot_server, site.address, *(n.ip for n in cluster.nodes))}
    first, last = int(net.subnet.network_address) + 1, int(net.subnet.broadcast_address) - 1
    best = (0, -1)
    run_start = None
    for addr in range(first + (last - first + 1) * 3 // 4, last + 2):
        if addr <= last and addr not in used:
            run_start = addr if run_start is None else run_start
            continue
        if run_start is not None and addr - run_start > best[1] - best[0] + 1:
            best = (run_start, addr - 1)
        run_start = None
    if best[1] < best[0]:  # a tiny, full top quarter: any free address will do
        free = next((a for a in range(first, last + 1) if a not in used), None)
        if free is None:
            return None
        best = (free, free)
    return IPv4Address(best[0]), IPv4Address(best[1])
