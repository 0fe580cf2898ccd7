"""What invoke tasks share: error reporting and the summaries they print."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import inventory, render
from .inventory import Cluster
from .log import UserError, human_bytes, set_verbose
from .run import CommandError

if TYPE_CHECKING:
    from .factory.pipeline import Artifacts
    from .pxe.server import PxeServer
    from .vm.cluster import ClusterVMs

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(task: F) -> F:
    """Print user errors and failed commands as a message and exit 1: never a traceback."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        set_verbose(bool(kwargs.get("verbose")))
        try:
            return task(*args, **kwargs)
        except (UserError, CommandError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted: nothing half-written was left in place", file=sys.stderr)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


DIST = Path("dist")
STATE = Path("state")
RUNS = Path("runs")
IMAGE = DIST / "images" / f"{render.IMAGE_NAME}.qcow2"


def load(path: str) -> Cluster:
    return inventory.load(path)


def cluster_vms(inventory_path: str, boot: str = "disk") -> ClusterVMs:
    """The inventory's QEMU cluster, with its seeds freshly rendered (rendering is idempotent)."""
    from .vm.cluster import ClusterVMs

    if boot not in ("disk", "pxe"):
        raise UserError(f"--boot must be disk or pxe, not '{boot}'")
    cluster = load(inventory_path)
    seeds = render.render(cluster, DIST, STATE)
    return ClusterVMs(cluster, IMAGE, seeds, STATE, RUNS, boot=boot)


def build_image() -> Artifacts:
    from .factory.context import BuildContext
    from .factory.pipeline import build_image

    return build_image(BuildContext.create())


def build_ubuntu(iso: str) -> Path:
    from .factory.context import BuildContext
    from .factory.ubuntu import build_ubuntu_qcow2

    if not iso:
        raise UserError("--os ubuntu-24.04 installs from an Ubuntu ISO", hint="pass --iso PATH")
    return build_ubuntu_qcow2(BuildContext.create(), Path(iso))


def build_netboot() -> Artifacts:
    from .factory.context import BuildContext
    from .factory.pipeline import build_netboot_files

    return build_netboot_files(BuildContext.create())


def build_installers(inventory_path: str) -> Artifacts:
    from .factory.context import BuildContext
    from .factory.pipeline import build_installers

    cluster = load(inventory_path)
    return build_installers(BuildContext.create(), cluster, render.render(cluster, DIST, STATE))


def release(inventory_path: str) -> Path:
    from .factory.context import BuildContext
    from .factory.release import make_release

    cluster = load(inventory_path)
    artifacts = build_installers(inventory_path)
    return make_release(BuildContext.create(), cluster, artifacts)


def pxe_server(inventory_path: str, interface: str, mode: str) -> PxeServer:
    from .pxe.server import PxeServer

    return PxeServer(load(inventory_path), interface, mode, DIST, STATE, RUNS)


def discovered(inventory_path: str) -> str:
    from .pxe.discovery import Discoveries

    return Discoveries(STATE, load(inventory_path)).as_inventory()


def reinstall(inventory_path: str, node_name: str) -> None:
    from .pxe.http import Installed

    cluster = load(inventory_path)
    try:
        node = cluster.node(node_name)
    except KeyError:
        names = ", ".join(n.name for n in cluster.nodes)
        raise UserError(f"no node named '{node_name}'", hint=f"nodes: {names}") from None
    Installed(STATE / cluster.name / "pxe-installed.json").remove(node.mac_hyphen)


def print_artifacts(artifacts: Artifacts) -> None:
    for name, path in vars(artifacts).items():
        if path is None:
            continue
        size = sum(p.stat().st_blocks * 512 for p in ([path] if path.is_file() else path.rglob("*")))
        print(f"{name:<8} {path}  ({human_bytes(size)} on disk)")


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


def render_summary(cluster: Cluster, out: Path) -> str:
    lines = [f"cluster {cluster.name} ({cluster.domain}, {cluster.os}) rendered to {out}/",
             f"  {'node':<8} {'mac':<18} {'ip':<15} {'overlay':<15} {'boot':<9} roles"]
    for n in cluster.nodes:
        lines.append(f"  {n.name:<8} {n.mac:<18} {str(n.ip):<15} {str(n.overlay_ip):<15} "
                     f"{n.boot:<9} {','.join(n.roles)}")
    files = [p for p in sorted(out.rglob("*")) if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    services = [s for s in ("etcd", "ceph", "wireguard", "slurm", "k3s")
                if getattr(cluster.services, s)]
    lines.append(f"  services: {', '.join(services)}")
    lines.append(f"  {len(files)} files, {human_bytes(total)}: inventory.json, "
                 "nodes/<name>/{user-data,meta-data,network-config,seed.iso,autoinstall.yaml}, "
                 "pxe/{boot.ipxe,menu.ipxe,mac/*.ipxe,dnsmasq.conf}")
    return "\n".join(lines)
