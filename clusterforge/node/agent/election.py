"""Leader election on an etcd lease: one holder per name, fencing tokens, no sleeps.

The holder's key /clusterforge/leader/<name> carries the holder's name and is attached to its
lease, so the key vanishes when the holder stops keeping the lease alive (crash, partition,
pause) and another contender's txn on create_revision == 0 then wins. The key's create_revision
is the fencing token: every new holder creates the key anew, so tokens strictly increase, and a
resource that remembers the highest token it has seen can refuse an older holder that has not
noticed yet (a paused node cannot step down by itself).

The agent's loop calls campaign() every pass (about TTL/3 apart); a holder calls holding() before
it acts. Neither trusts local memory: each call asks etcd, and any doubt (lease gone, key taken,
etcd unreachable) answers False, with the reason in `why` for the agent's status line.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .etcd_client import (
    EtcdClient,
    EtcdError,
    compare_create_revision,
    op_get,
    op_put,
    response_kvs,
)

LEADER_PREFIX = "/clusterforge/leader/"
T = TypeVar("T")


def _locked(method: Callable[..., T]) -> Callable[..., T]:
    """The agent's loop and its keeper thread both touch an election: one at a time."""

    @functools.wraps(method)
    def wrapper(self: Election, *args: Any, **kwargs: Any) -> T:
        with self._mutex:
            return method(self, *args, **kwargs)

    return wrapper


class Election:
    def __init__(self, client: EtcdClient, name: str, holder: str, ttl: int = 10):
        if not name or "/" in name:
            raise ValueError(f"election name must be one non-empty path segment: {name!r}")
        self.client = client
        self.key = LEADER_PREFIX + name
        self.holder = holder
        self.ttl = ttl
        self.why = "not campaigned yet"  # one line: why we do not hold it (empty while we do)
        self._lease = 0
        self._token: int | None = None
        self._mutex = threading.RLock()

    @property
    def lease(self) -> int:
        """Our lease id, 0 when we have none."""
        return self._lease

    @property
    def token(self) -> int | None:
        """Our fencing token as of the last campaign()/holding() that returned True; None otherwise."""
        return self._token

    @_locked
    def campaign(self) -> bool:
        """Take the key if it is free, keep it if it is already ours; True when we hold it. Never blocks."""
        try:
            if self._lease and self.client.lease_keepalive(self._lease) <= 0:
                self._forget("our lease expired")
            if not self._lease:
                self._lease = self.client.lease_grant(self.ttl)
            won, responses = self.client.txn(
                [compare_create_revision(self.key, 0)],
                [op_put(self.key, self.holder, self._lease)],
                [op_get(self.key)],
            )
        except EtcdError as e:
            return self._doubt(e)
        if won:
            # A created key's create_revision is the txn's revision.
            self._token = int(responses[0]["response_put"]["header"]["revision"])
            self.why = ""
            return True
        kvs = response_kvs(responses[0])
        if not kvs:  # cannot happen (the txn is atomic), but a wrong True would be the worse bug
            return self._lose("the leader key vanished during the txn")
        return self._judge(kvs[0].value, kvs[0].lease, kvs[0].create_revision)

    @_locked
    def holding(self) -> bool:
        """Keep our lease alive and confirm in etcd that the key is still ours; False means stop acting now."""
        if not self._lease:
            return self._lose(self.why or "no lease: campaign first")
        try:
            if self.client.lease_keepalive(self._lease) <= 0:
                self._forget("our lease expired")
                return False
            kv = self.client.get(self.key)
        except EtcdError as e:
            return self._doubt(e)
        if kv is None:
            self._drop_lease("the leader key was deleted")
            return False
        return self._judge(kv.value, kv.lease, kv.create_revision)

    @_locked
    def resign(self) -> None:
        """Give it up now: revoking the lease deletes the key, so the next campaign() anywhere wins.

        Raises EtcdError when etcd cannot be reached; the lease then expires by itself after ttl.
        """
        lease = self._lease
        self._forget("resigned")
        if lease:
            self.client.lease_revoke(lease)

    @_locked
    def keep(self) -> bool | None:
        """For a keeper thread: None when we hold nothing, else holding() (False: stop now)."""
        if self._token is None:
            return None
        return self.holding()

    def leader(self) -> tuple[str, int] | None:
        """The current holder and its fencing token, None when nobody holds it.

        Unlike campaign()/holding(), an unreachable etcd raises EtcdError here: "unknown" is not "nobody".
        """
        kv = self.client.get(self.key)
        return (kv.value.decode(errors="replace"), kv.create_revision) if kv else None

    # ---- internals

    def _judge(self, value: bytes, lease: int, create_revision: int) -> bool:
        if lease == self._lease and value == self.holder.encode():
            self._token = create_revision
            self.why = ""
            return True
        if lease == self._lease:  # our lease, someone else's name: the key was rewritten behind our back
            self._drop_lease("the leader key was overwritten")
            return False
        was_ours = self._token is not None
        self._token = None
        who = value.decode(errors="replace")
        if was_ours:
            # We held it and the key now belongs to another lease: ours guards nothing any more.
            self._drop_lease(f"lost to {who} (token {create_revision})")
        else:
            self.why = f"held by {who} (token {create_revision})"
        return False

    def _doubt(self, e: EtcdError) -> bool:
        # Stop acting, but keep the lease id: if it is still alive when etcd answers again, the key is
        # still ours and campaign()/holding() resume with the same token (nobody else can have held it).
        self._token = None
        self.why = f"cannot confirm with etcd: {e}"
        return False

    def _lose(self, why: str) -> bool:
        self._token = None
        self.why = why
        return False

    def _forget(self, why: str) -> None:
        self._lease = 0
        self._token = None
        self.why = why

    def _drop_lease(self, why: str) -> None:
        """Forget a lease that still exists, revoking it so it does not linger until its TTL runs out."""
        lease = self._lease
        self._forget(why)
        try:
            self.client.lease_revoke(lease)
        except EtcdError:
            pass  # it expires by itself; nothing hangs on it
