"""The ``none`` driver: disks only, for hosts without a hypervisor."""

from __future__ import annotations

from cowfleet.compute.domain_xml import DiskTarget, DomainSpec
from cowfleet.compute.drivers.base import NO_HYPERVISOR, DomainInfo
from cowfleet.errors import ConflictError


class NoneDriver:
    """Defines nothing and runs nothing: the instance folder is the whole instance."""

    name = "none"
    can_run = False

    def define(self, spec: DomainSpec) -> None:
        return None

    def start(self, uuid: str) -> None:
        raise ConflictError(
            f"server {uuid} uses the none driver: there is no hypervisor to start it",
            server=uuid,
        )

    def stop(self, uuid: str, *, force: bool = False, timeout: float = 60.0) -> None:
        return None  # never running

    def undefine(self, uuid: str) -> None:
        return None

    def info(self, uuid: str) -> DomainInfo | None:
        return DomainInfo(uuid=uuid, name="", id=None, state=NO_HYPERVISOR, active=False)

    def list_domains(self) -> list[DomainInfo]:
        return []

    def disks(self, uuid: str) -> list[DiskTarget] | None:
        return None

    def close(self) -> None:
        return None
