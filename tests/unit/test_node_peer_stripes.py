"""The peer route's stripes: ``?stripe=t&stripes=k&leaf=SIZE`` with ``Range: bytes=a-``
answers only the leaves of stripe t from a's leaf on; bad parameters are 400."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cowfleet.cache.layout import Layout
from cowfleet.cache.live import LiveFetches, TrackingSink
from cowfleet.fetch.partsink import PartSink
from cowfleet.fetch.sources import Peer
from cowfleet.fetch.stripes import PeerStripes
from cowfleet.hashtree import MIN_LEAF_SIZE, tree_of
from cowfleet.node.peers import add_peer_routes

IID = "4f1c2b0e-8d7a-4c3e-9f10-0123456789ab"
LEAF = MIN_LEAF_SIZE
DATA = os.urandom(5 * LEAF + 999)  # 6 leaves, the last short
URL = f"/peer/v1/images/{IID}"


def _served(tmp_path: Path, *, slowly: bool = False) -> tuple[TestClient, threading.Thread]:
    """A node whose download of DATA is in progress (landing a leaf at a time)."""
    layout = Layout(tmp_path / "instances")
    layout.ensure_dirs()
    live = LiveFetches()
    fd = os.open(tmp_path / "x.part", os.O_RDWR | os.O_CREAT, 0o600)
    entry = live.begin(IID, len(DATA), fd)
    part = PartSink(fd, "x.part")
    sink = TrackingSink(part, entry)

    def land() -> None:
        for i in range(0, len(DATA), LEAF):
            sink.write(i, DATA[i : i + LEAF])
            if slowly:
                time.sleep(0.05)

    t = threading.Thread(target=land)
    t.start()
    app = FastAPI()
    add_peer_routes(app, layout, live, wait=5.0)
    return TestClient(app), t


def _leaves(*indexes: int) -> bytes:
    return b"".join(DATA[i * LEAF : (i + 1) * LEAF] for i in indexes)


def test_one_stripe_is_its_leaves_in_order_even_while_they_land(tmp_path: Path) -> None:
    client, t = _served(tmp_path, slowly=True)
    r = client.get(
        URL, params={"stripe": 1, "stripes": 2, "leaf": LEAF}, headers={"Range": f"bytes={LEAF}-"}
    )
    t.join()
    assert r.status_code == 206 and r.content == _leaves(1, 3, 5)
    assert r.headers["Content-Range"] == f"bytes {LEAF}-{len(DATA) - 1}/{len(DATA)}"
    assert r.headers["X-Cowfleet-Stripe"] == "1/2"
    # from leaf 2, stripe 0 of 3: leaves 3 only (3 % 3 == 0), starting past a's leaf
    r = client.get(
        URL,
        params={"stripe": 0, "stripes": 3, "leaf": LEAF},
        headers={"Range": f"bytes={2 * LEAF}-"},
    )
    assert r.status_code == 206 and r.content == _leaves(3)
    assert r.headers["Content-Range"] == f"bytes {3 * LEAF}-{4 * LEAF - 1}/{len(DATA)}"


@pytest.mark.parametrize(
    ("params", "rng", "words"),
    [
        ({"stripe": "x", "stripes": 2, "leaf": LEAF}, "bytes=0-", "'stripe' must be a whole"),
        ({"stripe": 2, "stripes": 2, "leaf": LEAF}, "bytes=0-", "'stripe' must be 0-1"),
        ({"stripe": 0, "stripes": 9, "leaf": LEAF}, "bytes=0-", "'stripes' must be 2-8"),
        ({"stripe": 0, "stripes": 1, "leaf": LEAF}, "bytes=0-", "'stripes' must be 2-8"),
        ({"stripe": 0, "stripes": 2, "leaf": 1000}, "bytes=0-", "'leaf'"),
        ({"stripe": 0, "stripes": 2}, "bytes=0-", "needs 'leaf'"),
        ({"stripe": 0, "stripes": 2, "leaf": LEAF}, None, "needs 'Range"),
        ({"stripe": 0, "stripes": 2, "leaf": LEAF}, "bytes=100-", "not on a leaf boundary"),
        ({"stripe": 0, "stripes": 2, "leaf": LEAF}, "bytes=0-99", "needs 'Range"),
    ],
)
def test_bad_stripe_parameters_are_400_naming_the_problem(
    tmp_path: Path, params: dict[str, object], rng: str | None, words: str
) -> None:
    client, t = _served(tmp_path)
    t.join()
    headers = {"Range": rng} if rng else {}
    r = client.get(URL, params=params, headers=headers)
    assert r.status_code == 400 and words in r.json()["error"]["message"]


def test_a_stripe_with_no_leaf_left_is_416(tmp_path: Path) -> None:
    client, t = _served(tmp_path)
    t.join()
    r = client.get(
        URL,
        params={"stripe": 0, "stripes": 4, "leaf": LEAF},
        headers={"Range": f"bytes={5 * LEAF}-"},
    )
    assert r.status_code == 416


def test_the_stripe_client_reads_the_route_leaf_by_leaf(tmp_path: Path) -> None:
    client, t = _served(tmp_path, slowly=True)
    tree = tree_of(DATA, LEAF)
    src = PeerStripes(Peer("n1", "http://testserver"), IID, tree, "tok", client, stall=5.0)
    with src.open(0, 2, 2) as body:
        got = b"".join(body)
    t.join()
    assert got == _leaves(2, 4)
