"""A small etcd v3 client over the JSON gRPC gateway, with mutual TLS and endpoint failover.

Node code has only the standard library, so this speaks etcd 3.4's gateway (/v3/...) with
http.client rather than gRPC. The gateway's JSON is protobuf's: keys and values are base64,
int64 fields are strings, and any field holding its default value (0, false, "", []) is
omitted, so every reader here supplies the default itself.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

JSON = dict[str, Any]

_GRPC_NOT_FOUND = 5
_GRPC_DEADLINE_EXCEEDED = 4
_GRPC_UNAVAILABLE = 14


def _member_cannot_serve(e: EtcdError) -> bool:
    """True for refusals meaning "this member cannot serve now", which another member may well serve.

    A member cut off from the quorum answers "etcdserver: request timed out" (Unavailable) to reads and
    "context deadline exceeded" (code 2, Unknown) to writes, both after about 7 s; "no leader" and
    "unhealthy cluster" are Unavailable too. A timed-out write may still be applied later, so a retry
    on the next member can apply it twice: fine for puts and lease calls, and the reason create()
    documents its answer as advisory after a failover.
    """
    return e.code in (_GRPC_DEADLINE_EXCEEDED, _GRPC_UNAVAILABLE) or "deadline exceeded" in str(e)


class EtcdError(Exception):
    """One line a person can act on; never carries keys, values or certificate material.

    `code` is the gRPC status code when a live member refused the request (e.g. 5 for a lease
    that does not exist), None when no member answered at all.
    """

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TLSFiles:
    ca: Path  # the cluster CA, which signs every member's certificate
    cert: Path  # this node's certificate (clientAuth); etcd runs with --client-cert-auth
    key: Path


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int  # changes only when the key is created anew: the fencing token of an election
    mod_revision: int
    lease: int  # 0 when the key is not attached to a lease


@dataclass(frozen=True)
class Event:
    type: str  # "PUT" or "DELETE"
    kv: KeyValue  # for DELETE: the key, an empty value and mod_revision = the deletion's revision


@dataclass(frozen=True)
class Member:
    id: int
    name: str  # "" for a member added but not started yet
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]  # empty until the member has started and published them


@dataclass(frozen=True)
class EndpointStatus:
    member_id: int  # the member answering
    leader: int  # the leader's member id as this member sees it; 0 while there is none
    raft_term: int
    raft_index: int
    db_size: int
    version: str
    errors: tuple[str, ...]  # alarms such as "NOSPACE"


def _b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: str) -> str:
    """etcd's range_end for "every key starting with prefix": the prefix with its last byte plus one."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return _b64(bytes(raw))
        raw.pop()
    return _b64(b"\0")  # an empty prefix (or all 0xff) means the whole keyspace


def _kv(obj: JSON) -> KeyValue:
    return KeyValue(
        key=_unb64(obj.get("key", "")).decode(errors="replace"),
        value=_unb64(obj.get("value", "")),
        create_revision=int(obj.get("create_revision", 0)),
        mod_revision=int(obj.get("mod_revision", 0)),
        lease=int(obj.get("lease", 0)),
    )


def _member(obj: JSON) -> Member:
    return Member(id=int(obj.get("ID", 0)), name=obj.get("name", ""),
                  peer_urls=tuple(obj.get("peerURLs", ())), client_urls=tuple(obj.get("clientURLs", ())))


def _revision(reply: JSON) -> int:
    return int(reply.get("header", {}).get("revision", 0))


