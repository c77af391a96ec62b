"""cowfleet.logs: request ids in and out, text and JSON lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cowfleet import logs
from tests.unit._api_fakes import ADMIN, api, create, register, wait_for


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """Every record of the ``cowfleet`` loggers as JSON lines (a handler of ours)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    handler.addFilter(logs.RequestIdFilter())
    logger = logging.getLogger("cowfleet")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def parsed(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_incoming_ids_are_kept_only_when_well_formed() -> None:
    assert logs.accept("req-1234-abcd") == "req-1234-abcd"
    for bad in (None, "", "x" * 129, "has space", "semi;colon", "new\nline"):
        made = logs.accept(bad)
        assert made.startswith("req-") and made != bad


def _app() -> TestClient:
    app = FastAPI()
    log = logging.getLogger("cowfleet.test")

    @app.get("/sync")
    def sync() -> dict[str, str | None]:  # runs in the thread pool
        log.warning("in a thread")
        return {"id": logs.current()}

    @app.get("/async")
    async def asynchronous() -> dict[str, str | None]:
        log.warning("on the loop")
        return {"id": logs.current()}

    app.add_middleware(logs.RequestIdMiddleware)
    return TestClient(app)


def test_the_middleware_takes_or_makes_the_id_and_every_line_names_it(
    lines: io.StringIO,
) -> None:
    client = _app()
    given = client.get("/sync", headers={"X-Request-Id": "req-given-1"})
    assert given.json() == {"id": "req-given-1"}
    assert given.headers["x-request-id"] == "req-given-1"
    assert given.headers["x-openstack-request-id"] == "req-given-1"
    nova = client.get("/async", headers={"X-OpenStack-Request-Id": "req-nova-2"})
    assert nova.json() == {"id": "req-nova-2"}
    made = client.get("/sync")
    rid = made.json()["id"]
    assert rid.startswith("req-") and made.headers["x-request-id"] == rid
    assert logs.current() is None  # nothing leaks out of a request
    records = parsed(lines)
    by_id = {(r["request_id"], r["logger"]) for r in records}
    assert ("req-given-1", "cowfleet.test") in by_id
    assert ("req-given-1", "cowfleet.access") in by_id
    assert ("req-nova-2", "cowfleet.test") in by_id
    assert (rid, "cowfleet.test") in by_id
    access = [r for r in records if r["logger"] == "cowfleet.access"]
    assert access[0]["message"].startswith("GET /sync 200 ")  # type: ignore[union-attr]
    assert access[0]["status"] == 200


def test_outgoing_calls_and_pool_threads_carry_the_id() -> None:
    sent: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("x-request-id"))
        return httpx.Response(200)

    client = httpx.Client(transport=httpx.MockTransport(handler), event_hooks=logs.httpx_hooks())
    client.get("http://node.test/")
    token = logs.bind("req-out-3")
    try:
        client.get("http://node.test/")
        with ThreadPoolExecutor(1) as pool:
            seen = pool.submit(logs.carry(logs.current)).result()
            plain = pool.submit(logs.current).result()
    finally:
        logs.unbind(token)
    assert sent == [None, "req-out-3"]
    assert (seen, plain) == ("req-out-3", None)


def test_text_and_json_formats() -> None:
    record = logging.LogRecord("cowfleet.x", logging.WARNING, "f", 1, "hello %s", ("you",), None)
    record.request_id = "req-9"
    record.image_id = "abc"
    assert logs.TextFormatter().format(record) == "WARNING cowfleet.x: hello you [req-9]"
    doc = json.loads(logs.JsonFormatter().format(record))
    assert (doc["level"], doc["logger"], doc["message"]) == ("WARNING", "cowfleet.x", "hello you")
    assert (doc["request_id"], doc["image_id"]) == ("req-9", "abc")
    record.request_id = None
    assert logs.TextFormatter().format(record) == "WARNING cowfleet.x: hello you"
    with pytest.raises(ValueError):
        logs.configure(logging.INFO, "xml")


def test_the_compute_api_sends_the_callers_id_to_the_node(tmp_path: Path) -> None:
    with api(tmp_path) as (client, nodes, _):
        register(client, "node-a")
        seen: list[str | None] = []
        real = nodes.build

        def build(url: str, spec: dict[str, object]) -> dict[str, object]:
            seen.append(logs.current())  # what the header hook would send
            return real(url, spec)

        nodes.build = build  # type: ignore[method-assign]
        resp = create(client, "vm1", **{})
        assert resp.status_code == 202
        rid = resp.headers["x-openstack-request-id"]
        wait_for(lambda: seen)
        assert seen == [rid]
        again = client.get("/v2.1/flavors", headers={"X-Auth-Token": ADMIN, "X-Request-Id": "r-1"})
        assert again.headers["x-openstack-request-id"] == "r-1"
