"""Routes of Glance v2's image members: the projects a ``shared`` image is shared with.

The owner (or an admin) adds and removes members; a member project accepts or rejects
(``PUT .../members/{project}`` with ``{"status": ...}``); a shared image is listed for a
member once it accepted, and readable by id in any status (see :mod:`.access`). A
project that cannot read the image gets 404 for all of these; one that can read it but
may not do the change asked gets 403.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request, Response

from cowfleet.errors import NotFoundError, ValidationError
from cowfleet.images.server import schemas
from cowfleet.images.server.access import MEMBER_STATUSES, SHARED, Caller
from cowfleet.images.server.api import (
    call,
    caller,
    changeable,
    image_id_or_404,
    read_json,
    readable,
    service,
)
from cowfleet.images.server.catalog import ImageRecord, MemberRecord
from cowfleet.images.server.errors import bad_request, forbidden
from cowfleet.images.server.validate import check_text
from cowfleet.images.server.views import isotime

MEMBER_SCHEMA = "/v2/schemas/member"
MEMBERS_SCHEMA = "/v2/schemas/members"
MAX_MEMBER = 255

router = APIRouter()


def member_json(rec: MemberRecord) -> dict[str, Any]:
    return {
        "image_id": rec.image_id,
        "member_id": rec.member,
        "status": rec.status,
        "created_at": isotime(rec.created_at),
        "updated_at": isotime(rec.updated_at),
        "schema": MEMBER_SCHEMA,
    }


def _only_shared(rec: ImageRecord) -> None:
    if rec.visibility != SHARED:
        raise forbidden(
            f"image {rec.id} is {rec.visibility}: only shared images have members",
            image_id=rec.id,
        )


def _sees_every_member(who: Caller, rec: ImageRecord) -> bool:
    return who.reads_all or who.owns(rec.owner)


def _member_id(image_id: str, member_id: str) -> str:
    """A project id from the path; one no member can have (too long, NUL, not valid
    text, which PostgreSQL would refuse to compare) is simply no member: 404."""
    try:
        check_text(member_id, "member")
    except ValidationError:
        member_id = ""
    if not 1 <= len(member_id) <= MAX_MEMBER:
        raise NotFoundError(f"no such member of image {image_id}", image_id=image_id)
    return member_id


def _member_field(body: Any, key: str) -> str:
    if not isinstance(body, Mapping) or set(body) != {key}:
        raise bad_request(f'the request body must be a JSON object {{"{key}": ...}}')
    value = body[key]
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_MEMBER:
        raise bad_request(f"{key} must be a string of 1 to {MAX_MEMBER} characters")
    return value


_MEMBER_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": schemas.MemberCreate.model_json_schema()}},
    }
}
_STATUS_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": schemas.MemberUpdate.model_json_schema()}},
    }
}


@router.get("/v2/schemas/member", tags=["schemas"], responses=schemas.error_responses(401))
def member_schema() -> dict[str, Any]:
    return {"name": "member", "properties": schemas.Member.model_json_schema()["properties"]}


@router.get("/v2/schemas/members", tags=["schemas"], responses=schemas.error_responses(401))
def members_schema() -> dict[str, Any]:
    return {
        "name": "members",
        "properties": {
            "members": {"type": "array", "items": member_schema()},
            "schema": {"type": "string"},
        },
    }


@router.post(
    "/v2/images/{image_id}/members",
    response_model=schemas.Member,
    responses=schemas.error_responses(400, 401, 403, 404, 409, 413, 415),
    openapi_extra=_MEMBER_BODY,
    tags=["image members"],
)
async def add_member(request: Request, image_id: str) -> dict[str, Any]:
    svc = service(request)
    image_id = image_id_or_404(image_id)
    rec = await call(changeable, svc, caller(request), image_id)
    _only_shared(rec)
    member = _member_field(await read_json(request, ("application/json",)), "member")
    return member_json(await call(svc.catalog.add_member, image_id, member))


@router.get(
    "/v2/images/{image_id}/members",
    response_model=schemas.MemberList,
    responses=schemas.error_responses(401, 403, 404),
    tags=["image members"],
)
def list_members(request: Request, image_id: str) -> dict[str, Any]:
    svc, who = service(request), caller(request)
    rec = readable(svc, who, image_id_or_404(image_id))
    _only_shared(rec)
    members = svc.catalog.list_members(rec.id)
    if not _sees_every_member(who, rec):  # a member sees its own membership only
        members = [m for m in members if m.member == who.project]
    return {"members": [member_json(m) for m in members], "schema": MEMBERS_SCHEMA}


@router.get(
    "/v2/images/{image_id}/members/{member_id}",
    response_model=schemas.Member,
    responses=schemas.error_responses(401, 403, 404),
    tags=["image members"],
)
def show_member(request: Request, image_id: str, member_id: str) -> dict[str, Any]:
    svc, who = service(request), caller(request)
    rec = readable(svc, who, image_id_or_404(image_id))
    _only_shared(rec)
    member_id = _member_id(rec.id, member_id)
    if not _sees_every_member(who, rec) and member_id != who.project:
        raise NotFoundError(
            f"project {member_id[:80]} is not a member of image {rec.id}", image_id=rec.id
        )
    return member_json(svc.catalog.get_member(rec.id, member_id))


@router.put(
    "/v2/images/{image_id}/members/{member_id}",
    response_model=schemas.Member,
    responses=schemas.error_responses(400, 401, 403, 404, 413, 415),
    openapi_extra=_STATUS_BODY,
    tags=["image members"],
)
async def update_member(request: Request, image_id: str, member_id: str) -> dict[str, Any]:
    svc, who = service(request), caller(request)
    rec = await call(readable, svc, who, image_id_or_404(image_id))
    _only_shared(rec)
    member_id = _member_id(rec.id, member_id)
    if member_id != who.project and not who.is_admin:
        raise forbidden(
            f"only project {member_id[:80]} may accept or reject its membership of image {rec.id}",
            image_id=rec.id,
        )
    status = _member_field(await read_json(request, ("application/json",)), "status")
    if status not in MEMBER_STATUSES:
        raise bad_request(f"status must be one of {', '.join(MEMBER_STATUSES)}, not {status!r}")
    return member_json(await call(svc.catalog.set_member_status, rec.id, member_id, status))


@router.delete(
    "/v2/images/{image_id}/members/{member_id}",
    status_code=204,
    responses=schemas.error_responses(401, 403, 404),
    tags=["image members"],
)
def remove_member(request: Request, image_id: str, member_id: str) -> Response:
    svc = service(request)
    rec = changeable(svc, caller(request), image_id_or_404(image_id))
    _only_shared(rec)
    svc.catalog.remove_member(rec.id, _member_id(rec.id, member_id))
    return Response(status_code=204)
