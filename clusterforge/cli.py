"""What invoke tasks share: error reporting, loading, and the summaries they print."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import identity, render
from . import inventory as inventory_mod
from . import secrets as secrets_mod
from .inventory import Cluster
from .log import UserError, die, human_bytes, set_verbose
from .paths import DEFAULT_INVENTORY, Paths, user_path
from .run import CommandError

if TYPE_CHECKING:
    from .factory.pipeline import Artifacts
    from .pxe.server import PxeServer
    from .vm.cluster import ClusterVMs

F = TypeVar("F", bound=Callable[..., Any])


def user_facing() -> tuple[type[Exception], ...]:
    """The errors printed as a message: a machine's names its logs. The VM layer is imported
    only by the commands that use it; when it was not, none of its errors can be raised."""
    machine = sys.modules.get(f"{__package__}.vm.machine")
    return (UserError, CommandError, TimeoutError, *((machine.MachineError,) if machine else ()))


def user_errors(task: F) -> F:
    """Print user errors and failed commands as a message and exit 1: never a traceback."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        set_verbose(bool(kwargs.get("verbose")))
        try:
            return task(*args, **kwargs)
        except user_facing() as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted: nothing half-written was left in place", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def load(inventory: str, paths: Paths) -> Cluster:
    """The inventory, with the names and addresses its nodes were given before (read only)."""
    return inventory_mod.load(user_path(inventory, DEFAULT_INVENTORY), state=paths.state)


def image_path(cluster: Cluster, paths: Paths) -> Path:
    return paths.images / f"{cluster.image_name}.qcow2"


def cluster_vms(inventory: str, paths: Paths, boot: str = "disk", fresh: bool = False) -> ClusterVMs:
    """The inventory's QEMU cluster. fresh=True renders its seeds first (idempotent); the
    other commands only read what is there and create nothing."""
    from .vm.cluster import ClusterVMs

    if boot not in ("disk", "pxe"):
        raise UserError(f"--boot must be disk or pxe, not '{boot}'")
    cluster = load(inventory, paths)
    if fresh:
        render.render(cluster, paths.out, paths.state)
    return ClusterVMs(cluster, image_path(cluster, paths), paths, boot=boot)


def build_context(paths: Paths) -> Any:
    from .factory.context import BuildContext

    return BuildContext.create(out=paths.out)


def build_image(paths: Paths) -> Artifacts:
    from .factory.pipeline import build_image

    return build_image(build_context(paths))


def build_ubuntu(iso: str, paths: Paths) -> Path:
    from .factory.ubuntu import build_ubuntu_qcow2

    if not iso:
        raise UserError("--os ubuntu-24.04 installs from an Ubuntu ISO", hint="pass --iso PATH")
    return build_ubuntu_qcow2(build_context(paths), user_path(iso))


def build_netboot(paths: Paths) -> Artifacts:
    from .factory.pipeline import build_netboot_files

    return build_netboot_files(build_context(paths))


def debian_only(cluster: Cluster, what: str) -> None:
    if cluster.os != inventory_mod.OS.DEBIAN_12:
        die(f"{what} is built from the Debian image; cluster {cluster.name} has os: {cluster.os}",
            hint="Ubuntu nodes install with Ubuntu's installer and their nodes/<name>/autoinstall.yaml")


def build_installers(inventory: str, paths: Paths) -> Artifacts:
    from .factory.pipeline import build_installers

    cluster = load(inventory, paths)
    debian_only(cluster, "the installer ISO and USB image")
    rendered = render.render(cluster, paths.out, paths.state).path
    return build_installers(build_context(paths), cluster, rendered)


def release(inventory: str, paths: Paths, verified: bool = True) -> Path:
    """The release, after its image has passed `verify --faults` on the example cluster;
    nothing is published when it fails."""
    from .factory.release import make_release

    artifacts = build_installers(inventory, paths)
    proof = None
    if verified:
        outcome = verify(str(DEFAULT_INVENTORY), paths, keep=False, faults=True)
        if not outcome.ok:
            die("the image failed its verification: nothing was published",
                hint=f"the report: {outcome.html}")
        proof = (outcome.json, outcome.html)
    return make_release(build_context(paths), load(inventory, paths), artifacts, proof)


def pxe_server(inventory: str, interface: str, mode: str, paths: Paths) -> PxeServer:
    from .pxe.server import PxeServer

    cluster = load(inventory, paths)
    debian_only(cluster, "network booting")
    return PxeServer(cluster, interface, mode or str(render.served_mode(cluster)), paths)


def discovered(inventory: str, paths: Paths, from_cluster: bool = False) -> str:
    from .pxe.discovery import Discoveries, listing

    cluster = load(inventory, paths)
    if not from_cluster:
        return Discoveries(paths.cluster_state(cluster.name), cluster).as_inventory()
    from .node.agent.pxe import DISCOVERED
    from .publish import first_answer

    text = first_answer(cluster, paths, f"etcdctl get --prefix {DISCOVERED} -w json")
    return listing(etcd_records(text, DISCOVERED), (n.mac for n in cluster.nodes))


