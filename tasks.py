"""clusterforge tasks: `./forge <task>` (or `invoke <task>` inside .venv). Argument handling only."""

from __future__ import annotations

import json
import os
import sys

from invoke import Collection, task

from clusterforge import cli
from clusterforge import render as render_mod
from clusterforge.cli import user_errors
from clusterforge.paths import Paths

HELP = {"inventory": "inventory YAML (default examples/cluster.yaml)",
        "out": "output root (default dist/ of the repository)", "verbose": "show every command run",
        "state": "where cluster secrets are kept (default state/ of the repository)",
        "runs": "where VM run directories are kept (default runs/ of the repository)",
        "node": "the node's name", "cmd": "command to run instead of a shell (or put it after NODE)",
        "boot": "disk (default) or pxe", "timeout": "seconds to wait for guests to power off",
        "interface": "network interface to serve on (needs an address in the subnet)",
        "mode": "dhcp (isolated network) or proxy (beside an existing DHCP server); default: the inventory's "
                "network.pxe (dhcp when it is off)",
        "from_cluster": "the machines that booted from the running cluster's own PXE (asked over SSH)",
        "on_cluster": "on the running cluster's own PXE (over SSH), not the factory's pxe.serve",
        "os": "debian-12 (default, built from Debian packages) or ubuntu-24.04 (needs --iso)",
        "iso": "an Ubuntu 24.04 server ISO, for --os ubuntu-24.04",
        "rekey": "make a new cluster CA and reissue every node certificate (every node then needs its new seed)",
        "mac": "a MAC address that state/ keeps a name and address for"}
PATHS = ("out", "state", "runs")


def opts(*names: str) -> dict[str, str]:
    return {name: HELP[name] for name in names}


@task(help=opts("inventory", "out", "state", "rekey", "verbose"))
@user_errors
def render(c, inventory="", out="", state="", rekey=False, verbose=False):
    """Render every node's seed and iPXE script, and the dnsmasq config."""
    paths = Paths.resolve(out, state)
    cluster = cli.load(inventory, paths)
    print(cli.render_summary(cluster, render_mod.render(cluster, paths.out, paths.state, rekey=rekey)))


@task(help=opts("inventory", *PATHS, "verbose"))
@user_errors
def demo(c, inventory="", out="", state="", runs="", verbose=False):
    """The main job: render the example inventory, build the image, boot it as a QEMU cluster that
    forms itself, verify every service, and leave it running."""
    paths = Paths.resolve(out, state, runs)
    render(c, inventory=inventory, out=out, state=state, verbose=verbose)
    cli.print_artifacts(cli.build_image(paths))
    outcome = cli.verify(inventory, paths, keep=True)
    vms = cli.cluster_vms(inventory, paths)
    first = vms.cluster.nodes[0].name
    print(f"\nthe cluster is running{'' if outcome.ok else ' (NOT all healthy: see the report)'}:\n"
          f"  ./forge cluster.ssh {first}            a root shell on {first} (check-cluster, ceph -s, sinfo ...)\n"
          f"  ip netns exec {vms.net.netns} curl http://{vms.cluster.network.vip}/status   the status page\n"
          f"  ./forge cluster.down                stop it (logs: {vms.dir}/)")
    if not outcome.ok:
        raise SystemExit(1)


@task(help={**opts("inventory", *PATHS, "verbose"), "keep": "leave the cluster running afterwards",
            "faults": "then power off, cut off, pause and power-cycle nodes, timing each recovery"})
@user_errors
def verify(c, inventory="", out="", state="", runs="", keep=False, faults=False, verbose=False):
    """Boot the inventory as a QEMU cluster (or use the running one), wait for it to form, and check
    every service from inside the nodes; writes <out>/<cluster>/report/report.{json,html}."""
    if not cli.verify(inventory, Paths.resolve(out, state, runs), keep=keep, faults=faults).ok:
        raise SystemExit(1)


# ---------------------------------------------------------------- image factory

@task(help=opts("os", "iso", "out", "verbose"))
@user_errors
def image(c, os="debian-12", iso="", out="", verbose=False):
    """Build the generic node image: <out>/images/<name>.qcow2 and .raw (no-op when unchanged)."""
    paths = Paths.resolve(out)
    if os == "ubuntu-24.04":
        print(cli.build_ubuntu(iso, paths))
    elif os == "debian-12":
        cli.print_artifacts(cli.build_image(paths))
    else:
        raise cli.UserError(f"--os must be debian-12 or ubuntu-24.04, not '{os}'")


@task(help=opts("out", "verbose"))
@user_errors
def netboot(c, out="", verbose=False):
    """Build <out>/images/netboot/ (kernel, initrd, squashfs root) and the compressed raw image."""
    cli.print_artifacts(cli.build_netboot(Paths.resolve(out)))


