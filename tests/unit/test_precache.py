"""Pre-cache: the state machine and summary, the node's job runner, the API's records."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cowfleet import precache as pc
from cowfleet.api.nodes_client import NodeError
from cowfleet.cache import metadata as md
from cowfleet.cache.layout import Layout
from cowfleet.distribution.assign import Holder, SourcePlan
from cowfleet.errors import IntegrityError, ValidationError
from cowfleet.node.precache import Precacher, PrecacheRequest
from tests.unit._api_fakes import (
    ADMIN,
    IMAGE,
    MEMBER_A,
    NODE,
    Clock,
    FakeNodes,
    api,
    headers,
    register,
)
from tests.unit._api_fakes import wait_for as wait

PID = "8d5e3c1a-2b4f-4e6a-9c7d-1f0e2d3c4b5a"

# -- states and summary ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "new", "ok"),
    [
        ("queued", "fetching", True),
        ("queued", "cached", True),
        ("queued", "skipped", True),
        ("fetching", "fetching", True),
        ("fetching", "verifying", True),
        ("verifying", "fetching", False),  # a late report never moves back
        ("fetching", "queued", False),
        ("fetching", "skipped", False),
        ("cached", "failed", False),
        ("failed", "cached", False),
        ("skipped", "fetching", False),
        ("queued", "bogus", False),
    ],
)
def test_states_move_forward_only(current: str, new: str, ok: bool) -> None:
    assert pc.may_move(current, new) is ok


def test_summary_of_nodes() -> None:
    running = pc.summarize(
        [
            pc.NodeProgress("fetching", 10, 100, 5.0, "origin"),
            pc.NodeProgress("cached", 100, 100, 0.0, None),
            pc.NodeProgress("skipped", error="down"),
        ]
    )
    assert running.state == "running"
    assert (running.bytes_done, running.bytes_total, running.rate) == (110, 200, 5.0)
    assert running.counts["fetching"] == running.counts["cached"] == running.counts["skipped"] == 1
    assert pc.summarize([pc.NodeProgress("fetching")]).bytes_total is None
    failed = pc.summarize([pc.NodeProgress("cached", 1, 1), pc.NodeProgress("failed", error="x")])
    assert failed.state == "failed"
    assert pc.summarize([pc.NodeProgress("skipped"), pc.NodeProgress("cached")]).state == "done"
    assert pc.summarize([]).state == "done"


@pytest.mark.parametrize(
    "doc",
    [
        {"state": "nope"},
        {"state": "fetching", "bytes_done": -1},
        {"state": "fetching", "bytes_done": True},
        {"state": "fetching", "bytes_total": "9"},
        {"state": "fetching", "rate": -2},
        {"state": "fetching", "source": ""},
        {"state": "failed", "error": 3},
    ],
)
def test_progress_reports_are_validated(doc: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        pc.NodeProgress.from_json(doc)


def test_rate_meter() -> None:
    meter = pc.RateMeter()
    assert meter.sample(10.0, 0) == 0.0
    assert meter.sample(12.0, 1000) == 500.0
    assert meter.sample(12.0, 5000) == 500.0  # no time passed: the last rate stands


# -- the node's job runner ---------------------------------------------------------------


class FakeCache:
    """Writes the ``.part`` in steps as the real fetch does, or fails, or hits."""

    def __init__(self, root: Path, *, size: int = 4000, steps: int = 4, step: float = 0.05):
        self.layout = Layout(root)
        self.layout.ensure_dirs()
        self.size, self.steps, self.step = size, steps, step
        self.calls: list[str] = []
        self.fail: Exception | None = None
        self.hit = False

    def ensure_cached(self, image_id: str) -> Any:
        self.calls.append(image_id)
        paths = self.layout.paths(image_id)
        if self.hit:
            return type("Hit", (), {"fetched": False, "size": self.size})()
        record = md.PartMeta(image_id, self.size, "sha512", "0" * 128, "http://origin", 0.0)
        md.write_atomic(paths.part_meta, record.to_json())
        with paths.part.open("wb") as f:
            for _ in range(self.steps):
                time.sleep(self.step)
                f.write(b"x" * (self.size // self.steps))
                f.flush()
                if self.fail is not None and f.tell() >= self.size // 2:
                    raise self.fail
        time.sleep(max(self.step * 6, 0.3))  # checks and install (the sampler sees it)
        paths.part.rename(paths.base)
        return type("Got", (), {"fetched": True, "size": self.size})()


class Reports:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def __call__(self, pid: str, body: dict[str, Any]) -> None:
        with self.lock:
            self.sent.append((pid, dict(body)))

    def states(self) -> list[str]:
        with self.lock:
            return [b["state"] for _, b in self.sent]

    def last(self) -> dict[str, Any]:
        with self.lock:
            return self.sent[-1][1]


def _req(**kw: Any) -> PrecacheRequest:
    return PrecacheRequest.from_json({"precache_id": PID, "image_id": IMAGE, **kw})


def test_node_job_reports_fetching_verifying_then_cached_at_bounded_frequency(
    tmp_path: Path,
) -> None:
    cache, reports = FakeCache(tmp_path), Reports()
    runner = Precacher(cache, reports, interval=0.02)
    started = time.monotonic()
    runner.submit(_req())
    wait(lambda: reports.sent and reports.last()["state"] in pc.TERMINAL)
    elapsed = time.monotonic() - started
    states = reports.states()
    assert states[-1] == "cached" and "fetching" in states and "verifying" in states
    ranks = [pc.STATES.index(s) for s in states]
    assert ranks == sorted(ranks)  # never backwards
    assert len(states) <= elapsed / 0.02 + 2  # one report per interval, plus the last word
    fetching = [b for _, b in reports.sent if b["state"] == "fetching"]
    assert all(b["bytes_total"] == 4000 and b["source"] == "origin" for b in fetching)
    assert any(b["rate"] > 0 for b in fetching)
    assert reports.last() == {
        "state": "cached",
        "bytes_done": 4000,
        "bytes_total": 4000,
        "rate": 0.0,
        "source": "origin",
        "error": None,
    }
    runner.close()


def test_node_job_for_a_held_image_reports_cached_from_nowhere(tmp_path: Path) -> None:
    cache, reports = FakeCache(tmp_path), Reports()
    cache.hit = True
    runner = Precacher(cache, reports, interval=0.02)
    runner.submit(_req())
    wait(lambda: reports.sent)
    assert reports.states() == ["cached"]
    assert reports.last()["source"] is None and reports.last()["bytes_done"] == 4000
    runner.close()


def test_node_job_failure_names_the_error_and_an_ask_again_repeats_the_last_word(
    tmp_path: Path,
) -> None:
    cache, reports = FakeCache(tmp_path), Reports()
    cache.fail = IntegrityError("sha512 mismatch for image x")
    runner = Precacher(cache, reports, interval=0.02)
    runner.submit(_req())
    wait(lambda: reports.sent and reports.last()["state"] == "failed")
    assert reports.last()["error"] == "IntegrityError: sha512 mismatch for image x"
    n = len(reports.sent)
    job = runner.submit(_req())  # the API asks again (a lost report)
    wait(lambda: len(reports.sent) == n + 1)
    assert job.progress.state == "failed" and reports.last()["state"] == "failed"
    assert cache.calls == [IMAGE]  # one fetch, whatever the asks
    runner.close()


def test_node_passes_sources_only_to_a_fetch_that_takes_them(tmp_path: Path) -> None:
    seen: list[Any] = []

    class PeerCache(FakeCache):
        def ensure_cached(self, image_id: str, sources: Any = None) -> Any:  # type: ignore[override]
            seen.append(sources)
            return type("Got", (), {"fetched": True, "size": 5, "source": "node-b"})()

    reports = Reports()
    runner = Precacher(PeerCache(tmp_path), reports, interval=0.02)
    runner.submit(_req(sources=[{"host": "node-b", "url": "http://127.0.0.3:1"}]))
    wait(lambda: reports.sent)
    assert [[(p.host, p.url) for p in got] for got in seen] == [[("node-b", "http://127.0.0.3:1")]]
    assert reports.last()["source"] == "node-b"
    # A fetch without the parameter still runs (origin only).
    reports2 = Reports()
    plain = Precacher(FakeCache(tmp_path / "b", steps=1, step=0.0), reports2, interval=0.02)
    plain.submit(_req(sources=[{"host": "node-b", "url": "http://127.0.0.3:1"}]))
    wait(lambda: reports2.sent and reports2.last()["state"] == "cached")
    assert reports2.last()["source"] == "origin"
    runner.close()
    plain.close()


def test_node_progress_names_the_source_sending_now_then_the_one_that_sent_most(
    tmp_path: Path,
) -> None:
    """The fetch starts from peer node-b, which dies half-way; the origin takes over
    (the cache's live download records each switch, as ``Sources.on_switch`` does)."""
    import os
    import types

    from cowfleet.cache.live import LiveFetches

    live = LiveFetches()

    class PeerCache(FakeCache):
        peering = types.SimpleNamespace(live=live)

        def ensure_cached(self, image_id: str, sources: Any = None) -> Any:  # type: ignore[override]
            paths = self.layout.paths(image_id)
            record = md.PartMeta(image_id, 4000, "sha512", "0" * 128, "http://origin", 0.0)
            md.write_atomic(paths.part_meta, record.to_json())
            with paths.part.open("wb") as f:
                entry = live.begin(image_id, 4000, f.fileno())
                entry.source = "node-b"
                for i in range(8):
                    if i == 4:
                        entry.source = "origin"  # node-b died: the origin resumes
                    f.write(b"x" * 500)
                    f.flush()
                    time.sleep(0.06)
                live.end(entry, True)
            paths.part.rename(paths.base)
            os.unlink(paths.part_meta)
            return type("Got", (), {"fetched": True, "size": 4000, "source": "node-b"})()

    reports = Reports()
    runner = Precacher(PeerCache(tmp_path), reports, interval=0.02)
    runner.submit(_req(sources=[{"host": "node-b", "url": "http://127.0.0.3:1"}]))
    wait(lambda: reports.sent and reports.last()["state"] in pc.TERMINAL)
    fetching = [b["source"] for _, b in reports.sent if b["state"] == "fetching"]
    assert "node-b" in fetching and "origin" in fetching
    assert fetching.index("origin") > fetching.index("node-b")
    assert fetching[fetching.index("origin") :] == ["origin"] * fetching.count("origin")
    assert reports.last()["state"] == "cached" and reports.last()["source"] == "node-b"
    runner.close()


@pytest.mark.parametrize(
    "doc",
    [
        None,
        {"precache_id": "x", "image_id": IMAGE},
        {"precache_id": PID, "image_id": "../../etc"},
        {"precache_id": PID, "image_id": IMAGE, "sources": "node-b"},
        {"precache_id": PID, "image_id": IMAGE, "sources": [{"host": "b", "url": "file:///x"}]},
        {"precache_id": PID, "image_id": IMAGE, "stripes": [[]]},
        {
            "precache_id": PID,
            "image_id": IMAGE,
            "stripes": [[], [{"host": "b/", "url": "http://b"}]],
        },
    ],
)
def test_node_refuses_a_bad_request(doc: Any) -> None:
    with pytest.raises(ValidationError):
        PrecacheRequest.from_json(doc)


# -- the API -----------------------------------------------------------------------------


class PrecacheNodes(FakeNodes):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str, dict[str, Any]]] = []

    def precache(self, node_url: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.asked.append((node_url, body))
        if node_url in self.failing:
            raise NodeError(f"node at {node_url} cannot be reached: refused")
        return {"precache_id": body["precache_id"], "state": "queued"}


@contextmanager
def _api(tmp_path: Path, **settings: Any) -> Iterator[tuple[TestClient, PrecacheNodes, Clock]]:
    with api(tmp_path, PrecacheNodes(), **settings) as made:
        yield made


def _report(client: TestClient, host: str, pid: str, **body: Any) -> int:
    resp = client.post(
        f"/internal/nodes/{host}/precache/{pid}", json=body, headers={"X-Auth-Token": NODE}
    )
    return resp.status_code


def _show(client: TestClient, pid: str) -> dict[str, Any]:
    doc: dict[str, Any] = client.get(f"/v2.1/cowfleet/precache/{pid}", headers=headers()).json()
    return doc["precache"]


def _nodes(client: TestClient, pid: str) -> dict[str, dict[str, Any]]:
    return {n["host"]: n for n in _show(client, pid)["nodes"]}


def test_api_records_progress_skips_down_nodes_and_ignores_late_reports(tmp_path: Path) -> None:
    with _api(tmp_path) as (client, nodes, clock):
        register(client, "n1")
        register(client, "n2")
        clock.now += 120  # both down ...
        register(client, "n1")  # ... until n1 heartbeats again
        resp = client.post(
            "/v2.1/cowfleet/precache", json={"image_id": IMAGE, "all": True}, headers=headers()
        )
        assert resp.status_code == 202, resp.text
        pid = resp.json()["precache"]["id"]
        wait(lambda: nodes.asked)
        ((url, body),) = nodes.asked
        assert url == "http://n1.test:8775"
        assert body == {"precache_id": pid, "image_id": IMAGE, "sources": []}
        n2 = _nodes(client, pid)["n2"]
        assert n2["state"] == "skipped" and "node n2 is down: no heartbeat for 120s" in n2["error"]

        assert _report(client, "n1", pid, state="fetching", bytes_done=5, bytes_total=10) == 204
        assert _report(client, "n1", pid, state="verifying", bytes_done=10, bytes_total=10) == 204
        assert _report(client, "n1", pid, state="fetching", bytes_done=7) == 204  # late: ignored
        n1 = _nodes(client, pid)["n1"]
        assert (n1["state"], n1["bytes_done"], n1["bytes_total"]) == ("verifying", 10, 10)
        assert _show(client, pid)["state"] == "running"
        assert _report(client, "n1", pid, state="cached", bytes_done=10, source="origin") == 204
        assert _report(client, "n1", pid, state="failed", error="late") == 204  # terminal stays
        doc = _show(client, pid)
        assert doc["state"] == "done" and doc["counts"]["cached"] == doc["counts"]["skipped"] == 1
        assert _nodes(client, pid)["n1"]["source"] == "origin"

        assert _report(client, "n9", pid, state="cached") == 404
        assert _report(client, "n1", pid, state="cached", bytes_done=-1) == 400
        listed = client.get("/v2.1/cowfleet/precache", headers=headers()).json()["precaches"]
        assert [p["id"] for p in listed] == [pid] and "nodes" not in listed[0]
        assert client.get("/v2.1/cowfleet/precache", headers=headers(MEMBER_A)).status_code == 403
        r = client.post(
            f"/internal/nodes/n1/precache/{pid}", json={"state": "cached"}, headers=headers()
        )
        assert r.status_code == 403  # a user token on the node route


def test_api_bounded_concurrency_asks_the_next_node_when_one_is_done(tmp_path: Path) -> None:
    with _api(tmp_path, precache_concurrency=1) as (client, nodes, _):
        for h in ("n1", "n2", "n3"):
            register(client, h)
        resp = client.post(
            "/v2.1/cowfleet/precache",
            json={"image_id": IMAGE, "hosts": ["n1", "n2", "n3"]},
            headers=headers(),
        )
        pid = resp.json()["precache"]["id"]
        for i, host in enumerate(("n1", "n2", "n3")):
            wait(lambda i=i: len(nodes.asked) == i + 1)  # type: ignore[misc]
            time.sleep(0.5)  # the dispatcher waits for a free slot, not for time
            assert len(nodes.asked) == i + 1
            assert nodes.asked[i][0] == f"http://{host}.test:8775"
            _report(client, host, pid, state="cached", bytes_done=1, bytes_total=1)
        wait(lambda: _show(client, pid)["state"] == "done")


def test_api_unreachable_node_fails_and_node_gone_down_fails_on_sweep(tmp_path: Path) -> None:
    with _api(tmp_path) as (client, nodes, clock):
        register(client, "n1")
        register(client, "n2")
        nodes.failing.add("http://n2.test:8775")
        resp = client.post(
            "/v2.1/cowfleet/precache", json={"image_id": IMAGE, "all": True}, headers=headers()
        )
        pid = resp.json()["precache"]["id"]
        wait(lambda: _nodes(client, pid)["n2"]["state"] == "failed")
        assert "cannot be reached" in _nodes(client, pid)["n2"]["error"]
        _report(client, "n1", pid, state="fetching", bytes_done=1, bytes_total=9)
        clock.now += 120
        client.app.state.precaches.sweep()  # type: ignore[attr-defined]
        n1 = _nodes(client, pid)["n1"]
        assert n1["state"] == "failed" and "node n1 is down" in n1["error"]
        assert _show(client, pid)["state"] == "failed"


def test_api_sends_peer_sources_from_the_assignment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[list[str], list[Holder]]] = []

    def assign(
        image_id: str, fetchers: Any, holders: Any, *, fanout: int, **_kw: Any
    ) -> dict[str, SourcePlan]:
        seen.append((list(fetchers), list(holders)))
        return {h: SourcePlan(h, ("n1",)) for h in fetchers}

    monkeypatch.setattr("cowfleet.api.precache.assign_sources", assign)
    with _api(tmp_path) as (client, nodes, _):
        register(client, "n1", cache=[{"image_id": IMAGE, "verified": True, "bytes": 9}])
        register(client, "n2")
        client.post(
            "/v2.1/cowfleet/precache", json={"image_id": IMAGE, "all": True}, headers=headers()
        )
        wait(lambda: len(nodes.asked) == 2)
        asked = {url: body["sources"] for url, body in nodes.asked}
        assert asked["http://n2.test:8775"] == [{"host": "n1", "url": "http://n1.test:8775"}]
        assert asked["http://n1.test:8775"] == []  # the holder itself gets no peers
        ((fetchers, holders),) = seen
        assert fetchers == ["n2"]
        assert holders == [Holder("n1", "http://n1.test:8775", True)]


