"""VM tests: real QEMU machines. Each test gets its own run directory of console, QMP
and QEMU logs under runs/tests/<test>/, named in every failure message."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from clusterforge import inventory, render
from clusterforge.factory import pipeline
from clusterforge.factory.context import BuildContext
from clusterforge.paths import Paths
from clusterforge.run import run
from clusterforge.vm.cluster import ClusterVMs

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "cluster.yaml"
LAB = REPO / "qemu" / "lab.yaml"  # the example cluster, with an ext4 disk on s3 that Ceph must not take
RUNS = REPO / "runs" / "tests"


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A cancelled CI job sends SIGTERM: unwind like Ctrl-C, so every Machine, network
    # namespace and server the running test holds is stopped, not left behind.
    signal.signal(signal.SIGTERM, _interrupt)


# The shared cluster's tests run together, module by module in this order, and the test that
# takes it down last; the modules that boot machines of their own run before it is up, or
# (a cluster of their own with faults) after it is gone: two clusters at once would share 2 cores.
FORMED_MODULES = ("test_formed.py", "test_selfhosted.py", "test_membership.py")
AFTER_FORMED = ("test_release.py",)
LAST_ON_FORMED = "test_cluster_commands_as_typed"


def _order(item: pytest.Item) -> tuple[int, int]:
    module = Path(str(item.fspath)).name
    if item.name == LAST_ON_FORMED:
        return 1, len(FORMED_MODULES)
    if module in FORMED_MODULES:
        return 1, FORMED_MODULES.index(module)
    return (2 if module in AFTER_FORMED else 0), 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)
    items.sort(key=lambda item: _order(item) if "tests/vm/" in str(item.fspath) else (-1, 0))  # stable


@pytest.fixture(scope="session")
def build_ctx() -> BuildContext:
    return BuildContext.create()


@pytest.fixture(scope="session")
def image(build_ctx: BuildContext) -> pipeline.Artifacts:
    """The node image, built (or found cached) once per session."""
    return pipeline.build_image(build_ctx)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[inventory.Cluster, Path, Path]:
    """The example cluster rendered with a fresh state: (cluster, rendered dir, state dir)."""
    root = tmp_path_factory.mktemp("lab")
    cluster = inventory.load(EXAMPLE)
    rendered = render.render(cluster, root / "dist", root / "state").path
    return cluster, rendered, root / "state"


@pytest.fixture
def rundir(request: pytest.FixtureRequest) -> Iterator[Path]:
    path = RUNS / re.sub(r"[^\w.-]+", "_", request.node.name)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    yield path


def ext4_disk(path: Path, work: Path) -> None:
    """A data disk that already holds something: an ext4 filesystem with a file on it."""
    tree = work / "ext4-tree"
    tree.mkdir()
    (tree / "keep-me.txt").write_text("clusterforge must not erase this\n")
    raw = work / "ext4.raw"
    with open(raw, "wb") as f:
        f.truncate(256 * 1024**2)
    run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(raw)])
    path.parent.mkdir(parents=True, exist_ok=True)
    run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)])


def collect_logs(vms: ClusterVMs) -> None:
    """Every node's agent, etcd and Ceph journals beside its console log, for whoever reads a failure."""
    for node in vms.cluster.nodes:
        if not vms.machine(node).running:
            continue
        out = vms.ssh(node).run("journalctl --no-pager -o short-monotonic -u clusterforge-agent -u clusterforge-etcd "
                                "-u 'ceph*' -u 'slurm*' -u munge -u keepalived -u chrony -u 'clusterforge-*' "
                                "| tail -n 3000", check=False, timeout=120)
        (vms.dir / node.name / "journal.txt").write_text(out.stdout + out.stderr)


def keep_logs(vms: ClusterVMs, to: Path) -> None:
    """The cluster's logs (journals collected first), copied out of its directory before
    `cluster.destroy` removes it; the disks and sockets are left behind."""
    collect_logs(vms)
    shutil.rmtree(to, ignore_errors=True)
    shutil.copytree(vms.dir, to, ignore=shutil.ignore_patterns("*.qcow2", "*.raw", "*.fd", "*.sock", "*.bin",
                                                               "chromium"))


FORMED_RUNS = RUNS / "formed"
DEMO_TIMEOUT = 3600  # a safety net: verify waits on the cluster with limits of its own (formation: 13-25 min)
# The shared cluster's inventory: a copy of qemu/lab.yaml, which cluster.replace edits as it
# would a user's (a new MAC in place of the old one).
FORMED_INVENTORY = FORMED_RUNS / "lab.yaml"


