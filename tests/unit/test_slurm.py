"""SLURM (issue 15): munge with the seed's key, slurmd configless with dynamic nodes, and
slurmctld on the one core node the election picks, its state on an RBD image that follows it.

No slurm, munge or Ceph binary runs here: the files are checked as text, and the agent's
plans on recorded-style facts (tests/unit/data/facts/slurm-*.json, in the format
`python3 -m clusterforge.node.agent.facts` prints) with seeds rendered from real inventories.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from clusterforge.node import seed as seedlib
from clusterforge.node.agent import core, munge, slurm, slurmconf, slurmctld, slurmstate
from clusterforge.node.agent.context import Ctx
from clusterforge.node.agent.core import State, StepFailed, Wait
from clusterforge.node.agent.host import Unit
from clusterforge.node.seed import Role, Service
from clusterforge.run import CommandError
from clusterforge.verify import faults

from .conftest import DATA, EXAMPLE
from .seeds import seeds_on_disk

FACTS = DATA / "facts"
MODULES: dict[str, Any] = {"munge": munge, "slurm": slurm, "slurmctld": slurmctld}

# The example's three nodes become core+storage only, and four compute-only nodes join.
LARGER = EXAMPLE.read_text().replace("roles: [core, storage, compute]", "roles: [core, storage]") + "".join(
    f'  - mac: "52:54:00:00:00:{21 + i}"\n    roles: [compute]\n' for i in range(4))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, seedlib.Seed]]:
    return {"example": seeds_on_disk(EXAMPLE.read_text(), tmp_path_factory.mktemp("example")),
            "larger": seeds_on_disk(LARGER, tmp_path_factory.mktemp("larger"))}


def without_ceph(seed: seedlib.Seed) -> seedlib.Seed:
    cluster = dataclasses.replace(seed.cluster, services={**seed.cluster.services, Service.CEPH: False})
    return dataclasses.replace(seed, cluster=cluster)


def fixture(seeds: dict[str, dict[str, seedlib.Seed]], name: str, module: Any, **changes: Any) -> tuple[Ctx, Any]:
    doc = json.loads((FACTS / name).read_text())
    seed = seeds[doc["inventory"]][doc["identity"]["node"]]
    facts = core.from_jsonable(module.Facts, doc["facts"][module.name])
    return Ctx(seed), dataclasses.replace(facts, **changes)


def names(plan: core.Plan) -> list[str]:
    assert not isinstance(plan, Wait), plan
    return [step.name for step in plan]


def settings(conf: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in conf.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


# ---------------------------------------------------------------- the files


def test_slurm_conf_for_the_example(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    example = seeds["example"]
    confs = {slurmconf.slurm_conf(example[n].cluster) for n in ("s1", "s2", "s3")}
    assert len(confs) == 1  # the same on every core node: any may become the controller
    got = settings(confs.pop())
    assert got == {
        "ClusterName": ["lab"],
        "SlurmctldHost": ["s1(10.0.0.11)", "s2(10.0.0.12)", "s3(10.0.0.13)"],  # inventory order
        "SlurmctldParameters": ["enable_configless"],
        "AuthType": ["auth/munge"],
        "SlurmUser": ["slurm"],
        "StateSaveLocation": ["/var/lib/slurm/slurmctld"],
        "SlurmdSpoolDir": ["/var/lib/slurm/slurmd"],
        "SlurmctldPidFile": ["/run/slurmctld.pid"],
        "SlurmdPidFile": ["/run/slurmd.pid"],
        "MaxNodeCount": ["64"],
        "TreeWidth": ["65533"],
        "SelectType": ["select/cons_tres"],
        "SelectTypeParameters": ["CR_Core_Memory"],
        "ProctrackType": ["proctrack/linuxproc"],
        "ReturnToService": ["2"],
        "SlurmctldTimeout": ["15"],
        "SlurmdTimeout": ["60"],
        "MessageTimeout": ["20"],
        "BatchStartTimeout": ["60"],
        "PartitionName": ["all Nodes=ALL Default=YES MaxTime=INFINITE State=UP"],
    }
    assert "NodeName" not in got  # dynamic nodes: nothing about the hardware


def test_slurm_conf_for_core_and_compute_only_nodes(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    larger = seeds["larger"]
    confs = {slurmconf.slurm_conf(larger[n].cluster) for n in ("s1", "s2", "s3")}
    assert len(confs) == 1
    got = settings(confs.pop())
    assert got["SlurmctldHost"] == ["s1(10.0.0.11)", "s2(10.0.0.12)", "s3(10.0.0.13)"]
    assert got["MaxNodeCount"] == ["64"] and "NodeName" not in got
    # Who runs what: controllers on core nodes, slurmd on compute nodes, munge on both.
    for node, seed in larger.items():
        ctx = Ctx(seed)
        assert slurmctld.applies(ctx) == node.startswith("s")
        assert slurm.applies(ctx) == node.startswith("c")
        assert munge.applies(ctx)
    # A compute node's seed knows the core nodes and itself: enough for its slurmd.
    c1 = larger["c1"].cluster
    assert slurmconf.controllers(c1) == [("s1", "10.0.0.11"), ("s2", "10.0.0.12"), ("s3", "10.0.0.13")]
    # Room for the compute nodes of a larger inventory.
    computes = tuple(dataclasses.replace(c1.nodes[-1], name=f"c{i}") for i in range(50))
    assert slurmconf.max_node_count(dataclasses.replace(c1, nodes=c1.nodes[:3] + computes)) == 100


def test_configless_slurmd_dropin(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    dropins = {slurmconf.slurmd_dropin(seed.cluster) for group in seeds.values() for seed in group.values()}
    assert len(dropins) == 1  # every compute node of both inventories: the same core nodes
    text = dropins.pop()
    lines = text.splitlines()
    assert lines.index("[Unit]") < lines.index("ConditionPathExists=") < lines.index("[Service]")
    exec_lines = [line for line in lines if line.startswith("ExecStart=")]
    assert exec_lines == ["ExecStart=",  # clears Debian's, which needs /etc/slurm/slurm.conf
                          'ExecStart=/usr/sbin/slurmd -D -s --conf-server 10.0.0.11,10.0.0.12,10.0.0.13 '
                          '-Z --conf "Feature=compute"']
    assert "Restart=on-failure" in lines and "RestartSec=5" in lines


# Debian 12's units (slurmd, slurmctld 22.05.8-4+deb12u3), as the packages ship them.
DEBIAN_UNITS = {
    "slurmd.service": """[Unit]