@task(help=opts("inventory", "out", "state", "verbose"))
@user_errors
def iso(c, inventory="", out="", state="", verbose=False):
    """Build the installer ISO for the inventory (BIOS+UEFI, CD or USB stick)."""
    cli.print_artifacts(cli.build_installers(inventory, Paths.resolve(out, state)))


@task(help=opts("inventory", "out", "state", "verbose"))
@user_errors
def usb(c, inventory="", out="", state="", verbose=False):
    """Build the USB installer image for the inventory (write it to a stick with dd)."""
    cli.print_artifacts(cli.build_installers(inventory, Paths.resolve(out, state)))


@task(help={**opts("inventory", *PATHS, "verbose"),
            "no_verify": "publish without verifying (the manifest then says 'not verified')"})
@user_errors
def release(c, inventory="", out="", state="", runs="", no_verify=False, verbose=False):
    """Build everything, verify the image on the example cluster (with faults), and put it with its
    report, SHA256SUMS and manifest.json into <out>/release/<build-id>/."""
    print(cli.release(inventory, Paths.resolve(out, state, runs), verified=not no_verify))


# ---------------------------------------------------------------- pxe.* and state.*

@task(help=opts("interface", "inventory", "mode", *PATHS, "verbose"))
@user_errors
def serve(c, interface, inventory="", mode="", out="", state="", runs="", verbose=False):
    """Serve PXE on INTERFACE: dnsmasq (DHCP or proxy-DHCP, TFTP) and HTTP; Ctrl-C stops."""
    cli.pxe_server(inventory, interface, mode, Paths.resolve(out, state, runs)).serve()


@task(help=opts("inventory", "from_cluster", "state", "runs", "verbose"))
@user_errors
def discovered(c, inventory="", from_cluster=False, state="", runs="", verbose=False):
    """Machines that PXE-booted but are not in the inventory, as entries ready to paste."""
    print(cli.discovered(inventory, Paths.resolve(state=state, runs=runs), from_cluster)
          or "# no unknown machine has booted yet")


@task(help=opts("node", "inventory", "on_cluster", "state", "runs", "verbose"))
@user_errors
def reinstall(c, node, inventory="", on_cluster=False, state="", runs="", verbose=False):
    """Make a node install again on its next PXE boot (instead of booting its disk)."""
    print(cli.reinstall(inventory, node, Paths.resolve(state=state, runs=runs), on_cluster))


@task(help=opts("mac", "inventory", "state", "verbose"))
@user_errors
def forget(c, mac, inventory="", state="", verbose=False):
    """Release the name and address state/ keeps for a MAC that left the inventory."""
    print(cli.forget(inventory, mac, Paths.resolve(state=state)))


@task(help={"fast": "unit tests only", "all": "also the long VM tests (see README)",
            "k": "only tests matching this expression"})
def test(c, fast=False, all=False, k=""):
    """Run the test suite: unit tests, then the QEMU VM tests (unless --fast)."""
    args = [sys.executable, "-m", "pytest", "tests/unit" if fast else "tests"]
    if not fast:
        args += ["--durations=30"]  # where a CI run's time went, in its own output
    if all:
        args += ["--all"]
    if k:
        args += ["-k", k]
    os.execv(sys.executable, args)


# ---------------------------------------------------------------- cluster.*

@task(help=opts("inventory", "boot", *PATHS, "verbose"))
@user_errors
def up(c, inventory="", boot="disk", out="", state="", runs="", verbose=False):
    """Boot the inventory as a QEMU cluster (rendering its seeds) and wait until every node answers SSH."""
    timeline = cli.cluster_vms(inventory, Paths.resolve(out, state, runs), boot=boot, fresh=True).up()
    print(json.dumps(timeline, indent=2))


@task(help=opts("inventory", *PATHS, "verbose"))
@user_errors
def status(c, inventory="", out="", state="", runs="", verbose=False):
    """Each VM's run state (from QMP), uptime and the boot phase it reached."""
    for row in cli.cluster_vms(inventory, Paths.resolve(out, state, runs)).status():
        uptime = f"{row['uptime']}s" if row["uptime"] is not None else "-"
        print(f"{row['node']:<8} {row['ip']:<15} {row['state']:<10} up {uptime:<8} phase {row['phase'] or '-'}")


@task(help=opts("node", "cmd", "inventory", *PATHS, "verbose"))
@user_errors
def ssh(c, node, cmd="", inventory="", out="", state="", runs="", verbose=False):
    """SSH to a node with clusterforge's key: ./forge cluster.ssh NODE [COMMAND...]."""
    argv = cli.ssh_argv(cli.cluster_vms(inventory, Paths.resolve(out, state, runs)), node, cmd)
    os.execv(argv[0], argv)


