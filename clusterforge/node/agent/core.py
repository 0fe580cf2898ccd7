"""The agent's shape: services made of facts, a pure plan of steps, and one loop.

    facts(ctx) -> F          read-only: files, unit states, what etcd says
    plan(ctx, facts)         pure: [] when converged, the steps still needed in order,
                             or Wait(reason) when a fact it needs is not there yet
    health(ctx, facts)       once converged: is the service really working?

A pass runs, per service in dependency order, facts -> plan -> the first step, and again,
until the plan is empty or says wait. A step does one thing and says why in one line.
A service whose dependency is not healthy is not touched ("blocked: waiting for etcd"),
so a refused OSD disk blocks nothing but Ceph's own consumers.
"""

from __future__ import annotations

import dataclasses
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Generic, Protocol, TypeVar

F = TypeVar("F")
MAX_STEPS = 12  # per service per pass: a plan that never empties is a bug, not a reason to spin


class State(StrEnum):
    OK = "ok"  # converged and healthy
    WAITING = "waiting"  # needs a fact that is not there yet (peers, quorum, a disk)
    BLOCKED = "blocked"  # a service it depends on is not ok
    FAILED = "failed"  # a step failed; retried next pass
    DEGRADED = "degraded"  # working, with something an operator should see (a refused disk)
    OFF = "off"  # not enabled for this node


@dataclass(frozen=True)
class Step:
    name: str  # "etcd: write config"
    why: str  # "member list changed"
    apply: Callable[[], Any]

    def __str__(self) -> str:
        return f"{self.name}: {self.why}"


@dataclass(frozen=True)
class Wait:
    """The plan cannot go on until a fact changes; reason is the one line a person reads."""

    reason: str


Plan = list[Step] | Wait


@dataclass(frozen=True)
class Status:
    state: State
    reason: str = ""
    since: float = field(default=0.0, compare=False)
    detail: dict[str, Any] = field(default_factory=dict, compare=False)  # for tools: who holds what

    def to_dict(self) -> dict[str, Any]:
        return {**self.detail, "state": str(self.state), "reason": self.reason, "since": round(self.since, 1)}


class ServiceModule(Protocol, Generic[F]):
    """What every service module provides (see etcd.py for the shape in full)."""

    name: str
    needs: tuple[str, ...]

    def applies(self, ctx: Any) -> bool: ...

    def facts(self, ctx: Any) -> F: ...

    def plan(self, ctx: Any, facts: F) -> Plan: ...

    def health(self, ctx: Any, facts: F) -> Status: ...


class StepFailed(Exception):
    """A step could not do its one thing; the message is its one line."""


@dataclass
class PassResult:
    changed: list[str] = field(default_factory=list)  # the steps applied, as "name: why"
    statuses: dict[str, Status] = field(default_factory=dict)
    duration: float = 0.0


def run_pass(ctx: Any, services: list[Any], previous: dict[str, Status],
             log: Callable[[str], None], after: Callable[[PassResult], None] = lambda r: None) -> PassResult:
    """One pass over every service, in order. Never raises for a service's trouble: that
    becomes the service's status, and the next service still runs. `after` sees the result
    so far after each service (a pass of slow steps still shows what it is doing)."""
    result = PassResult()
    start = time.monotonic()
    for service in services:
        if not service.applies(ctx):
            status = Status(State.OFF, "not on this node")
        else:
            blocking = [n for n in service.needs if result.statuses.get(n, Status(State.OK)).state
                        not in (State.OK, State.DEGRADED, State.OFF)]
            if blocking:
                status = Status(State.BLOCKED, f"waiting for {', '.join(blocking)}")
            else:
                status = converge(ctx, service, result, log)
        old = previous.get(service.name)
        since = old.since if old is not None and old == status else time.time()
        status = Status(status.state, status.reason, since, status.detail)
        if old is None or old != status:
            log(describe(service.name, status))
        result.statuses[service.name] = status
        result.duration = time.monotonic() - start
        after(PassResult(result.changed, {**previous, **result.statuses}, result.duration))
    return result


def describe(service: str, status: Status) -> str:
    """One line: "etcd: waiting for quorum: 1 of 3 members reachable (s2, s3 unreachable)"."""
    if status.reason.startswith(str(status.state)):
        return f"{service}: {status.reason}"
    return f"{service}: {status.state}" + (f": {status.reason}" if status.reason else "")


def converge(ctx: Any, service: Any, result: PassResult, log: Callable[[str], None]) -> Status:
    for _ in range(MAX_STEPS):
        try:
            facts = service.facts(ctx)
            plan = service.plan(ctx, facts)
        except Exception as exc:  # noqa: BLE001 - a fact that cannot be read is this service's failure
            return Status(State.FAILED, f"reading facts: {one_line(exc)}")
        if isinstance(plan, Wait):
            return Status(State.WAITING, plan.reason)
        if not plan:
            try:
                return service.health(ctx, facts)  # type: ignore[no-any-return]
            except Exception as exc:  # noqa: BLE001
                return Status(State.FAILED, f"checking health: {one_line(exc)}")
        step = plan[0]
        log(f"{step}")
        try:
            step.apply()
        except Exception as exc:  # noqa: BLE001 - the step's failure is reported, the loop goes on
            return Status(State.FAILED, f"{step.name}: {one_line(exc)}")
        result.changed.append(str(step))
    return Status(State.FAILED, f"still not converged after {MAX_STEPS} steps in one pass")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    # A failed command's message ends with its output's tail: keep its last line too.
    return first if len(text) < 2 else f"{first} ... {text[-1].strip()}"[:300]


# ---------------------------------------------------------------- facts as JSON
# Facts are recorded on real nodes (`python3 -m clusterforge.node.agent.facts`) and fed
# back to plan() in unit tests: both directions, for any facts dataclass.


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (IPv4Address, IPv4Network)):
        return str(obj)
    return obj


def from_jsonable(kind: Any, data: Any) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if data is None:
        return None
    if origin in (typing.Union, types.UnionType):
        return from_jsonable(next(a for a in args if a is not type(None)), data)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: from_jsonable(hints[f.name], data[f.name])
                       for f in dataclasses.fields(kind) if f.name in data})
    if origin is tuple:
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else Any
        return tuple(from_jsonable(inner, x) for x in data)
    if origin is list:
        return [from_jsonable(args[0], x) for x in data]
    if origin is dict:
        return {from_jsonable(args[0], k): from_jsonable(args[1], v) for k, v in data.items()}
    if kind in (IPv4Address, IPv4Network) or (isinstance(kind, type) and issubclass(kind, StrEnum)):
        return kind(data)
    return data
