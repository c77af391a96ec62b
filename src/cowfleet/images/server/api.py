"""Routes of the Glance v2 subset (images, their data, schemas, versions)."""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from cowfleet.errors import ConflictError, NotFoundError, ValidationError
from cowfleet.formats import policy
from cowfleet.images.server import schemas
from cowfleet.images.server.access import (
    SHARED,
    Caller,
    check_change,
    check_create,
    check_fields,
    check_read,
    list_scope,
    owner_for_new_image,
)
from cowfleet.images.server.body import receive_body
from cowfleet.images.server.catalog import ACTIVE, FILTER_KEYS, Catalog, ImageRecord
from cowfleet.images.server.download import DescriptorResponse, UseCounts
from cowfleet.images.server.errors import bad_request
from cowfleet.images.server.patch import PATCH_MEDIA_TYPES, apply_patch
from cowfleet.images.server.ranges import parse_range
from cowfleet.images.server.settings import ServerSettings
from cowfleet.images.server.slots import UploadSlots
from cowfleet.images.server.store import FilesystemStore
from cowfleet.images.server.upload import BlockPool, UploadPipeline, check_qcow2_tables, too_large
from cowfleet.images.server.validate import (
    MAX_JSON_DEPTH,
    check_document,
    check_text,
    check_uuid,
    parse_create,
)
from cowfleet.images.server.views import ImageResponse, image_json

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_JSON_BODY = 1024 * 1024
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_UUID = re.compile(UUID_PATTERN)


@dataclass(frozen=True)
class Service:
    """What the routes work with (kept on ``app.state.service``)."""

    settings: ServerSettings
    catalog: Catalog
    store: FilesystemStore
    blocks: BlockPool  # upload buffers, reused from one upload to the next
    slots: UploadSlots  # uploads in flight, per server and per token
    uses: UseCounts = field(default_factory=UseCounts)  # downloads per image


def service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await run_in_threadpool(fn, *args, **kwargs)


def caller(request: Request) -> Caller:
    """Who the request speaks for (set by :class:`~.auth.TokenAuth`)."""
    who: Caller = request.state.caller
    return who


def membership(svc: Service, who: Caller, rec: ImageRecord) -> str | None:
    """``who``'s member status on ``rec`` where it matters for access (shared images)."""
    if rec.visibility != SHARED or who.reads_all or who.owns(rec.owner):
        return None
    return svc.catalog.membership(rec.id, who.project)


def readable(svc: Service, who: Caller, image_id: str) -> ImageRecord:
    """The image, if ``who`` may read it; 404 otherwise (also when it does not exist)."""
    rec = svc.catalog.get(image_id)
    check_read(who, rec.id, rec.owner, rec.visibility, membership(svc, who, rec))
    return rec


def changeable(svc: Service, who: Caller, image_id: str) -> ImageRecord:
    """The image, if ``who`` may change it; 404 if it cannot read it, else 403."""
    rec = svc.catalog.get(image_id)
    check_change(who, rec.id, rec.owner, rec.visibility, membership(svc, who, rec))
    return rec