Description=Slurm node daemon
After=munge.service network-online.target remote-fs.target
Wants=network-online.target
ConditionPathExists=/etc/slurm/slurm.conf

[Service]
Type=simple
EnvironmentFile=-/etc/default/slurmd
ExecStart=/usr/sbin/slurmd -D -s $SLURMD_OPTIONS
ExecReload=/bin/kill -HUP $MAINPID
PIDFile=/run/slurmd.pid
KillMode=process
Delegate=yes
""",
    "slurmctld.service": """[Unit]
Description=Slurm controller daemon
After=network-online.target munge.service
Wants=network-online.target
ConditionPathExists=/etc/slurm/slurm.conf

[Service]
Type=simple
EnvironmentFile=-/etc/default/slurmctld
ExecStart=/usr/sbin/slurmctld -D -s $SLURMCTLD_OPTIONS
ExecReload=/bin/kill -HUP $MAINPID
PIDFile=/run/slurmctld.pid
""",
}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_dropins_are_units_systemd_reads(tmp_path: Path, seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    """systemd's own parser on the drop-ins over Debian's units: no unknown or invalid setting."""
    dropins = {"slurmd.service": slurmconf.slurmd_dropin(seeds["larger"]["c1"].cluster),
               "slurmctld.service": slurmconf.slurmctld_dropin(True)}
    for unit, text in DEBIAN_UNITS.items():
        (tmp_path / unit).write_text(text)
        (tmp_path / f"{unit}.d").mkdir()
        (tmp_path / f"{unit}.d" / "clusterforge.conf").write_text(dropins[unit])
    proc = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / u) for u in DEBIAN_UNITS)],
                          env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"}, capture_output=True, text=True)
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines()
                  if "is not executable" not in line and "man " not in line]  # no slurm binaries here
    assert not complaints, complaints


def test_slurmctld_dropin() -> None:
    with_rbd, local = slurmconf.slurmctld_dropin(True), slurmconf.slurmctld_dropin(False)
    assert "ConditionPathIsMountPoint=/var/lib/slurm/slurmctld" in with_rbd.splitlines()
    assert "ConditionPathIsMountPoint" not in local
    for text in (with_rbd, local):
        assert "RequiresMountsFor=/var/lib/slurm/slurmctld" in text.splitlines()
        assert "TimeoutStopSec=10" in text.splitlines() and "[Install]" not in text


def test_mount_unit_in_the_image() -> None:
    """At shutdown the state is unmounted while the network and the local Ceph daemons run."""
    path = (Path(__file__).resolve().parents[2] / "overlays/common/etc/systemd/system"
            / "var-lib-slurm-slurmctld.mount.d/clusterforge.conf")
    assert str(slurmconf.STATE_DIR) == "/var/lib/slurm/slurmctld"  # the unit's name follows the path
    text = path.read_text()
    assert "After=network-online.target ceph-mon.target ceph-osd.target" in text.splitlines()


# ---------------------------------------------------------------- munge


def munge_facts(**changes: Any) -> munge.Facts:
    unit = Unit(munge.UNIT, "active", "running", "enabled", "success", "1000")
    return dataclasses.replace(munge.Facts(True, True, unit, False, True), **changes)


def test_munge_key_install_plan(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    ctx = Ctx(seeds["larger"]["c1"])
    assert munge.plan(ctx, munge_facts()) == []
    assert isinstance(munge.plan(ctx, munge_facts(seed_key=False)), Wait)
    # The image's own key (the package made it) is replaced before munged ever starts.
    fresh = munge_facts(installed=False, unit=Unit(munge.UNIT, "inactive", "dead", "disabled", "success"))
    assert names(munge.plan(ctx, fresh)) == ["munge: install the cluster's key"]
    assert names(munge.plan(ctx, dataclasses.replace(fresh, installed=True))) == ["munge: start munged"]
    # A key changed under a running munged: install, then restart.
    assert names(munge.plan(ctx, munge_facts(installed=False))) == ["munge: install the cluster's key"]
    assert names(munge.plan(ctx, munge_facts(stale=True))) == ["munge: restart munged"]
    assert names(munge.plan(ctx, munge_facts(unit=Unit(munge.UNIT, "active", "running", "disabled", "success")))) \
        == ["munge: enable munged"]
    assert munge.health(ctx, munge_facts()).state == State.OK
    assert munge.health(ctx, munge_facts(works=False)).state == State.FAILED


# ---------------------------------------------------------------- slurmd


def test_slurmd_plan_and_health(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    ctx, f = fixture(seeds, "slurm-c1-compute.json", slurm)
    assert slurm.plan(ctx, f) == []
    assert names(slurm.plan(ctx, dataclasses.replace(f, dropin=None))) == ["slurm: write slurmd's drop-in"]
    stopped = Unit(slurmconf.SLURMD_UNIT, "failed", "failed", "enabled", "exit-code")
    assert names(slurm.plan(ctx, dataclasses.replace(f, unit=stopped))) == ["slurm: start slurmd"]
    retrying = Unit(slurmconf.SLURMD_UNIT, "activating", "auto-restart", "enabled", "exit-code")
    assert isinstance(slurm.plan(ctx, dataclasses.replace(f, unit=retrying)), Wait)

    ok = slurm.health(ctx, f)
    assert (ok.state, ok.detail) == (State.OK, {"controller": "s2", "state": "idle"})
    for state, expected in (("drained", State.DEGRADED), ("draining", State.DEGRADED), ("down", State.FAILED),
                            ("idle*", State.WAITING), ("allocated", State.OK), ("mixed", State.OK)):
        assert slurm.health(ctx, dataclasses.replace(f, state=state)).state == expected, state
    unknown = dataclasses.replace(f, state=None, state_why="not registered")
    assert slurm.health(ctx, unknown).state == State.WAITING
    # A controller that started without the previous state does not know the node: slurmd
    # registers at start only, so it is restarted (not while it may still be registering).
    assert names(slurm.plan(ctx, unknown)) == ["slurm: restart slurmd"]
    assert slurm.plan(ctx, dataclasses.replace(unknown, running_for=20.0)) == []
    assert slurm.plan(ctx, dataclasses.replace(unknown, state_why="timed out")) == []
    assert slurm.health(ctx, dataclasses.replace(f, controller="")).state == State.WAITING
    wrong_uid = slurm.health(ctx, dataclasses.replace(f, operator_uid=1001))
    assert wrong_uid.state == State.DEGRADED and "forge" in wrong_uid.reason


def test_what_slurm_says_parsed() -> None:
    ping = ("Slurmctld(primary) at s1 is DOWN\nSlurmctld(backup1) at s2 is UP\nSlurmctld(backup2) at s3 is DOWN\n"
            "*****************************************\n** RESTORE SLURMCTLD DAEMON TO SERVICE **\n")
    assert slurmconf.parse_ping(ping) == "s2"
    assert slurmconf.parse_ping("Slurmctld(primary) at s1 is DOWN\n") == ""
    assert slurmconf.parse_nodes("s1 idle\nc1 down*\n\n") == {"s1": "idle", "c1": "down*"}
    assert slurmconf.summary({"s1": "idle", "s2": "idle", "c1": "mixed"}) == "2 idle, 1 mixed"
    record = "JobId=3 JobName=wrap UserId=root(0) GroupId=root(0) JobState=NODE_FAIL Reason=None ExitCode=0:0"
    assert faults.job_state(record) == "NODE_FAIL" and "NODE_FAIL" in faults.FINAL_JOB_STATES
    assert faults.job_state("slurm_load_jobs error: Invalid job id specified") == ""
    assert faults.field(record + " BatchHost=s2 NodeList=s2", "BatchHost") == "s2"


def test_a_backup_is_told_its_place(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    """The place `scontrol takeover` is given: the node's SlurmctldHost line, 0 the primary."""
    places = {name: slurmctld.index(Ctx(seed)) for name, seed in seeds["example"].items()}
    assert places == {"s1": 0, "s2": 1, "s3": 2}
    conf = slurmconf.slurm_conf(seeds["example"]["s1"].cluster).splitlines()
    hosts = [line for line in conf if line.startswith("SlurmctldHost=")]
    assert [hosts[place].split("=")[1].split("(")[0] for place in places.values()] == list(places)