def test_api_sends_each_node_the_sources_of_every_stripe(tmp_path: Path) -> None:
    with _api(tmp_path, peer_stripes=2, peer_stripe_fanout=3) as (client, nodes, _):
        for n in ("n1", "n2", "n3"):
            register(client, n)
        client.post(
            "/v2.1/cowfleet/precache", json={"image_id": IMAGE, "all": True}, headers=headers()
        )
        wait(lambda: len(nodes.asked) == 3)
        bodies = {url.split("//")[1].split(".")[0]: body for url, body in nodes.asked}
        # n1 (first): both stripes from the origin, so no stripes are named, and it feeds
        # both to n2; n3: stripe 0 from n1, stripe 1 from n2 (its home; n1 is full)
        assert "stripes" not in bodies["n1"] and bodies["n1"]["sources"] == []
        n1 = {"host": "n1", "url": "http://n1.test:8775"}
        n2 = {"host": "n2", "url": "http://n2.test:8775"}
        assert bodies["n2"]["stripes"][0][0] == n1 and bodies["n2"]["stripes"][1][0] == n1
        assert bodies["n3"]["stripes"][0][0] == n1 and bodies["n3"]["stripes"][1][0] == n2
        assert bodies["n3"]["sources"] == bodies["n3"]["stripes"][0]


