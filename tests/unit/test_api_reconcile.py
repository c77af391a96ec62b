"""Reconcile (pure): the node is the truth for what exists on it."""

from __future__ import annotations

from cowfleet.api.reconcile import Known, Reported, plan

NOW = 1000.0


def known(
    i: str,
    vm: str,
    *,
    task: str | None = None,
    deleted: bool = False,
    updated: float = 0.0,
    deadline: float | None = None,
    power: int = 0,
) -> Known:
    return Known(i, vm, task, deleted, updated, deadline, power)


def test_the_api_takes_the_nodes_state() -> None:
    p = plan(
        "n",
        [Reported("a", "SHUTOFF", 4)],
        [known("a", "active", power=1)],
        NOW,
        complete=True,
        absent_grace=30,
    )
    assert [(u.id, u.vm_state, u.power_state) for u in p.updates] == [("a", "stopped", 4)]


def test_a_heartbeat_older_than_a_fresh_change_does_not_undo_it() -> None:
    """A start finished (event applied, row changed 2 s ago), then a heartbeat whose list
    was taken before the start arrives saying SHUTOFF: the server stays active until that
    state has stood past the grace; an event saying the same applies at once."""
    fresh = known("a", "active", power=1, updated=NOW - 2)
    stale = [Reported("a", "SHUTOFF", 4)]
    assert plan("n", stale, [fresh], NOW, complete=True, absent_grace=30).updates == ()
    later = plan("n", stale, [fresh], NOW + 40, complete=True, absent_grace=30)
    assert [(u.vm_state, u.power_state) for u in later.updates] == [("stopped", 4)]
    event = plan("n", stale, [fresh], NOW, complete=False, absent_grace=30)
    assert [(u.vm_state, u.power_state) for u in event.updates] == [("stopped", 4)]


def test_a_finished_build_becomes_active_and_a_failed_one_is_rescheduled() -> None:
    p = plan(
        "n",
        [Reported("a", "ACTIVE", 1), Reported("b", "ERROR", 0, "disk full")],
        [known("a", "building"), known("b", "building")],
        NOW,
        complete=True,
        absent_grace=30,
    )
    assert [(u.id, u.vm_state) for u in p.updates] == [("a", "active")]
    assert [(r.id, r.cause, r.delete_on_node) for r in p.reschedules] == [("b", "disk full", True)]


def test_a_build_absent_past_the_grace_is_rescheduled_not_before() -> None:
    fresh = plan(
        "n", [], [known("a", "building", updated=NOW - 5)], NOW, complete=True, absent_grace=30
    )
    assert fresh.empty
    old = plan(
        "n", [], [known("a", "building", updated=NOW - 60)], NOW, complete=True, absent_grace=30
    )
    assert [r.id for r in old.reschedules] == ["a"]
    # An event is not the whole list: an absence there means nothing.
    event = plan(
        "n", [], [known("a", "building", updated=NOW - 60)], NOW, complete=False, absent_grace=30
    )
    assert event.empty


def test_a_build_past_its_deadline_is_rescheduled() -> None:
    p = plan(
        "n",
        [Reported("a", "BUILDING")],
        [known("a", "building", deadline=NOW - 1)],
        NOW,
        complete=True,
        absent_grace=30,
    )
    assert [r.id for r in p.reschedules] == ["a"]


def test_deleted_in_the_api_is_deleted_on_the_node_then_forgotten() -> None:
    present = plan(
        "n",
        [Reported("a", "ACTIVE", 1)],
        [known("a", "active", deleted=True)],
        NOW,
        complete=True,
        absent_grace=30,
    )
    assert present.deletes == ("a",)
    deleting = plan(
        "n",
        [Reported("a", "DELETING")],
        [known("a", "active", deleted=True)],
        NOW,
        complete=True,
        absent_grace=30,
    )
    assert deleting.deletes == () and deleting.forgets == ()
    gone = plan("n", [], [known("a", "active", deleted=True)], NOW, complete=True, absent_grace=30)
    assert gone.forgets == ("a",)


def test_an_instance_unknown_to_the_api_is_reported_never_deleted() -> None:
    p = plan("n", [Reported("x", "ACTIVE", 1)], [], NOW, complete=True, absent_grace=30)
    assert p.unknown == ("x",) and p.deletes == () and p.empty


def test_an_action_in_flight_waits_for_its_target_state() -> None:
    waiting = plan(
        "n",
        [Reported("a", "ACTIVE", 1)],
        [known("a", "active", task="powering-off", power=1)],
        NOW,
        complete=True,
        absent_grace=30,
    )
    assert waiting.empty
    done = plan(
        "n",
        [Reported("a", "SHUTOFF", 4)],
        [known("a", "active", task="powering-off", power=1)],
        NOW,
        complete=True,
        absent_grace=30,
    )
    assert [(u.vm_state, u.clear_task) for u in done.updates] == [("stopped", True)]


def test_an_instance_that_vanished_from_its_node_is_an_error() -> None:
    p = plan(
        "n", [], [known("a", "active", updated=0.0, power=1)], NOW, complete=True, absent_grace=30
    )
    assert [(u.vm_state, u.fault) for u in p.updates] == [
        ("error", "the instance is no longer on n")
    ]


def test_a_deleted_event_releases_at_once_and_is_never_unknown() -> None:
    gone = [Reported("a", "DELETED")]
    p = plan("n", gone, [known("a", "active", deleted=True)], NOW, complete=False, absent_grace=30)
    assert p.forgets == ("a",) and p.unknown == ()
    lost = plan(
        "n",
        gone,
        [known("a", "active", updated=NOW, power=1)],
        NOW,
        complete=False,
        absent_grace=30,
    )
    assert [u.vm_state for u in lost.updates] == ["error"]
    assert (
        plan("n", [Reported("x", "DELETED")], [], NOW, complete=False, absent_grace=30).unknown
        == ()
    )
