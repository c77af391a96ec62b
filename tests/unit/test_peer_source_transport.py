"""A node reads a peer through the data transport: whole pieces into the fetch's pooled
buffers, the node token sent, a stall still a timeout (a stdlib server on loopback)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cowfleet.cache.peering import Peering
from cowfleet.errors import TimeoutError_
from cowfleet.fetch.buffers import BufferPool
from cowfleet.fetch.sources import OriginSource, Peer, PeerSource

ID = "4f1c2b0e-8d7a-4c3e-9f10-0123456789ab"
DATA = bytes(range(256)) * 4096 * 3  # 3 MiB
CHUNK = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    tokens: list[str] = []
    stall = False

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).tokens.append(self.headers.get("X-Auth-Token", ""))
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
        body = DATA[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(DATA) - 1}/{len(DATA)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).stall:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            time.sleep(2)
            return
        self.wfile.write(body)


@pytest.fixture
def peer() -> Iterator[tuple[Peer, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"tokens": [], "stall": False})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Peer("node-x", f"http://127.0.0.1:{server.server_address[1]}"), handler
    finally:
        server.shutdown()
        server.server_close()


def _source(peering: Peering, peer: Peer) -> PeerSource:
    origin = OriginSource(lambda _offset, _pool: pytest.fail("the origin is not asked"))
    first = peering.sources(ID, [peer], origin)[0]
    assert isinstance(first, PeerSource)
    return first


def test_a_peer_is_read_in_whole_pieces_into_the_fetchs_pooled_buffers(
    peer: tuple[Peer, type[_Handler]],
) -> None:
    info, handler = peer
    peering = Peering(token="node-token", stall=5.0)
    pool = BufferPool(4, CHUNK)
    try:
        with _source(peering, info).open(CHUNK, pool) as stream:
            assert (stream.status, stream.offset, stream.total_size) == (206, CHUNK, len(DATA))
            got = bytearray()
            sizes = []
            for piece in stream.iter_chunks(CHUNK):
                assert isinstance(piece, memoryview)  # a view of one of the pool's buffers
                assert isinstance(piece.obj, bytearray) and len(piece.obj) == CHUNK
                sizes.append(len(piece))
                got += piece
                pool.give(piece)
        assert bytes(got) == DATA[CHUNK:]
        assert sizes == [CHUNK, CHUNK]  # one readinto per piece, not 64 KiB events
        assert pool.allocated <= 2  # each buffer reused once given back
        assert handler.tokens == ["node-token"]
    finally:
        peering.close()


def test_a_stalled_peer_is_still_a_timeout(peer: tuple[Peer, type[_Handler]]) -> None:
    info, handler = peer
    handler.stall = True
    peering = Peering(token="node-token", stall=0.3)
    pool = BufferPool(4, CHUNK)
    try:
        with (
            pytest.raises(TimeoutError_, match="stalled"),
            _source(peering, info).open(0, pool) as stream,
        ):
            for piece in stream.iter_chunks(CHUNK):
                pool.give(piece)
    finally:
        peering.close()
