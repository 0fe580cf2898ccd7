"""Election against a real 3-member etcd on loopback: one holder at a time, fencing tokens, no waiting."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from clusterforge.node.agent.election import Election
from clusterforge.node.agent.etcd_client import EtcdClient, EtcdError

from .etcd_cluster import EtcdCluster, free_ports


@pytest.fixture
def name() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def contenders(etcd: EtcdCluster, name: str, count: int, ttl: int = 10) -> list[Election]:
    return [Election(etcd.client(), name, f"node{i}", ttl=ttl) for i in range(count)]


def test_one_holder_among_contenders(etcd: EtcdCluster, name: str) -> None:
    elections = contenders(etcd, name, 5)
    with ThreadPoolExecutor(len(elections)) as pool:
        first = list(pool.map(Election.campaign, elections))
    assert first.count(True) == 1
    winner = elections[first.index(True)]
    assert winner.token is not None and winner.why == ""
    # Idempotent: the holder keeps it, the others keep losing, and holding() agrees.
    assert [e.campaign() for e in elections] == first
    assert [e.holding() for e in elections] == first
    assert winner.leader() == (winner.holder, winner.token)
    for loser in elections:
        if loser is not winner:
            assert loser.token is None and f"held by {winner.holder}" in loser.why
    for e in elections:
        e.resign()


def test_revoked_lease_stops_the_holder_at_once(etcd: EtcdCluster, name: str) -> None:
    a, b = contenders(etcd, name, 2)
    assert a.campaign() and not b.campaign()
    old_token = a.token
    assert old_token is not None
    etcd.client().lease_revoke(a.lease)  # behind its back
    assert a.holding() is False
    assert a.lease == 0 and a.token is None and "lease" in a.why
    assert b.campaign() is True  # no wait: the key went with the lease
    assert b.token is not None and b.token > old_token
    assert a.holding() is False and a.campaign() is False
    assert b.holding() is True
    assert a.leader() == (b.holder, b.token)
    b.resign()


def test_expired_lease_passes_leadership_on(etcd: EtcdCluster, name: str) -> None:
    a, b = contenders(etcd, name, 2, ttl=2)
    assert a.campaign() and not b.campaign()
    old_token = a.token
    assert old_token is not None
    # a stops keeping its lease alive (a paused node); b keeps campaigning, as the agent's loop would.
    start = time.monotonic()
    while not b.campaign():
        assert time.monotonic() - start < 6, f"b never took over: {b.why}"
        assert a.leader() in ((a.holder, old_token), None)  # never two holders
        time.sleep(0.1)
    assert time.monotonic() - start > 1  # it waited for the lease, not for nothing
    assert b.token is not None and b.token > old_token
    assert a.holding() is False and a.token is None
    b.resign()


def test_resign_lets_another_take_it(etcd: EtcdCluster, name: str) -> None:
    a, b = contenders(etcd, name, 2)
    assert a.campaign() and not b.campaign()
    old_token = a.token
    assert old_token is not None
    a.resign()
    assert a.token is None and a.lease == 0 and a.leader() is None
    assert b.campaign() is True
    assert b.token is not None and b.token > old_token
    assert a.holding() is False
    a.resign()  # nothing to give up: no error
    b.resign()


def test_deleted_key_is_noticed(etcd: EtcdCluster, name: str) -> None:
    (a,) = contenders(etcd, name, 1)
    assert a.campaign()
    etcd.client().delete(a.key)
    assert a.holding() is False and a.lease == 0
    assert a.campaign() is True  # a fresh lease and a fresh key


def test_unreachable_etcd_means_not_holding(etcd: EtcdCluster, name: str) -> None:
    client = EtcdClient([f"https://127.0.0.1:{port}" for port in free_ports(2)], etcd.client_tls, timeout=1)
    e = Election(client, name, "node0")
    assert e.campaign() is False and e.holding() is False
    assert e.why.startswith("cannot confirm with etcd: no etcd endpoint answered")
    with pytest.raises(EtcdError):
        e.leader()


def test_bad_name_is_a_bug(etcd: EtcdCluster) -> None:
    with pytest.raises(ValueError):
        Election(etcd.client(), "a/b", "node0")
