"""clusterforge tasks: `./forge <task>` (or `invoke <task>` inside .venv). Argument handling only."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from invoke import Collection, task

from clusterforge import cli
from clusterforge import render as render_mod
from clusterforge.cli import user_errors

INVENTORY = "examples/cluster.yaml"
HELP = {"inventory": "inventory YAML (default examples/cluster.yaml)",
        "out": "output root (default dist/)", "verbose": "show every command run",
        "state": "where cluster secrets are kept (default state/)", "node": "the node's name",
        "cmd": "command to run instead of a shell", "boot": "disk (default) or pxe",
        "timeout": "seconds to wait for guests to power off",
        "interface": "network interface to serve on (needs an address in the subnet)",
        "mode": "dhcp (isolated network, default) or proxy (beside an existing DHCP server)",
        "os": "debian-12 (default, built from Debian packages) or ubuntu-24.04 (needs --iso)",
        "iso": "an Ubuntu 24.04 server ISO, for --os ubuntu-24.04"}


def opts(*names: str) -> dict[str, str]:
    return {name: HELP[name] for name in names}


@task(help=opts("inventory", "out", "state", "verbose"))
@user_errors
def render(c, inventory=INVENTORY, out="dist", state="state", verbose=False):
    """Render every node's seed, autoinstall and iPXE script, and the dnsmasq config."""
    cluster = cli.load(inventory)
    target = render_mod.render(cluster, Path(out), Path(state))
    print(cli.render_summary(cluster, target))


@task(help=opts("inventory", "verbose"))
@user_errors
def demo(c, inventory=INVENTORY, verbose=False):
    """The main job on the example inventory: render it, build the image, boot it as a QEMU cluster."""
    render(c, inventory=inventory, verbose=verbose)
    cli.print_artifacts(cli.build_image())
    vms = cli.cluster_vms(inventory)
    timeline = vms.up()
    for name, phases in timeline.items():
        print(f"{name}: " + "  ".join(f"{phase} {t:.0f}s" for phase, t in phases.items()))
    print(f"\nthe cluster is running: ./forge cluster.status | cluster.ssh s1 | cluster.console s1\n"
          f"stop it with ./forge cluster.down (logs: {vms.dir}/)")


# ---------------------------------------------------------------- image factory

@task(help=opts("os", "iso", "verbose"))
@user_errors
def image(c, os="debian-12", iso="", verbose=False):
    """Build the generic node image: dist/images/<name>.qcow2 and .raw (no-op when unchanged)."""
    if os == "ubuntu-24.04":
        print(cli.build_ubuntu(iso))
    elif os == "debian-12":
        cli.print_artifacts(cli.build_image())
    else:
        raise cli.UserError(f"--os must be debian-12 or ubuntu-24.04, not '{os}'")


@task(help=opts("verbose"))
@user_errors
def netboot(c, verbose=False):
    """Build dist/images/netboot/ (kernel, initrd, squashfs root) and the compressed raw image."""
    cli.print_artifacts(cli.build_netboot())


@task(help=opts("inventory", "verbose"))
@user_errors
def iso(c, inventory=INVENTORY, verbose=False):
    """Build the installer ISO for the inventory (BIOS+UEFI, CD or USB stick)."""
    cli.print_artifacts(cli.build_installers(inventory))


@task(help=opts("inventory", "verbose"))
@user_errors
def usb(c, inventory=INVENTORY, verbose=False):
    """Build the USB installer image for the inventory (write it to a stick with dd)."""
    cli.print_artifacts(cli.build_installers(inventory))


@task(help=opts("inventory", "verbose"))
@user_errors
def release(c, inventory=INVENTORY, verbose=False):
    """Build everything and put it with SHA256SUMS and manifest.json into dist/release/<build-id>/."""
    print(cli.release(inventory))


# ---------------------------------------------------------------- pxe.*

@task(help=opts("inventory", "interface", "mode", "verbose"))
@user_errors
def serve(c, interface, inventory=INVENTORY, mode="dhcp", verbose=False):
    """Serve PXE on INTERFACE: dnsmasq (DHCP or proxy-DHCP, TFTP) and HTTP; Ctrl-C stops."""
    cli.pxe_server(inventory, interface, mode).serve()


@task(help=opts("inventory", "verbose"))
@user_errors
def discovered(c, inventory=INVENTORY, verbose=False):
    """Machines that PXE-booted but are not in the inventory, as entries ready to paste."""
    print(cli.discovered(inventory) or "# no unknown machine has booted yet")


