"""Reading an upload body straight from a socket (the receiver thread's side)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from starlette.requests import ClientDisconnect, Request

from cowfleet.images.server import body
from cowfleet.images.server.body import _declared_length, _SocketReader


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)  # as an asyncio transport leaves it
    yield ours, theirs
    ours.close()
    theirs.close()


def test_reads_what_arrives_then_eof_is_a_disconnect(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    reader = _SocketReader(ours.fileno(), 5.0, threading.Event())
    buf = memoryview(bytearray(1 << 20))

    def later() -> None:
        time.sleep(0.1)  # the reader must wait (poll), not spin or give up
        theirs.sendall(b"a" * 1000)
        time.sleep(0.1)
        theirs.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=later)
    t.start()
    got = 0
    with pytest.raises(ClientDisconnect):
        while True:
            n = reader.read_into(buf[got:])
            assert n > 0
            got += n
    t.join()
    assert bytes(buf[:got]) == b"a" * 1000


def test_silence_longer_than_the_idle_timeout_is_a_timeout(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _theirs = pair
    reader = _SocketReader(ours.fileno(), 0.3, threading.Event())
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        reader.read_into(memoryview(bytearray(10)))
    assert 0.3 <= time.monotonic() - t0 < 2.0


def test_the_stop_flag_ends_a_wait_within_a_poll_slice(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _theirs = pair
    stop = threading.Event()
    reader = _SocketReader(ours.fileno(), 60.0, stop)
    threading.Timer(0.1, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(ClientDisconnect):
        reader.read_into(memoryview(bytearray(10)))
    assert time.monotonic() - t0 < 0.1 + body.POLL_SLICE + 1.0


def test_a_reset_connection_is_a_disconnect() -> None:
    import struct

    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        ours, _ = server.accept()
    ours.setblocking(False)
    try:
        client.sendall(b"x")
        reader = _SocketReader(ours.fileno(), 5.0, threading.Event())
        buf = memoryview(bytearray(10))
        assert reader.read_into(buf) == 1
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # with linger 0: a TCP reset
        with pytest.raises(ClientDisconnect) as err:
            reader.read_into(buf)
        assert isinstance(err.value.__cause__, ConnectionResetError)
    finally:
        ours.close()


def _request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "PUT", "headers": raw})


def test_only_a_plain_content_length_body_can_be_read_directly() -> None:
    assert _declared_length(_request({"Content-Length": "123"})) == 123
    assert _declared_length(_request({})) is None
    assert _declared_length(_request({"Content-Length": "-1"})) is None
    chunked = {"Content-Length": "123", "Transfer-Encoding": "chunked"}
    assert _declared_length(_request(chunked)) is None


def test_discard_drops_what_is_there_and_waits_only_as_long_as_asked(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    reader = _SocketReader(ours.fileno(), 5.0, threading.Event())
    theirs.sendall(b"p" * 5000)
    time.sleep(0.05)
    assert reader.discard(1 << 20, 0.0) == 5000  # only what had arrived, no waiting
    assert reader.discard(1 << 20, 0.0) == 0
    theirs.sendall(b"q" * 3000)
    assert reader.discard(1000, 0.0) == 1000  # never more than the limit
    threading.Timer(0.2, lambda: theirs.sendall(b"r" * 100)).start()
    t0 = time.monotonic()
    assert reader.discard(2100, 5.0) == 2100  # waits for the rest of what it was told
    assert time.monotonic() - t0 < 4.0
    t0 = time.monotonic()
    assert reader.discard(10, 0.3) == 0  # nothing comes: gives up after the time given
    assert 0.25 <= time.monotonic() - t0 < 2.0
    theirs.sendall(b"s" * 1500)
    threading.Timer(0.2, lambda: theirs.sendall(b"t" * 1000)).start()
    assert reader.discard(2000, 5.0) == 2000  # the second read stops at the limit too
    time.sleep(0.05)
    assert reader.discard(1 << 20, 0.0) == 500  # what was beyond it is still there
