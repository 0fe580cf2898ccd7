"""What the VM benchmarks share: the image (built when missing) and the example cluster
rendered into a temporary directory, each booting run with a runs directory of its own."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clusterforge import inventory, render  # noqa: E402
from clusterforge.factory.context import BuildContext  # noqa: E402
from clusterforge.factory.pipeline import build_image  # noqa: E402
from clusterforge.paths import Paths  # noqa: E402
from clusterforge.vm.cluster import ClusterVMs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def example_cluster() -> Iterator[tuple[inventory.Cluster, Callable[[str], ClusterVMs]]]:
    """The example cluster, and a maker of its QEMU clusters: vms(name) -> ClusterVMs."""
    image = build_image(BuildContext.create()).qcow2
    cluster = inventory.load(REPO / "examples" / "cluster.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        render.render(cluster, root / "dist", root / "state")

        def vms(runs: str) -> ClusterVMs:
            return ClusterVMs(cluster, image, Paths(root / "dist", root / "state", root / runs))

        yield cluster, vms
