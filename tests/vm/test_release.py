"""The long ones (./forge test --all): a release verifies its image with faults before it
publishes, and the five-node cluster verifies with faults."""

from __future__ import annotations

import json

import pytest

from clusterforge.factory import pipeline

from .conftest import REPO, forge


@pytest.mark.all_only
def test_release_carries_its_proof(image: pipeline.Artifacts) -> None:
    proc = forge("release", timeout=7200)
    out = REPO / proc.stdout.strip().splitlines()[-1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"].startswith("pass")
    listed = {a["name"] for a in manifest["artifacts"]}
    assert {"report.json", "report.html"} <= listed
    sums = (out / "SHA256SUMS").read_text()
    assert "  report.json\n" in sums and "  report.html\n" in sums
    report = json.loads((out / "report.json").read_text())
    assert [c["status"] for c in report["checks"] if c["service"] == "faults"] == ["pass"] * 4


@pytest.mark.all_only
def test_five_node_cluster_verifies_with_faults(image: pipeline.Artifacts) -> None:
    proc = forge("verify", "--faults", "--inventory", "qemu/five.yaml", "--runs", "runs/tests/five",
                 timeout=10800, check=False)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
