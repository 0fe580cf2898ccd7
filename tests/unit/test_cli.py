"""The README's commands, run the way a user types them: `./forge <task> ...` in a shell.

Every test runs the repository's own ./forge script, from a directory of its own, with
--out, --state and --runs in temporary directories, except where a test is about the
defaults; those check that nothing new is left in the repository's dist/, state/, runs/.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterforge import cli
from clusterforge.forge import UsageError, rewrite
from clusterforge.paths import Paths

from .conftest import KEY, REPO, write_inventory

FORGE = REPO / "forge"
DEFAULTS = ("dist", "state", "runs")

LAB = f"""
cluster: {{name: lab}}
network: {{subnet: 10.0.0.0/24}}
access:
  ssh_authorized_keys: ["{KEY}"]
services: {{etcd: true, ceph: false, wireguard: true, slurm: true}}
nodes:
  - {{mac: "52:54:00:00:00:11", roles: [core]}}
  - {{mac: "52:54:00:00:00:12", roles: [core]}}
  - {{mac: "52:54:00:00:00:13", roles: [core]}}
  - {{mac: "52:54:00:00:00:51", roles: [compute]}}
"""


def forge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # FORGE_CWD from an outer ./forge (`./forge test`) must not stand in for this command's cwd.
    env = {k: v for k, v in os.environ.items() if k != "FORGE_CWD"}
    return subprocess.run([str(FORGE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def snapshot(root: Path) -> set[str]:
    """Every path under root, to see what a command created (contents may change under a running build)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@pytest.fixture
def defaults_untouched() -> Iterator[None]:
    """For tests of the defaults: no new file or folder in the repository's dist/, state/, runs/."""
    before = {name: (REPO / name).exists() for name in DEFAULTS}
    state_before = snapshot(REPO / "state")
    runs_before = snapshot(REPO / "runs")
    lab_before = snapshot(REPO / "dist" / "lab")
    yield
    for name, existed in before.items():
        assert existed or not (REPO / name).exists(), f"{REPO / name} was created"
    assert snapshot(REPO / "state") == state_before
    assert snapshot(REPO / "runs") == runs_before
    assert snapshot(REPO / "dist" / "lab") == lab_before


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    """A scratch inventory, lab.yaml, in a directory of its own (the user's cwd)."""
    write_inventory(tmp_path, LAB, "lab.yaml")
    return tmp_path


# ---------------------------------------------------------------- ./forge itself

