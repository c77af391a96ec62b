"""A misbehaving peer for the peer-fetch tests: a tiny real HTTP server that answers
``GET /peer/v1/images/{id}`` (with ``Range``) as a node agent would, but

- ``corrupt``: flips one byte at that offset of the image;
- ``die_at``: closes the connection once the body reaches that byte;
- ``stall_at``: stops sending at that byte and holds the connection open.

It checks the node token (401 otherwise) and records each request's ``Range``. With
``?stripe=t&stripes=k&leaf=SIZE`` it answers that stripe as a node agent does
(:mod:`cowfleet.node.peerstripes`); ``die_at`` and ``stall_at`` then count bytes of
the stripe's body.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.fixtures.images import free_port

PATH_RE = re.compile(r"^/peer/v1/images/([0-9a-f-]{36})(?:\?(.*))?$")
RANGE_RE = re.compile(r"^bytes=(\d+)-$")


class RoguePeer:
    def __init__(
        self,
        token: str,
        images: dict[str, bytes],
        *,
        host: str = "127.0.0.9",
        corrupt: int | None = None,
        die_at: int | None = None,
        stall_at: int | None = None,
    ) -> None:
        self.token = token
        self.images = images
        self.corrupt = corrupt
        self.die_at = die_at
        self.stall_at = stall_at
        self.ranges: list[str | None] = []
        self.stop = threading.Event()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                if self.headers.get("X-Auth-Token") != peer.token:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                m = PATH_RE.match(self.path)
                data = peer.images.get(m.group(1)) if m else None
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                raw = self.headers.get("Range")
                peer.ranges.append(raw)
                rm = RANGE_RE.match(raw or "")
                start = int(rm.group(1)) if rm else 0
                body = bytearray(data)
                if peer.corrupt is not None:
                    body[peer.corrupt] ^= 0xFF
                query = dict(urllib.parse.parse_qsl(m.group(2) or "")) if m else {}
                if "stripe" in query and rm:
                    t, k, leaf = (int(query[n]) for n in ("stripe", "stripes", "leaf"))
                    first = start // leaf + (t - start // leaf) % k
                    idx = range(first, -(-len(data) // leaf), k)
                    body = bytearray(b"".join(body[i * leaf : (i + 1) * leaf] for i in idx))
                    last = min((idx[-1] + 1) * leaf, len(data)) - 1
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {first * leaf}-{last}/{len(data)}")
                    self.send_header("X-Cowfleet-Stripe", f"{t}/{k}")
                    data, start = bytes(body), 0
                else:
                    self.send_response(206 if rm else 200)
                    if rm:
                        self.send_header(
                            "Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}"
                        )
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                pos = start
                while pos < len(data):
                    end = min(pos + 65536, len(data))
                    for limit in (peer.die_at, peer.stall_at):
                        if limit is not None and pos < limit < end:
                            end = limit
                    self.wfile.write(body[pos:end])
                    pos = end
                    if pos == peer.die_at:
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if pos == peer.stall_at:
                        self.wfile.flush()
                        while not peer.stop.is_set():
                            time.sleep(0.05)
                        return

        class Server(ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server((host, free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
