"""The hypervisor behind a small interface (libvirt, or none)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from cowfleet.compute.domain_xml import DiskTarget, DomainMetadata, DomainSpec

# libvirt's virDomainState numbers and the words ``virsh list`` prints for them.
STATE_NAMES: dict[int, str] = {
    0: "no state",
    1: "running",
    2: "idle",
    3: "paused",
    4: "in shutdown",
    5: "shut off",
    6: "crashed",
    7: "pmsuspended",
}
NO_HYPERVISOR = "shut off (no hypervisor)"


@dataclass(frozen=True)
class DomainInfo:
    """What the hypervisor says about one domain."""

    uuid: str
    name: str
    id: int | None  # the hypervisor's id while running, else None
    state: str
    active: bool
    metadata: DomainMetadata | None = None  # None: not defined by cowfleet


class Driver(Protocol):
    """A hypervisor driver. Implementations own their connection."""

    name: str
    can_run: bool  # False: disks only (``server create`` then does not start anything)

    def define(self, spec: DomainSpec) -> None:
        """Define a persistent domain; ConflictError if its name or UUID exists."""

    def start(self, uuid: str) -> None:
        """Start a defined domain; ConflictError if it already runs."""

    def stop(self, uuid: str, *, force: bool = False, timeout: float = 60.0) -> None:
        """Shut down (ACPI, then hard power-off after ``timeout``; at once with ``force``)."""

    def undefine(self, uuid: str) -> None:
        """Destroy the domain if it runs and undefine it; no error when it does not exist."""

    def info(self, uuid: str) -> DomainInfo | None:
        """The domain's state, or None when the hypervisor has no such domain."""

    def list_domains(self) -> list[DomainInfo]:
        """Every domain the hypervisor knows (cowfleet's and others')."""

    def disks(self, uuid: str) -> list[DiskTarget] | None:
        """Disks of the live (or defined) domain; None when the driver has no hypervisor."""

    def close(self) -> None:
        """Release the connection."""