def test_forge_lists_the_tasks(tmp_path: Path) -> None:
    proc = forge("--list", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("render", "demo", "test", "image", "netboot", "iso", "usb", "release", "pxe.serve",
                 "pxe.discovered", "pxe.reinstall", "state.forget", "cluster.up", "cluster.status",
                 "cluster.ssh", "cluster.console", "cluster.kill", "cluster.start", "cluster.partition",
                 "cluster.heal", "cluster.pause", "cluster.resume", "cluster.down", "cluster.destroy",
                 "cluster.publish"):
        assert f"  {name} " in proc.stdout or proc.stdout.rstrip().endswith(f"  {name}"), name
    assert "installing" not in proc.stderr  # installed once: nothing to install again


# ---------------------------------------------------------------- render

def test_render_resolves_paths_against_the_users_directory(lab: Path, defaults_untouched: None) -> None:
    proc = forge("render", "--inventory", "lab.yaml", "--out", "out", "--state", "st", cwd=lab)
    assert proc.returncode == 0, proc.stderr
    assert f"cluster lab (lab.internal, debian-12) rendered to {lab}/out/lab/" in proc.stdout
    assert "c1       52:54:00:00:00:51  10.0.0.51       10.99.0.51      install   compute  (new)" in proc.stdout
    assert (lab / "out/lab/nodes/s1/seed.iso").is_file()
    assert (lab / "out/lab/pxe/mac/52-54-00-00-00-51.ipxe").is_file()
    assert json.loads((lab / "st/lab/nodes.json").read_text())["nodes"]["52:54:00:00:00:51"] == {
        "name": "c1", "ip": "10.0.0.51"}
    assert (lab / "st/lab/ssh/id_ed25519").is_file()

    again = forge("render", "--inventory", "lab.yaml", "--out", "out", "--state", "st", cwd=lab)
    assert again.returncode == 0, again.stderr
    assert "(new)" not in again.stdout and "reissued" not in again.stdout


def test_render_of_the_example_prints_its_summary(tmp_path: Path) -> None:
    proc = forge("render", "--out", str(tmp_path / "dist"), "--state", str(tmp_path / "state"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "cluster lab (lab.internal, debian-12)" in proc.stdout
    assert "s3       52:54:00:00:00:13" in proc.stdout
    assert (tmp_path / "dist/lab/nodes/s3/seed.iso").is_file()


def test_bad_inventory_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    bad = write_inventory(tmp_path, """
        cluster:
          name: lab
          nmae: x
        """)
    proc = forge("render", "--inventory", bad.name, "--out", "dist", "--state", "state", cwd=tmp_path)
    assert proc.returncode == 1
    assert f"error: {bad}:3: cluster.nmae: unknown key 'nmae'" in proc.stderr
    assert "hint: did you mean 'name'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "dist").exists()


def test_render_refuses_a_pin_on_another_nodes_name(lab: Path) -> None:
    assert forge("render", "--inventory", "lab.yaml", "--out", "out", "--state", "st", cwd=lab).returncode == 0
    text = (lab / "lab.yaml").read_text() + '  - {mac: "52:54:00:00:00:52", roles: [compute], name: s1}\n'
    (lab / "lab.yaml").write_text(text)
    proc = forge("render", "--inventory", "lab.yaml", "--out", "out", "--state", "st", cwd=lab)
    assert proc.returncode == 1
    assert (f"error: {lab}/lab.yaml:11: nodes[4].name: name 's1' is nodes[0] (52:54:00:00:00:11, line 7)'s"
            in proc.stderr), proc.stderr


# ---------------------------------------------------------------- state.forget

def test_state_forget(lab: Path) -> None:
    args = ("--inventory", "lab.yaml", "--state", "st")
    assert forge("render", *args, "--out", "out", cwd=lab).returncode == 0
    proc = forge("state.forget", "52:54:00:00:00:51", *args, cwd=lab)
    assert proc.returncode == 1
    assert "error: 52:54:00:00:00:51 is node c1 of the inventory" in proc.stderr

    text = (lab / "lab.yaml").read_text().replace('  - {mac: "52:54:00:00:00:51", roles: [compute]}\n',
                                                  '  - {mac: "52:54:00:00:00:52", roles: [compute]}\n')
    (lab / "lab.yaml").write_text(text)
    rendered = forge("render", *args, "--out", "out", cwd=lab)
    assert "c2       52:54:00:00:00:52" in rendered.stdout
    assert "kept in state, not in the inventory: 52:54:00:00:00:51 (c1, 10.0.0.51)" in rendered.stdout

    proc = forge("state.forget", "52-54-00-00-00-51", *args, cwd=lab)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("released c1 (10.0.0.51), kept for 52:54:00:00:00:51; its keys are deleted and its "
                                   "certificate revoked (the next cluster.publish tells a running cluster)")
    assert not (lab / "st/lab/nodes/52-54-00-00-00-51").exists()
    proc = forge("state.forget", "52:54:00:00:00:51", *args, cwd=lab)
    assert proc.returncode == 1 and f"error: {lab}/st/lab keeps nothing for 52:54:00:00:00:51" in proc.stderr


# ---------------------------------------------------------------- pxe.discovered, pxe.reinstall

def test_pxe_discovered_with_a_fresh_state_is_read_only(lab: Path) -> None:
    proc = forge("pxe.discovered", "--inventory", "lab.yaml", "--state", "st", cwd=lab)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "# no unknown machine has booted yet"
    assert not (lab / "st").exists()


def test_pxe_discovered_lists_unknown_machines(lab: Path) -> None:
    (lab / "st/lab").mkdir(parents=True)
    (lab / "st/lab/discovered.json").write_text(json.dumps({
        "52:54:00:00:00:99": {"platform": "efi", "manufacturer": "QEMU", "last_seen": "2024-01-01T00:00:00+00:00"},
        "52:54:00:00:00:11": {"platform": "pcbios"}}))
    proc = forge("pxe.discovered", "--inventory", "lab.yaml", "--state", "st", cwd=lab)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        '  - mac: "52:54:00:00:00:99"  # seen 2024-01-01T00:00:00+00:00; platform "efi"; manufacturer "QEMU"',
        "    roles: [compute]"]


def test_pxe_discovered_as_typed(defaults_untouched: None) -> None:
    proc = forge("pxe.discovered", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_pxe_reinstall(lab: Path) -> None:
    args = ("--inventory", "lab.yaml", "--state", "st")
    proc = forge("pxe.reinstall", "c1", *args, cwd=lab)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "c1 is not marked installed: it installs on its next network boot"
    assert not (lab / "st").exists()

    (lab / "st/lab").mkdir(parents=True)
    (lab / "st/lab/pxe-installed.json").write_text(json.dumps(["52-54-00-00-00-11", "52-54-00-00-00-51"]))
    proc = forge("pxe.reinstall", "c1", *args, cwd=lab)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "c1 installs again on its next network boot"
    assert json.loads((lab / "st/lab/pxe-installed.json").read_text()) == ["52-54-00-00-00-11"]

    proc = forge("pxe.reinstall", "c9", *args, cwd=lab)
    assert proc.returncode == 1
    assert "error: no node named 'c9' in cluster lab\n  hint: nodes: s1, s2, s3, c1" in proc.stderr


@pytest.mark.parametrize("argv", [
    ["cluster.publish", "--out", "out"], ["pxe.discovered", "--from-cluster"], ["pxe.reinstall", "c1", "--on-cluster"],
], ids=["publish", "discovered", "reinstall"])
def test_the_cluster_pxe_commands_without_the_clusters_state(lab: Path, argv: list[str]) -> None:
    """They reach the nodes with the key in state/: without it they say so, render and create nothing."""
    proc = forge(*argv, "--inventory", "lab.yaml", "--state", "st", "--runs", "runs", cwd=lab)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: no SSH key at {lab}/st/lab/ssh/id_ed25519"), proc.stderr
    assert "hint: this is not the state/ the cluster was rendered from" in proc.stderr
    assert sorted(p.name for p in lab.iterdir()) == ["lab.yaml"]


def test_pxe_serve_refuses_an_interface_outside_the_subnet(lab: Path) -> None:
    args = ("--inventory", "lab.yaml", "--out", "out", "--state", "st", "--runs", "runs")
    proc = forge("pxe.serve", "--interface", "lo", *args, cwd=lab)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: interface lo has no address in the cluster's subnet 10.0.0.0/24"), proc.stderr
    proc = forge("pxe.serve", "--interface", "lo", "--mode", "relay", *args, cwd=lab)
    assert proc.returncode == 1 and "error: --mode must be dhcp or proxy, not 'relay'" in proc.stderr
    assert sorted(p.name for p in lab.iterdir()) == ["lab.yaml"]


# ---------------------------------------------------------------- the image factory (no build here)

def test_image_options_are_checked_before_anything_is_built(tmp_path: Path) -> None:
    proc = forge("image", "--os", "arch", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 1 and "error: --os must be debian-12 or ubuntu-24.04, not 'arch'" in proc.stderr
    proc = forge("image", "--os", "ubuntu-24.04", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 1 and "error: --os ubuntu-24.04 installs from an Ubuntu ISO" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_test_task_offers_fast(tmp_path: Path) -> None:
    """`./forge test --fast` itself would run this suite inside itself: its help is checked."""
    proc = forge("test", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--fast" in proc.stdout and "unit tests only" in proc.stdout


# ---------------------------------------------------------------- cluster.*

def test_cluster_status_with_a_fresh_runs_dir_is_read_only(lab: Path) -> None:
    proc = forge("cluster.status", "--inventory", "lab.yaml", "--out", "out", "--state", "st", "--runs", "runs",
                 cwd=lab)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].split() == ["s1", "10.0.0.11", "off", "up", "-", "phase", "-"]
    assert proc.stdout.splitlines()[3].split()[:3] == ["c1", "10.0.0.51", "off"]
    assert sorted(p.name for p in lab.iterdir()) == ["lab.yaml"]  # no seeds, no secrets, no run dir


def test_cluster_status_as_typed(defaults_untouched: None) -> None:
    proc = forge("cluster.status", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert [line.split()[0] for line in proc.stdout.splitlines()] == ["s1", "s2", "s3"]


def test_cluster_up_boots_the_seeds_rendered_to_out(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`./forge render --out X` then `./forge cluster.up --out X`: the VMs get X's seeds (the
    boot itself is tests/vm's); everything else lands in --state and --runs."""
    assert forge("render", "--inventory", "lab.yaml", "--out", "X", "--state", "st", cwd=lab).returncode == 0
    monkeypatch.setenv("FORGE_CWD", str(lab))  # as ./forge passes it
    vms = cli.cluster_vms("lab.yaml", Paths.resolve("X", "st", "runs"))
    spec = vms.spec(vms.cluster.node("c1"))
    drives = {str(d.path) for d in spec.drives}
    assert f"{lab}/X/lab/nodes/c1/seed.iso" in drives
    assert f"{lab}/runs/lab/c1/root.qcow2" in drives
    assert vms.ssh_key == lab / "st/lab/ssh/id_ed25519"
    assert not (lab / "runs").exists()


@pytest.mark.parametrize("argv", [
    ["cluster.ssh", "s1", "hostname"],
    ["cluster.ssh", "s1", "--", "ceph", "-s"],
    ["cluster.ssh", "s1", "--cmd", "hostname"],
    ["cluster.ssh", "s1"],
], ids=["command", "after --", "--cmd", "shell"])
def test_cluster_ssh_with_no_cluster_running_says_so(lab: Path, argv: list[str]) -> None:
    proc = forge(*argv[:1], "--inventory", "lab.yaml", "--out", "out", "--state", "st", "--runs", "runs",
                 *argv[1:], cwd=lab)
    assert proc.returncode == 1
    assert "No idea what" not in proc.stderr
    assert proc.stderr.startswith(f"error: s1 is not running (no QEMU process in {lab}/runs/lab/s1)"), proc.stderr
    assert "hint: ./forge cluster.status shows the nodes; ./forge cluster.up boots the cluster" in proc.stderr
    assert sorted(p.name for p in lab.iterdir()) == ["lab.yaml"]


def test_cluster_ssh_as_typed(defaults_untouched: None) -> None:
    """`./forge cluster.ssh s1 hostname` from the README: never a parse error. With the
    repository's cluster up it answers; otherwise it says the node is not running."""
    for argv in (["s1", "hostname"], ["s1", "--", "hostname", "-s"]):
        proc = forge("cluster.ssh", *argv, cwd=REPO)
        assert "No idea what" not in proc.stderr
        if proc.returncode != 0:
            assert proc.returncode == 1
            assert proc.stderr.startswith("error: s1 is not running") or "error: no SSH key" in proc.stderr, proc.stderr
        else:
            assert proc.stdout.strip().startswith("s1")


def test_cluster_ssh_command_twice_is_refused(lab: Path) -> None:
    proc = forge("cluster.ssh", "s1", "--cmd", "uptime", "hostname", cwd=lab)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: cluster.ssh: give the command after NODE or with --cmd, not both"


def test_cluster_ssh_unknown_node(lab: Path) -> None:
    proc = forge("cluster.ssh", "--inventory", "lab.yaml", "--runs", "runs", "s9", "hostname", cwd=lab)
    assert proc.returncode == 1
    assert "error: no node named 's9' in cluster lab\n  hint: nodes: s1, s2, s3, c1" in proc.stderr


def test_cluster_commands_with_nothing_running(lab: Path) -> None:
    """Each says so or does nothing, never a traceback. The cluster has a name of its own: its
    network namespace (cf-<name>), which cluster.down removes, is nobody else's."""
    name = f"cli{os.getpid() % 100000}"
    (lab / "own.yaml").write_text((lab / "lab.yaml").read_text().replace("{name: lab}", f"{{name: {name}}}"))
    args = ("--inventory", "own.yaml", "--out", "out", "--state", "st", "--runs", "runs")
    proc = forge("cluster.console", "s1", *args, cwd=lab)
    assert proc.returncode == 1
    assert f"error: no console at {lab}/runs/{name}/s1/console.sock" in proc.stderr, proc.stderr
    for task in ("cluster.partition", "cluster.heal"):
        proc = forge(task, "c1", *args, cwd=lab)
        assert proc.returncode == 1 and proc.stderr.startswith("error: c1: not running"), proc.stderr
    for argv in (["cluster.kill", "s1"], ["cluster.pause"], ["cluster.resume"], ["cluster.down"],
                 ["cluster.destroy"]):
        proc = forge(*argv, *args, cwd=lab)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in lab.iterdir()) == ["lab.yaml", "own.yaml"]

    # cluster.up checks what it needs before it creates a network or a disk.
    proc = forge("cluster.up", "--boot", "usb", *args, cwd=lab)
    assert proc.returncode == 1 and "error: --boot must be disk or pxe, not 'usb'" in proc.stderr
    proc = forge("cluster.up", *args, cwd=lab)
    assert proc.returncode == 1
    assert f"error: image not found: {lab}/out/images/clusterforge-debian-12.qcow2" in proc.stderr, proc.stderr
    assert (lab / f"out/{name}/nodes/s1/seed.iso").is_file()  # its seeds are rendered first
    assert not (lab / "runs").exists()


def test_cluster_console_relays_the_serial_console(lab: Path) -> None:
    """What QEMU's console socket sends reaches the terminal and what is typed reaches it; the
    command ends when the console closes. A socket stands in for QEMU."""
    name = f"cli{os.getpid() % 100000}"
    (lab / "own.yaml").write_text((lab / "lab.yaml").read_text().replace("{name: lab}", f"{{name: {name}}}"))
    console = lab / "runs" / name / "s1" / "console.sock"
    console.parent.mkdir(parents=True)
    typed: list[bytes] = []
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(console))
        server.listen(1)
        server.settimeout(60)

        def qemu() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"s1 login: ")
                typed.append(conn.recv(100))
                conn.sendall(b"\r\nwelcome\r\n")

        thread = threading.Thread(target=qemu)
        thread.start()
        env = {k: v for k, v in os.environ.items() if k != "FORGE_CWD"}
        proc = subprocess.Popen([str(FORGE), "cluster.console", "s1", "--inventory", "own.yaml", "--runs", "runs"],
                                cwd=lab, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        watchdog = threading.Timer(60, proc.kill)
        watchdog.start()
        try:
            proc.stdin.write(b"root\n")
            proc.stdin.flush()
            out = proc.stdout.read()  # until the console closes; the terminal stays open meanwhile
            proc.stdin.close()
            err = proc.stderr.read()
            proc.wait()
        finally:
            watchdog.cancel()
            thread.join(timeout=60)
    assert proc.returncode == 0, err
    assert out == b"s1 login: \r\nwelcome\r\n"
    assert typed == [b"root\n"]
    assert b"connected; Ctrl-] leaves" in err


# ---------------------------------------------------------------- cluster.ssh's arguments

@pytest.mark.parametrize("typed, given", [
    ("cluster.ssh s1 hostname", ["cluster.ssh", "s1", "--cmd", "hostname"]),
    ("cluster.ssh s1 -- ceph -s", ["cluster.ssh", "s1", "--cmd", "ceph -s"]),
    ("cluster.ssh --inventory x.yaml s1 ls -la", ["cluster.ssh", "--inventory", "x.yaml", "s1", "--cmd", "ls -la"]),
    ("cluster.ssh s1", ["cluster.ssh", "s1"]),
    ("cluster.ssh s1 --", ["cluster.ssh", "s1"]),
    ("cluster.ssh s1 --cmd uptime", ["cluster.ssh", "s1", "--cmd", "uptime"]),
    ("cluster.ssh --cmd uptime s1", ["cluster.ssh", "--cmd", "uptime", "s1"]),
    ("cluster.ssh -c uptime s1", ["cluster.ssh", "-c", "uptime", "s1"]),
    ("cluster.ssh --cmd=uptime s1", ["cluster.ssh", "--cmd=uptime", "s1"]),
    # Options after the node, as ssh takes them, until the command starts.
    ("cluster.ssh s1 --state st -r runs ceph -s",
     ["cluster.ssh", "s1", "--state", "st", "-r", "runs", "--cmd", "ceph -s"]),
    ("cluster.ssh s1 ls --state st", ["cluster.ssh", "s1", "--cmd", "ls --state st"]),
    ("cluster.ssh s1 -- --state", ["cluster.ssh", "s1", "--cmd", "--state"]),
    ("cluster.ssh --node s1 uptime", ["cluster.ssh", "--node", "s1", "--cmd", "uptime"]),
    ("cluster.ssh -n s1 -v uptime", ["cluster.ssh", "-n", "s1", "-v", "--cmd", "uptime"]),
    ("cluster.ssh --help", ["cluster.ssh", "--help"]),
    ("-e cluster.ssh s1 hostname", ["-e", "cluster.ssh", "s1", "--cmd", "hostname"]),
    ("render --out x", ["render", "--out", "x"]),
    ("test -k cluster.ssh", ["test", "-k", "cluster.ssh"]),
])
def test_ssh_arguments_are_rewritten_as_ssh_reads_them(typed: str, given: list[str]) -> None:
    assert rewrite(typed.split()) == given


@pytest.mark.parametrize("typed", ["cluster.ssh s1 --cmd uptime hostname", "cluster.ssh --cmd=uptime s1 -- ls"])
def test_ssh_command_given_twice(typed: str) -> None:
    with pytest.raises(UsageError):
        rewrite(typed.split())
