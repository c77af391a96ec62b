"""The image client against a server that drops a kept-alive connection when it is reused.

:class:`DroppingServer` is a small HTTP/1.1 image service on loopback (plain
sockets, one thread per connection). It answers the first request on each
connection and keeps the connection open; when a later request arrives on that
connection it drops it, without a byte of answer: a reset (``SO_LINGER`` 0) or a
plain close. That is the race of a server closing an idle connection just as the
client reuses it, made deterministic. The client must send an idempotent request
again on a new connection (a file body rewound, a pipe body replayed) and never a
POST.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cowfleet.errors import BackendUnavailableError
from cowfleet.images.body import STREAM_CHUNK
from cowfleet.images.client import ImageClient

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
# Decides whether to drop a request: (method, its index on its connection) -> drop?
DropRule = Callable[[str, int], bool]


def on_reuse(method: str, index: int) -> bool:
    return index > 0


@dataclass
class Seen:
    """One request as the server saw it."""

    conn: int
    index: int  # 0 = first request on its connection
    method: str
    path: str
    dropped: bool
    body: bytes | None = None  # None when dropped before reading it
    largest_chunk: int | None = None  # chunked bodies only


class DroppingServer:
    def __init__(self, how: str, rule: DropRule = on_reuse) -> None:
        assert how in ("reset", "close")
        self.how = how
        self.rule = rule
        self.seen: list[Seen] = []
        self.images: dict[str, bytes | None] = {}
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._conns = 0
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def close(self) -> None:
        self._stop.set()
        self._accepter.join(5)
        self._listener.close()
        for t in self._threads:
            t.join(5)

    def requests(self, method: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method]

    # -- serving -----------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn, self._conns = self._conns, self._conns + 1
            t = threading.Thread(target=self._serve, args=(sock, conn), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket, conn: int) -> None:
        sock.settimeout(10)
        reader = sock.makefile("rb")
        try:
            index = 0
            while not self._stop.is_set():
                line = reader.readline()
                if not line:
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (h := reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = h.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                if self.rule(method, index):
                    with self._lock:
                        self.seen.append(Seen(conn, index, method, target, dropped=True))
                    self._drop(sock)
                    return
                body, largest = _read_body(reader, headers)
                with self._lock:
                    self.seen.append(Seen(conn, index, method, target, False, body, largest))
                sock.sendall(self._answer(method, target, body))
                index += 1
        except (OSError, ValueError):
            return
        finally:
            reader.close()
            sock.close()

    def _drop(self, sock: socket.socket) -> None:
        if self.how == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return  # the close in _serve sends the RST
        # A clean close (FIN) without an answer; read what the client still sends so
        # that the kernel does not turn the close into a reset.
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(5)
        while sock.recv(1 << 20):
            pass

    def _answer(self, method: str, target: str, body: bytes) -> bytes:
        parts = target.split("?")[0].strip("/").split("/")
        if method == "POST" and parts == ["v2", "images"]:
            iid = str(uuid.uuid4())
            self.images[iid] = None
            return _response(201, _record(iid, json.loads(body), None))
        if len(parts) >= 3 and parts[:2] == ["v2", "images"] and parts[2] in self.images:
            iid = parts[2]
            if method == "PUT" and parts[3:] == ["file"]:
                self.images[iid] = body
                return _response(204, b"")
            if method == "GET" and parts[3:] == []:
                return _response(200, _record(iid, {}, self.images[iid]))
            if method == "GET" and parts[3:] == ["file"]:
                data = self.images[iid] or b""
                return _response(200, data, "application/octet-stream")
        return _response(404, {"message": f"no route for {method} {target}"})


def _read_body(reader: Any, headers: dict[str, str]) -> tuple[bytes, int | None]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts: list[bytes] = []
        largest = 0
        while True:
            size = int(reader.readline().split(b";")[0], 16)
            if size == 0:
                while reader.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts), largest
            largest = max(largest, size)
            parts.append(reader.read(size))
            reader.readline()
    length = int(headers.get("content-length", "0"))
    data = reader.read(length) if length else b""
    if len(data) != length:
        raise ValueError("body cut short")
    return data, None


def _record(iid: str, fields: dict[str, Any], data: bytes | None) -> dict[str, Any]:
    return {
        "id": iid,
        "name": fields.get("name", "img"),
        "status": "queued" if data is None else "active",
        "disk_format": fields.get("disk_format", "raw"),
        "container_format": "bare",
        "size": None if data is None else len(data),
        "checksum": None if data is None else hashlib.md5(data).hexdigest(),
        "os_hash_algo": None if data is None else "sha512",
        "os_hash_value": None if data is None else hashlib.sha512(data).hexdigest(),
        "visibility": "shared",
        "min_disk": 0,
        "min_ram": 0,
        "protected": False,
        "tags": [],
    }


def _response(status: int, body: Any, ctype: str = "application/json") -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    reason = {200: "OK", 201: "Created", 204: "No Content", 404: "Not Found"}[status]
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
    if status != 204:
        head += f"Content-Length: {len(raw)}\r\n"
    return head.encode() + b"\r\n" + raw


@pytest.fixture(params=["reset", "close"])
def how(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_server() -> Iterator[Callable[..., DroppingServer]]:
    made: list[DroppingServer] = []

    def make(how: str, rule: DropRule = on_reuse) -> DroppingServer:
        made.append(DroppingServer(how, rule))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_get_dropped_on_reuse_is_sent_again(make_server: Any, how: str) -> None:
    server = make_server(how)
    with ImageClient(server.url) as client:
        iid = client.create(name="a", disk_format="raw").id
        # GETs go through the client's own transport (its connections, kept alive too):
        # the second GET reuses the first one's connection, which the server drops.
        assert client.get(iid).status == "queued"
        assert client.get(iid).status == "queued"
    gets = server.requests("GET")
    assert [(g.conn, g.index, g.dropped) for g in gets] == [
        (1, 0, False),
        (1, 1, True),
        (2, 0, False),
    ]


def test_file_upload_is_rewound_and_sent_again(make_server: Any, how: str, tmp_path: Path) -> None:
    server = make_server(how)
    data = os.urandom(6 * MiB + 7)
    src = tmp_path / "disk.raw"
    src.write_bytes(data)
    with ImageClient(server.url) as client, src.open("rb") as fh:
        iid = client.create(name="a", disk_format="raw").id
        image = client.upload(iid, fh)
        assert image.status == "active" and image.size == len(data)
        client.download(iid, tmp_path / "copy.raw")
    puts = server.requests("PUT")
    assert [(p.conn, p.index, p.dropped) for p in puts] == [(0, 1, True), (1, 0, False)]
    assert puts[1].body == data  # the whole file again, from its first byte
    assert (tmp_path / "copy.raw").read_bytes() == data


def test_pipe_upload_is_chunked_small_and_replayed(make_server: Any, how: str) -> None:
    server = make_server(how)
    data = os.urandom(3 * MiB + 11)
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as out:
            out.write(data)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    with ImageClient(server.url) as client, os.fdopen(r, "rb") as fh:
        iid = client.create(name="p", disk_format="raw").id
        image = client.upload(iid, fh)
    writer.join(5)
    assert image.size == len(data)
    puts = server.requests("PUT")
    assert [(p.conn, p.index, p.dropped) for p in puts] == [(0, 1, True), (1, 0, False)]
    assert puts[1].body == data
    assert puts[1].largest_chunk is not None and puts[1].largest_chunk <= STREAM_CHUNK


def test_post_is_not_sent_again(make_server: Any, how: str) -> None:
    server = make_server(how)
    with ImageClient(server.url) as client:
        client.create(name="first", disk_format="raw")  # opens the connection
        with pytest.raises(BackendUnavailableError):
            client.create(name="second", disk_format="raw")
    posts = server.requests("POST")
    assert [(p.conn, p.index, p.dropped) for p in posts] == [(0, 0, False), (0, 1, True)]


def test_a_failure_on_a_new_connection_is_final(make_server: Any, tmp_path: Path) -> None:
    server = make_server("reset", lambda method, index: method == "PUT" or index > 0)
    src = tmp_path / "disk.raw"
    src.write_bytes(os.urandom(MiB))
    with ImageClient(server.url) as client, src.open("rb") as fh:
        iid = client.create(name="a", disk_format="raw").id
        with pytest.raises(BackendUnavailableError):
            client.upload(iid, fh)
    puts = server.requests("PUT")
    assert [(p.conn, p.index, p.dropped) for p in puts] == [(0, 1, True), (1, 0, True)]


def test_cli_upload_from_stdin(make_server: Any, tmp_path: Path) -> None:
    server = make_server("reset")
    data = os.urandom(2 * MiB + 3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    env["COWFLEET_HOME"] = str(tmp_path / "home")
    env["COWFLEET_IMAGE_URL"] = server.url
    argv = [sys.executable, "-m", "cowfleet", "image", "upload", "--name", "in"]
    argv += ["--disk-format", "raw", "--output", "json", "-"]
    done = subprocess.run(argv, input=data, capture_output=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["size"] == len(data)
    put = [p for p in server.requests("PUT") if not p.dropped]
    assert len(put) == 1 and put[0].body == data
    assert put[0].largest_chunk is not None and put[0].largest_chunk <= STREAM_CHUNK
