"""Builds, deletes and power actions of one node, in-process, in a bounded thread pool.

Every request is keyed by the server's UUID and idempotent: the same build spec
twice makes one instance; a different spec for a UUID that exists is a
:class:`ConflictError`. Builds call the project's one provisioning path
(:class:`cowfleet.compute.provision.Provisioner`, the code ``server create``
runs), so concurrent builds of one uncached image share one download through the
cache's per-base lock.

What exists is read from the instances path and the driver
(:func:`cowfleet.node.inventory.instance_views`); only work in flight lives in
memory (a build queued or running, a delete, a power action, a build that failed
and left nothing on disk). State changes are pushed to ``notify`` as they happen.

State machine (``BUILDING`` -> ``ACTIVE`` | ``ERROR``; ``ACTIVE`` <-> ``SHUTOFF``
by stop/start; any -> ``DELETING`` -> gone)::

    start   needs SHUTOFF
    stop    needs ACTIVE
    reboot  SOFT needs ACTIVE, HARD needs ACTIVE or SHUTOFF
    any action on an instance with work in flight, or in ERROR: ConflictError
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from cowfleet.compute import instance as inst
from cowfleet.compute.drivers.base import Driver
from cowfleet.compute.manager import ServerManager
from cowfleet.compute.provision import Provisioner
from cowfleet.errors import (
    BackendUnavailableError,
    ConflictError,
    CowfleetError,
    NotFoundError,
    ValidationError,
)
from cowfleet.logs import carry
from cowfleet.node.inventory import POWER_FILE, POWER_OFF, instance_view, instance_views
from cowfleet.node.spec import (
    ACTIVE,
    BUILDING,
    DELETED,
    DELETING,
    ERROR,
    NOSTATE,
    SHUTOFF,
    BuildSpec,
    InstanceView,
    one_line,
)

log = logging.getLogger(__name__)

ACTIONS = ("start", "stop", "reboot")
REBOOT_TYPES = ("SOFT", "HARD")
STOP_TIMEOUT = 60.0  # seconds a guest gets to shut down before it is powered off

Notify = Callable[[InstanceView], None]


@dataclass
class _Task:
    """Work in flight on one instance (guarded by ``Builds._lock``)."""

    view: InstanceView
    spec: BuildSpec | None = None
    busy: bool = True  # a job runs or waits in the pool
    delete_after: bool = False  # a delete asked for while another job ran


class ShuttingDown(BackendUnavailableError):
    """The agent is stopping: it takes no new work."""


class Builds:
    """The node's instances: what exists (disk + driver) merged with work in flight."""

    def __init__(
        self,
        instances_path: Path,
        *,
        provisioner: Provisioner,
        manager: ServerManager,
        driver: Driver,
        notify: Notify = lambda _view: None,
        workers: int = 8,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.instances_path = instances_path
        self.provisioner = provisioner
        self.manager = manager
        self.driver = driver
        self.notify = notify
        self.stop_timeout = stop_timeout
        self._lock = threading.Lock()
        self._tasks: dict[str, _Task] = {}
        self._futures: dict[str, Future[None]] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="build")
        self._closing = False

    # reading -----------------------------------------------------------------
    def _on_disk(self) -> dict[str, InstanceView]:
        domains = self.driver.list_domains() if self.driver.can_run else []
        return instance_views(self.instances_path, domains)

    def list(self) -> list[InstanceView]:
        """Every instance: on disk, with work in flight taking precedence."""
        # Work in flight first, the disk second: a build that ends in between is then
        # seen on disk, never missing from both.
        with self._lock:
            tasks = {uuid: task.view for uuid, task in self._tasks.items()}
        views = self._on_disk()
        for uuid, view in tasks.items():
            if view.state in (BUILDING, DELETING, ERROR) or uuid not in views:
                views[uuid] = view
        return sorted(views.values(), key=lambda v: v.uuid)

    def get(self, uuid: str) -> InstanceView:
        """One instance (its folder and domain only: no scan of the others)."""
        with self._lock:
            task = self._tasks.get(uuid)
            in_flight = task.view if task is not None else None
        if in_flight is not None and in_flight.state in (BUILDING, DELETING, ERROR):
            return in_flight
        domain = self.driver.info(uuid) if self.driver.can_run else None
        view = instance_view(self.instances_path, uuid, domain)
        if view is None:
            view = in_flight
        if view is None:
            raise NotFoundError(f"server {uuid} is not on this node", server=uuid)
        return view

    def building(self, image_id: str) -> bool:
        """Whether a build of ``image_id`` is queued or running here (peers asking for the
        image wait for its download to start)."""
        with self._lock:
            return any(
                t.spec is not None and t.spec.image_id == image_id and t.view.state == BUILDING
                for t in self._tasks.values()
            )

    def _exists(self, uuid: str) -> bool:
        path = self.instances_path
        if (path / uuid).is_dir() or (path / f".{uuid}.tmp").is_dir():
            return True
        return self.driver.can_run and self.driver.info(uuid) is not None

    # build -------------------------------------------------------------------
    def put(self, spec: BuildSpec) -> InstanceView:
        """Build ``spec`` unless it exists; the same spec again returns the instance."""
        uuid = spec.uuid
        with self._lock:
            if self._closing:
                raise ShuttingDown("the node agent is stopping", server=uuid)
            task = self._tasks.get(uuid)
            if task is not None:
                if task.spec is not None and task.spec != spec:
                    raise self._conflict(uuid)
                return task.view
            if self._exists(uuid):
                existing = self._existing_spec(uuid)
                if existing is not None and existing != spec:
                    raise self._conflict(uuid)
                known: InstanceView | None = None
            else:
                view = InstanceView(uuid, BUILDING, NOSTATE, None, spec.name, spec.image_id)
                self._tasks[uuid] = _Task(view, spec)
                self._futures[uuid] = self._pool.submit(carry(self._build), spec)
                known = view
        if known is None:
            return self.get(uuid)
        log.info("build %s queued (image %s, flavor %s)", uuid, spec.image_id, spec.flavor.name)
        self.notify(known)
        return known

    @staticmethod
    def _conflict(uuid: str) -> ConflictError:
        return ConflictError(
            f"server {uuid} exists on this node with a different build spec", server=uuid
        )

    def _existing_spec(self, uuid: str) -> BuildSpec | None:
        try:
            rec = inst.read_record(self.instances_path / uuid)
        except CowfleetError:
            return None  # unfinished or broken: reported as ERROR, compared to nothing
        if rec.spec is None:
            return None
        try:
            return BuildSpec.from_json(rec.spec, uuid)
        except ValidationError:
            return None

    def _started(self, uuid: str) -> None:
        with self._lock:  # running now: nothing left to cancel
            self._futures.pop(uuid, None)

    def _build(self, spec: BuildSpec) -> None:
        uuid = spec.uuid
        self._started(uuid)
        fault: str | None = None
        try:
            self.provisioner.create(
                spec.node_name,
                spec.image_id,
                spec.flavor,
                uuid=uuid,
                spec=spec.to_dict(),
                start=True,
                **({"sources": spec.sources} if spec.sources else {}),  # type: ignore[arg-type]
                **({"stripes": spec.stripes} if spec.stripes else {}),
            )
        except CowfleetError as exc:
            fault = one_line(str(exc))
            log.warning("build %s (image %s) failed: %s", uuid, spec.image_id, fault)
        except Exception as exc:  # a bug: the agent goes on, the build ends in ERROR
            fault = one_line(f"internal error: {type(exc).__name__}: {exc}")
            log.error("build %s (image %s): unexpected error: %s", uuid, spec.image_id, fault)
            log.debug("build %s: traceback", uuid, exc_info=True)
        else:
            log.info("build %s done (image %s)", uuid, spec.image_id)
        with self._lock:
            task = self._tasks[uuid]
            delete_after = task.delete_after
            if fault is not None:
                task.view = replace(task.view, state=ERROR, fault=fault)
                task.busy = False
                failed: InstanceView | None = task.view
            else:
                failed = None
                if not delete_after:
                    del self._tasks[uuid]
        if delete_after:
            self._delete(uuid)
            return
        self._report(uuid, failed)

    def _report(self, uuid: str, view: InstanceView | None = None) -> None:
        """Push the instance's state now (read from disk unless given)."""
        try:
            if view is None:
                view = self.get(uuid)
            self.notify(view)
        except NotFoundError:
            self.notify(InstanceView(uuid, DELETED))
        except Exception as exc:
            log.warning("cannot report the state of %s: %s: %s", uuid, type(exc).__name__, exc)

    # delete ------------------------------------------------------------------
    def delete(self, uuid: str) -> bool:
        """Start deleting ``uuid``; False when the node has no such instance."""
        with self._lock:
            task = self._tasks.get(uuid)
            if task is not None:
                if task.busy:
                    task.delete_after = True
                    task.view = replace(task.view, state=DELETING)
                    view = task.view
                    submit = False
                else:  # a build that failed: nothing left on disk but its record here
                    task.view = replace(task.view, state=DELETING)
                    task.busy = True
                    view = task.view
                    submit = True
            elif self._exists(uuid):
                view = InstanceView(uuid, DELETING)
                self._tasks[uuid] = _Task(view)
                submit = True
            else:
                return False
            if submit:
                if self._closing:
                    raise ShuttingDown("the node agent is stopping", server=uuid)
                self._futures[uuid] = self._pool.submit(carry(self._delete), uuid)
        self.notify(view)
        return True

    def _delete(self, uuid: str) -> None:
        self._started(uuid)
        try:
            self.manager.delete(uuid)
        except NotFoundError:
            pass  # a build that failed left nothing behind
        except Exception as exc:
            fault = one_line(f"delete failed: {exc}")
            log.error("delete %s failed: %s: %s", uuid, type(exc).__name__, exc)
            log.debug("delete %s: traceback", uuid, exc_info=True)
            with self._lock:
                task = self._tasks[uuid]
                task.view = replace(task.view, state=ERROR, fault=fault)
                task.busy = task.delete_after = False
                view = task.view
            self.notify(view)
            return
        with self._lock:
            self._tasks.pop(uuid, None)
        log.info("deleted %s", uuid)
        self.notify(InstanceView(uuid, DELETED))

    # power -------------------------------------------------------------------
    def action(self, uuid: str, action: str, kind: str = "SOFT") -> InstanceView:
        """Start, stop or reboot ``uuid`` in the background (ConflictError: wrong state)."""
        if action not in ACTIONS:
            raise ValidationError(f"unknown action {action!r} (use {', '.join(ACTIONS)})")
        if kind not in REBOOT_TYPES:
            raise ValidationError(f"unknown reboot type {kind!r} (use SOFT or HARD)")
        view = self.get(uuid)  # NotFoundError
        with self._lock:
            if self._closing:
                raise ShuttingDown("the node agent is stopping", server=uuid)
            if uuid in self._tasks:
                state = self._tasks[uuid].view.state
                raise ConflictError(
                    f"cannot {action} server {uuid} while it is {state} or busy", server=uuid
                )
            allowed = {
                "start": (SHUTOFF,),
                "stop": (ACTIVE,),
                "reboot": (ACTIVE, SHUTOFF) if kind == "HARD" else (ACTIVE,),
            }[action]
            if view.state not in allowed:
                raise ConflictError(
                    f"cannot {action} server {uuid} while it is {view.state}",
                    server=uuid,
                    state=view.state,
                )
            self._tasks[uuid] = _Task(view)
            self._futures[uuid] = self._pool.submit(carry(self._act), uuid, action, kind)
        return view

    def _act(self, uuid: str, action: str, kind: str) -> None:
        self._started(uuid)
        try:
            if self.driver.can_run:
                if action == "start":
                    self.manager.start(uuid)
                elif action == "stop":
                    self.manager.stop(uuid, timeout=self.stop_timeout)
                else:
                    with contextlib.suppress(NotFoundError):
                        self.manager.stop(uuid, force=kind == "HARD", timeout=self.stop_timeout)
                    self.manager.start(uuid)
            else:
                self._set_power(uuid, on=action != "stop")
            log.info("%s %s done", action, uuid)
        except Exception as exc:  # the instance keeps the state the disk and driver say
            log.error("%s %s failed: %s: %s", action, uuid, type(exc).__name__, exc)
            log.debug("%s %s: traceback", action, uuid, exc_info=True)
        with self._lock:
            task = self._tasks.pop(uuid)
        if task.delete_after:
            with self._lock:
                self._tasks[uuid] = _Task(InstanceView(uuid, DELETING))
            self._delete(uuid)
            return
        self._report(uuid)

    def _set_power(self, uuid: str, *, on: bool) -> None:
        """The none driver runs nothing: its power state is a file in the instance folder."""
        path = self.instances_path / uuid / POWER_FILE
        if on:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        tmp = path.with_name(f".{POWER_FILE}.tmp")
        tmp.write_text(POWER_OFF + "\n")
        os.replace(tmp, path)

    # shutdown ----------------------------------------------------------------
    def close(self, *, wait: bool = True) -> None:
        """Take no new work; let running jobs finish; record queued builds as failed."""
        with self._lock:
            self._closing = True
            futures = dict(self._futures)
        self._pool.shutdown(wait=wait, cancel_futures=True)
        for uuid, future in futures.items():
            if not future.cancelled():
                continue
            with self._lock:
                task = self._tasks.get(uuid)
                if task is None:
                    continue
                if task.view.state == BUILDING:
                    task.view = replace(
                        task.view,
                        state=ERROR,
                        fault="the node agent stopped before the build began",
                    )
                    task.busy = False
                    view: InstanceView | None = task.view
                else:
                    self._tasks.pop(uuid)
                    view = None
            if view is not None:
                log.warning("build %s not started: the agent is stopping", uuid)
                self._report(uuid, view)

    def check_idle(self, uuid: str) -> None:
        """NotFoundError, or ConflictError unless ``uuid`` is ACTIVE or SHUTOFF with no
        work in flight (a snapshot may start)."""
        view = self.get(uuid)
        with self._lock:
            if self._closing:
                raise ShuttingDown("the node agent is stopping", server=uuid)
            if uuid in self._tasks or view.state not in (ACTIVE, SHUTOFF):
                raise ConflictError(
                    f"server {uuid} is {view.state} or busy: no snapshot now", server=uuid
                )

    @property
    def in_flight(self) -> int:
        with self._lock:
            return sum(1 for t in self._tasks.values() if t.busy)