@task(help=opts("node", "inventory", "verbose"))
@user_errors
def reinstall(c, node, inventory=INVENTORY, verbose=False):
    """Make a node install again on its next PXE boot (instead of booting its disk)."""
    cli.reinstall(inventory, node)


@task(help={"fast": "unit tests only", "k": "only tests matching this expression"})
def test(c, fast=False, k=""):
    """Run the test suite: unit tests, then the QEMU VM tests (unless --fast)."""
    args = [sys.executable, "-m", "pytest", "tests/unit" if fast else "tests"]
    if k:
        args += ["-k", k]
    os.execv(sys.executable, args)


# ---------------------------------------------------------------- cluster.*

@task(help=opts("inventory", "boot", "verbose"))
@user_errors
def up(c, inventory=INVENTORY, boot="disk", verbose=False):
    """Boot the inventory as a QEMU cluster and wait until every node answers SSH."""
    timeline = cli.cluster_vms(inventory, boot=boot).up()
    print(json.dumps(timeline, indent=2))


@task(help=opts("inventory", "verbose"))
@user_errors
def status(c, inventory=INVENTORY, verbose=False):
    """Each VM's run state (from QMP), uptime and the boot phase it reached."""
    for row in cli.cluster_vms(inventory).status():
        uptime = f"{row['uptime']}s" if row["uptime"] is not None else "-"
        print(f"{row['node']:<8} {row['ip']:<15} {row['state']:<10} up {uptime:<8} phase {row['phase'] or '-'}")


@task(help=opts("node", "cmd", "inventory", "verbose"))
@user_errors
def ssh(c, node, cmd="", inventory=INVENTORY, verbose=False):
    """SSH to a node (with clusterforge's key), or run CMD there."""
    vms = cli.cluster_vms(inventory)
    target = vms.ssh(vms.nodes([node])[0])
    os.execv(target.argv(cmd)[0], target.argv(cmd, tty=not cmd))


@task(help=opts("node", "inventory", "verbose"))
@user_errors
def console(c, node, inventory=INVENTORY, verbose=False):
    """Attach to a node's serial console (Ctrl-] leaves)."""
    vms = cli.cluster_vms(inventory)
    cli.attach_console(vms.machine(vms.nodes([node])[0]).console_socket)


@task(help=opts("inventory", "timeout", "verbose"))
@user_errors
def down(c, inventory=INVENTORY, timeout=120, verbose=False):
    """Power every node off (ACPI, then quit); nothing is left running."""
    cli.cluster_vms(inventory).down(timeout=float(timeout))


@task(help=opts("inventory", "verbose"))
@user_errors
def destroy(c, inventory=INVENTORY, verbose=False):
    """Power off and delete the cluster's disks and run directory."""
    cli.cluster_vms(inventory).destroy()


@task(name="kill", help=opts("node", "inventory", "verbose"))
@user_errors
def kill_(c, node, inventory=INVENTORY, verbose=False):
    """Hard power-off one node."""
    cli.cluster_vms(inventory).kill(node)


@task(help=opts("node", "inventory", "verbose"))
@user_errors
def start(c, node, inventory=INVENTORY, verbose=False):
    """Start one node again and wait until it answers SSH."""
    cli.cluster_vms(inventory).start(node)


@task(help=opts("node", "inventory", "verbose"))
@user_errors
def partition(c, node, inventory=INVENTORY, verbose=False):
    """Cut a node off the network (link down)."""
    cli.cluster_vms(inventory).set_link(node, up=False)


@task(help=opts("node", "inventory", "verbose"))
@user_errors
def heal(c, node, inventory=INVENTORY, verbose=False):
    """Reconnect a node (link up)."""
    cli.cluster_vms(inventory).set_link(node, up=True)


@task(help=opts("inventory", "verbose"))
@user_errors
def pause(c, inventory=INVENTORY, verbose=False):
    """Freeze every node (QMP stop)."""
    cli.cluster_vms(inventory).pause(True)


@task(help=opts("inventory", "verbose"))
@user_errors
def resume(c, inventory=INVENTORY, verbose=False):
    """Thaw every node (QMP cont)."""
    cli.cluster_vms(inventory).pause(False)


namespace = Collection(render, demo, test, image, netboot, iso, usb, release)
namespace.add_collection(Collection("pxe", serve, discovered, reinstall))
namespace.add_collection(Collection("cluster", up, status, ssh, console, down, destroy, kill_, start,
                                    partition, heal, pause, resume))
