"""Reconcile one node's report with the API's servers on it: decide (pure), then act.

The node is the truth for what exists on it. :func:`plan` compares its instances with
the API's records and returns the steps; :mod:`cowfleet.api.fleet` carries them out,
each as a conditional update that re-checks the record.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cowfleet.api import states


@dataclass(frozen=True)
class Reported:
    """An instance as the node reports it."""

    uuid: str
    state: str
    power_state: int = 0
    fault: str | None = None


@dataclass(frozen=True)
class Known:
    """A server as the API records it (on this node, or deleted with a claim here)."""

    id: str
    vm_state: str
    task_state: str | None
    deleted: bool
    updated_at: float
    deadline: float | None = None
    power_state: int = 0


@dataclass(frozen=True)
class Update:
    id: str
    vm_state: str
    power_state: int
    clear_task: bool
    fault: str | None = None


@dataclass(frozen=True)
class Reschedule:
    id: str
    cause: str
    delete_on_node: bool


@dataclass(frozen=True)
class Plan:
    updates: tuple[Update, ...] = ()
    reschedules: tuple[Reschedule, ...] = ()
    deletes: tuple[str, ...] = ()  # uuids the node must delete
    forgets: tuple[str, ...] = ()  # deleted servers gone from the node: release their claims
    unknown: tuple[str, ...] = ()  # on the node, unknown to the API: reported, never deleted

    @property
    def empty(self) -> bool:
        return not (self.updates or self.reschedules or self.deletes or self.forgets)


def plan(
    hostname: str,
    reported: Iterable[Reported],
    known: Iterable[Known],
    now: float,
    *,
    complete: bool,
    absent_grace: float,
) -> Plan:
    """The steps that bring the API in line with ``hostname``'s report.

    ``complete`` is True for a heartbeat (the node's whole list: an absence means
    something) and False for one event.
    """
    reported = list(reported)
    # "DELETED" (an event after a delete finished) says for sure the node no longer has it.
    gone = {r.uuid for r in reported if r.state == "DELETED"}
    on_node = {r.uuid: r for r in reported if r.state != "DELETED"}
    updates: list[Update] = []
    reschedules: list[Reschedule] = []
    deletes: list[str] = []
    forgets: list[str] = []
    seen: set[str] = set()
    for k in known:
        seen.add(k.id)
        r = on_node.get(k.id)
        if k.deleted:
            if r is None:
                if complete or k.id in gone:
                    forgets.append(k.id)
            elif r.state != "DELETING":
                deletes.append(k.id)
            continue
        if r is None:
            if (complete and now - k.updated_at > absent_grace) or k.id in gone:
                if k.vm_state == states.BUILDING:
                    reschedules.append(
                        Reschedule(k.id, f"the build vanished from {hostname}", False)
                    )
                elif k.vm_state in (states.ACTIVE, states.STOPPED):
                    updates.append(
                        Update(
                            k.id,
                            states.ERROR,
                            states.NOSTATE,
                            True,
                            f"the instance is no longer on {hostname}",
                        )
                    )
            continue
        step = _compare(hostname, k, r, now, settle=absent_grace if complete else 0.0)
        if isinstance(step, Update):
            updates.append(step)
        elif isinstance(step, Reschedule):
            reschedules.append(step)
    unknown = tuple(sorted(u for u in on_node if u not in seen))
    return Plan(tuple(updates), tuple(reschedules), tuple(deletes), tuple(forgets), unknown)


def _compare(
    hostname: str, k: Known, r: Reported, now: float, *, settle: float
) -> Update | Reschedule | None:
    if k.vm_state == states.BUILDING:
        if r.state == "ERROR":
            cause = r.fault or f"the build failed on {hostname}"
            return Reschedule(k.id, cause, True)
        if r.state in ("ACTIVE", "SHUTOFF"):
            vm, power = states.FROM_NODE[r.state]
            return Update(k.id, vm, power, True)
        if k.deadline is not None and now > k.deadline:
            return Reschedule(k.id, f"the build on {hostname} passed its deadline", True)
        return None
    if r.state not in states.FROM_NODE or r.state == "BUILDING":
        return None
    vm, power = states.FROM_NODE[r.state]
    fault = (r.fault or f"the instance failed on {hostname}") if vm == states.ERROR else None
    if k.task_state is not None:
        if states.TASK_TARGET.get(k.task_state) == r.state:
            return Update(k.id, vm, power, True, fault)
        return None
    if (vm, power) != (k.vm_state, k.power_state):
        # A heartbeat's list may have been taken before the change the API just applied
        # (an action's event overtakes it): it corrects a state only once that state has
        # stood for ``settle`` seconds. Events come in order and apply at once.
        if now - k.updated_at < settle:
            return None
        return Update(k.id, vm, power, False, fault)
    return None
