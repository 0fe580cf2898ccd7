"""The verification report, on data: the timeline from boot phases and agents' records, and a
page that stands alone (the VM suite opens a real one in Chromium)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from clusterforge.verify import report, run


def test_timeline_lines_up_services_with_power_on() -> None:
    boot = {"s1": {"firmware": 1.0, "kernel": 12.0, "multi-user": 90.0, "seed": 120.0, "ssh": 121.0,
                   "at": 1000.0}}
    records = {"s1": {"services": {"etcd": {"state": "ok", "since": 1180.5},
                                   "ceph": {"state": "waiting", "since": 1200.0}}}}
    events = report.timeline(boot, records)["s1"]
    assert events == {"power-on": 0.0, "firmware": 1.0, "kernel": 12.0, "multi-user": 90.0, "seed": 120.0,
                      "etcd healthy": 180.5}
    assert list(events) == sorted(events, key=events.get)  # type: ignore[arg-type]


def test_report_files_and_page(tmp_path: Path) -> None:
    checks = [{"name": "etcd: healthy", "service": "etcd", "status": "pass", "reason": "3 members <ok>",
               "evidence": "s1$ etcdctl ...", "at": 1.0, "seconds": 2.0},
              {"name": "k3s: Ready", "service": "k3s", "status": "skipped", "reason": "not verified: no bundle",
               "evidence": "", "at": 3.0, "seconds": 0.0}]
    events = {"s1": {"power-on": 0.0, "kernel": 12.0, "etcd healthy": 180.0}}
    json_path, html_path = report.write(tmp_path, "lab", checks, events, {"power-on to all healthy (s)": 300})
    data = json.loads(json_path.read_text())
    assert data["verdict"] == "pass" and data["timeline"] == events
    page = html_path.read_text()
    assert "<script" not in page and "src=" not in page and "@import" not in page and "url(" not in page
    assert "3 members &lt;ok&gt;" in page  # escaped
    assert "etcd healthy 180s" in page and "not verified: no bundle" in page
    checks[0]["status"] = "fail"
    report.write(tmp_path, "lab", checks, events, {})
    assert json.loads(json_path.read_text())["verdict"] == "fail"


def test_a_fault_is_judged_by_passes_made_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run 16: faults 2 and 3 were 'fully healthy 2 s after' being undone, on the records the
    agents published before them. Healthy counts only once every node has passed again."""
    def view(s1: float, s2: float, healthy: bool = True) -> dict[str, Any]:
        nodes = [{"node": "s1", "last_pass": {"at": s1}}, {"node": "s2", "last_pass": {"at": s2}}]
        return {"healthy": healthy, "problems": [] if healthy else ["s2: ceph: waiting"], "nodes": nodes}

    before = view(100.0, 100.0)
    views = iter([before, view(105.0, 100.0), view(110.0, 108.0, healthy=False), view(115.0, 113.0)])
    monkeypatch.setattr(run, "cluster_view", lambda vms: next(views))
    monkeypatch.setattr(run, "POLL", 0.0)
    after = run.last_passes(before)
    assert after == {"s1": 100.0, "s2": 100.0}
    took, seen = run.wait_formed(None, since=0.0, timeout=60, after=after)  # type: ignore[arg-type]
    assert took is not None and run.last_passes(seen) == {"s1": 115.0, "s2": 113.0}
    assert run.last_passes(None) == {}
