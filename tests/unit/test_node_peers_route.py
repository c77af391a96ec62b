"""The peer route over a real cache layout and live registry (no agent): a download in
progress is streamed as it lands; an image on its way is waited for, not a 404."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.testclient import TestClient

from cowfleet.cache.layout import Layout
from cowfleet.cache.live import LiveFetches, TrackingSink
from cowfleet.fetch.partsink import PartSink
from cowfleet.node.peers import add_peer_routes

IID = "4f1c2b0e-8d7a-4c3e-9f10-0123456789ab"
DATA = os.urandom(300_000)


def _app(tmp_path: Path, live: LiveFetches, expecting: bool) -> TestClient:
    layout = Layout(tmp_path / "instances")
    layout.ensure_dirs()
    app = FastAPI()
    add_peer_routes(app, layout, live, wait=3.0, expecting=lambda _iid: expecting)
    return TestClient(app)


def _land_later(tmp_path: Path, live: LiveFetches, delay: float) -> threading.Thread:
    def run() -> None:
        time.sleep(delay)
        fd = os.open(tmp_path / "x.part", os.O_RDWR | os.O_CREAT, 0o600)
        entry = live.begin(IID, len(DATA), fd)
        part = PartSink(fd, "x.part")
        sink = TrackingSink(part, entry)
        for i in range(0, len(DATA), 100_000):
            sink.write(i, DATA[i : i + 100_000])
            time.sleep(0.05)
        sink.commit(len(DATA))
        live.end(entry, True)
        part.close()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_nothing_held_nothing_expected_is_404_at_once(tmp_path: Path) -> None:
    client = _app(tmp_path, LiveFetches(), expecting=False)
    t0 = time.monotonic()
    assert client.get(f"/peer/v1/images/{IID}").status_code == 404
    assert time.monotonic() - t0 < 1
    assert client.get("/peer/v1/images/not-a-uuid").status_code == 400


def test_an_expected_image_is_waited_for_then_streamed_as_it_lands(tmp_path: Path) -> None:
    live = LiveFetches()
    client = _app(tmp_path, live, expecting=True)
    t = _land_later(tmp_path, live, 0.3)
    resp = client.get(f"/peer/v1/images/{IID}", headers={"Range": "bytes=1000-"})
    t.join()
    assert resp.status_code == 206 and resp.content == DATA[1000:]
    assert resp.headers["content-range"] == f"bytes 1000-{len(DATA) - 1}/{len(DATA)}"


def test_an_image_expected_by_the_cache_itself_is_waited_for(tmp_path: Path) -> None:
    live = LiveFetches()
    client = _app(tmp_path, live, expecting=False)
    with live.expect(IID):
        t = _land_later(tmp_path, live, 0.3)
        resp = client.get(f"/peer/v1/images/{IID}")
    t.join()
    assert resp.status_code == 200 and resp.content == DATA