def image_id_or_404(image_id: str) -> str:
    # Glance answers 404 for ids that are not UUIDs.
    if not _UUID.match(image_id):
        raise NotFoundError(f"no image with id {image_id[:80]!r}")
    return image_id.lower()


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json(request: Request, allowed: tuple[str, ...]) -> Any:
    if _media_type(request) not in allowed:
        raise ValidationError(
            f"content type must be {' or '.join(allowed)}, not "
            f"{request.headers.get('content-type', 'missing')!r}",
            http_status=415,
        )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_JSON_BODY:
        raise ValidationError("request body too large", http_status=413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_JSON_BODY:
            raise ValidationError("request body too large", http_status=413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad_request(f"malformed JSON in request body: {exc}") from exc
    except RecursionError:
        raise bad_request(
            f"the request body is nested deeper than {MAX_JSON_DEPTH} levels"
        ) from None
    check_document(doc)
    return doc


def check_property_quota(count: int, quota: int) -> None:
    """413 when an image would hold more than ``quota`` free-form properties."""
    if count > quota:
        raise ValidationError(
            f"an image may hold at most {quota} properties; this request leaves {count}",
            http_status=413,
        )


router = APIRouter()


@router.get("/", status_code=300, response_model=schemas.Versions, tags=["versions"])
@router.get("/versions", response_model=schemas.Versions, tags=["versions"])
def versions(request: Request) -> dict[str, Any]:
    base = str(request.base_url).rstrip("/")
    return {
        "versions": [
            {"id": "v2.9", "status": "CURRENT", "links": [{"rel": "self", "href": f"{base}/v2/"}]}
        ]
    }


@router.get("/v2/schemas/image", tags=["schemas"], responses=schemas.error_responses(401))
def image_schema() -> dict[str, Any]:
    return {
        "name": "image",
        "additionalProperties": {"type": "string"},
        "properties": schemas.Image.model_json_schema(by_alias=True)["properties"],
        "links": [
            {"rel": "self", "href": "{self}"},
            {"rel": "enclosure", "href": "{file}"},
            {"rel": "describedby", "href": "{schema}"},
        ],
    }


@router.get("/v2/schemas/images", tags=["schemas"], responses=schemas.error_responses(401))
def images_schema() -> dict[str, Any]:
    return {
        "name": "images",
        "properties": {
            "images": {"type": "array", "items": image_schema()},
            "first": {"type": "string"},
            "next": {"type": "string"},
            "schema": {"type": "string"},
        },
        "links": [
            {"rel": "first", "href": "{first}"},
            {"rel": "next", "href": "{next}"},
            {"rel": "describedby", "href": "{schema}"},
        ],
    }


_CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": schemas.ImageCreate.model_json_schema()}},
    }
}


@router.post(
    "/v2/images",
    status_code=201,
    response_model=schemas.Image,
    responses=schemas.error_responses(400, 401, 403, 409, 413, 415),
    openapi_extra=_CREATE_BODY,
    tags=["images"],
)
async def create_image(request: Request) -> ImageResponse:
    svc = service(request)
    who = caller(request)
    check_create(who)
    req = parse_create(await read_json(request, ("application/json",)))
    check_property_quota(len(req.properties), svc.settings.property_quota)
    fields = dict(req.fields)
    check_fields(who, fields)
    fields["owner"] = owner_for_new_image(who, fields, svc.settings.owner)
    image_id = req.image_id or str(uuid.uuid4())
    rec = await call(
        svc.catalog.create, image_id, fields=fields, properties=req.properties, tags=req.tags
    )
    log.info("created image %s (%s)", rec.id, rec.name)
    return ImageResponse(
        image_json(rec), status_code=201, headers={"Location": f"/v2/images/{rec.id}"}
    )


@router.get(
    "/v2/images",
    response_model=schemas.ImageList,
    responses=schemas.error_responses(400, 401),
    tags=["images"],
)
def list_images(
    request: Request,
    limit: Annotated[int | None, Query(ge=0)] = None,
    marker: Annotated[str | None, Query(pattern=UUID_PATTERN)] = None,
    sort_key: schemas.SortKey = "created_at",
    sort_dir: Literal["asc", "desc"] = "desc",
    name: str | None = None,
    status: schemas.Status | None = None,
    disk_format: schemas.DiskFormat | None = None,
    container_format: schemas.ContainerFormat | None = None,
    visibility: schemas.Visibility | Literal["all"] | None = None,
    owner: str | None = None,
    member_status: Literal["accepted", "pending", "rejected", "all"] | None = None,
) -> ImageResponse:
    svc = service(request)
    who = caller(request)
    st = svc.settings
    if limit is None:
        limit = st.default_page_size
    if limit < 0:
        raise bad_request(f"limit must not be negative: {limit}")
    limit = min(limit, st.max_page_size)
    given = {
        "name": name,
        "status": status,
        "disk_format": disk_format,
        "container_format": container_format,
        "visibility": visibility,
        "owner": owner,
    }
    filters = {k: v for k, v in given.items() if v is not None and k in FILTER_KEYS}
    for key, value in filters.items():
        check_text(value, f"filter {key}")
    if filters.get("visibility") == "all":
        del filters["visibility"]
    if marker is not None:
        marker = check_uuid(marker)
        try:
            readable(svc, who, marker)  # another project's private image is no marker
        except NotFoundError as exc:
            raise bad_request(f"marker could not be found: {marker}") from exc
    try:
        page, more = svc.catalog.list_page(
            filters=filters,
            sort_key=sort_key,
            sort_dir=sort_dir,
            limit=limit,
            marker=marker,
            scope=list_scope(who, visibility, member_status),
        )
    except NotFoundError as exc:
        raise bad_request(f"marker could not be found: {marker}") from exc
    query = {k: v for k, v in request.query_params.items() if k != "marker"}
    body: dict[str, Any] = {
        "images": [image_json(r) for r in page],
        "first": "/v2/images" + (f"?{urlencode(query)}" if query else ""),
        "schema": "/v2/schemas/images",
    }
    if more and page:
        body["next"] = "/v2/images?" + urlencode({**query, "marker": page[-1].id})
    return ImageResponse(body)


