"""cowfleet.metrics: the families, where they are counted, and who may read /metrics."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cowfleet.api.settings import ApiSettings
from cowfleet.cache.cache import ImageCache
from cowfleet.cache.layout import Layout
from cowfleet.config import Config
from cowfleet.images.server.settings import ServerSettings
from cowfleet.metrics import (
    ApiMetrics,
    ImageMetrics,
    MetricsEndpoint,
    NodeMetrics,
    clean_reason,
    is_loopback,
    metrics_open,
)
from tests.unit._api_fakes import ADMIN, MEMBER_A, NODE, api, create, register, wait_for
from tests.unit._cache_fakes import FakeClient, image_for

MiB = 1024 * 1024


def value(text: str | bytes, name: str, **labels: str) -> float | None:
    """The sample ``name{labels}`` of an exposition, or None."""
    if isinstance(text, bytes):
        text = text.decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "node1.example", ""):
        assert not is_loopback(host), host
    assert metrics_open("0.0.0.0", public=True)
    assert not metrics_open("0.0.0.0", public=False)


def test_each_service_settings_open_metrics_on_loopback_or_when_public(tmp_path: Path) -> None:
    def cfg(**kw: Any) -> Config:
        return Config(home=tmp_path, instances_path=tmp_path / "i", **kw)

    assert ApiSettings.from_config(cfg()).metrics_open  # the default host is loopback
    assert not ApiSettings.from_config(cfg(api_host="0.0.0.0")).metrics_open
    assert ApiSettings.from_config(cfg(api_host="0.0.0.0", metrics_public=True)).metrics_open
    assert ServerSettings.from_config(cfg(), "t").metrics_open
    assert not ServerSettings.from_config(cfg(images_host="192.0.2.1"), "t").metrics_open
    assert ServerSettings.from_config(
        cfg(images_host="192.0.2.1", metrics_public=True), "t"
    ).metrics_open


def _endpoint_app(open_: bool) -> TestClient:
    metrics = NodeMetrics()
    app = FastAPI()

    @app.get("/v1/servers/{uuid}")
    def get_server(uuid: str) -> dict[str, str]:
        return {"uuid": uuid}

    app.add_middleware(
        MetricsEndpoint,
        registry=metrics.registry,
        open=open_,
        authorised=lambda token: token == "right-token",
        http=metrics.http,
    )
    return TestClient(app)


def test_closed_metrics_need_the_service_token() -> None:
    client = _endpoint_app(open_=False)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"X-Auth-Token": "wrong"}).status_code == 401
    ok = client.get("/metrics", headers={"X-Auth-Token": "right-token"})
    assert ok.status_code == 200 and "cowfleet_fetch_bytes_total" in ok.text
    assert ok.headers["content-type"].startswith("text/plain")
    assert client.post("/metrics", headers={"X-Auth-Token": "right-token"}).status_code == 405
    bearer = client.get("/metrics", headers={"Authorization": "Bearer right-token"})
    assert bearer.status_code == 200  # Prometheus's own `authorization` option
    assert client.get("/metrics", headers={"Authorization": "Basic right-token"}).status_code == 401


def test_open_metrics_need_no_token_and_requests_count_by_route_template() -> None:
    client = _endpoint_app(open_=True)
    for n in range(3):
        assert client.get(f"/v1/servers/id-{n}").status_code == 200
    assert client.get("/nowhere/at/all").status_code == 404
    text = client.get("/metrics").text
    route = "/v1/servers/{uuid}"
    assert value(text, "cowfleet_http_requests_total", route=route, status="200") == 3
    assert value(text, "cowfleet_http_requests_total", route="unmatched", status="404") == 1
    assert value(text, "cowfleet_http_request_duration_seconds_count", route=route) == 3
    assert "id-1" not in text  # never the raw path


def test_cache_counts_a_miss_with_its_bytes_then_hits_and_reports_bases(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    client = FakeClient()
    iid = str(uuid.uuid4())
    client.add(image_for(iid, data), data)
    cfg = Config(home=tmp_path, instances_path=tmp_path / "inst")
    metrics = NodeMetrics(cfg.instances_path)
    cache = ImageCache(cfg, client, metrics=metrics)  # type: ignore[arg-type]
    cache.ensure_cached(iid)
    cache.ensure_cached(iid)
    cache.ensure_cached(iid)
    text = generate_latest(metrics.registry)
    assert value(text, "cowfleet_cache_misses_total") == 1
    assert value(text, "cowfleet_cache_hits_total") == 2
    assert value(text, "cowfleet_fetch_bytes_total", source="origin") == len(data)
    assert value(text, "cowfleet_fetch_bytes_total", source="peer") == 0
    assert value(text, "cowfleet_fetch_duration_seconds_count", source="origin") == 1
    assert value(text, "cowfleet_cache_bases", state="verified") == 1
    assert value(text, "cowfleet_cache_bytes", state="verified") == len(data)
    # A download in progress and a quarantined file, read at the next scrape.
    layout = Layout(cfg.instances_path)
    paths = layout.paths(str(uuid.uuid4()))
    paths.part.write_bytes(b"x" * 1000)
    paths.part_meta.write_text("{}")
    layout.quarantine_dir.mkdir(parents=True, exist_ok=True)
    (layout.quarantine_dir / "q1").write_bytes(b"y" * 300)
    (layout.quarantine_dir / "q1.json").write_text("{}")
    text = generate_latest(metrics.registry)
    assert value(text, "cowfleet_cache_bases", state="fetching") == 1
    assert value(text, "cowfleet_cache_bytes", state="fetching") == 1000
    assert value(text, "cowfleet_cache_bases", state="quarantined") == 1
    assert value(text, "cowfleet_cache_bytes", state="quarantined") == 300
    assert value(text, "cowfleet_cache_bases", state="verified") == 1


def test_clean_pass_counts_by_fixed_reason() -> None:
    def d(action: str, kind: str, reason: str, done: bool = True, size: int = 10) -> Any:
        return SimpleNamespace(action=action, kind=kind, reason=reason, done=done, allocated=size)

    metrics = NodeMetrics()
    metrics.cleaned(
        [
            d("quarantine", "base", "failed verification: digest differs"),
            d("remove", "base", "unused for 2.0 d (limit 1.0 d)", size=100),
            d("remove", "base", "over the budget by 1 GiB: least recently used (x)"),
            d("remove", "part", "abandoned download, 2 h old (limit 1 h)"),
            d("remove", "temp", "temporary file left by a killed writer, 2 h"),
            d("remove", "base", "unused for 2.0 d (limit 1.0 d)", done=False),  # dry run
            d("keep", "base", "in use by 1 instances"),
        ]
    )
    text = generate_latest(metrics.registry)
    assert value(text, "cowfleet_cache_quarantines_total", reason="failed_verification") == 1
    assert value(text, "cowfleet_cache_removals_total", reason="unused") == 1
    assert value(text, "cowfleet_cache_removed_bytes_total", reason="unused") == 100
    assert value(text, "cowfleet_cache_removals_total", reason="over_budget") == 1
    assert value(text, "cowfleet_cache_removals_total", reason="abandoned_download") == 1
    assert value(text, "cowfleet_cache_removals_total", reason="temp_left_behind") == 1
    assert clean_reason("remove", "converted", "whatever") == "abandoned_download"


def test_build_phases_and_refused_uploads() -> None:
    node = NodeMetrics()
    node.phase("fetch", 2.0)
    node.phase("disks", 0.5)
    text = generate_latest(node.registry)
    assert value(text, "cowfleet_build_phase_duration_seconds_sum", phase="fetch") == 2.0
    assert value(text, "cowfleet_build_phase_duration_seconds_count", phase="hypervisor") == 0
    images = ImageMetrics()
    images.upload_refused([SimpleNamespace(code="backing-file"), SimpleNamespace(code="x")])
    images.upload_refused([SimpleNamespace(code="backing-file")])
    text = generate_latest(images.registry)
    assert value(text, "cowfleet_upload_refusals_total", failure="backing-file") == 2
    assert value(text, "cowfleet_upload_refusals_total", failure="x") == 1


def test_precache_progress_family() -> None:
    m = ApiMetrics()
    m.precache_progress("node-a", "img-1", 4096)
    text = generate_latest(m.registry)
    assert value(text, "cowfleet_precache_bytes_done", host="node-a", image="img-1") == 4096
    m.precache_progress("node-a", "img-1", None)
    m.precache_progress("node-b", "never-set", None)
    assert value(generate_latest(m.registry), "cowfleet_precache_bytes_done") is None


def test_compute_api_metrics_decisions_heartbeats_and_access(tmp_path: Path) -> None:
    with api(tmp_path) as (client, _nodes, clock):
        # ApiSettings built by hand: metrics_open False, so the token check applies.
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"X-Auth-Token": "nope"}).status_code == 401
        assert create(client, "early").status_code == 202  # no node yet: no valid host
        register(client, "node-a")
        clock.now += 7.5
        server = create(client, "vm1").json()["server"]

        def scrape() -> str:
            resp = client.get("/metrics", headers={"X-Auth-Token": MEMBER_A})
            assert resp.status_code == 200
            return resp.text

        wait_for(lambda: value(scrape(), "cowfleet_scheduler_decisions_total", outcome="placed"))
        text = scrape()
        assert value(text, "cowfleet_scheduler_decisions_total", outcome="placed") == 1
        assert value(text, "cowfleet_scheduler_decisions_total", outcome="no_valid_host") == 1
        assert value(text, "cowfleet_node_heartbeat_age_seconds", node="node-a") == 7.5
        client.get(f"/v2.1/servers/{server['id']}", headers={"X-Auth-Token": ADMIN})
        text = scrape()
        route = "/v2.1/servers/{server_id}"
        assert value(text, "cowfleet_http_requests_total", route=route, status="200") == 1
        assert (
            value(text, "cowfleet_http_requests_total", route="/v2.1/servers", method="POST") == 2
        )
        assert (
            value(
                text,
                "cowfleet_http_requests_total",
                route="/internal/nodes/{hostname}",
                status="200",
            )
            == 1
        )
        assert client.get("/metrics", headers={"X-Auth-Token": NODE}).status_code == 200


@pytest.mark.parametrize("public", [False, True])
def test_compute_api_metrics_open_when_settings_say_so(tmp_path: Path, public: bool) -> None:
    with api(tmp_path, metrics_open=public) as (client, _, _):
        assert client.get("/metrics").status_code == (200 if public else 401)


def test_route_template_keeps_the_prefix_and_never_a_value() -> None:
    from cowfleet.metrics import route_template

    assert route_template("/v2.1/servers/abc", "/servers/{server_id}") == (
        "/v2.1/servers/{server_id}"
    )
    assert route_template("/v1/servers/abc", "/v1/servers/{uuid}") == "/v1/servers/{uuid}"
    assert route_template("/v2.1/flavors/", "/flavors") == "/v2.1/flavors"
    assert route_template("/anything", None) == "unmatched"


def test_node_and_image_service_metrics_follow_their_own_token(tmp_path: Path) -> None:
    from cowfleet.images.server.app import create_app as image_app
    from cowfleet.node.app import create_app as node_app

    node = TestClient(
        node_app(
            None,  # type: ignore[arg-type]  # no route of the builds is called
            dict,
            "node-token-123",
            metrics=NodeMetrics(),
            metrics_open=False,
        )
    )
    assert node.get("/metrics").status_code == 401
    assert node.get("/metrics", headers={"X-Auth-Token": "other"}).status_code == 401
    assert node.get("/metrics", headers={"X-Auth-Token": "node-token-123"}).status_code == 200
    settings = ServerSettings(
        data_dir=tmp_path / "images",
        database_url=f"sqlite:///{tmp_path / 'catalog.sqlite'}",
        token="image-token-456",
    )
    with TestClient(image_app(settings)) as images:
        assert images.get("/metrics").status_code == 401
        assert images.get("/v2/images", headers={"X-Auth-Token": "image-token-456"}).is_success
        ok = images.get("/metrics", headers={"X-Auth-Token": "image-token-456"})
        assert ok.status_code == 200 and "cowfleet_upload_refusals_total" in ok.text
        assert value(ok.text, "cowfleet_http_requests_total", route="/v2/images") == 1
    with TestClient(image_app(ServerSettings(**{**vars(settings), "metrics_open": True}))) as c:
        assert c.get("/metrics").status_code == 200


def test_a_fetch_fed_by_a_peer_then_the_origin_counts_each_ones_bytes(tmp_path: Path) -> None:
    """The peer's connection breaks after 2 leaves: the origin sends the rest. Bytes are
    labelled by who sent them, not all "origin" (issue 16)."""
    import httpx

    from cowfleet.cache.peering import Peering
    from cowfleet.fetch.sources import Peer
    from cowfleet.hashtree import tree_of

    leaf = MiB  # the peer reader hands on whole MiB chunks
    data = os.urandom(3 * leaf + 999)
    client = FakeClient()
    iid = str(uuid.uuid4())
    client.add(image_for(iid, data), data)
    client.trees[iid] = tree_of(data, leaf)
    asked: list[str] = []

    class Breaks(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield data[: 2 * leaf]
            raise httpx.ReadError("connection reset by peer")

    def peer(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        return httpx.Response(200, headers={"Content-Length": str(len(data))}, stream=Breaks())

    peering = Peering("node-token", _client=httpx.Client(transport=httpx.MockTransport(peer)))
    cfg = Config(home=tmp_path, instances_path=tmp_path / "inst")
    metrics = NodeMetrics(cfg.instances_path)
    cache = ImageCache(cfg, client, peering=peering, metrics=metrics)  # type: ignore[arg-type]
    got = cache.ensure_cached(iid, sources=[Peer("node-b", "http://127.0.0.3:1")])
    assert asked == [f"http://127.0.0.3:1/peer/v1/images/{iid}"]
    assert client.downloads == [(iid, 2 * leaf)]  # the origin resumed where the peer stopped
    assert dict(got.bytes_by_source) == {"node-b": 2 * leaf, "origin": leaf + 999}
    assert got.source == "node-b"  # it sent the most
    text = generate_latest(metrics.registry)
    assert value(text, "cowfleet_fetch_bytes_total", source="peer") == 2 * leaf
    assert value(text, "cowfleet_fetch_bytes_total", source="origin") == leaf + 999
    assert value(text, "cowfleet_fetch_duration_seconds_count", source="peer") == 1
    assert value(text, "cowfleet_fetch_duration_seconds_count", source="origin") == 0
    assert value(text, "cowfleet_cache_misses_total") == 1
    assert (tmp_path / "inst" / "_base").is_dir() and got.path.read_bytes() == data
