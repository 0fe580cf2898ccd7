"""Shared fixtures: the example inventory, a fixed secrets state, a rendered tree."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from clusterforge import inventory, render

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
EXAMPLE = REPO / "examples" / "cluster.yaml"
# Test-only secrets, committed so golden files are stable. Never used outside tests.
FIXED_STATE = DATA / "state"


@pytest.fixture
def example() -> inventory.Cluster:
    return inventory.load(EXAMPLE)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    target = tmp_path / "state"
    shutil.copytree(FIXED_STATE, target)
    return target


@pytest.fixture
def rendered(example: inventory.Cluster, state: Path, tmp_path: Path) -> Path:
    return render.render(example, tmp_path / "dist", state).path


KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJbHTlu4gELWONj09/8k0fELB1uY3ZQjNOtCF0TcxLV "
       "test@example")


def write_inventory(tmp_path: Path, text: str, name: str = "inv.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@pytest.fixture(scope="session")
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory):
    """One real 3-member etcd (mutual TLS, loopback) for the whole run; tests use their own key prefixes."""
    from .etcd_cluster import EtcdCluster  # here, not at the top: only etcd tests pay for the import

    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def etcd(etcd_cluster):
    """The shared cluster with every member running again (a previous test may have stopped one)."""
    etcd_cluster.ensure_running()
    return etcd_cluster
