"""Projects and visibility with the shared tokens file (in process, SQLite in tmp).

The matrix: members of two projects, an admin and a node token against private,
public, shared (member pending / accepted) and community images of project ``alpha``,
for list, show, download, PATCH, DELETE and upload. The answer is exactly 404 for an
image the caller may not see (never 403), 403 for a change refused on an image it can
see, and success otherwise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cowfleet.images.server import ServerSettings, create_app
from cowfleet.images.server.catalog import Catalog
from cowfleet.tokens import parse_tokens

TOKENS = {
    "alpha": "alpha-member-token-0001",
    "beta": "beta-member-token-00001",
    "admin": "admin-token-000000000001",
    "node": "node-token-0000000000001",
}
TOKENS_TOML = f"""
[[token]]
token = "{TOKENS["alpha"]}"
project = "alpha"
role = "member"

[[token]]
token = "{TOKENS["beta"]}"
project = "beta"
role = "member"

[[token]]
token = "{TOKENS["admin"]}"
project = "admin"
role = "admin"

[[token]]
token = "{TOKENS["node"]}"
project = "service"
role = "node"
"""
PATCH_TYPE = "application/openstack-images-v2.1-json-patch"
DATA = b"\x00" * 4096
KINDS = ("private", "public", "shared-pending", "shared-accepted", "community")
CALLERS = ("alpha", "beta", "admin", "node")


def h(who: str, **extra: str) -> dict[str, str]:
    return {"X-Auth-Token": TOKENS[who], **extra}


def make_app(tmp: Path) -> Any:
    return create_app(
        ServerSettings(
            data_dir=tmp / "data",
            database_url=f"sqlite:///{tmp / 'c.sqlite'}",
            token=None,
            tokens=parse_tokens(TOKENS_TOML),
            upload_block=64 * 1024,
        )
    )


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(make_app(tmp_path)) as c:
        yield c


def create(c: TestClient, who: str, **fields: Any) -> Any:
    body = {"name": "img", "disk_format": "raw", "container_format": "bare", **fields}
    return c.post("/v2/images", json=body, headers=h(who))


def upload(c: TestClient, who: str, image_id: str) -> Any:
    return c.put(
        f"/v2/images/{image_id}/file",
        content=DATA,
        headers=h(who, **{"Content-Type": "application/octet-stream"}),
    )


def add_member(c: TestClient, who: str, image_id: str, member: str) -> Any:
    return c.post(f"/v2/images/{image_id}/members", json={"member": member}, headers=h(who))


def set_status(c: TestClient, who: str, image_id: str, member: str, status: str) -> Any:
    return c.put(f"/v2/images/{image_id}/members/{member}", json={"status": status}, headers=h(who))


def listed(c: TestClient, who: str, **query: str) -> set[str]:
    r = c.get("/v2/images", params={"limit": "1000", **query}, headers=h(who))
    assert r.status_code == 200, r.text
    return {img["id"] for img in r.json()["images"]}


def alpha_images(c: TestClient, *, with_data: bool = True) -> dict[str, str]:
    """One image of project alpha per kind (the public one made by the admin)."""
    ids: dict[str, str] = {}
    for kind in KINDS:
        visibility = kind.split("-")[0]
        if visibility == "public":
            r = create(c, "admin", visibility="public", owner="alpha", name=kind)
        else:
            r = create(c, "alpha", visibility=visibility, name=kind)
        assert r.status_code == 201, r.text
        assert r.json()["owner"] == "alpha"
        ids[kind] = r.json()["id"]
        if with_data:
            assert upload(c, "alpha", ids[kind]).status_code == 204
    assert add_member(c, "alpha", ids["shared-pending"], "beta").status_code == 200
    assert add_member(c, "alpha", ids["shared-accepted"], "beta").status_code == 200
    r = set_status(c, "beta", ids["shared-accepted"], "beta", "accepted")
    assert r.status_code == 200 and r.json()["status"] == "accepted", r.text
    return ids


# Who reads what: beta sees everything but alpha's private image.
def _read(who: str, kind: str) -> int:
    return 404 if (who, kind) == ("beta", "private") else 200


# Who changes what: the owner and the admin; beta 404 where it cannot read, else 403;
# the node never.
def _change(who: str, kind: str, ok: int) -> int:
    if who in ("alpha", "admin"):
        return ok
    if who == "node":
        return 403
    return 404 if kind == "private" else 403


MATRIX = [(who, kind) for who in CALLERS for kind in KINDS]


@pytest.mark.parametrize(("who", "kind"), MATRIX)
def test_show_and_download(client: TestClient, who: str, kind: str) -> None:
    image_id = alpha_images(client)[kind]
    expected = _read(who, kind)
    r = client.get(f"/v2/images/{image_id}", headers=h(who))
    assert r.status_code == expected, r.text
    r = client.get(f"/v2/images/{image_id}/file", headers=h(who))
    assert r.status_code == expected, r.text
    if expected == 200:
        assert r.content == DATA
    else:
        # The same answer as for an image that does not exist.
        assert r.json()["message"] == f"no image with id {image_id}"
    r = client.get(f"/v2/images/{image_id}/tree", headers=h(who))
    assert r.status_code == expected, r.text
    if expected == 200:
        assert r.content == hashlib.sha256(DATA).digest()  # one leaf
    else:
        assert r.json()["message"] == f"no image with id {image_id}"


@pytest.mark.parametrize(("who", "kind"), MATRIX)
def test_patch(client: TestClient, who: str, kind: str) -> None:
    image_id = alpha_images(client)[kind]
    r = client.patch(
        f"/v2/images/{image_id}",
        json=[{"op": "add", "path": "/note", "value": who}],
        headers=h(who, **{"Content-Type": PATCH_TYPE}),
    )
    assert r.status_code == _change(who, kind, 200), r.text
    note = client.get(f"/v2/images/{image_id}", headers=h("admin")).json().get("note")
    assert note == (who if r.status_code == 200 else None)


@pytest.mark.parametrize(("who", "kind"), MATRIX)
def test_delete(client: TestClient, who: str, kind: str) -> None:
    image_id = alpha_images(client)[kind]
    r = client.delete(f"/v2/images/{image_id}", headers=h(who))
    expected = _change(who, kind, 204)
    assert r.status_code == expected, r.text
    after = client.get(f"/v2/images/{image_id}", headers=h("admin")).status_code
    assert after == (404 if expected == 204 else 200)


@pytest.mark.parametrize(("who", "kind"), MATRIX)
def test_upload(client: TestClient, who: str, kind: str) -> None:
    image_id = alpha_images(client, with_data=False)[kind]
    r = upload(client, who, image_id)
    expected = _change(who, kind, 204)
    assert r.status_code == expected, r.text
    status = client.get(f"/v2/images/{image_id}", headers=h("admin")).json()["status"]
    assert status == ("active" if expected == 204 else "queued")


@pytest.mark.parametrize(
    ("who", "kinds"),
    [
        ("alpha", KINDS),  # its own images, community too
        ("beta", ("public", "shared-accepted")),  # pending: readable, not listed
        ("admin", KINDS),
        ("node", KINDS),
    ],
)
def test_default_list(client: TestClient, who: str, kinds: tuple[str, ...]) -> None:
    ids = alpha_images(client)
    assert listed(client, who) == {ids[k] for k in kinds}


def test_list_filters_of_a_member(client: TestClient) -> None:
    ids = alpha_images(client)
    assert listed(client, "beta", visibility="community") == {ids["community"]}
    assert listed(client, "beta", visibility="shared") == {ids["shared-accepted"]}
    assert listed(client, "beta", visibility="private") == set()
    assert listed(client, "beta", member_status="pending") == {ids["public"], ids["shared-pending"]}
    assert listed(client, "beta", member_status="all") == {
        ids[k] for k in ("public", "shared-pending", "shared-accepted")
    }
    assert listed(client, "beta", visibility="all") == {
        ids[k] for k in ("public", "shared-accepted", "community")
    }
    # Another project's private image is no marker (the same answer as a missing one).
    r = client.get("/v2/images", params={"marker": ids["private"]}, headers=h("beta"))
    assert r.status_code == 400 and "marker" in r.json()["message"]
    assert client.get(
        "/v2/images", params={"marker": ids["private"]}, headers=h("alpha")
    ).is_success


def test_rejected_membership_is_readable_but_not_listed(client: TestClient) -> None:
    ids = alpha_images(client)
    assert set_status(client, "beta", ids["shared-accepted"], "beta", "rejected").status_code == 200
    assert ids["shared-accepted"] not in listed(client, "beta")
    assert ids["shared-accepted"] in listed(client, "beta", member_status="rejected")
    assert client.get(f"/v2/images/{ids['shared-accepted']}", headers=h("beta")).status_code == 200


def test_unknown_token_is_401(client: TestClient) -> None:
    assert (
        client.get("/v2/images", headers={"X-Auth-Token": "not-a-known-token-00"}).status_code
        == 401
    )
    assert client.get("/v2/images").status_code == 401
    two = [("X-Auth-Token", TOKENS["alpha"]), ("X-Auth-Token", TOKENS["admin"])]
    assert client.get("/v2/images", headers=two).status_code == 401
    assert client.get("/versions").status_code == 200


def test_owner_and_public_rules_at_create(client: TestClient) -> None:
    r = create(client, "alpha")
    assert r.status_code == 201 and r.json()["owner"] == "alpha"
    assert r.json()["visibility"] == "shared"
    assert create(client, "alpha", owner="alpha").status_code == 201
    r = create(client, "alpha", owner="beta")
    assert r.status_code == 403 and "owned by another project" in r.json()["message"]
    assert create(client, "alpha", owner=None).status_code == 403
    r = create(client, "alpha", visibility="public")
    assert r.status_code == 403 and "public" in r.json()["message"]
    assert create(client, "alpha", visibility="community").status_code == 201
    assert create(client, "node").status_code == 403
    r = create(client, "admin")
    assert r.status_code == 201 and r.json()["owner"] == "admin"
    r = create(client, "admin", owner="beta", visibility="public")
    assert r.status_code == 201 and r.json()["owner"] == "beta"
    assert listed(client, "alpha") >= {r.json()["id"]}  # public: everyone lists it


def test_owner_and_public_rules_at_patch(client: TestClient) -> None:
    image_id = create(client, "alpha", visibility="private").json()["id"]
    hdr = h("alpha", **{"Content-Type": PATCH_TYPE})
    r = client.patch(
        f"/v2/images/{image_id}",
        json=[{"op": "replace", "path": "/visibility", "value": "public"}],
        headers=hdr,
    )
    assert r.status_code == 403 and "public" in r.json()["message"]
    r = client.patch(
        f"/v2/images/{image_id}",
        json=[{"op": "replace", "path": "/owner", "value": "beta"}],
        headers=hdr,
    )
    assert r.status_code == 403
    r = client.patch(
        f"/v2/images/{image_id}",
        json=[{"op": "replace", "path": "/visibility", "value": "community"}],
        headers=hdr,
    )
    assert r.status_code == 200 and r.json()["visibility"] == "community"
    # An admin hands the image to beta and makes it private: alpha loses it.
    r = client.patch(
        f"/v2/images/{image_id}",
        json=[
            {"op": "replace", "path": "/owner", "value": "beta"},
            {"op": "replace", "path": "/visibility", "value": "private"},
        ],
        headers=h("admin", **{"Content-Type": PATCH_TYPE}),
    )
    assert r.status_code == 200 and r.json()["owner"] == "beta"
    assert client.get(f"/v2/images/{image_id}", headers=h("alpha")).status_code == 404
    assert client.get(f"/v2/images/{image_id}", headers=h("beta")).status_code == 200


def test_members_api(client: TestClient) -> None:
    image_id = create(client, "alpha").json()["id"]  # shared by default
    base = f"/v2/images/{image_id}/members"
    # Not a member yet: beta cannot see the image at all.
    assert add_member(client, "beta", image_id, "beta").status_code == 404
    assert client.get(base, headers=h("beta")).status_code == 404
    r = add_member(client, "alpha", image_id, "beta")
    assert r.status_code == 200, r.text
    member = r.json()
    assert member["status"] == "pending" and member["member_id"] == "beta"
    assert member["image_id"] == image_id and member["schema"] == "/v2/schemas/member"
    assert add_member(client, "alpha", image_id, "beta").status_code == 409
    assert add_member(client, "alpha", image_id, "gamma").status_code == 200
    assert add_member(client, "node", image_id, "delta").status_code == 403
    assert add_member(client, "admin", image_id, "delta").status_code == 200
    # The owner, the admin and nodes see every member; a member sees itself only.
    everyone = {"beta", "gamma", "delta"}
    for who in ("alpha", "admin", "node"):
        r = client.get(base, headers=h(who))
        assert r.status_code == 200 and {m["member_id"] for m in r.json()["members"]} == everyone
    r = client.get(base, headers=h("beta"))
    assert [m["member_id"] for m in r.json()["members"]] == ["beta"]
    assert client.get(f"{base}/gamma", headers=h("beta")).status_code == 404
    assert client.get(f"{base}/beta", headers=h("beta")).json()["status"] == "pending"
    assert client.get(f"{base}/nobody", headers=h("alpha")).status_code == 404
    # Only the member accepts; a bad status is 400.
    assert set_status(client, "alpha", image_id, "beta", "accepted").status_code == 403
    assert set_status(client, "beta", image_id, "gamma", "accepted").status_code == 403
    assert set_status(client, "beta", image_id, "beta", "maybe").status_code == 400
    assert image_id not in listed(client, "beta")
    assert set_status(client, "beta", image_id, "beta", "accepted").json()["status"] == "accepted"
    assert image_id in listed(client, "beta")
    # Only the owner (or an admin) removes a member; then the image is gone for it.
    assert client.delete(f"{base}/beta", headers=h("beta")).status_code == 403
    assert client.delete(f"{base}/beta", headers=h("alpha")).status_code == 204
    assert client.delete(f"{base}/beta", headers=h("alpha")).status_code == 404
    assert client.get(f"/v2/images/{image_id}", headers=h("beta")).status_code == 404
    assert image_id not in listed(client, "beta")


def test_members_only_on_shared_images(client: TestClient) -> None:
    image_id = create(client, "alpha", visibility="private").json()["id"]
    r = add_member(client, "alpha", image_id, "beta")
    assert r.status_code == 403 and "only shared images" in r.json()["message"]
    assert client.get(f"/v2/images/{image_id}/members", headers=h("alpha")).status_code == 403
    # Members of an image made private again no longer see it.
    shared = create(client, "alpha").json()["id"]
    assert add_member(client, "alpha", shared, "beta").status_code == 200
    assert client.get(f"/v2/images/{shared}", headers=h("beta")).status_code == 200
    r = client.patch(
        f"/v2/images/{shared}",
        json=[{"op": "replace", "path": "/visibility", "value": "private"}],
        headers=h("alpha", **{"Content-Type": PATCH_TYPE}),
    )
    assert r.status_code == 200
    assert client.get(f"/v2/images/{shared}", headers=h("beta")).status_code == 404


def test_member_bodies_are_checked(client: TestClient) -> None:
    image_id = create(client, "alpha").json()["id"]
    base = f"/v2/images/{image_id}/members"
    for body in ({}, {"member": 3}, {"member": ""}, {"member": "x" * 256}, {"member": "b", "x": 1}):
        assert client.post(base, json=body, headers=h("alpha")).status_code == 400, body
    r = client.post(
        base, content=b"member=beta", headers=h("alpha", **{"Content-Type": "text/plain"})
    )
    assert r.status_code == 415


@pytest.mark.parametrize("member", ["%00", "x" * 300, "%ED%A0%80"])
def test_member_ids_no_project_can_have_are_404(client: TestClient, member: str) -> None:
    image_id = create(client, "alpha").json()["id"]
    url = f"/v2/images/{image_id}/members/{member}"
    assert client.get(url, headers=h("alpha")).status_code == 404
    assert client.delete(url, headers=h("alpha")).status_code == 404
    r = client.put(url, json={"status": "accepted"}, headers=h("admin"))
    assert r.status_code == 404


def test_deleting_an_image_removes_its_members(client: TestClient, tmp_path: Path) -> None:
    image_id = create(client, "alpha").json()["id"]
    assert add_member(client, "alpha", image_id, "beta").status_code == 200
    assert client.delete(f"/v2/images/{image_id}", headers=h("alpha")).status_code == 204
    cat = Catalog.open(f"sqlite:///{tmp_path / 'c.sqlite'}")
    try:
        assert cat.list_members(image_id) == []
    finally:
        cat.close()


def test_single_token_mode_is_an_admin_of_no_project(tmp_path: Path) -> None:
    settings = ServerSettings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'c.sqlite'}",
        token="the-one-token",
    )
    with TestClient(create_app(settings)) as c:
        auth = {"X-Auth-Token": "the-one-token"}
        r = c.post("/v2/images", json={"name": "x", "visibility": "private"}, headers=auth)
        assert r.status_code == 201 and r.json()["owner"] is None
        r = c.post("/v2/images", json={"name": "p", "visibility": "public"}, headers=auth)
        assert r.status_code == 201
        assert len(c.get("/v2/images", headers=auth).json()["images"]) == 2
        assert c.get("/v2/images", headers={"X-Auth-Token": TOKENS["admin"]}).status_code == 401
