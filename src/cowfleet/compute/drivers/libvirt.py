"""The libvirt driver (libvirt-python). Owns its connection; translates libvirt errors.

libvirt errors never leave this module: an unreachable daemon becomes
:class:`BackendUnavailableError`, an unknown domain :class:`NotFoundError`, a
domain that exists or is in the wrong state :class:`ConflictError`, an
invalid domain definition :class:`ValidationError`, and anything else (QEMU
failing to start, ...) :class:`CommandError` carrying libvirt's message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cowfleet.compute.domain_xml import (
    DiskTarget,
    DomainSpec,
    build_domain_xml,
    parse_disks,
    parse_files,
    parse_metadata,
)
from cowfleet.compute.drivers.base import STATE_NAMES, DomainInfo
from cowfleet.errors import (
    BackendUnavailableError,
    CommandError,
    ConflictError,
    CowfleetError,
    NotFoundError,
    ValidationError,
)

if TYPE_CHECKING:
    from cowfleet.cache.holders import DomainDisk

log = logging.getLogger(__name__)

# virErrorNumber values (stable libvirt ABI)
_NO_CONNECT = 5
_DOM_EXIST = 28
_XML_ERROR = 27
_SYSTEM_ERROR = 38
_RPC = 39
_NO_DOMAIN = 42
_AUTH_FAILED = 45
_OPERATION_INVALID = 55
_CONFIG_UNSUPPORTED = 67
_AUTH_UNAVAILABLE = 94
_UNAVAILABLE = {_NO_CONNECT, _SYSTEM_ERROR, _RPC, _AUTH_FAILED, _AUTH_UNAVAILABLE}
_STATE_SHUTOFF = 5
_XML_INACTIVE = 2  # VIR_DOMAIN_XML_INACTIVE: the persistent definition of a running domain

Opener = Callable[[str], Any]


def _default_opener(uri: str) -> Any:
    try:
        import libvirt
    except ImportError as exc:
        raise BackendUnavailableError(
            "the libvirt driver needs libvirt-python (pip install 'cowfleet[libvirt]')"
        ) from exc
    # libvirt prints every error to stderr by default; cowfleet reports them itself.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt.open(uri)


def _error_code(exc: BaseException) -> int | None:
    get = getattr(exc, "get_error_code", None)
    code = get() if callable(get) else None
    return code if isinstance(code, int) else None


def _is_libvirt_error(exc: BaseException) -> bool:
    return type(exc).__name__ == "libvirtError" or hasattr(exc, "get_error_code")


class LibvirtDriver:
    name = "libvirt"
    can_run = True

    def __init__(self, uri: str, *, opener: Opener | None = None, poll: float = 0.2) -> None:
        self.uri = uri
        self._opener = opener or _default_opener
        self._conn: Any = None
        self._poll = poll

    # connection -----------------------------------------------------------
    def _connection(self) -> Any:
        if self._conn is None:
            try:
                self._conn = self._opener(self.uri)
            except CowfleetError:
                raise
            except Exception as exc:
                if not _is_libvirt_error(exc):
                    raise
                raise BackendUnavailableError(
                    f"libvirt is unreachable at {self.uri}: {exc}", uri=self.uri
                ) from exc
            if self._conn is None:
                raise BackendUnavailableError(f"libvirt is unreachable at {self.uri}")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception as exc:  # closing must never fail the caller
                log.debug("closing libvirt connection: %s", exc)
            self._conn = None

    @contextmanager
    def _translate(self, what: str, uuid: str | None = None) -> Iterator[None]:
        try:
            yield
        except CowfleetError:
            raise
        except Exception as exc:
            if not _is_libvirt_error(exc):
                raise
            code = _error_code(exc)
            ctx: dict[str, Any] = {"uri": self.uri, "libvirt_code": code}
            if uuid:
                ctx["server"] = uuid
            msg = f"libvirt: {what}: {exc}"
            if code == _NO_DOMAIN:
                raise NotFoundError(msg, **ctx) from exc
            if code in (_DOM_EXIST, _OPERATION_INVALID):
                raise ConflictError(msg, **ctx) from exc
            if code in (_XML_ERROR, _CONFIG_UNSUPPORTED):
                raise ValidationError(msg, **ctx) from exc
            if code in _UNAVAILABLE:
                self._conn = None
                raise BackendUnavailableError(msg, **ctx) from exc
            raise CommandError(msg, stderr=str(exc), **ctx) from exc

    def _lookup(self, uuid: str) -> Any:
        conn = self._connection()
        with self._translate("look up domain", uuid):
            return conn.lookupByUUIDString(uuid)

    def _find(self, uuid: str) -> Any | None:
        try:
            return self._lookup(uuid)
        except NotFoundError:
            return None

    # Driver -----------------------------------------------------------------
    def define(self, spec: DomainSpec) -> None:
        conn = self._connection()
        for lookup, key in ((conn.lookupByName, spec.name), (conn.lookupByUUIDString, spec.uuid)):
            try:
                with self._translate("look up domain"):
                    lookup(key)
            except NotFoundError:
                continue
            raise ConflictError(
                f"libvirt already has a domain {key!r}", server=spec.name, uri=self.uri
            )
        xml = build_domain_xml(spec)
        with self._translate("define domain", spec.uuid):
            conn.defineXML(xml)
        log.info("defined domain %s (%s)", spec.name, spec.uuid)

    def start(self, uuid: str) -> None:
        dom = self._lookup(uuid)
        with self._translate("start domain", uuid):
            dom.create()
        log.info("started domain %s", uuid)

    def stop(self, uuid: str, *, force: bool = False, timeout: float = 60.0) -> None:
        dom = self._lookup(uuid)
        with self._translate("stop domain", uuid):
            if not dom.isActive():
                return
            if not force:
                try:
                    dom.shutdown()
                except Exception as exc:  # guest may stop between isActive and shutdown
                    if not _is_libvirt_error(exc) or _error_code(exc) != _OPERATION_INVALID:
                        raise
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if not dom.isActive():
                        return
                    time.sleep(self._poll)
                log.warning("domain %s ignored shutdown for %.0f s: powering off", uuid, timeout)
            try:
                dom.destroy()
            except Exception as exc:
                if not _is_libvirt_error(exc) or _error_code(exc) != _OPERATION_INVALID:
                    raise

    def undefine(self, uuid: str) -> None:
        dom = self._find(uuid)
        if dom is None:
            return
        with self._translate("destroy/undefine domain", uuid):
            if dom.isActive():
                try:
                    dom.destroy()
                except Exception as exc:
                    if not _is_libvirt_error(exc) or _error_code(exc) != _OPERATION_INVALID:
                        raise
            try:
                dom.undefine()
            except Exception as exc:
                if not _is_libvirt_error(exc) or _error_code(exc) != _NO_DOMAIN:
                    raise
        log.info("undefined domain %s", uuid)

    def _info(self, dom: Any) -> DomainInfo:
        state, _reason = dom.state()
        active = state != _STATE_SHUTOFF and bool(dom.isActive())
        dom_id = dom.ID()
        return DomainInfo(
            uuid=dom.UUIDString(),
            name=dom.name(),
            id=dom_id if active and dom_id >= 0 else None,
            state=STATE_NAMES.get(state, f"state {state}"),
            active=active,
            metadata=parse_metadata(dom.XMLDesc(0)),
        )

    def info(self, uuid: str) -> DomainInfo | None:
        dom = self._find(uuid)
        if dom is None:
            return None
        try:
            with self._translate("read domain state", uuid):
                return self._info(dom)
        except NotFoundError:  # undefined between lookup and read
            return None

    def list_domains(self) -> list[DomainInfo]:
        conn = self._connection()
        out: list[DomainInfo] = []
        with self._translate("list domains"):
            domains = conn.listAllDomains(0)
        for dom in domains:
            try:
                with self._translate("read domain state"):
                    out.append(self._info(dom))
            except NotFoundError:
                continue
        return out

    def disks(self, uuid: str) -> list[DiskTarget] | None:
        dom = self._lookup(uuid)
        with self._translate("read domain XML", uuid):
            xml = dom.XMLDesc(0)
        return parse_disks(xml)

    # createImage (compute/drivers/libvirt_snapshot.py) --------------------------------
    def disk_snapshot(self, uuid: str, target: str, overlay: Path) -> float:
        """The guest writes to a new ``overlay`` from now on; the call's seconds."""
        from cowfleet.compute.drivers import libvirt_snapshot

        return libvirt_snapshot.disk_snapshot(self, uuid, target, overlay)

    def commit_back(self, uuid: str, target: str, overlay: Path) -> float:
        """Merge ``overlay`` back and pivot the guest to its disk; the pivot's seconds."""
        from cowfleet.compute.drivers import libvirt_snapshot

        return libvirt_snapshot.commit_back(self, uuid, target, overlay)

    def recover_overlay(self, uuid: str, target: str, disk: Path, overlay: Path) -> None:
        from cowfleet.compute.drivers import libvirt_snapshot

        libvirt_snapshot.recover_overlay(self, uuid, target, disk, overlay)

    def domain_disks(self) -> list[DomainDisk]:
        """Every file the disks (and kernel/initrd) of every defined domain read.

        Running or not: a running domain's live XML and its persistent
        definition are both read (a disk swapped live may differ from the one
        it boots with next time). The cache's in-use check asks this.
        """
        from cowfleet.cache.holders import DomainDisk

        conn = self._connection()
        with self._translate("list domains"):
            domains = conn.listAllDomains(0)
        out: list[DomainDisk] = []
        for dom in domains:
            try:
                with self._translate("read domain XML"):
                    name = dom.name()
                    xmls = [dom.XMLDesc(0)]
                    if dom.isActive():
                        xmls.append(dom.XMLDesc(_XML_INACTIVE))
            except NotFoundError:  # undefined since the listing: uses nothing
                continue
            seen: set[tuple[str, str | None]] = set()
            for xml in xmls:
                for f in parse_files(xml):
                    if (f.path, f.format) not in seen:
                        seen.add((f.path, f.format))
                        out.append(DomainDisk(name, f.path, f.format))
        return out
