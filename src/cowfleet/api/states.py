"""Server states: Nova's vm_state/task_state pairs, the status users see, node states."""

from __future__ import annotations

BUILDING, ACTIVE, STOPPED, ERROR, DELETED = "building", "active", "stopped", "error", "deleted"

SCHEDULING, SPAWNING = "scheduling", "spawning"
POWERING_OFF, POWERING_ON = "powering-off", "powering-on"
REBOOTING, REBOOTING_HARD = "rebooting", "rebooting_hard"

NOSTATE, RUNNING, SHUTDOWN = 0, 1, 4

# status filter value -> vm_state
STATUS_TO_VM = {"BUILD": BUILDING, "ACTIVE": ACTIVE, "SHUTOFF": STOPPED, "ERROR": ERROR}

# node-reported state -> (vm_state, power_state)
FROM_NODE = {
    "BUILDING": (BUILDING, NOSTATE),
    "ACTIVE": (ACTIVE, RUNNING),
    "SHUTOFF": (STOPPED, SHUTDOWN),
    "ERROR": (ERROR, NOSTATE),
}

# task_state -> the node state that ends it
TASK_TARGET = {
    POWERING_OFF: "SHUTOFF",
    POWERING_ON: "ACTIVE",
    REBOOTING: "ACTIVE",
    REBOOTING_HARD: "ACTIVE",
}


def status(vm_state: str, task_state: str | None) -> str:
    """The ``status`` field a client sees."""
    if vm_state == ACTIVE:
        if task_state == REBOOTING:
            return "REBOOT"
        if task_state == REBOOTING_HARD:
            return "HARD_REBOOT"
        return "ACTIVE"
    return {BUILDING: "BUILD", STOPPED: "SHUTOFF", ERROR: "ERROR", DELETED: "DELETED"}.get(
        vm_state, "UNKNOWN"
    )
