"""VM tests: real QEMU machines. Each test gets its own run directory of console, QMP
and QEMU logs under runs/tests/<test>/, named in every failure message."""

from __future__ import annotations

import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from clusterforge import inventory, render
from clusterforge.factory import pipeline
from clusterforge.factory.context import BuildContext

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "cluster.yaml"
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
    rendered = render.render(cluster, root / "dist", root / "state")
    return cluster, rendered, root / "state"


@pytest.fixture
def rundir(request: pytest.FixtureRequest) -> Iterator[Path]:
    path = RUNS / re.sub(r"[^\w.-]+", "_", request.node.name)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    yield path
