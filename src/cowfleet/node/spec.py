"""The controller's build spec and the instance object of the fleet protocol (validated once).

See docs/fleet-protocol.md: ``PUT /v1/servers/{uuid}`` carries a :class:`BuildSpec`;
every answer, event and heartbeat entry is an :class:`InstanceView`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from cowfleet.compute.flavors import Flavor
from cowfleet.compute.instance import is_uuid
from cowfleet.errors import ValidationError
from cowfleet.fetch.sources import Peer, parse_sources
from cowfleet.fetch.stripes import parse_stripes

HOSTNAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,255}$")
MAX_NAME = 255
MAX_FAULT = 1000

# Node instance states (docs/fleet-protocol.md); DELETED is only ever sent as an event.
BUILDING = "BUILDING"
ACTIVE = "ACTIVE"
SHUTOFF = "SHUTOFF"
ERROR = "ERROR"
DELETING = "DELETING"
DELETED = "DELETED"

# Nova's power_state numbers.
NOSTATE = 0
RUNNING = 1
PAUSED = 3
SHUTDOWN = 4
CRASHED = 6
SUSPENDED = 7


def validate_hostname(name: str) -> str:
    if not HOSTNAME_RE.match(name):
        raise ValidationError(
            f"invalid node hostname {name!r}: use 1-255 characters of A-Z a-z 0-9 . _ -"
        )
    return name


def _int(data: dict[str, Any], key: str, *, minimum: int) -> int:
    value = data.get(key, 0 if minimum == 0 else None)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValidationError(f"flavor.{key} must be a whole number >= {minimum}, not {value!r}")
    return value


def _text(data: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise ValidationError(f"{key} must be a string of 1-{MAX_NAME} characters")
    return value


@dataclass(frozen=True)
class BuildSpec:
    """What the controller asks a node to build (the whole spec, keyed by ``uuid``)."""

    uuid: str
    name: str
    project_id: str | None
    image_id: str
    flavor: Flavor
    # Peers to fetch the image from before the origin (the controller's choice of the
    # moment: not part of what the build is, so a retry with others is the same build).
    sources: tuple[Peer, ...] = field(default=(), compare=False)
    # Or the peers of each stripe (cowfleet.fetch.stripes): same standing as sources.
    stripes: tuple[tuple[Peer, ...], ...] = field(default=(), compare=False)

    @classmethod
    def from_json(cls, data: Any, uuid: str | None = None) -> BuildSpec:
        """Validate a request body; ``uuid`` is the one in the URL (the body's must match)."""
        if not isinstance(data, dict):
            raise ValidationError("the build spec must be a JSON object")
        body_uuid = data.get("uuid", uuid)
        if not isinstance(body_uuid, str) or not is_uuid(body_uuid):
            raise ValidationError(f"invalid server uuid {body_uuid!r}")
        if uuid is not None and body_uuid != uuid:
            raise ValidationError(f"the body's uuid {body_uuid} is not the URL's {uuid}")
        name = _text(data, "name")
        image_id = _text(data, "image_id")
        fl = data.get("flavor")
        if not isinstance(fl, dict):
            raise ValidationError("flavor must be an object (name, vcpus, ram_mb, root_gb, ...)")
        flavor = Flavor(
            name=str(_text(fl, "name")),
            vcpus=_int(fl, "vcpus", minimum=1),
            ram_mb=_int(fl, "ram_mb", minimum=1),
            root_gb=_int(fl, "root_gb", minimum=0),
            ephemeral_gb=_int(fl, "ephemeral_gb", minimum=0),
            swap_mb=_int(fl, "swap_mb", minimum=0),
        )
        return cls(
            uuid=body_uuid,
            name=str(name),
            project_id=_text(data, "project_id", required=False),
            image_id=str(image_id),
            flavor=flavor,
            sources=parse_sources(data.get("sources")),
            stripes=parse_stripes(data.get("stripes")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "name": self.name,
            "project_id": self.project_id,
            "image_id": self.image_id,
            "flavor": self.flavor.to_dict(),
        }

    @property
    def node_name(self) -> str:
        """The instance's name on the node (domain name): unique per node, unlike the
        user's name, which Nova lets several servers share."""
        return node_name(self.uuid)


def node_name(uuid: str) -> str:
    return f"instance-{uuid}"


def one_line(text: str) -> str:
    """A fault message: one line, bounded."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_FAULT else line[: MAX_FAULT - 3] + "..."


@dataclass(frozen=True)
class InstanceView:
    """One instance as the node reports it (the protocol's instance object)."""

    uuid: str
    state: str
    power_state: int = NOSTATE
    fault: str | None = None
    name: str | None = None  # the user's name, from the spec (None: not built by a controller)
    image_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "state": self.state,
            "power_state": self.power_state,
            "fault": self.fault,
            "name": self.name,
            "image_id": self.image_id,
        }
