"""Validation of image fields as they arrive in HTTP bodies (create and PATCH).

Follows Glance v2: unknown keys are free-form string properties; server-computed
attributes are read-only (403); ``location``, ``deleted``... and ``os_glance_*`` are
reserved (403); wrong types or values are 400. Before any of that, :func:`check_document`
refuses (400) what the catalog could store but not send back or not store on every
backend: text that is not valid Unicode (a lone surrogate such as ``"\\ud800"``), NUL
characters, and JSON nested deeper than :data:`MAX_JSON_DEPTH`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cowfleet.hashtree import LEAF_SIZE_PROPERTY, ROOT_PROPERTY
from cowfleet.images.server.errors import bad_request, forbidden
from cowfleet.images.vocabulary import CONTAINER_FORMATS, DISK_FORMATS, VISIBILITIES

MAX_NAME = 255
MAX_PROPERTY_VALUE = 65535
MAX_INT = 2**31 - 1  # min_disk / min_ram (GiB / MiB): an int32 column, like Glance
# Deepest JSON a request body may hold (ours need 3: a patch list > operation > tags list).
MAX_JSON_DEPTH = 8

READ_ONLY = frozenset(
    {
        "status",
        "size",
        "virtual_size",
        "checksum",
        "os_hash_algo",
        "os_hash_value",
        "created_at",
        "updated_at",
        "self",
        "file",
        "schema",
        "direct_url",
        "locations",
        "stores",
        "os_hidden",
        # The hash tree (root and leaf size) the server computed at upload.
        ROOT_PROPERTY,
        LEAF_SIZE_PROPERTY,
    }
)
RESERVED = frozenset({"location", "deleted", "deleted_at"})
RESERVED_PREFIX = "os_glance"
# Base attributes a caller may set (the catalog's writable columns, plus id/tags at create).
SETTABLE = (
    "name",
    "disk_format",
    "container_format",
    "visibility",
    "min_disk",
    "min_ram",
    "protected",
)
CREATE_ONLY = ("id", "tags", "owner")
BASE = frozenset(SETTABLE) | frozenset(CREATE_ONLY) | READ_ONLY


@dataclass(frozen=True)
class CreateRequest:
    image_id: str | None
    fields: dict[str, Any]
    properties: dict[str, str]
    tags: tuple[str, ...] = field(default_factory=tuple)


def check_text(value: str, what: str) -> None:
    """Refuse text that cannot be encoded as UTF-8 (lone surrogates) or holds NUL."""
    if "\x00" in value:
        raise bad_request(f"{what} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(
            f"{what} is not valid Unicode text (character {exc.start}: "
            f"{value[exc.start]!r} is a lone surrogate)"
        ) from None


def check_document(doc: Any) -> None:
    """Every string (keys too) valid text without NUL; nesting at most MAX_JSON_DEPTH."""
    todo: list[tuple[Any, int]] = [(doc, 1)]
    while todo:
        value, depth = todo.pop()
        if isinstance(value, str):
            check_text(value, "a string in the request body")
            continue
        if not isinstance(value, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise bad_request(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                check_text(key, "a member name in the request body")
                todo.append((item, depth + 1))
        else:
            todo.extend((item, depth + 1) for item in value)


def check_key(key: str) -> None:
    """Refuse read-only and reserved attribute names (403 like Glance)."""
    if key in READ_ONLY:
        raise forbidden(f"Attribute '{key}' is read-only.")
    if key in RESERVED or key.startswith(RESERVED_PREFIX):
        raise forbidden(f"Attribute '{key}' is reserved.")


def check_field(key: str, value: Any) -> Any:
    """Validate one settable base attribute; returns the value to store."""
    if key == "name":
        if value is not None and not isinstance(value, str):
            raise bad_request("name must be a string or null")
        if isinstance(value, str) and len(value) > MAX_NAME:
            raise bad_request(f"name is longer than {MAX_NAME} characters ({len(value)})")
        return value
    if key in ("disk_format", "container_format"):
        allowed = DISK_FORMATS if key == "disk_format" else CONTAINER_FORMATS
        if value is not None and value not in allowed:
            raise bad_request(f"{key} must be one of {', '.join(allowed)}, not {value!r}")
        return value
    if key == "visibility":
        if value not in VISIBILITIES:
            raise bad_request(f"visibility must be one of {', '.join(VISIBILITIES)}, not {value!r}")
        return value
    if key in ("min_disk", "min_ram"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad_request(f"{key} must be an integer, not {value!r}")
        if not 0 <= value <= MAX_INT:
            raise bad_request(f"{key} must be between 0 and {MAX_INT}, not {value}")
        return value
    if key == "protected":
        if not isinstance(value, bool):
            raise bad_request(f"protected must be a boolean, not {value!r}")
        return value
    if key == "owner":
        if value is not None and (not isinstance(value, str) or len(value) > 255):
            raise bad_request("owner must be a string of at most 255 characters or null")
        return value
    raise bad_request(f"unknown attribute {key!r}")


def check_property(key: str, value: Any) -> str:
    """A free-form property: a string name (1..255) and a string value."""
    check_key(key)
    if not key or len(key) > 255:
        raise bad_request(f"property names must be 1 to 255 characters long: {key[:40]!r}")
    if not isinstance(value, str):
        raise bad_request(f"property {key!r} must be a string, not {type(value).__name__}")
    if len(value) > MAX_PROPERTY_VALUE:
        raise bad_request(f"property {key!r} is longer than {MAX_PROPERTY_VALUE} characters")
    return value


def check_uuid(value: Any) -> str:
    if not isinstance(value, str):
        raise bad_request("id must be a UUID string")
    try:
        canonical = str(uuid.UUID(value))
    except ValueError as exc:
        raise bad_request(f"id is not a UUID: {value[:64]!r}") from exc
    return canonical


def parse_create(body: Any) -> CreateRequest:
    """The body of ``POST /v2/images`` (already JSON-decoded)."""
    if not isinstance(body, Mapping):
        raise bad_request("the request body must be a JSON object")
    image_id: str | None = None
    fields: dict[str, Any] = {}
    props: dict[str, str] = {}
    tags: tuple[str, ...] = ()
    for key, value in body.items():
        check_key(key)
        if key == "id":
            image_id = None if value is None else check_uuid(value)
        elif key == "tags":
            tags = check_tags(value)
        elif key in SETTABLE or key == "owner":
            fields[key] = check_field(key, value)
        else:
            props[key] = check_property(key, value)
    return CreateRequest(image_id, fields, props, tags)


def check_tags(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise bad_request("tags must be a list of strings")
    if any(len(t) > 255 or not t for t in value):
        raise bad_request("each tag must be 1 to 255 characters long")
    if len(value) > 128:
        raise bad_request("at most 128 tags")
    return tuple(value)
