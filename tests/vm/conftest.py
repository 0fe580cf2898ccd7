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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


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


def on_formed(task: str, *args: str) -> list[str]:
    """A cluster.* command pointed at the shared cluster: its options right after the task, as
    `cluster.ssh NODE COMMAND...` takes everything after the command as the command (like ssh)."""
    return [task, "--inventory", str(LAB.relative_to(REPO)), "--runs", str(FORMED_RUNS), *args]


@pytest.fixture(scope="session")
def formed(image: pipeline.Artifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterVMs]:
    """The example cluster (qemu/lab.yaml) booted once by `./forge demo`, as a user would, and
    formed by its agents (check-cluster OK); shared by every test of tests/vm/test_formed.py,
    the destructive ones last. Default dist/ and state/; its VMs in runs/tests/formed/."""
    paths = Paths.resolve(runs=str(FORMED_RUNS))
    if FORMED_RUNS.exists():
        shutil.rmtree(FORMED_RUNS)
    cluster = inventory.load(LAB, state=paths.state)
    vms = ClusterVMs(cluster, image.qcow2, paths)
    ext4_disk(vms.dir / "s3" / "data-1.qcow2", tmp_path_factory.mktemp("ext4"))
    try:
        demo = forge("demo", "--inventory", str(LAB.relative_to(REPO)), "--runs", str(FORMED_RUNS), check=False)
        (vms.dir / "demo.txt").write_text(demo.stdout + demo.stderr)
        formed_line = next((line for line in demo.stderr.splitlines() if "verify: formed" in line), "")
        figure(formed_line.strip())
        print(demo.stdout[-3000:])
        assert demo.returncode == 0, (f"./forge demo failed:\n{demo.stdout[-4000:]}{demo.stderr[-4000:]}\n"
                                      f"logs: {vms.dir}/")
        yield ClusterVMs(inventory.load(LAB, state=paths.state), image.qcow2, paths)
    finally:
        collect_logs(vms)
        vms.down(timeout=60)
