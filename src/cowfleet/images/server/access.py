"""Who may see and change which image: Glance v2's visibility rules, sans-I/O.

A request speaks for a :class:`Caller` (a project and a role from the shared tokens
file, or the single token's admin). Visibility of an image, as Glance v2:

==========  =============================================  ==========================
visibility  read by id (show, download)                    listed by default
==========  =============================================  ==========================
public      everyone                                       everyone
community   everyone                                       its owner only (others ask
                                                           with ``visibility=community``)
shared      its owner and every member project, in any     its owner, and members that
            member status                                  accepted (``member_status``)
private     its owner only                                 its owner only
==========  =============================================  ==========================

An admin reads, lists and changes everything; a node token reads everything (it is the
compute service fetching images) and changes nothing. Only the owner project (or an
admin) changes an image, its data or its members. An image the caller may not read is
a 404, never a 403, so a project never learns that another's private image exists; a
change refused on an image the caller can read is a 403.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cowfleet.errors import NotFoundError
from cowfleet.images.server.errors import forbidden
from cowfleet.tokens import Principal, Role

PUBLIC, COMMUNITY, SHARED, PRIVATE = "public", "community", "shared", "private"
MEMBER_STATUSES = ("pending", "accepted", "rejected")


@dataclass(frozen=True)
class Caller:
    """Who a request speaks for. ``project`` None: the single-token mode's admin, which
    belongs to no project (its images get the server's configured ``owner``)."""

    project: str | None
    role: Role

    @classmethod
    def of(cls, principal: Principal) -> Caller:
        return cls(principal.project, principal.role)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def reads_all(self) -> bool:
        return self.role in ("admin", "node")

    def owns(self, owner: str | None) -> bool:
        return self.project is not None and owner == self.project


# The caller of the single-token mode, and of a server with authentication off.
SINGLE_TOKEN_ADMIN = Caller(None, "admin")


@dataclass(frozen=True)
class ListScope:
    """Which images a list may return, before the caller's filters.

    ``everything``: no restriction (admins and nodes). Otherwise the images of
    ``project``, public ones, community ones when ``community``, and shared ones where
    ``project`` is a member in ``member_status`` (None: any status).
    """

    everything: bool
    project: str | None = None
    community: bool = False
    member_status: str | None = "accepted"


def can_read(caller: Caller, owner: str | None, visibility: str, member: str | None) -> bool:
    """May ``caller`` read an image with this owner and visibility? ``member`` is the
    caller project's member status on the image (None: not a member)."""
    if caller.reads_all or caller.owns(owner):
        return True
    if visibility in (PUBLIC, COMMUNITY):
        return True
    return visibility == SHARED and member is not None


def check_read(
    caller: Caller, image_id: str, owner: str | None, visibility: str, member: str | None
) -> None:
    """NotFoundError (404) unless ``caller`` may read the image."""
    if not can_read(caller, owner, visibility, member):
        raise NotFoundError(f"no image with id {image_id}", image_id=image_id)


def check_change(
    caller: Caller, image_id: str, owner: str | None, visibility: str, member: str | None
) -> None:
    """404 if ``caller`` cannot read the image, 403 if it can but does not own it."""
    check_read(caller, image_id, owner, visibility, member)
    if caller.is_admin or caller.owns(owner):
        return
    raise forbidden(
        f"image {image_id} belongs to another project: only its owner may change it",
        image_id=image_id,
    )


def check_create(caller: Caller) -> None:
    """403 for a node token: nodes read images, never make them."""
    if caller.role == "node":
        raise forbidden("a node token cannot create images")


def owner_for_new_image(caller: Caller, fields: Mapping[str, Any], default: str | None) -> Any:
    """The ``owner`` a new image gets. A member's images belong to its project (naming
    another is 403); an admin may name any owner, else it owns the image itself (the
    single-token admin gives the server's ``default``)."""
    if "owner" in fields:
        wanted = fields["owner"]
        if not caller.is_admin and wanted != caller.project:
            raise forbidden(f"only an admin may create images owned by another project: {wanted!r}")
        return wanted
    return caller.project if caller.project is not None else default


def check_fields(caller: Caller, fields: Mapping[str, Any]) -> None:
    """403 for a value only an admin may set: ``visibility`` public (Glance's
    ``publicize_image``). (A new ``owner`` is checked at create by
    :func:`owner_for_new_image`; a PATCH of ``owner`` is open to admins only.)"""
    if fields.get("visibility") == PUBLIC and not caller.is_admin:
        raise forbidden("only an admin may make an image public")


def list_scope(caller: Caller, visibility: str | None, member_status: str | None) -> ListScope:
    """What a list by ``caller`` may return, given its ``visibility`` and
    ``member_status`` filters (``member_status`` "all" or None as Glance: all / accepted)."""
    if caller.reads_all:
        return ListScope(everything=True)
    status = None if member_status == "all" else (member_status or "accepted")
    return ListScope(
        everything=False,
        project=caller.project,
        community=visibility in (COMMUNITY, "all"),
        member_status=status,
    )
