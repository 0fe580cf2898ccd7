"""EtcdClient against a real 3-member etcd 3.4 on loopback with mutual TLS (see etcd_cluster.py)."""

from __future__ import annotations

import http.client
import re
import ssl
import threading
import time
import uuid

import pytest

from clusterforge.node.agent.etcd_client import (
    EtcdClient,
    EtcdError,
    KeyValue,
    TLSFiles,
    compare_lease,
    compare_value,
    op_delete,
    op_get,
    op_put,
    response_kvs,
)

from .etcd_cluster import EtcdCluster, free_ports, issue, make_ca


@pytest.fixture
def prefix() -> str:
    return f"/test/{uuid.uuid4().hex[:8]}/"


def dead_endpoint() -> str:
    return f"https://127.0.0.1:{free_ports(1)[0]}"


def follower(etcd: EtcdCluster) -> str:
    """The follower started last: stopping a follower needs no new election, and the one started last
    leaves the members that have been connected longest (see test_wiped_member_rejoins), so tests stay fast."""
    client = etcd.client()
    leader = client.status(etcd.endpoints[0]).leader
    followers = [m for m in etcd.members if client.status(m.client_url).member_id != leader]
    return max(followers, key=lambda m: m.started).name


def test_put_get_delete(etcd: EtcdCluster, prefix: str) -> None:
    c = etcd.client()
    assert c.get(prefix + "a") is None
    rev = c.put(prefix + "a", "one")
    assert c.get(prefix + "a") == KeyValue(prefix + "a", b"one", create_revision=rev, mod_revision=rev, lease=0)
    rev2 = c.put(prefix + "a", b"\x00\xfftwo")
    kv = c.get(prefix + "a")
    assert kv is not None and kv.value == b"\x00\xfftwo"
    assert (kv.create_revision, kv.mod_revision) == (rev, rev2) and rev2 > rev
    c.put(prefix + "b", "")
    c.put(prefix + "b/c", "y")
    c.put(prefix[:-1] + "0", "just past the prefix")
    assert [(kv.key, kv.value) for kv in c.get_prefix(prefix)] == [
        (prefix + "a", b"\x00\xfftwo"), (prefix + "b", b""), (prefix + "b/c", b"y")]
    kvs, revision = c.range(prefix, prefix=True)
    assert len(kvs) == 3 and revision >= max(kv.mod_revision for kv in kvs)
    assert c.delete(prefix + "a") == 1
    assert c.delete(prefix + "a") == 0
    assert c.delete_prefix(prefix) == 2
    assert c.get_prefix(prefix) == []
    assert c.get(prefix[:-1] + "0") is not None


def test_create_only_once(etcd: EtcdCluster, prefix: str) -> None:
    c = etcd.client()
    assert c.create(prefix + "k", "first") is True
    assert c.create(prefix + "k", "second") is False
    kv = c.get(prefix + "k")
    assert kv is not None and kv.value == b"first"


def test_txn_branches(etcd: EtcdCluster, prefix: str) -> None:
    c = etcd.client()
    c.put(prefix + "k", "v1")
    ok, responses = c.txn([compare_value(prefix + "k", "v1")], [op_put(prefix + "k", "v2")], [op_get(prefix + "k")])
    assert ok is True and "response_put" in responses[0]
    # The reply of a failed txn has no "succeeded" at all (false is protobuf's default): still False here.
    ok, responses = c.txn([compare_value(prefix + "k", "v1")], [op_put(prefix + "k", "v3")], [op_get(prefix + "k")])
    assert ok is False
    assert [kv.value for kv in response_kvs(responses[0])] == [b"v2"]
    ok, responses = c.txn([compare_value(prefix + "missing", "x")], [], [op_get(prefix + "missing")])
    assert ok is False and response_kvs(responses[0]) == []
    # A write guarded by a leader key's lease (what a holder does to fence its own writes), and a delete.
    lease = c.lease_grant(10)
    c.put(prefix + "leader", "me", lease=lease)
    guarded = [op_put(prefix + "state", "s"), op_delete(prefix + "k")]
    ok, _ = c.txn([compare_lease(prefix + "leader", lease)], guarded, [])
    assert ok is True and c.get(prefix + "k") is None
    ok, _ = c.txn([compare_lease(prefix + "leader", lease + 1)], [op_put(prefix + "state", "stale")], [])
    kv = c.get(prefix + "state")
    assert ok is False and kv is not None and kv.value == b"s"
    c.lease_revoke(lease)


