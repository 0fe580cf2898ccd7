"""Seeds rendered from an inventory text and written as cloud-init writes them on each node
(the ceph and slurm tests read them back the way the agent does)."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import yaml

from clusterforge import inventory, render
from clusterforge.node import seed as seedlib

from .conftest import FIXED_STATE


def seeds_on_disk(text: str, tmp: Path) -> dict[str, seedlib.Seed]:
    """Every node's seed with its files (keys included), under tmp/nodes/<name>, keyed by name."""
    shutil.copytree(FIXED_STATE, tmp / "state")
    (tmp / "inv.yaml").write_text(text)
    out = render.render(inventory.load(tmp / "inv.yaml"), tmp / "dist", tmp / "state").path
    seeds = {}
    for folder in sorted((out / "nodes").iterdir()):
        root = tmp / "nodes" / folder.name
        for f in yaml.safe_load((folder / "user-data").read_text())["write_files"]:
            rel = Path(f["path"]).relative_to(seedlib.CONFIG_DIR)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            content = f.get("content", "")
            data = base64.b64decode(content) if f.get("encoding") == "b64" else content.encode()
            (root / rel).write_bytes(data)
        seeds[folder.name] = seedlib.load(root)
    return seeds