# ---------------------------------------------------------------- the controller


def test_converged_nodes_plan_nothing(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    """A pass on a converged node changes nothing: the loop's own pass over recorded-style facts."""
    for name in ("slurm-s1-controller.json", "slurm-s2-standby.json", "slurm-c1-compute.json"):
        doc = json.loads((FACTS / name).read_text())
        for service in doc["facts"]:
            ctx, f = fixture(seeds, name, MODULES[service])
            module = MODULES[service]
            stub = SimpleNamespace(name=module.name, needs=(), applies=module.applies, facts=lambda ctx, f=f: f,
                                   plan=module.plan, health=module.health)
            result = core.run_pass(ctx, [stub], {}, lambda line: None)
            assert result.changed == [], (name, service)
            assert result.statuses[service].state == State.OK, (name, service, result.statuses[service])


def test_fixtures_round_trip() -> None:
    paths = sorted(FACTS.glob("slurm-*.json"))
    assert len(paths) >= 4
    for path in paths:
        doc = json.loads(path.read_text())
        for service, data in doc["facts"].items():
            facts = core.from_jsonable(MODULES[service].Facts, data)
            assert core.to_jsonable(facts) == data, (path.name, service)


def test_health_names_the_controller_and_the_nodes(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    ctx, f = fixture(seeds, "slurm-s1-controller.json", slurmctld)
    status = slurmctld.health(ctx, f)
    assert status.detail == {"controller": "s1", "nodes": {"s1": "idle", "s2": "idle", "s3": "idle"}}
    assert "3 idle" in status.reason and "rbd/slurmctld-state" in status.reason
    ctx, f = fixture(seeds, "slurm-s2-standby.json", slurmctld)
    status = slurmctld.health(ctx, f)
    assert (status.state, status.detail) == (State.OK, {"controller": "s1"})
    assert slurmctld.health(ctx, dataclasses.replace(f, holder="")).state == State.WAITING
    # Without Ceph, check-cluster says what a failover keeps and what it loses.
    local = slurmctld.health(Ctx(without_ceph(ctx.seed)), f)
    assert "keeps the nodes and the partition and loses the job queue" in local.reason


def test_takeover_fences_maps_mounts_and_starts(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    """The elected node, with nothing mapped, while the previous holder (s2, paused) still
    watches and locks the image: fence first, then map, mount, own, start."""
    ctx, f = fixture(seeds, "slurm-s1-takeover.json", slurmctld)
    assert f.leader and f.image is not None and not f.devices
    s2 = "10.0.0.12:0/2254811930"
    assert names(slurmctld.plan(ctx, f)) == ["slurmctld: fence the previous holder"]
    assert s2 in slurmctld.plan(ctx, f)[0].why  # type: ignore[index]
    # Once blocklisted (the image still lists it until the OSDs drop its watch): map.
    fenced = dataclasses.replace(f.image, blocklisted=(f"v1:{s2}",))
    assert names(slurmctld.plan(ctx, dataclasses.replace(f, image=fenced))) == ["slurmctld: map the state image"]
    mapped = dataclasses.replace(f, image=None, devices=("/dev/rbd0",), term=f.token, fs="ext4")
    assert names(slurmctld.plan(ctx, mapped)) == ["slurmctld: check and mount the state"]
    mounted = dataclasses.replace(mapped, fs=None, mounted="/dev/rbd0", state_dir_ok=False)  # a new root: root's
    assert names(slurmctld.plan(ctx, mounted)) == ["slurmctld: give the state to the slurm user"]
    owned = dataclasses.replace(mounted, state_dir_ok=True)
    assert names(slurmctld.plan(ctx, owned)) == ["slurmctld: start the controller"]
    running = dataclasses.replace(owned, unit=Unit(slurmconf.SLURMCTLD_UNIT, "active", "running", "disabled", ""))
    assert slurmctld.plan(ctx, running) == []


def test_first_use_creates_and_formats_never_reformats(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    ctx, f = fixture(seeds, "slurm-s1-takeover.json", slurmctld)
    missing = slurmstate.Image(exists=False, watchers=(), lockers=(), blocklisted=())
    assert names(slurmctld.plan(ctx, dataclasses.replace(f, image=missing))) == ["slurmctld: create the state image"]
    created = dataclasses.replace(missing, exists=True)
    assert names(slurmctld.plan(ctx, dataclasses.replace(f, image=created))) == ["slurmctld: map the state image"]
    blank = dataclasses.replace(f, image=None, devices=("/dev/rbd0",), term=f.token, fs="")
    assert names(slurmctld.plan(ctx, blank)) == ["slurmctld: make the state's filesystem"]
    for other in ("xfs", "dos", "unknown signature"):
        refused = slurmctld.plan(ctx, dataclasses.replace(blank, fs=other))
        assert isinstance(refused, Wait) and "not formatting" in refused.reason
    # Ceph does not tell (most likely it answers no core node): wait, saying why.
    silent = slurmctld.plan(ctx, dataclasses.replace(f, image=None, ceph_why="no monitor quorum answers"))
    assert isinstance(silent, Wait) and "no monitor quorum answers" in silent.reason


def test_standby_with_a_running_controller_stops_it_first(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    ctx, f = fixture(seeds, "slurm-s2-standby.json", slurmctld)
    running = Unit(slurmconf.SLURMCTLD_UNIT, "active", "running", "enabled", "success")
    stray = dataclasses.replace(f, unit=running, conf=None, dropin=None)
    assert names(slurmctld.plan(ctx, stray)) == ["slurmctld: stop the controller"]
    stopped = dataclasses.replace(stray, unit=dataclasses.replace(running, active="inactive", sub="dead"))
    assert names(slurmctld.plan(ctx, stopped)) == ["slurmctld: write slurm.conf",
                                                   "slurmctld: write slurmctld's drop-in",
                                                   "slurmctld: do not start slurmctld at boot"]


def test_holder_whose_lease_is_gone_stops_at_once(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    ctx, f = fixture(seeds, "slurm-s1-controller.json", slurmctld)
    lost = dataclasses.replace(f, leader=False, token=None, holder="s3", why="lost to s3 (token 12)", nodes=None)
    plan = slurmctld.plan(ctx, lost)
    assert names(plan) == ["slurmctld: stop the controller"] and "lost to s3" in plan[0].why  # type: ignore[index]
    stopped = dataclasses.replace(lost, unit=dataclasses.replace(f.unit, active="inactive", sub="dead"))
    assert names(slurmctld.plan(ctx, stopped)) == ["slurmctld: unmount the controller's state"]
    unmounted = dataclasses.replace(stopped, mounted="")
    assert names(slurmctld.plan(ctx, unmounted)) == ["slurmctld: unmap the state image"]
    assert slurmctld.plan(ctx, dataclasses.replace(unmounted, devices=())) == []
    # Unsure (etcd does not answer) is not holding: the same.
    doubt = dataclasses.replace(lost, holder="", why="cannot confirm with etcd: no member answered")
    assert names(slurmctld.plan(ctx, doubt)) == ["slurmctld: stop the controller"]


def test_a_mapping_from_an_earlier_term_is_made_anew(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    """Elected again after another node held the role in between (which fenced this node's
    mapping): stop, unmount, unmap, then take the image as on any takeover."""
    ctx, f = fixture(seeds, "slurm-s1-controller.json", slurmctld)
    again = dataclasses.replace(f, token=15, nodes=None)
    plan = slurmctld.plan(ctx, again)
    assert names(plan) == ["slurmctld: stop the controller"] and "earlier term" in plan[0].why  # type: ignore[index]
    stopped = dataclasses.replace(again, unit=dataclasses.replace(f.unit, active="inactive", sub="dead"))
    assert names(slurmctld.plan(ctx, stopped)) == ["slurmctld: unmount the controller's state"]
    assert names(slurmctld.plan(ctx, dataclasses.replace(stopped, mounted=""))) == ["slurmctld: unmap the state image"]
    clean = dataclasses.replace(stopped, mounted="", devices=(), image=slurmstate.Image(True, (), (), ()))
    assert names(slurmctld.plan(ctx, clean)) == ["slurmctld: map the state image"]


def test_elected_with_a_controller_running_unmounted_stops_it(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    ctx, f = fixture(seeds, "slurm-s1-controller.json", slurmctld)
    unmounted = dataclasses.replace(f, mounted="", fs="ext4")
    assert names(slurmctld.plan(ctx, unmounted)) == ["slurmctld: stop the controller"]


def test_without_ceph_the_state_stays_local(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    ctx, f = fixture(seeds, "slurm-s1-controller.json", slurmctld)
    ctx = Ctx(without_ceph(ctx.seed))
    stopped = Unit(slurmconf.SLURMCTLD_UNIT, "inactive", "dead", "disabled", "success")
    base = dataclasses.replace(f, devices=(), mounted="", unit=stopped, nodes=None,
                               dropin=slurmconf.slurmctld_dropin(False), state_holder="s1", local_state=True)
    assert names(slurmctld.plan(ctx, base)) == ["slurmctld: start the controller"]
    # Another core node ran the controller since: its old state is set aside, not revived.
    assert names(slurmctld.plan(ctx, dataclasses.replace(base, state_holder="s2"))) == \
        ["slurmctld: set aside an older state"]
    fresh = dataclasses.replace(base, state_holder="s2", local_state=False)
    assert names(slurmctld.plan(ctx, fresh)) == ["slurmctld: record where the state is"]
    assert names(slurmctld.plan(ctx, dataclasses.replace(base, state_holder=""))) == \
        ["slurmctld: record where the state is"]
    assert isinstance(slurmctld.plan(ctx, dataclasses.replace(base, state_holder=None)), Wait)


class FakeElection:
    def __init__(self, held: bool, token: int = 7):
        self.held, self.token_value, self.resigned = held, token, False
        self.why = "" if held else "lost to s3 (token 9)"

    def holding(self) -> bool:
        return self.held

    @property
    def token(self) -> int | None:
        return self.token_value if self.held else None

    def resign(self) -> None:
        self.resigned = True


def test_takeover_steps_confirm_the_role_and_give_it_up_on_failure(
        tmp_path: Path, seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    ctx = Ctx(seeds["example"]["s1"], run_dir=tmp_path)
    tokens: list[int] = []
    ctx._elections[slurmctld.ELECTION] = FakeElection(held=False)  # type: ignore[assignment]
    step = slurmctld.take(ctx, "map the state image", "test", tokens.append)
    with pytest.raises(StepFailed, match="lost the role before I could map the state image"):
        step.apply()
    assert tokens == []  # never acted
    ctx._elections[slurmctld.ELECTION] = held = FakeElection(held=True, token=42)  # type: ignore[assignment]
    slurmctld.take(ctx, "mount", "test", tokens.append).apply()
    assert tokens == [42] and not held.resigned  # the fencing token handed to the step

    def fail(token: int) -> None:
        raise RuntimeError("map failed")

    with pytest.raises(RuntimeError):
        slurmctld.take(ctx, "map", "test", fail).apply()
    assert held.resigned and slurmctld.gave_up_marker(ctx).exists()


def test_fencing_list_and_mappings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = slurmstate.Image(True, watchers=("10.0.0.12:0/1", "10.0.0.13:0/2"),
                             lockers=("v1:10.0.0.12:0/1",), blocklisted=("10.0.0.13:0/2", "10.0.0.99:0/5"))
    assert slurmstate.unfenced(image) == ["10.0.0.12:0/1"]  # one client, listed twice
    for dev, pool, name in (("0", "rbd", "slurmctld-state"), ("1", "rbd", "other"), ("3", "k3s", "slurmctld-state")):
        (tmp_path / dev).mkdir()
        (tmp_path / dev / "pool").write_text(pool + "\n")
        (tmp_path / dev / "name").write_text(name + "\n")
    monkeypatch.setattr(slurmstate, "SYSFS", tmp_path)
    assert slurmstate.mapped() == ("/dev/rbd0",)


def test_only_the_controller_waits_for_ceph() -> None:
    """slurmd needs munge only, so a blocked Ceph (or etcd) never stops it; the controller's
    module needs nothing, so that its stop path runs whatever else is blocked."""
    assert slurm.needs == ("munge",) and munge.needs == () and slurmctld.needs == ()


def test_roles_of_the_example(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    for seed in seeds["example"].values():
        assert seed.me.has(Role.CORE) and seed.me.has(Role.COMPUTE)
        ctx = Ctx(seed)
        assert slurmctld.applies(ctx) and slurm.applies(ctx) and munge.applies(ctx)
        assert slurmctld.on_rbd(ctx)


def test_the_controller_deletes_a_removed_node_that_registered_again(seeds: dict[str, dict[str, seedlib.Seed]]) -> None:
    """A node cluster.remove took out while it was off comes back with the cluster's munge key;
    its `slurmd -Z` registers it: the controller's agent deletes it (and only such nodes)."""
    ctx, f = fixture(seeds, "slurm-s1-controller.json", slurmctld)
    assert slurmctld.plan(ctx, f) == []
    ctx, f = fixture(seeds, "slurm-s1-controller.json", slurmctld, strangers=("c9",))
    plan = slurmctld.plan(ctx, f)
    assert names(plan) == ["slurmctld: delete nodes that are not the cluster's"]
    assert plan[0].why.startswith("c9: removed from the cluster")  # type: ignore[index]
    # What counts as a stranger: not in the seed; the seed's nodes never are (no etcd asked).
    assert slurmctld.strangers(ctx, {"s1": "idle", "s2": "idle"}) == ()


def test_why_ceph_did_not_tell_names_what_did_not_answer() -> None:
    """Formation (run 16): with the monitors in quorum and no OSD up yet, `rbd info` hangs on the
    pool; that is not reported as the monitors' silence."""
    assert slurmstate.unanswered(CommandError(["/usr/bin/ceph", "osd", "blocklist", "ls"], None, "",
                                              "timed out after 30.0s")) == "no monitor quorum answers"
    rbd = slurmstate.unanswered(CommandError(["/usr/bin/rbd", "info", "rbd/slurmctld-state"], None, "",
                                             "timed out after 30.0s"))
    assert "rbd did not answer" in rbd and "placement group" in rbd
    assert "Permission denied" in slurmstate.unanswered(
        CommandError(["/usr/bin/rbd", "status"], 13, "rbd: error: (13) Permission denied\n"))
