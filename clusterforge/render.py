"""Render an inventory into every node's seed and the PXE server's files.

One strict Jinja2 environment; one template per kind of file, with role and
service conditionals inside. Output goes to a temporary directory swapped in
only when complete.
"""

from __future__ import annotations

import base64
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import jinja2

from . import secrets as secrets_mod
from .fsutil import atomic_path
from .inventory import HTTP_PORT, IMAGE_NAME, Cluster, Node, Role
from .packages import disabled_units, service_packages
from .seediso import seed_iso_bytes

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DIRS = (ROOT / "autoinstall", ROOT / "pxe")
KERNEL_ARGS = "console=tty0 console=ttyS0,115200"


class TemplateError(Exception):
    """A bug in a template: names the template file and line."""


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in TEMPLATE_DIRS]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters["b64encode"] = lambda data: base64.b64encode(data).decode()
    # JSON strings are YAML strings: quoting any value this way is always safe.
    env.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
    env.filters["block"] = yaml_block
    env.globals["Role"] = Role
    return env


def yaml_block(text: str, indent: int) -> str:
    """A YAML literal block scalar of text, indented for a value at column `indent`.

    Readable where tojson would give one long line; clip chomping keeps one final newline.
    """
    if not text.endswith("\n") or text.endswith("\n\n") or text[:1].isspace():
        raise ValueError("yaml_block takes text with exactly one final newline and no leading space")
    pad = " " * indent
    return "|\n" + "".join(pad + line if line.strip() else "\n"
                            for line in text.splitlines(True)).rstrip("\n")


_ENV = _environment()


def render_template(name: str, **context: Any) -> str:
    try:
        return _ENV.get_template(name).render(**context)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{exc.filename}:{exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{_template_location(exc, name)}: {exc}") from None


def _template_location(exc: BaseException, name: str) -> str:
    # Jinja rewrites tracebacks so that template frames carry the template's file and line.
    tb = exc.__traceback__
    where = name
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.endswith(".j2"):
            where = f"{filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


@dataclass(frozen=True)
class Site:
    """Where the PXE server's HTTP side is reachable."""

    address: IPv4Address
    port: int = HTTP_PORT

    @property
    def base_url(self) -> str:
        return f"http://{self.address}:{self.port}"


def render(cluster: Cluster, out_root: Path, state_root: Path,
           site: Site | None = None) -> Path:
    """Write <out_root>/<cluster>/ whole; a failure leaves the previous output untouched."""
    site = site or Site(cluster.network.boot_server)
    secrets = secrets_mod.ensure(cluster, state_root)
    final = out_root / cluster.name
    files = render_files(cluster, secrets, site, previous=final)
    with atomic_path(final) as tmp:
        write_tree(tmp, files)
    return final


# A rendered tree: relative path -> (content, file mode). Rendering is pure; writing is I/O.
Files = dict[str, tuple[bytes, int]]
PRIVATE = 0o600  # what holds a node's private keys
PUBLIC = 0o644


def render_files(cluster: Cluster, secrets: secrets_mod.ClusterSecrets, site: Site, previous: Path) -> Files:
    files: Files = {"inventory.json": (cluster.to_json().encode(), PUBLIC)}
    facts = _Facts(cluster, secrets)
    shared = dict(cluster=cluster, secrets=secrets,
                  ssh_keys=[*cluster.ssh_authorized_keys, secrets.operator_ssh_public],
                  packages=service_packages(cluster), disabled_units=disabled_units(),
                  agent_url=f"{site.base_url}/images/clusterforge-agent.tar.gz")
    for index, node in enumerate(cluster.nodes):
        files.update(_node_files(node, facts.for_node(index), shared, previous / "nodes" / node.name))
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


class _Facts:
    """What a node's seed says about the cluster: the resolved inventory and generated public
    facts. Core nodes, which seed etcd, get every node; the others get the core nodes and
    themselves, so a seed stays small however large the cluster (the rest comes from etcd)."""

    def __init__(self, cluster: Cluster, secrets: secrets_mod.ClusterSecrets):
        self.base = cluster.to_dict()
        self.nodes = self.base.pop("nodes")
        self.core = [i for i, n in enumerate(cluster.nodes) if n.has(Role.CORE)]
        self.cluster = cluster
        self.secrets = secrets

    def for_node(self, index: int) -> str:
        if self.cluster.nodes[index].has(Role.CORE):
            chosen = list(range(len(self.nodes)))
        else:
            chosen = sorted({*self.core, index})
        nodes = [self.nodes[i] for i in chosen]
        facts = {**self.base, "nodes": nodes, "generated": {
            "ceph_fsid": self.secrets.ceph_fsid,
            "wireguard_public_keys": {n["name"]: self.secrets.nodes[n["name"]].wireguard_public
                                      for n in nodes},
        }}
        return json.dumps(facts, indent=2) + "\n"


def _node_files(node: Node, cluster_json: str, shared: dict[str, Any], previous: Path) -> Files:
    cluster: Cluster = shared["cluster"]
    context = dict(shared, node=node, fqdn=cluster.fqdn(node),
                   node_secrets=shared["secrets"].nodes[node.name], cluster_json=cluster_json,
                   identity_json=json.dumps({"cluster": cluster.name, "node": node.name}) + "\n")
    seed = {
        "user-data": render_template("user-data.j2", **context),
        "meta-data": render_template("meta-data.j2", **context),
        "network-config": render_template("network-config.j2", **context),
    }
    autoinstall = render_template("autoinstall.yaml.j2", **context, user_data=seed["user-data"],
                                  network_config=seed["network-config"])
    seed_bytes = {name: text.encode() for name, text in seed.items()}
    prefix = f"nodes/{node.name}/"
    return {
        prefix + "user-data": (seed_bytes["user-data"], PRIVATE),
        prefix + "meta-data": (seed_bytes["meta-data"], PUBLIC),
        prefix + "network-config": (seed_bytes["network-config"], PUBLIC),
        prefix + "seed.iso": (_seed_iso(seed_bytes, previous), PRIVATE),
        prefix + "autoinstall.yaml": (autoinstall.encode(), PRIVATE),
    }


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
        "pxe/dnsmasq.conf": (dnsmasq_conf(cluster, site, mode="dhcp").encode(), PUBLIC),
    }
    for node in cluster.nodes:
        script = render_template("node.ipxe.j2", **base, node=node, image_name=IMAGE_NAME,
                                 kernel_args=KERNEL_ARGS)
        files[f"pxe/mac/{node.mac_hyphen}.ipxe"] = (script.encode(), PUBLIC)
    return files


def dnsmasq_conf(cluster: Cluster, site: Site, mode: str) -> str:
    return render_template("dnsmasq.conf.j2", cluster=cluster, mode=mode,
                           pool=dhcp_pool(cluster, site),
                           boot_url=f"{site.base_url}/{cluster.name}/pxe/boot.ipxe")


def dhcp_pool(cluster: Cluster, site: Site) -> tuple[IPv4Address, IPv4Address]:
    """The longest run of free addresses in the subnet's top quarter: leases for machines
    not in the inventory, so they can boot the menu and be discovered."""
    net = cluster.network
    used = {int(a) for a in (net.gateway, net.vip, site.address, *(n.ip for n in cluster.nodes))}
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
    if best[1] < best[0]:  # a tiny, full subnet: any free address will do
        free = next((a for a in range(first, last + 1) if a not in used), last)
        best = (free, free)
    return IPv4Address(best[0]), IPv4Address(best[1])
