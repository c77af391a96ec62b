"""Flavors: the size of an instance (vCPUs, memory, root/ephemeral/swap disks).

Built-in flavors follow OpenStack's classic ``m1.*`` set; user-defined flavors
come from the configuration file (``[flavors.<name>]``) and replace a built-in
of the same name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from cowfleet.config import Config
from cowfleet.errors import NotFoundError

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class Flavor:
    name: str
    vcpus: int
    ram_mb: int
    root_gb: int
    ephemeral_gb: int = 0
    swap_mb: int = 0

    @property
    def root_bytes(self) -> int:
        return self.root_gb * GIB

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Flavor:
        return cls(
            name=str(data["name"]),
            vcpus=int(data["vcpus"]),
            ram_mb=int(data["ram_mb"]),
            root_gb=int(data["root_gb"]),
            ephemeral_gb=int(data.get("ephemeral_gb", 0)),
            swap_mb=int(data.get("swap_mb", 0)),
        )


BUILTIN: tuple[Flavor, ...] = (
    Flavor("m1.tiny", vcpus=1, ram_mb=512, root_gb=1),
    Flavor("m1.small", vcpus=1, ram_mb=2048, root_gb=20),
    Flavor("m1.medium", vcpus=2, ram_mb=4096, root_gb=40),
    Flavor("m1.large", vcpus=4, ram_mb=8192, root_gb=80),
    Flavor("m1.xlarge", vcpus=8, ram_mb=16384, root_gb=160),
)


def all_flavors(cfg: Config) -> list[Flavor]:
    """Built-ins then user-defined flavors; a user flavor replaces a built-in of its name."""
    by_name: dict[str, Flavor] = {f.name: f for f in BUILTIN}
    for spec in cfg.flavors:
        by_name[spec.name] = Flavor(
            name=spec.name,
            vcpus=spec.vcpus,
            ram_mb=spec.ram_mb,
            root_gb=spec.root_gb,
            ephemeral_gb=spec.ephemeral_gb,
            swap_mb=spec.swap_mb,
        )
    return list(by_name.values())


def get_flavor(cfg: Config, name: str) -> Flavor:
    """The flavor called ``name``; :class:`NotFoundError` naming the known ones otherwise."""
    for flavor in all_flavors(cfg):
        if flavor.name == name:
            return flavor
    known = ", ".join(f.name for f in all_flavors(cfg))
    raise NotFoundError(f"flavor {name!r} not found (known: {known})", flavor=name)