def _reason(exc: BaseException) -> str:
    """A short cause for the "no endpoint answered" line: what a person checks first."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):  # socket.timeout is the same class since 3.10
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):  # we do not trust the member
        return f"TLS: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLEOFError):
        # How a member refusing our certificate often looks: it hangs up before its alert is read.
        return "TLS: the member closed the connection during the handshake"
    if isinstance(exc, ssl.SSLError):
        if exc.reason and ("BAD_CERTIFICATE" in exc.reason or "CERTIFICATE_REQUIRED" in exc.reason):
            return "TLS: the member refused our client certificate"
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class EtcdClient:
    """Requests go to the member that answered last, then the others in the given order."""

    def __init__(self, endpoints: Sequence[str], tls: TLSFiles, timeout: float = 5.0):
        if not endpoints:
            raise EtcdError("no etcd endpoints given")
        for ep in endpoints:
            # Plain http would send the request (and later the values) unauthenticated: refuse it here.
            if urlsplit(ep).scheme != "https" or not urlsplit(ep).hostname:
                raise EtcdError(f"etcd endpoint must be an https:// URL: {ep}")
        self.endpoints = tuple(ep.rstrip("/") for ep in endpoints)
        self.timeout = timeout
        self._preferred = 0
        try:
            self._ssl = ssl.create_default_context(cafile=str(tls.ca))
            self._ssl.load_cert_chain(str(tls.cert), str(tls.key))
        except (OSError, ssl.SSLError) as e:
            # Names the files, never their content.
            raise EtcdError(f"cannot load etcd TLS files ({tls.ca}, {tls.cert}, {tls.key}): {_reason(e)}") from e

    @property
    def endpoint(self) -> str:
        """The endpoint asked first: the one that answered last."""
        return self.endpoints[self._preferred]

    # ---- transport

    def _connect(self, endpoint: str, timeout: float) -> http.client.HTTPSConnection:
        url = urlsplit(endpoint)
        return http.client.HTTPSConnection(url.hostname or "", url.port or 2379, timeout=timeout, context=self._ssl)

    def _order(self) -> list[int]:
        return [self._preferred] + [i for i in range(len(self.endpoints)) if i != self._preferred]

    def _post_once(self, endpoint: str, path: str, body: JSON) -> JSON:
        conn = self._connect(endpoint, self.timeout)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        return _decode(data, resp.status, path)

    def _call(self, path: str, body: JSON) -> JSON:
        """POST to the first member that answers; a live member's refusal is final unless it cannot serve."""
        failures: list[str] = []
        refusal: EtcdError | None = None
        for i in self._order():
            endpoint = self.endpoints[i]
            try:
                reply = self._post_once(endpoint, path, body)
            except EtcdError as e:
                if not _member_cannot_serve(e):
                    self._preferred = i  # it answered (no to this request): ask it first next time
                    raise
                refusal = e
                failures.append(f"{endpoint} ({e})")
                continue
            except (OSError, http.client.HTTPException) as e:
                failures.append(f"{endpoint} ({_reason(e)})")
                continue
            self._preferred = i
            return reply
        raise _no_endpoint(failures, refusal)

    # ---- keys

    def range(self, key: str, prefix: bool = False) -> tuple[list[KeyValue], int]:
        """The matching keys and the store's revision at the read (to watch from revision + 1)."""
        body: JSON = {"key": _b64(key)}
        if prefix:
            body["range_end"] = prefix_end(key)
        reply = self._call("/v3/kv/range", body)
        return [_kv(kv) for kv in reply.get("kvs", ())], _revision(reply)

    def get(self, key: str) -> KeyValue | None:
        kvs, _ = self.range(key)
        return kvs[0] if kvs else None

    def get_prefix(self, prefix: str) -> list[KeyValue]:
        return self.range(prefix, prefix=True)[0]

    def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        """Returns the revision of the write."""
        body: JSON = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return _revision(self._call("/v3/kv/put", body))

    def delete(self, key: str) -> int:
        """Returns how many keys were deleted (0 or 1)."""
        return int(self._call("/v3/kv/deleterange", {"key": _b64(key)}).get("deleted", 0))

    def delete_prefix(self, prefix: str) -> int:
        """Returns how many keys were deleted."""
        if not prefix:
            raise ValueError("delete_prefix(''): that is the whole keyspace")
        reply = self._call("/v3/kv/deleterange", {"key": _b64(prefix), "range_end": prefix_end(prefix)})
        return int(reply.get("deleted", 0))

    def txn(self, compare: list[JSON], success: list[JSON], failure: list[JSON]) -> tuple[bool, list[JSON]]:
        """The gateway's Txn as is: gateway-shaped dicts in (see the op_* helpers), (succeeded, responses) out.

        Each response is one of {"response_range": ...}, {"response_put": ...}, {"response_delete_range": ...}.
        """
        reply = self._call("/v3/kv/txn", {"compare": compare, "success": success, "failure": failure})
        return bool(reply.get("succeeded", False)), list(reply.get("responses", ()))

    def create(self, key: str, value: bytes | str, lease: int = 0) -> bool:
        """Put only if the key does not exist; True when this call created it.

        After a timeout on one member the request is retried on the next: if the first attempt did
        land, the retry finds the key and returns False. Callers that must know should compare the value.
        """
        ok, _ = self.txn([compare_create_revision(key, 0)], [op_put(key, value, lease)], [])
        return ok

    # ---- leases

    def lease_grant(self, ttl: int) -> int:
        """A new lease's id; etcd may raise the TTL to its minimum (1.5 x election timeout)."""
        reply = self._call("/v3/lease/grant", {"TTL": str(ttl)})
        if reply.get("error"):
            raise EtcdError(f"lease grant refused: {reply['error']}")
        return int(reply["ID"])

    def lease_keepalive(self, lease_id: int) -> int:
        """Refresh the lease; the TTL it has again, or 0 when the lease no longer exists."""
        # The gateway streams this RPC: our one request in, {"result": ...} out, then EOF. A lease that
        # is gone gets a result without TTL (0); timetolive says -1 for the same lease.
        reply = self._call("/v3/lease/keepalive", {"ID": str(lease_id)})
        if "result" not in reply:
            # Not "0 = gone": that would make a holder give up a lease that may well be alive.
            raise EtcdError("etcd /v3/lease/keepalive: the member closed the stream without a result")
        return int(reply["result"].get("TTL", 0))

    def lease_ttl(self, lease_id: int) -> int:
        """Seconds left on the lease without refreshing it; -1 when it does not exist."""
        return int(self._call("/v3/lease/timetolive", {"ID": str(lease_id)}).get("TTL", 0))

    def lease_revoke(self, lease_id: int) -> bool:
        """Revoke the lease, deleting every key attached to it; False when it did not exist (any more)."""
        try:
            self._call("/v3/lease/revoke", {"ID": str(lease_id)})
        except EtcdError as e:
            if e.code == _GRPC_NOT_FOUND:
                return False
            raise
        return True

    # ---- cluster

    def member_list(self) -> list[Member]:
        return [_member(m) for m in self._call("/v3/cluster/member/list", {}).get("members", ())]

    def member_add(self, peer_urls: Sequence[str]) -> Member:
        """Announce a member before it starts (it then starts with --initial-cluster-state existing).

        etcd's strict reconfiguration check refuses it with "unhealthy cluster" (code 14) until the
        leader has been connected to every voting member for 5 s, e.g. just after a member restarted:
        a reason to try again on a later pass, not a failure.
        """
        return _member(self._call("/v3/cluster/member/add", {"peerURLs": list(peer_urls)})["member"])

    def member_remove(self, member_id: int) -> None:
        """Drop a member for good (e.g. a wiped one, before adding it again); code 5 if the id is unknown."""
        self._call("/v3/cluster/member/remove", {"ID": str(member_id)})

    def status(self, endpoint: str) -> EndpointStatus:
        """One member's own view (no failover: the point is to ask that member)."""
        try:
            reply = self._post_once(endpoint.rstrip("/"), "/v3/maintenance/status", {})
        except (OSError, http.client.HTTPException) as e:
            raise EtcdError(f"etcd endpoint did not answer: {endpoint} ({_reason(e)})") from e
        return EndpointStatus(
            member_id=int(reply.get("header", {}).get("member_id", 0)),
            leader=int(reply.get("leader", 0)),
            raft_term=int(reply.get("raftTerm", 0)),
            raft_index=int(reply.get("raftIndex", 0)),
            db_size=int(reply.get("dbSize", 0)),
            version=reply.get("version", ""),
            errors=tuple(reply.get("errors", ())),
        )

    # ---- watch

    def watch(self, prefix: str, start_revision: int, timeout: float) -> list[Event]:
        """Changes under prefix from start_revision on: the first batch, or [] once timeout has passed.

        A wake-up for the agent's loop, not a subscription: the stream is closed after one batch.
        Continue from the last event's kv.mod_revision + 1.
        """
        body = {"create_request": {"key": _b64(prefix), "range_end": prefix_end(prefix),
                                   "start_revision": str(start_revision)}}
        deadline = time.monotonic() + timeout
        failures: list[str] = []
        refusal: EtcdError | None = None
        for i in self._order():
            endpoint = self.endpoints[i]
            # Setting the watch up gets the full request timeout; only the wait for events is bounded by `timeout`.
            conn = self._connect(endpoint, self.timeout)
            try:
                conn.request("POST", "/v3/watch", body=json.dumps(body), headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                if resp.status != 200:
                    _decode(resp.read(), resp.status, "/v3/watch")
                line = resp.readline()
                created = _decode(line, 200, "/v3/watch").get("result", {})
                self._preferred = i
                return _watch_events(resp, created, deadline, conn)
            except EtcdError as e:
                if not _member_cannot_serve(e):
                    raise
                refusal = e
                failures.append(f"{endpoint} ({e})")
            except (OSError, http.client.HTTPException) as e:
                failures.append(f"{endpoint} ({_reason(e)})")
            finally:
                conn.close()
        raise _no_endpoint(failures, refusal)


def _no_endpoint(failures: list[str], refusal: EtcdError | None) -> EtcdError:
    # Every reason is listed: "connection refused" everywhere reads differently from one TLS error.
    if refusal is None:
        return EtcdError("no etcd endpoint answered: " + ", ".join(failures))
    # Some member did answer, e.g. "unhealthy cluster" to a member add in the 5 s after a member
    # (re)connected: keep its gRPC code so the caller can tell "try again soon" from "all down".
    return EtcdError("no etcd member could serve the request: " + ", ".join(failures), code=refusal.code)


def _watch_events(resp: http.client.HTTPResponse, first: JSON, deadline: float,
                  conn: http.client.HTTPSConnection) -> list[Event]:
    msg = first
    while True:
        if msg.get("canceled"):
            if msg.get("compact_revision"):
                raise EtcdError(f"etcd watch: revision already compacted (oldest kept: {msg['compact_revision']}); "
                                "read the prefix again")
            raise EtcdError(f"etcd watch canceled by the member: {msg.get('cancel_reason', 'no reason given')}")
        events = msg.get("events", ())
        if events:
            return [Event(type=e.get("type", "PUT"), kv=_kv(e.get("kv", {}))) for e in events]
        left = deadline - time.monotonic()
        if left <= 0:
            return []
        if conn.sock is not None:
            conn.sock.settimeout(left)
        try:
            line = resp.readline()
        except TimeoutError:
            return []
        except (OSError, http.client.HTTPException) as e:
            raise EtcdError(f"etcd watch stream broke: {_reason(e)}") from e
        if not line:
            raise EtcdError("etcd watch stream closed by the member")
        msg = _decode(line, 200, "/v3/watch").get("result", {})


def _decode(data: bytes, status: int, path: str) -> JSON:
    """The reply as JSON, or EtcdError with etcd's own message for an HTTP or gRPC error.

    Unary errors come as {"error": "...", "message": "...", "code": N} with an HTTP error status;
    a streaming RPC has already sent 200 when it fails, so its error is {"error": {"grpc_code": N,
    "message": "..."}} in the body. Streams may hold several objects: the first one is the answer.
    """
    try:
        reply, _ = json.JSONDecoder().raw_decode(data.decode().strip() or "{}")
    except ValueError:
        raise EtcdError(f"etcd {path}: HTTP {status}, not JSON: {data[:120]!r}") from None
    if not isinstance(reply, dict):
        raise EtcdError(f"etcd {path}: HTTP {status}, unexpected reply")
    err = reply.get("error")
    if isinstance(err, dict):
        code, message = err.get("grpc_code"), err.get("message")
    elif status != 200 or "code" in reply:  # LeaseGrantResponse has an "error" string of its own: not this
        code, message = reply.get("code"), reply.get("message") or err
    else:
        return reply
    raise EtcdError(f"etcd {path}: {message or f'HTTP {status}'}", code=int(code) if code is not None else None)


# ---- txn building blocks (gateway-shaped dicts for EtcdClient.txn)

def compare_create_revision(key: str, revision: int) -> JSON:
    return {"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": str(revision)}


def compare_value(key: str, value: bytes | str) -> JSON:
    return {"key": _b64(key), "target": "VALUE", "result": "EQUAL", "value": _b64(value)}


def compare_lease(key: str, lease: int) -> JSON:
    return {"key": _b64(key), "target": "LEASE", "result": "EQUAL", "lease": str(lease)}


def op_put(key: str, value: bytes | str, lease: int = 0) -> JSON:
    put: JSON = {"key": _b64(key), "value": _b64(value)}
    if lease:
        put["lease"] = str(lease)
    return {"request_put": put}


def op_get(key: str) -> JSON:
    return {"request_range": {"key": _b64(key)}}


def op_delete(key: str) -> JSON:
    return {"request_delete_range": {"key": _b64(key)}}


def response_kvs(response: JSON) -> list[KeyValue]:
    """The keys of a txn's {"response_range": ...} entry ([] for other kinds or no match)."""
    return [_kv(kv) for kv in response.get("response_range", {}).get("kvs", ())]
