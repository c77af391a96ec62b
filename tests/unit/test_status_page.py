"""The fleet status page: view model, escaping, sign-in, roles, and the JSON it polls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cowfleet.api.status import view as v
from cowfleet.api.status.render import human_bytes, human_seconds, status_page
from tests.unit._api_fakes import (
    ADMIN,
    IMAGE,
    MEMBER_A,
    MEMBER_B,
    NODE,
    api,
    create,
    register,
    status_of,
    wait_for,
)

HOSTILE = '<script>alert("x")</script>&"\''
IMG2 = "7d1f0e4c-2222-4b3b-8a9d-2e4f6a8b0c1d"
IMG3 = "9e2a1b5d-3333-4c3b-8a9d-2e4f6a8b0c1d"


def node(hostname: str, cache: list[dict[str, Any]], heartbeat: float = 100.0) -> v.NodeSnap:
    return v.NodeSnap(hostname, True, heartbeat, 8, 2, 8192, 1024, 100, 10, 80, 2, tuple(cache))


def server(sid: str, project: str, created: float, **kw: Any) -> v.ServerSnap:
    base: dict[str, Any] = dict(
        id=sid,
        name=f"vm-{sid}",
        project_id=project,
        image_id=IMAGE,
        image_name=None,
        host="n1",
        vm_state="active",
        deleted=False,
        created_at=created,
        updated_at=created + 1,
        launched_at=created + 4.5,
    )
    base.update(kw)
    return v.ServerSnap(**base)


def test_matrix_cells_say_cached_fetching_failed_quarantined_with_bytes() -> None:
    nodes = [
        node(
            "n1",
            [
                {"image_id": IMAGE, "state": "verified", "bytes": 4096, "name": "cirros"},
                {"image_id": IMG2, "state": "fetching", "bytes": 100, "percent": 42.4},
            ],
        ),
        node(
            "n2",
            [
                {"image_id": IMAGE, "state": "failed", "bytes": 10},
                {"image_id": IMG3, "state": "quarantined", "bytes": 7},
                # a node from before states: only "verified" is known
                {"image_id": IMG2, "verified": True, "bytes": 1},
                # a new download beside a quarantined copy: the download is shown
                {"image_id": IMG3, "state": "fetching", "bytes": 3, "percent": 5},
            ],
        ),
    ]
    images, cells = v.cache_matrix(nodes)
    assert next(i.image_id for i in images) == IMAGE  # named first
    assert cells[("n1", IMAGE)].label == "cached"
    assert cells[("n1", IMAGE)].bytes == 4096
    assert cells[("n1", IMG2)].label == "fetching 42%"
    assert cells[("n2", IMAGE)].label == "failed"
    assert cells[("n2", IMG2)].label == "cached"
    assert cells[("n2", IMG3)].label == "fetching 5%"
    assert ("n1", IMG3) not in cells
    rows = v.precache_rows(nodes, images)
    assert [(r.node, r.image_id, r.percent) for r in rows] == [
        ("n1", IMG2, 42.4),
        ("n2", IMG3, 5.0),
    ]
    assert v.precache_rows([]) == ()


def test_build_durations_finished_failed_and_in_progress() -> None:
    now = 1000.0
    built = v.build_line(server("a", "p", 900.0), now)
    assert (built.seconds, built.finished, built.state) == (4.5, True, "active")
    failed = v.build_line(server("b", "p", 900.0, vm_state="error", launched_at=None), now)
    assert (failed.seconds, failed.finished) == (1.0, True)
    going = v.build_line(server("c", "p", 990.0, vm_state="building", launched_at=None), now)
    assert (going.seconds, going.finished) == (10.0, False)
    assert human_seconds(4.5) == "4.5 s" and human_seconds(125) == "2 min 5 s"
    assert human_bytes(4096) == "4.0 KiB" and human_bytes(None) == "-"


def test_member_sees_only_its_projects_builds_and_no_nodes() -> None:
    servers = [server("a", "alpha", 1.0), server("b", "beta", 2.0), server("c", "alpha", 3.0)]
    nodes = [node("n1", [{"image_id": IMAGE, "state": "verified", "bytes": 1}])]
    member = v.build_view(nodes, servers, now=10, down_after=60, admin=False, project="alpha")
    assert [b.id for b in member.builds] == ["c", "a"]  # newest first
    assert member.nodes == () and member.matrix == {} and member.precache == ()
    admin = v.build_view(nodes, servers, now=10, down_after=60, admin=True, project="admin")
    assert [b.id for b in admin.builds] == ["c", "b", "a"]
    assert admin.nodes[0].alive
    late = v.build_view(nodes, servers, now=1000, down_after=60, admin=True, project="admin")
    assert not late.nodes[0].alive


def test_every_user_string_is_escaped() -> None:
    nodes = [node("n1", [{"image_id": IMAGE, "state": "fetching", "name": HOSTILE, "percent": 1}])]
    servers = [server("a", "alpha", 1.0, name=HOSTILE, image_name=HOSTILE)]
    view = v.build_view(nodes, servers, now=10, down_after=60, admin=True, project="admin")
    page = status_page(view, "nonce123", role="admin")
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&quot;&#x27;" in page
    # the only script is the page's own, with the nonce
    assert page.count("<script") == 1 and '<script nonce="nonce123">' in page


def test_page_needs_a_token_and_a_cookie_login_is_httponly_strict(tmp_path: Path) -> None:
    with api(tmp_path) as (client, _nodes, _clock):
        resp = client.get("/status")
        assert resp.status_code == 401
        assert 'action="/status/login"' in resp.text
        assert (
            client.get("/status", headers={"X-Auth-Token": "wrong-token-000000"}).status_code == 401
        )
        assert client.get("/status", headers={"X-Auth-Token": NODE}).status_code == 403
        assert client.get("/status/data").status_code == 401

        bad = client.post("/status/login", data={"token": "nope-nope-nope-nope"})
        assert bad.status_code == 401 and "not accepted" in bad.text
        assert client.post("/status/login", data={"token": NODE}).status_code == 403
        cross = client.post(
            "/status/login", data={"token": ADMIN}, headers={"Origin": "https://evil.example"}
        )
        assert cross.status_code == 403 and "cowfleet_status" not in cross.headers.get(
            "set-cookie", ""
        )
        for fetch_site in ("cross-site", "same-site"):
            hdrs = {"Sec-Fetch-Site": fetch_site, "Origin": "http://testserver"}
            assert (
                client.post("/status/login", data={"token": ADMIN}, headers=hdrs).status_code == 403
            )
        hidden = client.post("/status/login", data={"token": ADMIN}, headers={"Origin": "null"})
        assert hidden.status_code == 403
        same = client.post(
            "/status/login",
            data={"token": ADMIN},
            headers={"Sec-Fetch-Site": "same-origin", "Origin": "null"},
            follow_redirects=False,
        )
        assert same.status_code == 303
        client.cookies.clear()

        ok = client.post("/status/login", data={"token": ADMIN}, follow_redirects=False)
        assert ok.status_code == 303 and ok.headers["location"] == "/status"
        cookie = ok.headers["set-cookie"].lower()
        for part in ("cowfleet_status=", "httponly", "samesite=strict", "path=/status"):
            assert part in cookie
        assert "secure" not in cookie  # plain http on loopback
        page = client.get("/status")  # the client keeps the cookie
        assert page.status_code == 200 and 'id="who">admin (admin)' in page.text
        # the page's poll sends the same cookie (its path covers /status/...)
        assert client.get("/status/data").json()["admin"] is True
        csp = page.headers["content-security-policy"]
        assert "script-src 'nonce-" in csp and "frame-ancestors 'none'" in csp

        out = client.post("/status/logout", follow_redirects=False)
        assert out.status_code == 303
        client.cookies.clear()
        assert client.get("/status").status_code == 401

        behind_tls = client.post(
            "/status/login",
            data={"token": MEMBER_A},
            headers={"X-Forwarded-Proto": "https"},
            follow_redirects=False,
        )
        assert "secure" in behind_tls.headers["set-cookie"].lower()


def test_page_shows_nodes_cache_matrix_and_builds_by_role(tmp_path: Path) -> None:
    with api(tmp_path) as (client, _nodes, _clock):
        cache = [
            {
                "image_id": IMAGE,
                "verified": True,
                "bytes": 8192,
                "state": "verified",
                "name": "cirros",
            },
            {
                "image_id": IMG2,
                "verified": False,
                "bytes": 512,
                "state": "fetching",
                "percent": 37.5,
            },
            {
                "image_id": IMG3,
                "verified": False,
                "bytes": 9,
                "state": "quarantined",
                "name": HOSTILE,
            },
        ]
        register(client, "node-a", cache=cache)
        register(client, "node-b")
        resp = create(client, "web", token=MEMBER_A)
        assert resp.status_code == 202, resp.text
        sid = resp.json()["server"]["id"]
        wait_for(lambda: status_of(client, sid) in ("ACTIVE", "ERROR"))
        assert create(client, "other", token=MEMBER_B).status_code == 202

        page = client.get("/status", headers={"X-Auth-Token": ADMIN}).text
        assert 'data-node="node-a"' in page and 'data-node="node-b"' in page
        assert "cached" in page and "fetching 38%" in page and "quarantined" in page
        assert "8.0 KiB" in page and "cirros" in page
        assert "<script>alert" not in page and "&lt;script&gt;" in page
        assert f'data-server="{sid}"' in page and ">web<" in page and ">other<" in page

        doc = client.get("/status/data", headers={"X-Auth-Token": ADMIN}).json()
        assert doc["precache"] == [
            {
                "node": "node-a",
                "image_id": IMG2,
                "image_name": None,
                "percent": 37.5,
                "bytes": 512,
                "size": None,
                "state": "fetching",
            }
        ]
        assert {b["name"] for b in doc["builds"]} == {"web", "other"}

        member = client.get("/status", headers={"X-Auth-Token": MEMBER_A}).text
        assert ">web<" in member and ">other<" not in member
        assert 'data-node="node-a"' not in member and 'id="member-note"' in member
        mdoc = client.get("/status/data", headers={"X-Auth-Token": MEMBER_A}).json()
        assert mdoc["nodes"] == [] and [b["name"] for b in mdoc["builds"]] == ["web"]


def test_heartbeat_inventory_reports_state_percent_and_name(tmp_path: Path) -> None:
    import json

    from cowfleet.cache import metadata as md
    from cowfleet.cache.layout import Layout
    from cowfleet.node.inventory import cache_inventory

    layout = Layout(tmp_path)
    layout.ensure_dirs()
    layout.quarantine_dir.mkdir(parents=True)
    done = layout.paths(IMAGE)
    done.base.write_bytes(b"x" * 4096)
    meta = md.BaseMeta(
        IMAGE,
        "cirros",
        "raw",
        "raw",
        4096,
        4096,
        4096,
        "sha512",
        "00",
        "sha512",
        "00",
        1.0,
        "http://images",
        1.0,
    )
    md.write_meta(done.meta, meta)
    part = layout.paths(IMG2)
    part.part.write_bytes(b"y" * 1000)
    md.write_atomic(
        part.part_meta,
        md.PartMeta(IMG2, 4000, "sha512", "00", "http://images", 1.0).to_json(),
    )
    (layout.quarantine_dir / "q1").write_bytes(b"z")
    (layout.quarantine_dir / "q1.json").write_text(
        json.dumps({"image_id": IMG3, "image_name": "bad", "reason": "checksum"})
    )
    got = {e["image_id"]: e for e in cache_inventory(tmp_path)}
    assert got[IMAGE]["state"] == "verified" and got[IMAGE]["name"] == "cirros"
    assert got[IMAGE]["verified"] is True
    assert got[IMG2]["state"] == "fetching" and got[IMG2]["percent"] == 25.0
    assert got[IMG2]["size"] == 4000
    assert got[IMG3]["state"] == "quarantined" and got[IMG3]["verified"] is False


def test_heartbeat_cache_details_are_validated_by_the_api() -> None:
    from cowfleet.api.nodes import cache_detail

    good = {"state": "fetching", "percent": 12.5, "size": 4096, "name": "n" * 300}
    assert cache_detail(good) == {
        "state": "fetching",
        "percent": 12.5,
        "size": 4096,
        "name": "n" * 255,
    }
    bad = {"state": "<b>", "percent": 101, "size": -1, "name": 7}
    assert cache_detail(bad) == {}
    assert cache_detail({"percent": True, "size": True}) == {}


def test_a_quarantined_copy_is_no_cache_hit_for_the_scheduler(tmp_path: Path) -> None:
    with api(tmp_path) as (client, _nodes, _clock):
        quarantined = {"image_id": IMAGE, "verified": False, "bytes": 1, "state": "quarantined"}
        register(client, "node-1", cache=[quarantined])
        fetching = {"image_id": IMAGE, "verified": False, "bytes": 1, "state": "fetching"}
        register(client, "node-2", cache=[fetching], ram_mb=4096)  # less RAM: spread avoids it
        resp = create(client, "vm1")
        sid = resp.json()["server"]["id"]
        wait_for(lambda: status_of(client, sid) == "ACTIVE")
        s = client.get(f"/v2.1/servers/{sid}", headers={"X-Auth-Token": ADMIN}).json()["server"]
        # the download in flight on node-2 counts as holding the image; node-1's
        # quarantined copy does not
        assert s["OS-EXT-SRV-ATTR:host"] == "node-2"


def test_precache_nodes_of_the_api_show_with_their_state_over_heartbeat_rows() -> None:
    nodes = [node("n1", [{"image_id": IMG2, "state": "fetching", "bytes": 100, "percent": 10}])]
    queued = v.PrecacheRow("n2", IMG2, None, None, 0, None, state="queued")
    newer = v.PrecacheRow("n1", IMG2, None, 50.0, 500, 1000, state="verifying")
    view = v.build_view(
        nodes, [], now=100, down_after=60, admin=True, project="admin", precaching=[queued, newer]
    )
    assert [(r.node, r.state, r.percent) for r in view.precache] == [
        ("n1", "verifying", 50.0),
        ("n2", "queued", None),
    ]
    html = status_page(view, "n", role="admin")
    assert "verifying" in html and "queued" in html