@router.get(
    "/v2/images/{image_id}",
    response_model=schemas.Image,
    responses=schemas.error_responses(401, 404),
    tags=["images"],
)
def show_image(request: Request, image_id: str) -> ImageResponse:
    rec = readable(service(request), caller(request), image_id_or_404(image_id))
    return ImageResponse(image_json(rec))


_PATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            PATCH_MEDIA_TYPES[0]: {
                "schema": {"type": "array", "items": schemas.PatchOperation.model_json_schema()}
            }
        },
    }
}


@router.patch(
    "/v2/images/{image_id}",
    response_model=schemas.Image,
    responses=schemas.error_responses(400, 401, 403, 404, 409, 413, 415),
    openapi_extra=_PATCH_BODY,
    tags=["images"],
)
async def update_image(request: Request, image_id: str) -> ImageResponse:
    svc = service(request)
    who = caller(request)
    image_id = image_id_or_404(image_id)
    rec = await call(changeable, svc, who, image_id)
    body = await read_json(request, PATCH_MEDIA_TYPES)
    result = apply_patch(rec, body, owner_writable=who.is_admin)
    check_fields(who, result.fields)
    if len(result.properties) > len(rec.properties):
        check_property_quota(len(result.properties), svc.settings.property_quota)
    rec = await call(
        svc.catalog.update,
        image_id,
        fields=result.fields,
        properties=result.properties,
        tags=result.tags,
    )
    return ImageResponse(image_json(rec))


@router.delete(
    "/v2/images/{image_id}",
    status_code=204,
    responses=schemas.error_responses(401, 403, 404),
    tags=["images"],
)
def delete_image(request: Request, image_id: str) -> Response:
    svc = service(request)
    image_id = image_id_or_404(image_id)
    changeable(svc, caller(request), image_id)
    rec = svc.catalog.delete(image_id)
    svc.store.delete(rec.id)
    svc.uses.forget(rec.id)
    log.info("deleted image %s", rec.id)
    return Response(status_code=204)


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.put(
    "/v2/images/{image_id}/file",
    status_code=204,
    responses=schemas.error_responses(400, 401, 403, 404, 408, 409, 410, 413, 415, 503),
    openapi_extra=_UPLOAD_BODY,
    tags=["image data"],
)
async def upload_image(request: Request, image_id: str) -> Response:
    svc = service(request)
    st = svc.settings
    image_id = image_id_or_404(image_id)
    rec = await call(changeable, svc, caller(request), image_id)
    if _media_type(request) != "application/octet-stream":
        raise ValidationError(
            "image data must be sent as application/octet-stream, not "
            f"{request.headers.get('content-type', 'missing')!r}",
            http_status=415,
        )
    if rec.disk_format is None or rec.container_format is None:
        raise bad_request("disk_format and container_format must be set before uploading data")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > st.max_image_size:
        raise too_large(int(declared), st.max_image_size, image_id)
    with svc.slots.hold(request.headers.get("x-auth-token", ""), image_id):
        return await _receive_upload(request, svc, image_id)


