"""Render an inventory into every node's seed and the PXE server's files.

One strict Jinja2 environment; one template per kind of file, with role and
service conditionals inside. Output goes to a temporary directory swapped in
only when complete.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import jinja2

from . import secrets as secrets_mod
from .fsutil import atomic_path
from .inventory import HTTP_PORT, Cluster, Node, Role
from .packages import disabled_units, service_packages
from .seediso import write_seed_iso

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DIRS = (ROOT / "autoinstall", ROOT / "pxe")
IMAGE_NAME = "clusterforge-debian-12"
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
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "inventory.json").write_text(cluster.to_json())
        facts = _Facts(cluster, secrets)
        for index, node in enumerate(cluster.nodes):
            _render_node(tmp / "nodes" / node.name, final / "nodes" / node.name, cluster, node,
                         secrets, facts.for_node(index), site)
        _render_pxe(tmp / "pxe", cluster, site)
    return final


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


def _render_node(directory: Path, previous: Path, cluster: Cluster, node: Node,
                 secrets: secrets_mod.ClusterSecrets, cluster_json: str, site: Site) -> None:
    directory.mkdir(parents=True)
    ssh_keys = [*cluster.ssh_authorized_keys, secrets.operator_ssh_public]
    context = dict(cluster=cluster, node=node, fqdn=cluster.fqdn(node), ssh_keys=ssh_keys,
                   secrets=secrets, node_secrets=secrets.nodes[node.name],
                   cluster_json=cluster_json,
                   identity_json=json.dumps({"cluster": cluster.name, "node": node.name}) + "\n")
    files = {
        "user-data": render_template("user-data.j2", **context),
        "meta-data": render_template("meta-data.j2", **context),
        "network-config": render_template("network-config.j2", **context),
    }
    for name, text in files.items():
        path = directory / name
        path.write_text(text)
        path.chmod(0o600 if name == "user-data" else 0o644)  # user-data holds private keys
    _seed_iso(directory, previous, {k: v.encode() for k, v in files.items()})
    autoinstall = render_template(
        "autoinstall.yaml.j2", **context, user_data=files["user-data"],
        network_config=files["network-config"], packages=service_packages(cluster),
        disabled_units=disabled_units(),
        agent_url=f"{site.base_url}/images/clusterforge-agent.tar.gz")
    (directory / "autoinstall.yaml").write_text(autoinstall)
    (directory / "autoinstall.yaml").chmod(0o600)


def _seed_iso(directory: Path, previous: Path, files: dict[str, bytes]) -> None:
    """Build the node's seed ISO, or reuse the previous render's when its files are unchanged
    (the ISO is a pure function of them; building one costs about a millisecond)."""
    target = directory / "seed.iso"
    try:
        unchanged = all((previous / name).read_bytes() == data for name, data in files.items())
        if unchanged:
            os.link(previous / "seed.iso", target)
            return
    except OSError:
        pass
    write_seed_iso(target, files)
    target.chmod(0o600)


def _render_pxe(directory: Path, cluster: Cluster, site: Site) -> None:
    (directory / "mac").mkdir(parents=True)
    base = dict(cluster=cluster, base_url=site.base_url)
    (directory / "boot.ipxe").write_text(render_template("boot.ipxe.j2", **base))
    (directory / "menu.ipxe").write_text(render_template("menu.ipxe.j2", **base))
    for node in cluster.nodes:
        script = render_template("node.ipxe.j2", **base, node=node, image_name=IMAGE_NAME,
                                 kernel_args=KERNEL_ARGS)
        (directory / "mac" / f"{node.mac_hyphen}.ipxe").write_text(script)
    (directory / "dnsmasq.conf").write_text(dnsmasq_conf(cluster, site, mode="dhcp"))


def dnsmasq_conf(cluster: Cluster, site: Site, mode: str) -> str:
    return render_template("dnsmasq.conf.j2", cluster=cluster, mode=mode,
                           pool=dhcp_pool(cluster, site),
                           boot_url=f"{site.base_url}/{cluster.name}/pxe/boot.ipxe")


def dhcp_pool(cluster: Cluster, site: Site) -> tuple[IPv4Address, IPv4Address]:
    """The longest run of free addresses in the subnet's top quarter: leases for machines
    not in the inventory, so they can boot the menu and be discovered."""
    net = cluster.network
    used = {net.gateway, net.vip, site.address, *(n.ip for n in cluster.nodes)}
    hosts = list(net.subnet.hosts())
    best: list[IPv4Address] = []
    run: list[IPv4Address] = []
    for addr in hosts[len(hosts) * 3 // 4:]:
        if addr in used:
            run = []
            continue
        run.append(addr)
        if len(run) > len(best):
            best = list(run)
    if not best:  # a tiny, full subnet: any free address will do
        best = [a for a in hosts if a not in used][:1] or [hosts[-1]]
    return best[0], best[-1]