@task(help=opts("node", "inventory", *PATHS, "verbose"))
@user_errors
def console(c, node, inventory="", out="", state="", runs="", verbose=False):
    """Attach to a node's serial console (Ctrl-] leaves)."""
    vms = cli.cluster_vms(inventory, Paths.resolve(out, state, runs))
    cli.attach_console(vms.machine(vms.nodes([node])[0]).console_socket)


@task(help=opts("inventory", "timeout", *PATHS, "verbose"))
@user_errors
def down(c, inventory="", timeout=120, out="", state="", runs="", verbose=False):
    """Power every node off (ACPI, then quit); nothing is left running."""
    cli.cluster_vms(inventory, Paths.resolve(out, state, runs)).down(timeout=float(timeout))


@task(help=opts("inventory", *PATHS, "verbose"))
@user_errors
def destroy(c, inventory="", out="", state="", runs="", verbose=False):
    """Power off and delete the cluster's disks and run directory."""
    cli.cluster_vms(inventory, Paths.resolve(out, state, runs)).destroy()


@task(name="kill", help=opts("node", "inventory", *PATHS, "verbose"))
@user_errors
def kill_(c, node, inventory="", out="", state="", runs="", verbose=False):
    """Hard power-off one node."""
    cli.cluster_vms(inventory, Paths.resolve(out, state, runs)).kill(node)


@task(help=opts("node", "inventory", *PATHS, "verbose"))
@user_errors
def start(c, node, inventory="", out="", state="", runs="", verbose=False):
    """Start one node again and wait until it answers SSH."""
    cli.cluster_vms(inventory, Paths.resolve(out, state, runs)).start(node)


@task(help=opts("node", "inventory", *PATHS, "verbose"))
@user_errors
def partition(c, node, inventory="", out="", state="", runs="", verbose=False):
    """Cut a node off the network (link down)."""
    cli.cluster_vms(inventory, Paths.resolve(out, state, runs)).set_link(node, up=False)


@task(help=opts("node", "inventory", *PATHS, "verbose"))
@user_errors
def heal(c, node, inventory="", out="", state="", runs="", verbose=False):
    """Reconnect a node (link up)."""
    cli.cluster_vms(inventory, Paths.resolve(out, state, runs)).set_link(node, up=True)


@task(help=opts("inventory", *PATHS, "verbose"))
@user_errors
def pause(c, inventory="", out="", state="", runs="", verbose=False):
    """Freeze every node (QMP stop)."""
    cli.cluster_vms(inventory, Paths.resolve(out, state, runs)).pause(True)


@task(help=opts("inventory", *PATHS, "verbose"))
@user_errors
def resume(c, inventory="", out="", state="", runs="", verbose=False):
    """Thaw every node (QMP cont)."""
    cli.cluster_vms(inventory, Paths.resolve(out, state, runs)).pause(False)


@task(help=opts("inventory", *PATHS, "verbose"))
@user_errors
def publish(c, inventory="", out="", state="", runs="", verbose=False):
    """Render and send what changed (inventory, new nodes' seeds, the image) to the running cluster's
    core nodes, which serve its own PXE; refuses what a running cluster cannot take in place."""
    if not cli.publish(inventory, Paths.resolve(out, state, runs)):
        raise SystemExit(1)


@task(help=opts("node", "inventory", *PATHS, "verbose"))
@user_errors
def remove(c, node, inventory="", out="", state="", runs="", verbose=False):
    """Take a non-core node out of the running cluster (delete it from the inventory first): drain it
    in SLURM, move its data to the other storage nodes, revoke its certificate, publish."""
    print("\n".join(cli.remove(inventory, node, Paths.resolve(out, state, runs))))


@task(help={**opts("node", "inventory", *PATHS, "verbose"), "mac": "the new machine's MAC"})
@user_errors
def replace(c, node, mac="", inventory="", out="", state="", runs="", verbose=False):
    """A new machine takes the place of a node whose machine is gone (same name and address): the old
    etcd member, monitor and OSDs retired, its certificate revoked, the inventory's MAC changed, published."""
    print("\n".join(cli.replace(inventory, node, mac, Paths.resolve(out, state, runs))))


@task(name="sync-agent", help=opts("inventory", *PATHS, "verbose"))
@user_errors
def sync_agent(c, inventory="", out="", state="", runs="", verbose=False):
    """Development aid: copy this checkout's node package into the running nodes, restart their agents."""
    print("agent updated on " + ", ".join(cli.sync_agent(inventory, Paths.resolve(out, state, runs))))


namespace = Collection(render, demo, verify, test, image, netboot, iso, usb, release)
namespace.add_collection(Collection("pxe", serve, discovered, reinstall))
namespace.add_collection(Collection("state", forget))
namespace.add_collection(Collection("cluster", up, status, ssh, console, down, destroy, kill_, start,
                                    partition, heal, pause, resume, publish, remove, replace, sync_agent))
