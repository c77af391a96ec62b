"""A small, real, misbehaving Glance-v2-shaped HTTP server for the cache fault tests.

It runs on loopback in a thread and speaks just enough of the image API
(``GET /v2/images/{id}`` and ``GET /v2/images/{id}/file`` with ``Range``) to
serve bytes the embedded image service would refuse to store, or to fail in
the ways a real network does: 5xx, stalls, truncation, extra bytes, wrong
digests, no Range support, slow streams.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class RogueImage:
    id: str
    data: bytes
    disk_format: str = "raw"
    # ok | 5xx | stall | truncate (short body, honest length) | drop (connection closed
    # mid-body, every time) | dropfirst | extra | norange | slow
    mode: str = "ok"
    declared_size: int | None = None
    hash_value: str | None = None
    rate: int = 16 * 1024 * 1024  # bytes/s for "slow"
    properties: dict[str, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "id": self.id,
            "name": "rogue-" + self.id[:8],
            "status": "active",
            "disk_format": self.disk_format,
            "container_format": "bare",
            "size": self.declared_size if self.declared_size is not None else len(self.data),
            "virtual_size": None,
            "checksum": hashlib.md5(self.data).hexdigest(),
            "os_hash_algo": "sha512",
            "os_hash_value": self.hash_value or hashlib.sha512(self.data).hexdigest(),
            "min_disk": 0,
            "min_ram": 0,
            "visibility": "shared",
            "protected": False,
            "owner": None,
            "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z",
            "tags": [],
            "self": f"/v2/images/{self.id}",
            "file": f"/v2/images/{self.id}/file",
            "schema": "/v2/schemas/image",
        }
        rec.update(self.properties)
        return rec


class RogueServer:
    def __init__(self) -> None:
        self.images: dict[str, RogueImage] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.release = threading.Event()  # ends stalls
        self.spans: list[tuple[str, float, float]] = []  # (image id, start, end) of bodies
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Range")))
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) < 3 or parts[:2] != ["v2", "images"] or parts[2] not in outer.images:
                    self._send(404, b'{"message": "not found"}')
                    return
                img = outer.images[parts[2]]
                if len(parts) == 3:
                    self._send(200, json.dumps(img.record()).encode())
                elif len(parts) == 4 and parts[3] == "file":
                    self._file(img)
                else:
                    self._send(404, b"{}")

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, img: RogueImage) -> None:
                data = img.data
                if img.mode == "5xx":
                    self._send(503, b'{"message": "unavailable"}')
                    return
                if img.mode == "extra":
                    data = data + b"\x00EXTRA" * 100
                start = 0
                rng = self.headers.get("Range")
                if rng and img.mode != "norange" and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                body = data[start:]
                if img.mode == "truncate":
                    body = body[: len(body) // 2]
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-MD5", hashlib.md5(data).hexdigest())
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                first = sum(1 for p, _ in outer.requests if p.endswith(img.id + "/file")) == 1
                began = time.monotonic()
                try:
                    if img.mode == "stall":
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        outer.release.wait(30)
                        return
                    if img.mode == "drop" or (img.mode == "dropfirst" and first):
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    if img.mode == "slow":
                        step = 256 * 1024
                        for i in range(0, len(body), step):
                            self.wfile.write(body[i : i + step])
                            time.sleep(step / img.rate)
                        return
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    return
                finally:
                    outer.spans.append((img.id, began, time.monotonic()))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add(self, img: RogueImage) -> RogueImage:
        self.images[img.id] = img
        return img

    def file_requests(self, image_id: str) -> list[str | None]:
        return [r for p, r in self.requests if p.endswith(image_id + "/file")]

    def __enter__(self) -> RogueServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
