"""The scheduler's inputs: what a server needs, and what each host offers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Need:
    """The resources one server takes from a host."""

    vcpus: int
    ram_mb: int
    disk_gb: int


@dataclass(frozen=True)
class Ratios:
    """Allocation ratios: a host offers ``total * ratio`` of each resource."""

    cpu: float = 4.0
    ram: float = 1.0
    disk: float = 1.0


@dataclass(frozen=True)
class HostState:
    """One node as the last heartbeat and the claims in the database describe it."""

    hostname: str
    enabled: bool
    alive: bool
    hypervisor_type: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    vcpus_used: int = 0
    ram_used_mb: int = 0
    disk_used_gb: int = 0
    arch: str | None = None
    # Images in the node's cache, or on their way there (a build of them placed on it).
    images: frozenset[str] = frozenset()

    def free_vcpus(self, ratios: Ratios) -> float:
        return self.vcpus * ratios.cpu - self.vcpus_used

    def free_ram_mb(self, ratios: Ratios) -> float:
        return self.ram_mb * ratios.ram - self.ram_used_mb

    def free_disk_gb(self, ratios: Ratios) -> float:
        return self.disk_gb * ratios.disk - self.disk_used_gb


@dataclass(frozen=True)
class Request:
    """What one server asks for: resources, its image, and the hosts already tried."""

    need: Need
    image_id: str
    image_props: Mapping[str, str] = field(default_factory=dict)
    exclude: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Weighing:
    """How hosts are ranked: the cache weight, the RAM weight, and spread or pack."""

    cache: float = 2.0
    ram: float = 1.0
    mode: str = "spread"  # "spread": most free RAM first; "pack": least free RAM first


@dataclass(frozen=True)
class Candidate:
    """A host that passed every filter, with its total weight and each weigher's part."""

    hostname: str
    weight: float
    weights: Mapping[str, float]


@dataclass(frozen=True)
class Selection:
    """Hosts ranked best first, and how many hosts each filter rejected."""

    candidates: tuple[Candidate, ...]
    rejected: Mapping[str, int]
    filters: tuple[str, ...]
    considered: int

    def why_none(self) -> str:
        """A one-line reason for an empty selection (after "No valid host was found.")."""
        if self.considered == 0:
            return "There are no compute hosts registered."
        parts = [f"{count} by {name}" for name, count in self.rejected.items() if count]
        return (
            f"There are not enough hosts available ({self.considered} considered, "
            f"rejected {', '.join(parts)})."
        )