async def _receive_upload(request: Request, svc: Service, image_id: str) -> Response:
    st = svc.settings
    # The record as claimed: its formats cannot change from here on (see Catalog.update),
    # so the safety check below judges the data against the values fixed now.
    rec = await call(svc.catalog.claim_upload, image_id)
    if rec.disk_format is None or rec.container_format is None:
        await call(svc.catalog.release_upload, image_id)
        raise bad_request("disk_format and container_format must be set before uploading data")
    started = time.monotonic()
    staged = svc.store.begin_write(image_id)
    pipe = UploadPipeline(staged, pool=svc.blocks, max_size=st.max_image_size)
    committed = False
    try:
        try:
            # A client that stops sending for upload_idle_timeout seconds is dropped, so
            # a stalled upload cannot keep the image in "saving" forever.
            await receive_body(request, pipe, st.upload_idle_timeout)
        except TimeoutError:
            log.warning(
                "image %s: no data for %ss after %d bytes; upload dropped",
                image_id,
                st.upload_idle_timeout,
                pipe.total,
            )
            raise ValidationError(
                "upload aborted: the client stopped sending data", http_status=408
            ) from None
        except ClientDisconnect:
            log.warning(
                "image %s: client went away after %d bytes; upload dropped", image_id, pipe.total
            )
            raise bad_request("upload aborted: the client disconnected") from None
        result = await pipe.finish()
        verdict = policy.check(
            rec.disk_format, result.inspection, max_virtual_size=st.max_virtual_size
        )
        verdict.raise_if_unsafe(image_id=image_id)
        if result.inspection.format == "qcow2":
            await call(check_qcow2_tables, staged)
        received = time.monotonic()
        await call(svc.store.commit, staged, tree_leaves=result.tree.leaves)
        committed = True
        try:
            rec = await call(
                svc.catalog.finish_upload,
                image_id,
                size=result.size,
                virtual_size=result.inspection.virtual_size,
                checksum=result.checksum,
                os_hash_algo=result.os_hash_algo,
                os_hash_value=result.os_hash_value,
                tree_sha256=result.tree.root,
                tree_leaf_size=result.tree.leaf_size,
            )
        except NotFoundError as exc:
            svc.store.delete(image_id)
            raise ValidationError(str(exc), http_status=410, image_id=image_id) from exc
    except BaseException:
        pipe.abort()
        if not committed:
            svc.store.abort(staged)
        svc.catalog.release_upload(image_id)
        raise
    log.info(
        "image %s active: %d bytes, %s, virtual size %d, %.2f s (fsync+rename %.2f s)",
        image_id,
        rec.size,
        rec.disk_format,
        rec.virtual_size,
        time.monotonic() - started,
        time.monotonic() - received,
    )
    return Response(status_code=204)


@router.get(
    "/v2/images/{image_id}/file",
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "description": "the image data",
        },
        204: {"description": "the image has no data yet"},
        206: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "description": "the requested range",
        },
        **schemas.error_responses(400, 401, 404, 416),
    },
    tags=["image data"],
)
def download_image(request: Request, image_id: str) -> Response:
    svc = service(request)
    rec = readable(svc, caller(request), image_id_or_404(image_id))
    if rec.status != ACTIVE:
        return Response(status_code=204)
    fd = svc.store.open_read(rec.id)
    try:
        size = os.fstat(fd).st_size
        rng = parse_range(request.headers.get("range"), size)
    except BaseException:
        os.close(fd)
        raise
    headers = {"accept-ranges": "bytes"}
    if rec.checksum:
        headers["content-md5"] = rec.checksum
    offset, length, status = 0, size, 200
    if rng is not None:
        headers["content-range"] = rng.content_range
        offset, length, status = rng.first, rng.length, 206
    min_uses = svc.settings.cache_min_uses
    return DescriptorResponse(
        fd,
        offset=offset,
        length=length,
        status_code=status,
        headers=headers,
        chunk_size=svc.settings.download_chunk,
        keep_cached=min_uses > 0 and svc.uses.count(rec.id) >= min_uses,
    )


@router.get(
    "/v2/images/{image_id}/tree",
    responses={
        200: {
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
            "description": "the hash tree's leaf list: the 32-byte sha256 of each leaf, in "
            "order (root and leaf size are the image properties cowfleet_tree_sha256 and "
            "cowfleet_tree_leaf_size)",
        },
        **schemas.error_responses(401, 404, 409),
    },
    tags=["image data"],
)
def image_tree(request: Request, image_id: str) -> Response:
    svc = service(request)
    rec = readable(svc, caller(request), image_id_or_404(image_id))
    if rec.status != ACTIVE:
        raise ConflictError(
            f"image {rec.id} is {rec.status}: only an active image has a hash tree",
            image_id=rec.id,
            status=rec.status,
        )
    if rec.tree_sha256 is None:
        raise NotFoundError(f"image {rec.id} has no hash tree", image_id=rec.id)
    leaves = svc.store.read_tree(rec.id)
    return Response(leaves, media_type="application/octet-stream")