def test_api_with_peer_fanout_0_sends_every_node_to_the_origin(tmp_path: Path) -> None:
    with _api(tmp_path, peer_fanout=0) as (client, nodes, _):
        register(client, "n1")
        register(client, "n2")
        r = client.post(
            "/v2.1/cowfleet/precache", json={"image_id": IMAGE, "all": True}, headers=headers()
        )
        assert r.status_code == 202
        wait(lambda: len(nodes.asked) == 2)
        assert [body["sources"] for _, body in nodes.asked] == [[], []]


def test_nova_aggregate_images_route(tmp_path: Path) -> None:
    with _api(tmp_path) as (client, nodes, _):
        register(client, "n1")
        agg = client.post(
            "/v2.1/os-aggregates", json={"aggregate": {"name": "a"}}, headers=headers()
        )
        agg_id = agg.json()["aggregate"]["id"]
        client.post(
            f"/v2.1/os-aggregates/{agg_id}/action",
            json={"add_host": {"host": "n1"}},
            headers=headers(),
        )
        path = f"/v2.1/os-aggregates/{agg_id}/images"
        for body in (
            {},
            {"cache": []},
            {"cache": [{"id": IMAGE}], "x": 1},
            {"cache": [{"id": IMAGE, "name": "x"}]},
            {"cache": [{"id": "not-a-uuid"}]},
            {"cache": [{"id": IMAGE}, {"id": IMAGE.upper()}]},
        ):
            assert client.post(path, json=body, headers=headers()).status_code == 400, body
        assert (
            client.post(
                "/v2.1/os-aggregates/x/images", json={"cache": [{"id": IMAGE}]}, headers=headers()
            ).status_code
            == 400
        )
        ok = client.post(path, json={"cache": [{"id": IMAGE}]}, headers=headers())
        assert ok.status_code == 202 and ok.content == b""
        pid = ok.headers["cowfleet-precache"]
        wait(lambda: nodes.asked)
        assert _show(client, pid)["target"] == {"aggregate": agg_id}
        assert nodes.asked[0][1]["image_id"] == IMAGE
        assert (
            client.post(
                path, json={"cache": [{"id": IMAGE}]}, headers=headers(ADMIN, "2.80")
            ).status_code
            == 404
        )


def test_node_passes_stripes_to_the_fetch_and_a_build_spec_takes_them(tmp_path: Path) -> None:
    from cowfleet.fetch.sources import Peer
    from cowfleet.node.spec import BuildSpec

    b = {"host": "node-b", "url": "http://127.0.0.3:1"}
    req = PrecacheRequest.from_json(
        {"precache_id": PID, "image_id": IMAGE, "sources": [b], "stripes": [[b], []]}
    )
    assert req.stripes == ((Peer("node-b", "http://127.0.0.3:1"),), ())
    spec = {
        "uuid": PID,
        "name": "vm",
        "image_id": IMAGE,
        "flavor": {"name": "t", "vcpus": 1, "ram_mb": 64, "root_gb": 1},
    }
    assert BuildSpec.from_json({**spec, "stripes": [[b], []]}).stripes == req.stripes
    with pytest.raises(ValidationError, match="stripes"):
        BuildSpec.from_json({**spec, "stripes": [[b]] * 9})