def test_lease_lifecycle(etcd: EtcdCluster, prefix: str) -> None:
    c = etcd.client()
    lease = c.lease_grant(5)
    c.put(prefix + "leased", "x", lease=lease)
    kv = c.get(prefix + "leased")
    assert kv is not None and kv.lease == lease
    assert 0 < c.lease_keepalive(lease) <= 5
    assert 0 <= c.lease_ttl(lease) <= 5
    assert c.lease_revoke(lease) is True
    assert c.get(prefix + "leased") is None  # revoking deletes the keys attached to the lease
    assert c.lease_keepalive(lease) == 0  # the gateway's answer for a lease that is gone: no TTL field
    assert c.lease_ttl(lease) == -1
    assert c.lease_revoke(lease) is False
    with pytest.raises(EtcdError, match="lease not found") as err:
        c.put(prefix + "leased", "x", lease=lease)
    assert err.value.code == 5 and "no etcd endpoint" not in str(err.value)  # a live refusal: not retried


def test_lease_ttl_is_raised_to_etcd_minimum(etcd: EtcdCluster) -> None:
    c = etcd.client()
    lease = c.lease_grant(1)  # below 1.5 x election timeout (1 s here): etcd grants 2
    try:
        assert c.lease_keepalive(lease) == 2
    finally:
        c.lease_revoke(lease)


def test_member_list_and_status(etcd: EtcdCluster) -> None:
    c = etcd.client()
    members = c.member_list()
    assert sorted(m.name for m in members) == ["m1", "m2", "m3"]
    assert sorted(u for m in members for u in m.client_urls) == sorted(etcd.endpoints)
    assert all(m.id and len(m.peer_urls) == 1 for m in members)
    ids = {m.id for m in members}
    statuses = [c.status(ep) for ep in etcd.endpoints]
    assert {s.member_id for s in statuses} == ids
    assert len({s.leader for s in statuses}) == 1 and statuses[0].leader in ids
    assert all(s.raft_term > 0 and s.raft_index > 0 and s.db_size > 0 and s.errors == () for s in statuses)
    assert statuses[0].version.startswith("3.4.")


def test_failover_past_a_dead_endpoint(etcd: EtcdCluster, prefix: str) -> None:
    c = EtcdClient([dead_endpoint(), *etcd.endpoints], etcd.client_tls, timeout=2)
    c.put(prefix + "k", "v")
    assert c.endpoint == etcd.endpoints[0]  # remembered: the dead one is not tried first again
    kv = c.get(prefix + "k")
    assert kv is not None and kv.value == b"v"


def test_failover_when_a_member_dies(etcd: EtcdCluster, prefix: str) -> None:
    victim = etcd.member(follower(etcd))
    c = EtcdClient([victim.client_url, *[e for e in etcd.endpoints if e != victim.client_url]], etcd.client_tls)
    c.put(prefix + "k", "before")
    assert c.endpoint == victim.client_url
    etcd.kill_member(victim.name)
    c.put(prefix + "k", "after")
    assert c.endpoint != victim.client_url
    kv = c.get(prefix + "k")
    assert kv is not None and kv.value == b"after"


def test_failover_past_a_hung_member(etcd: EtcdCluster, prefix: str) -> None:
    """A paused member accepts the connection and never answers: the timeout moves on to the next one."""
    hung = etcd.member(follower(etcd))
    c = EtcdClient([hung.client_url, *[e for e in etcd.endpoints if e != hung.client_url]], etcd.client_tls,
                   timeout=0.5)
    etcd.pause_member(hung.name)
    try:
        start = time.monotonic()
        c.put(prefix + "k", "v")
        assert 0.5 <= time.monotonic() - start < 2
        start = time.monotonic()
        assert c.get(prefix + "k") is not None
        assert time.monotonic() - start < 0.4  # the member that answered is asked first now
        alone = rf"^no etcd endpoint answered: {re.escape(hung.client_url)} \(timed out\)$"
        with pytest.raises(EtcdError, match=alone):
            EtcdClient([hung.client_url], etcd.client_tls, timeout=0.5).get(prefix + "k")
    finally:
        etcd.resume_member(hung.name)


def test_no_endpoint_answers(etcd: EtcdCluster) -> None:
    dead = [dead_endpoint(), dead_endpoint()]
    c = EtcdClient(dead, etcd.client_tls, timeout=2)
    start = time.monotonic()
    with pytest.raises(EtcdError) as err:
        c.get("/anything")
    assert time.monotonic() - start < 1
    assert str(err.value) == ("no etcd endpoint answered: "
                              f"{dead[0]} (connection refused), {dead[1]} (connection refused)")


