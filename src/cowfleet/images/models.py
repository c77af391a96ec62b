"""The Glance v2 image record as the client sees it, validated where the JSON enters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cowfleet.errors import RemoteError

# Keys of a Glance v2 image that are neither core fields of :class:`Image` nor
# free-form properties (links, lists, booleans Glance adds).
_NOT_PROPERTIES = frozenset(
    {"self", "file", "schema", "tags", "locations", "direct_url", "stores", "os_hidden"}
)

CORE_FIELDS = (
    "id",
    "name",
    "status",
    "disk_format",
    "container_format",
    "size",
    "virtual_size",
    "checksum",
    "os_hash_algo",
    "os_hash_value",
    "min_disk",
    "min_ram",
    "visibility",
    "protected",
    "owner",
    "created_at",
    "updated_at",
)


@dataclass(frozen=True)
class Image:
    """One Glance v2 image record (free-form string properties in ``properties``)."""

    id: str
    name: str | None
    status: str
    disk_format: str | None
    container_format: str | None
    size: int | None
    virtual_size: int | None
    checksum: str | None
    os_hash_algo: str | None
    os_hash_value: str | None
    min_disk: int
    min_ram: int
    visibility: str
    protected: bool
    owner: str | None
    created_at: str
    updated_at: str
    properties: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> Image:
        """Build from a decoded JSON object; a malformed record is a :class:`RemoteError`."""
        if not isinstance(data, Mapping):
            raise RemoteError("image service returned a non-object image record")
        try:
            image_id = data["id"]
            status = data["status"]
        except KeyError as exc:
            raise RemoteError(f"image record without {exc.args[0]!r}") from exc
        if not isinstance(image_id, str) or not isinstance(status, str):
            raise RemoteError("image record has a non-string id or status")
        props = {
            str(k): v
            for k, v in data.items()
            if k not in CORE_FIELDS and k not in _NOT_PROPERTIES and isinstance(v, str)
        }
        return cls(
            id=image_id,
            name=_opt_str(data, "name"),
            status=status,
            disk_format=_opt_str(data, "disk_format"),
            container_format=_opt_str(data, "container_format"),
            size=_opt_int(data, "size"),
            virtual_size=_opt_int(data, "virtual_size"),
            checksum=_opt_str(data, "checksum"),
            os_hash_algo=_opt_str(data, "os_hash_algo"),
            os_hash_value=_opt_str(data, "os_hash_value"),
            min_disk=_opt_int(data, "min_disk") or 0,
            min_ram=_opt_int(data, "min_ram") or 0,
            visibility=_opt_str(data, "visibility") or "shared",
            protected=bool(data.get("protected", False)),
            owner=_opt_str(data, "owner"),
            created_at=_opt_str(data, "created_at") or "",
            updated_at=_opt_str(data, "updated_at") or "",
            properties=props,
        )

    def to_dict(self) -> dict[str, Any]:
        """Flat Glance-style dict: core fields then properties (for ``--output json``)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in CORE_FIELDS}
        out["properties"] = dict(sorted(self.properties.items()))
        return out


@dataclass(frozen=True)
class Member:
    """One project an image is shared with (a Glance v2 image member)."""

    image_id: str
    member_id: str
    status: str
    created_at: str
    updated_at: str

    @classmethod
    def from_json(cls, data: Any) -> Member:
        """Build from a decoded JSON object; a malformed record is a :class:`RemoteError`."""
        if not isinstance(data, Mapping):
            raise RemoteError("image service returned a non-object member record")
        values = {key: _opt_str(data, key) for key in ("image_id", "member_id", "status")}
        missing = [key for key, value in values.items() if value is None]
        if missing:
            raise RemoteError(f"member record without {', '.join(map(repr, missing))}")
        return cls(
            image_id=str(values["image_id"]),
            member_id=str(values["member_id"]),
            status=str(values["status"]),
            created_at=_opt_str(data, "created_at") or "",
            updated_at=_opt_str(data, "updated_at") or "",
        )


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RemoteError(f"image record field {key!r} is not a string: {value!r}")
    return value


def _opt_int(data: Mapping[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RemoteError(f"image record field {key!r} is not an integer: {value!r}")
    return value