def etcd_records(text: str, prefix: str) -> dict[str, dict[str, str]]:
    """`etcdctl get --prefix P -w json` as MAC -> record, checked as the PXE servers check a report."""
    import base64
    import json

    from .node.pxeserve import sanitized

    try:
        kvs = json.loads(text).get("kvs", [])
        records = {}
        for kv in kvs:
            key = base64.b64decode(kv["key"]).decode(errors="replace")
            try:
                records[key.removeprefix(prefix)] = json.loads(base64.b64decode(kv.get("value", "")))
            except ValueError:
                continue  # a record nobody can read is no machine to list
    except (ValueError, TypeError, KeyError, AttributeError):
        die("etcdctl's answer cannot be read", hint="run it by hand on a core node: "
                                                   f"etcdctl get --prefix {prefix} -w json")
    return sanitized(records)


def reinstall(inventory: str, node_name: str, paths: Paths, on_cluster: bool = False) -> str:
    from .pxe.http import Installed

    cluster = load(inventory, paths)
    node = find_node(cluster, node_name)
    if on_cluster:
        from .node.agent.pxe import INSTALLED
        from .publish import first_answer

        deleted = first_answer(cluster, paths, f"etcdctl del {INSTALLED}{node.mac_hyphen}").strip()
        if deleted == "0":
            return f"{node.name} is not marked installed on the cluster: it installs on its next network boot"
        return f"{node.name} installs again on its next network boot from the cluster"
    installed = Installed(paths.cluster_state(cluster.name))
    if node.mac_hyphen not in installed.all():  # nothing to undo: write nothing
        return f"{node.name} is not marked installed: it installs on its next network boot"
    installed.remove(node.mac_hyphen)
    return f"{node.name} installs again on its next network boot"


def publish(inventory: str, paths: Paths) -> bool:
    """Print what was sent to each core node; False when a core node missed it."""
    from .publish import publish as publish_to

    cluster = load(inventory, paths)
    debian_only(cluster, "the cluster's own network boot")
    published = publish_to(cluster, paths)
    print("\n".join(published.lines))
    return not published.missed


def remove(inventory: str, name: str, paths: Paths) -> list[str]:
    from .membership import remove as remove_node

    cluster = load(inventory, paths)
    debian_only(cluster, "cluster.remove")
    return remove_node(cluster, name, paths)


def replace(inventory: str, name: str, mac_text: str, paths: Paths) -> list[str]:
    from .membership import replace as replace_node

    if not mac_text:
        raise UserError("cluster.replace needs the new machine's MAC", hint="--mac 52:54:00:12:34:56")
    mac = parse_mac_argument(mac_text)
    cluster = load(inventory, paths)
    debian_only(cluster, "cluster.replace")
    return replace_node(cluster, name, mac, paths)


def find_node(cluster: Cluster, name: str) -> inventory_mod.Node:
    try:
        return cluster.node(name)
    except KeyError:
        names = ", ".join(n.name for n in cluster.nodes)
        raise UserError(f"no node named '{name}' in cluster {cluster.name}", hint=f"nodes: {names}") from None


def parse_mac_argument(text: str) -> str:
    from .yamlsource import Field, Value

    try:
        return inventory_mod.parse_mac(Value(text, Field(Path("MAC"), 1, "")))
    except UserError as exc:  # the argument has no file and line to name
        raise UserError(exc.message.removeprefix("MAC:1: "), exc.hint) from None


def forget(inventory: str, mac_text: str, paths: Paths) -> str:
    """Release the name and address kept for a MAC that is no longer in the inventory."""
    mac = parse_mac_argument(mac_text)
    # The inventory as it will be once the record is gone: a pin refused because the record
    # holds its name must not stop the command that releases it.
    cluster = inventory_mod.load(user_path(inventory, DEFAULT_INVENTORY), state=paths.state, forgetting=mac)
    state = paths.cluster_state(cluster.name)
    if any(n.mac == mac for n in cluster.nodes):
        die(f"{mac} is node {next(n.name for n in cluster.nodes if n.mac == mac)} of the inventory",
            hint="remove it from the inventory first")
    kept = identity.Records.read(state).by_mac
    if mac not in kept:  # checked before locking, which would create state/
        absent = [m for m in kept if m not in {n.mac for n in cluster.nodes}]
        die(f"{state} keeps nothing for {mac}",
            hint=f"it keeps these MACs that left the inventory: {', '.join(absent)}" if absent else None)
    with secrets_mod.locked(state):
        records = identity.Records.read(state)
        record = records.by_mac[mac]
        records.forget(mac)
        secrets_mod.forget_node(state, mac.replace(":", "-"), record.name, "state.forget")
    return (f"released {record.name} ({record.ip}), kept for {mac}; its keys are deleted and its certificate "
            "revoked (the next cluster.publish tells a running cluster)")