def forge(*args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A README command as a user types it: ./forge from the repository root."""
    proc = subprocess.run(["./forge", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"./forge {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def figure(line: str) -> None:
    """A measured figure: printed, and kept in runs/tests/figures.txt (pytest shows a passing
    test's output to nobody), for the notes and the README."""
    print(f"\n{line}")
    RUNS.mkdir(parents=True, exist_ok=True)
    with open(RUNS / "figures.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


def sh(vms: ClusterVMs, node: str, command: str, timeout: float = 180, check: bool = True) -> str:
    """A command's output on a node of a booted cluster, over SSH."""
    return vms.ssh(vms.cluster.node(node)).run(command, timeout=timeout, check=check).stdout


def on_formed(task: str, *args: str, inventory: Path = FORMED_INVENTORY) -> list[str]:
    """A cluster.* command pointed at the shared cluster: its options right after the task, as
    `cluster.ssh NODE COMMAND...` takes everything after the command as the command (like ssh)."""
    return [task, "--inventory", str(inventory), "--runs", str(FORMED_RUNS), *args]


@pytest.fixture(scope="session")
def formed(image: pipeline.Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterVMs]:
    """The example cluster (qemu/lab.yaml) booted once by `./forge demo`, as a user would, and
    formed by its agents (check-cluster OK); shared by the tests of FORMED_MODULES, the
    destructive ones last. Default dist/ and state/ (its state made anew: the cluster is new);
    its inventory and VMs in runs/tests/formed/."""
    paths = Paths.resolve(runs=str(FORMED_RUNS))
    if FORMED_RUNS.exists():
        shutil.rmtree(FORMED_RUNS)
    FORMED_RUNS.mkdir(parents=True)
    shutil.copy(LAB, FORMED_INVENTORY)
    shutil.rmtree(paths.cluster_state(inventory.load(LAB).name), ignore_errors=True)
    cluster = inventory.load(FORMED_INVENTORY, state=paths.state)
    vms = ClusterVMs(cluster, image.qcow2, paths)
    ext4_disk(vms.dir / "s3" / "data-1.qcow2", tmp_path_factory.mktemp("ext4"))
    try:
        demo = forge("demo", "--inventory", str(FORMED_INVENTORY), "--runs", str(FORMED_RUNS), check=False,
                     timeout=DEMO_TIMEOUT)
        (vms.dir / "demo.txt").write_text(demo.stdout + demo.stderr)
        formed_line = next((line for line in demo.stderr.splitlines() if "verify: formed" in line), "")
        figure(formed_line.strip())
        print(demo.stdout[-3000:])
        assert demo.returncode == 0, (f"./forge demo failed:\n{demo.stdout[-4000:]}{demo.stderr[-4000:]}\n"
                                      f"logs: {vms.dir}/")
        yield ClusterVMs(inventory.load(FORMED_INVENTORY, state=paths.state), image.qcow2, paths)
    finally:
        collect_logs(vms)
        vms.down(timeout=60)


# ---------------------------------------------------------------- the shared cluster, grown

NEW = "52:54:00:00:00:51"  # a compute node that comes later, as new hardware (c1)


@pytest.fixture(scope="session")
def grown(formed: ClusterVMs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The shared cluster's inventory with one compute node more (c1); test_selfhosted.py
    publishes it and starts c1, test_membership.py removes it. Afterwards c1 is gone whatever
    happened: taken out with cluster.remove (told to the cluster, its record released), then
    powered off."""
    path = tmp_path_factory.mktemp("grown") / "lab-grown.yaml"
    path.write_text(FORMED_INVENTORY.read_text() + f'  - mac: "{NEW}"\n    roles: [compute]\n')
    try:
        yield path
    finally:
        forge(*on_formed("cluster.remove", "c1"), check=False, timeout=3600)
        forge(*on_formed("cluster.kill", "c1", inventory=path), check=False)


# Not the singletons (slurmctld, the PXE's dnsmasq): a busy emulated cluster may move them for
# reasons of its own, which is no restart a joining node caused.
UNITS_WATCHED = ("clusterforge-etcd.service", "keepalived.service", "chrony.service", "munge.service",
                 "slurmd.service", "ceph-mon@*.service", "ceph-mgr@*.service", "ceph-osd@*.service")


def service_starts(vms: ClusterVMs, nodes: list[str]) -> dict[str, str]:
    """When each running cluster service on these nodes last started (systemd's monotonic
    timestamp): the same before and after means nothing restarted."""
    units = " ".join(f"'{u}'" for u in UNITS_WATCHED)
    return {node: sh(vms, node, f"systemctl show -p Id,ActiveEnterTimestampMonotonic $(systemctl list-units "
                                f"--state=active --plain --no-legend {units} | cut -d' ' -f1) | paste -sd' '")
            for node in nodes}
