"""Pydantic models of requests and responses: they make the served OpenAPI schema.

Handlers build responses themselves (plain dicts from :mod:`.views`); these models
describe them so that clients and schemathesis know what to expect.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cowfleet.images.server.validate import MAX_INT, MAX_NAME

DiskFormat = Literal["raw", "qcow2", "vmdk", "vhd", "vhdx", "vdi", "iso", "aki", "ari", "ami"]
ContainerFormat = Literal["bare", "ovf", "ova", "aki", "ari", "ami", "docker", "compressed"]
Visibility = Literal["public", "private", "shared", "community"]
Status = Literal["queued", "saving", "active"]
SortKey = Literal[
    "name",
    "status",
    "container_format",
    "disk_format",
    "size",
    "virtual_size",
    "id",
    "created_at",
    "updated_at",
    "min_disk",
    "min_ram",
    "visibility",
    "owner",
]


class Image(BaseModel):
    """A Glance v2 image; free-form string properties appear as extra keys."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, str] = Field(init=False)

    id: str
    name: str | None
    status: Status
    disk_format: DiskFormat | None
    container_format: ContainerFormat | None
    visibility: Visibility
    size: int | None
    virtual_size: int | None
    checksum: str | None
    os_hash_algo: str | None
    os_hash_value: str | None
    min_disk: int
    min_ram: int
    protected: bool
    owner: str | None
    tags: list[str]
    created_at: str
    updated_at: str
    self_: str = Field(alias="self")
    file: str
    schema_: str = Field(alias="schema")


class ImageList(BaseModel):
    images: list[Image]
    first: str
    schema_: str = Field(alias="schema")
    next: str | None = None


class ImageCreate(BaseModel):
    """Body of ``POST /v2/images``; other string members become properties."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, str] = Field(init=False)

    id: str | None = Field(default=None, description="UUID chosen by the caller")
    name: str | None = Field(default=None, max_length=MAX_NAME)
    disk_format: DiskFormat | None = None
    container_format: ContainerFormat | None = None
    visibility: Visibility = "shared"
    min_disk: int = Field(default=0, ge=0, le=MAX_INT)
    min_ram: int = Field(default=0, ge=0, le=MAX_INT)
    protected: bool = False
    tags: list[str] = Field(default_factory=list)


class Member(BaseModel):
    """A project an image is shared with (Glance v2 image member)."""

    image_id: str
    member_id: str
    status: Literal["pending", "accepted", "rejected"]
    created_at: str
    updated_at: str
    schema_: str = Field(alias="schema")


class MemberList(BaseModel):
    members: list[Member]
    schema_: str = Field(alias="schema")


class MemberCreate(BaseModel):
    """Body of ``POST /v2/images/{id}/members``."""

    model_config = ConfigDict(extra="forbid")
    member: str = Field(min_length=1, max_length=255, description="the project to share with")


class MemberUpdate(BaseModel):
    """Body of ``PUT /v2/images/{id}/members/{member}``."""

    model_config = ConfigDict(extra="forbid")
    status: Literal["pending", "accepted", "rejected"]


class PatchOperation(BaseModel):
    op: Literal["add", "replace", "remove"]
    path: str
    value: Any = None


class Error(BaseModel):
    code: int
    title: str
    message: str


class Version(BaseModel):
    id: str
    status: str
    links: list[dict[str, str]]


class Versions(BaseModel):
    versions: list[Version]


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` entries for FastAPI routes: the error model for each status."""
    return {c: {"model": Error, "description": _REASONS.get(c, "error")} for c in codes}


_REASONS = {
    400: "malformed or invalid request",
    401: "missing or wrong X-Auth-Token",
    403: "read-only/reserved attribute, protected image, a format of an image past queued, "
    "or a change only the image's owner (or an admin) may make",
    404: "no such image (or one the caller may not see), or no such member",
    408: "the client stopped sending upload data",
    409: "conflict with the image's status or properties",
    410: "the image was deleted during the upload",
    413: "body larger than allowed, or more properties than the quota",
    415: "wrong content type, or the image data failed inspection",
    416: "range not satisfiable",
    503: "too many uploads in flight (see Retry-After)",
}