def verify(inventory: str, paths: Paths, keep: bool, faults: bool = False) -> Any:
    """Boot (or reuse) the inventory's QEMU cluster and check every service; the Outcome."""
    from .verify.run import verify as run_verify

    vms = cluster_vms(inventory, paths, fresh=True)
    outcome = run_verify(vms, paths.rendered(vms.cluster.name) / render.REPORT_DIR, keep=keep, faults=faults)
    print(f"report: {outcome.html}\n        {outcome.json}")
    return outcome


def sync_agent(inventory: str, paths: Paths) -> list[str]:
    """Lay the node package and overlays of this checkout into the running nodes and restart
    their agents: an agent change tried in a minute, not after an image rebuild (a
    development aid; the image still carries what it was built with)."""
    import base64

    from .factory.payload import payload_bytes

    vms = cluster_vms(inventory, paths)
    encoded = base64.b64encode(payload_bytes()).decode()
    script = ('set -e; t=$(mktemp -d); base64 -d > "$t/p.tar"; '
              'CLUSTERFORGE_PAYLOAD="$t/p.tar" sh -c "$(tar -xOf "$t/p.tar" provision/10-clusterforge.sh)"; '
              'rm -rf "$t"; systemctl restart clusterforge-agent.service')
    done = []
    for node in vms.nodes():
        if not vms.machine(node).running:
            continue
        vms.ssh(node).run(script, input=encoded, timeout=300)
        done.append(node.name)
    if not done:
        die(f"no node of cluster {vms.cluster.name} is running", hint="./forge cluster.up")
    return done


def print_artifacts(artifacts: Artifacts) -> None:
    for name, path in vars(artifacts).items():
        if path is None:
            continue
        size = sum(p.stat().st_blocks * 512 for p in ([path] if path.is_file() else path.rglob("*")))
        print(f"{name:<8} {path}  ({human_bytes(size)} on disk)")


def render_summary(cluster: Cluster, rendered: render.Rendered) -> str:
    out = rendered.path
    changes = rendered.changes
    lines = [f"cluster {cluster.name} ({cluster.domain}, {cluster.os}) rendered to {out}/",
             f"  {'node':<8} {'mac':<18} {'ip':<15} {'overlay':<15} {'boot':<9} roles"]
    for n in cluster.nodes:
        mark = "  (new)" if n.name in changes.new else ""
        lines.append(f"  {n.name:<8} {n.mac:<18} {str(n.ip):<15} {str(n.overlay_ip):<15} "
                     f"{n.boot:<9} {','.join(n.roles)}{mark}")
    for change in changes.moved:
        lines.append(f"  changed: {change}")
    reissued = [name for name in rendered.reissued if name not in changes.new]
    if reissued:
        lines.append(f"  certificates reissued: {', '.join(reissued)} (these nodes need their new seed)")
    for orphan in changes.orphans:
        lines.append(f"  kept in state, not in the inventory: {orphan}; release with ./forge state.forget MAC")
    files = [p for p in sorted(out.rglob("*")) if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    lines.append(f"  services: {', '.join(str(s) for s in cluster.services.on())}")
    lines.append(f"  {len(files)} files, {human_bytes(total)}: inventory.json, "
                 "nodes/<name>/{user-data,meta-data,network-config,seed.iso}, "
                 "pxe/{boot.ipxe,menu.ipxe,mac/*.ipxe,dnsmasq.conf}")
    return "\n".join(lines)


def ssh_argv(vms: ClusterVMs, node_name: str, command: str) -> list[str]:
    node = vms.nodes([node_name])[0]
    target = vms.ssh(node)
    if vms.machine(node).pid() is None:
        die(f"{node.name} is not running (no QEMU process in {vms.dir / node.name})",
            hint="./forge cluster.status shows the nodes; ./forge cluster.up boots the cluster")
    if not target.key.exists():
        die(f"no SSH key at {target.key}", hint="boot the cluster first: ./forge cluster.up")
    return target.argv(command, tty=not command and os.isatty(sys.stdin.fileno()))


def attach_console(socket_path: Path) -> None:
    """Relay the terminal to a serial console socket until Ctrl-] is typed."""
    import select
    import socket
    import termios
    import tty

    if not socket_path.exists():
        raise UserError(f"no console at {socket_path}", hint="is the node running? ./forge cluster.status")
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(socket_path))
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    print("connected; Ctrl-] leaves", file=sys.stderr)
    try:
        if saved is not None:
            tty.setraw(stdin)
        while True:
            ready, _, _ = select.select([sock, stdin], [], [])
            if sock in ready:
                data = sock.recv(4096)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if stdin in ready:
                data = os.read(stdin, 1024)
                if not data or b"\x1d" in data:
                    break
                sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        sock.close()