def test_watch_sees_changes_after_start_revision(etcd: EtcdCluster, prefix: str) -> None:
    c = etcd.client()
    rev = c.put(prefix + "old", "x")
    start = time.monotonic()
    assert c.watch(prefix, rev + 1, timeout=0.3) == []
    assert 0.25 < time.monotonic() - start < 2

    def later() -> None:
        time.sleep(0.1)
        etcd.client().put(prefix + "new", "y")

    writer = threading.Thread(target=later)
    writer.start()
    start = time.monotonic()
    events = c.watch(prefix, rev + 1, timeout=5)
    writer.join()
    assert time.monotonic() - start < 2  # woken by the put, not by the timeout
    assert [(e.type, e.kv.key, e.kv.value) for e in events] == [("PUT", prefix + "new", b"y")]
    deleted = c.delete(prefix + "new")
    assert deleted == 1
    events = c.watch(prefix, events[-1].kv.mod_revision + 1, timeout=5)
    assert [(e.type, e.kv.key) for e in events] == [("DELETE", prefix + "new")]
    # From an older revision: the history since then arrives in one batch, oldest first.
    events = c.watch(prefix, rev, timeout=5)
    assert [(e.type, e.kv.key) for e in events] == [("PUT", prefix + "old"), ("PUT", prefix + "new"),
                                                     ("DELETE", prefix + "new")]


def test_watch_from_compacted_revision(etcd: EtcdCluster, prefix: str) -> None:
    c = etcd.client()
    rev = c.put(prefix + "k", "1")
    c.put(prefix + "k", "2")
    etcd.etcdctl("compaction", str(rev + 1))
    with pytest.raises(EtcdError, match="compacted"):
        c.watch(prefix, rev, timeout=2)


def test_plaintext_is_refused(etcd: EtcdCluster) -> None:
    with pytest.raises(EtcdError, match="https://"):
        EtcdClient([etcd.endpoints[0].replace("https://", "http://")], etcd.client_tls)
    conn = http.client.HTTPConnection("127.0.0.1", etcd.members[0].client_port, timeout=2)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        conn.request("POST", "/v3/kv/range", body='{"key": "eA=="}')
        conn.getresponse()  # etcd's TLS listener hangs up on plain HTTP
    conn.close()


def test_client_without_certificate_is_refused(etcd: EtcdCluster) -> None:
    context = ssl.create_default_context(cafile=str(etcd.client_tls.ca))  # trusts etcd, shows no certificate
    conn = http.client.HTTPSConnection("127.0.0.1", etcd.members[0].client_port, timeout=2, context=context)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        conn.request("POST", "/v3/kv/range", body='{"key": "eA=="}')
        conn.getresponse()
    conn.close()


def test_certificates_of_another_ca_are_refused(etcd: EtcdCluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    stranger = issue(make_ca(tmp_path, "another CA"), tmp_path, "stranger")
    # Our CA, their certificate: etcd refuses the client.
    c = EtcdClient(etcd.endpoints[:1], TLSFiles(etcd.client_tls.ca, stranger.cert, stranger.key), timeout=2)
    with pytest.raises(EtcdError, match=r"no etcd endpoint answered: .* \(TLS: "):
        c.get("/anything")
    # Our certificate, their CA: the client refuses etcd.
    c = EtcdClient(etcd.endpoints[:1], TLSFiles(stranger.ca, etcd.client_tls.cert, etcd.client_tls.key), timeout=2)
    with pytest.raises(EtcdError, match="certificate verify failed|unable to get local issuer"):
        c.get("/anything")


def test_missing_tls_files_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    files = TLSFiles(tmp_path / "ca.crt", tmp_path / "node.crt", tmp_path / "node.key")
    with pytest.raises(EtcdError, match="ca.crt"):
        EtcdClient(["https://127.0.0.1:2379"], files)


def test_wiped_member_rejoins(etcd: EtcdCluster, prefix: str) -> None:
    """The replace-a-wiped-member flow: remove the old id, add it again, start it with state "existing"."""
    c = etcd.client(timeout=5)
    c.put(prefix + "k", "kept")
    victim = etcd.member(follower(etcd))
    old = next(m for m in c.member_list() if m.name == victim.name)
    etcd.kill_member(victim.name)
    etcd.wipe_member(victim.name)
    c.member_remove(old.id)
    assert victim.name not in [m.name for m in c.member_list()]
    # etcd's strict reconfiguration check refuses a voting member ("unhealthy cluster") until the leader
    # has been connected to every remaining member for 5 s; the agent simply tries again next pass.
    deadline = time.monotonic() + 15
    while True:
        try:
            added = c.member_add([victim.peer_url])
            break
        except EtcdError as e:
            assert "unhealthy cluster" in str(e) and e.code == 14, e
            assert time.monotonic() < deadline, e
            time.sleep(0.1)
    assert added.id != old.id and added.name == "" and added.client_urls == ()
    assert added.peer_urls == (victim.peer_url,)
    assert [m for m in c.member_list() if m.id == added.id] == [added]
    etcd.start_member(victim.name, state="existing")  # waits until it serves a linearizable read
    deadline = time.monotonic() + 10
    while (joined := next(m for m in c.member_list() if m.id == added.id)).name != victim.name:
        assert time.monotonic() < deadline, f"{victim.name} never published its name: {joined}"
        time.sleep(0.05)
    assert joined.client_urls == (victim.client_url,)
    kv = etcd.client([victim.client_url]).get(prefix + "k")
    assert kv is not None and kv.value == b"kept"
