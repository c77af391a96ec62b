"""What ``cowfleet cache fetch`` pays before its first byte: no server stack, no CA
bundle for a plain-HTTP image service, no buffers it does not use (issue 14)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cowfleet.fetch.buffers import BufferPool
from cowfleet.images import client as client_mod
from cowfleet.images.client import ImageClient
from cowfleet.images.transport import DataTransport

SRC = Path(__file__).resolve().parents[2] / "src"

# Modules the fetch path must not import: the servers' stacks, the database, libvirt.
FORBIDDEN = (
    "fastapi",
    "starlette",
    "uvicorn",
    "granian",
    "sqlalchemy",
    "alembic",
    "psycopg",
    "libvirt",
    "pydantic",
    "cowfleet.api",
    "cowfleet.node",
    "cowfleet.compute",
    "cowfleet.scheduler",
    "cowfleet.demo",
    "cowfleet.images.server",
    "cowfleet.qemuimg",
)

# In a fresh interpreter: parse a `cache fetch` command line, build its configuration,
# the cache and the image client (everything the command does before it downloads),
# recording every CA bundle load.
CHILD = textwrap.dedent(
    """
    import json, ssl, sys
    loads = []
    _orig = ssl.SSLContext.load_verify_locations
    def _spy(self, *a, **kw):
        loads.append(repr(a or kw))
        return _orig(self, *a, **kw)
    ssl.SSLContext.load_verify_locations = _spy
    from cowfleet.cli.main import build_parser
    from cowfleet.cli.common import build_config, fill_common_defaults
    argv = sys.argv[1:]
    args = fill_common_defaults(build_parser(argv).parse_args(argv))
    cfg = build_config(args)
    from cowfleet.cli.cache import _cache
    cache = _cache(cfg)
    cache.client  # created on first use: the fetch path creates it
    print(json.dumps({"modules": sorted(sys.modules), "ca_loads": loads}))
    """
)


def _child(tmp_path: Path, url: str) -> dict[str, list[str]]:
    argv = [
        "cache",
        "fetch",
        "some-image",
        "--home",
        str(tmp_path / "home"),
        "--instances-path",
        str(tmp_path / "inst"),
        "--image-url",
        url,
    ]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env = {k: v for k, v in env.items() if not k.startswith("COWFLEET_")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, *argv],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=tmp_path,
    )
    result: dict[str, list[str]] = json.loads(out.stdout)
    return result


def test_cache_fetch_set_up_imports_no_server_stack_and_loads_no_ca_bundle(
    tmp_path: Path,
) -> None:
    got = _child(tmp_path, "http://127.0.0.1:9")
    heavy = [m for m in got["modules"] if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN]
    heavy += [m for m in got["modules"] if any(m.startswith(f + ".") for f in FORBIDDEN)]
    assert sorted(set(heavy)) == []
    assert "cowfleet.cli.cache" in got["modules"]  # the child did run the cache group
    # GETs go through the project's transport: httpx's (httpcore, h11, trio) is not loaded
    http_stack = {"httpcore", "h11", "trio", "anyio"}
    assert [m for m in got["modules"] if m.split(".")[0] in http_stack] == []
    # A plain-HTTP image service: no TLS, so no CA bundle read at start-up.
    assert got["ca_loads"] == []


def test_an_https_image_service_still_gets_httpx_tls_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[int] = []
    real = httpx.create_ssl_context

    def spy(*a: object, **kw: object) -> object:
        made.append(1)
        return real()

    monkeypatch.setattr(client_mod.httpx, "create_ssl_context", spy)
    with ImageClient("http://127.0.0.1:9", "t"):
        pass
    assert made == []
    with ImageClient("https://127.0.0.1:9", "t"):
        pass
    assert made == [1]


def test_plain_http_context_trusts_no_ca() -> None:
    import ssl

    ctx = client_mod._tls_context("http://127.0.0.1:9")
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] == 0


def test_buffer_pool_allocates_only_what_is_taken() -> None:
    pool = BufferPool(12, 1 << 20)
    assert pool.allocated == 0
    a = pool.take()
    b = pool.take()
    assert pool.allocated == 2 and a is not b and len(a) == 1 << 20
    pool.give(memoryview(a)[:10])
    assert pool.take() is a  # a given-back buffer is reused before a new one is made
    assert pool.allocated == 2
    pool.give(memoryview(bytearray(4)))  # not ours: ignored
    assert pool.allocated == 2


def test_buffer_pool_still_bounds_memory() -> None:
    pool = BufferPool(2, 16)
    pool.take()
    pool.take()
    with pytest.raises(TimeoutError):
        pool.take(timeout=0.01)
    assert pool.allocated == 2


# -- GETs through the project's transport, kept alive (no httpcore on the fetch path) ----


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    ports: list[int] = []  # client port of each request

    def do_GET(self) -> None:
        self.ports.append(self.client_address[1])
        body = b"x" * (3 << 20) if self.path.endswith("/file") else b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def loopback() -> Iterator[tuple[str, list[int]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ports: list[int] = []
    _Handler.ports = ports
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", ports
    finally:
        server.shutdown()
        server.server_close()


def test_gets_read_to_the_end_reuse_one_connection(loopback: tuple[str, list[int]]) -> None:
    url, ports = loopback
    with httpx.Client(transport=DataTransport(), base_url=url) as c:
        for _ in range(3):
            assert c.get("/v2/images/x").json() == {"ok": True}
    assert len(ports) == 3 and len(set(ports)) == 1


def test_a_body_left_unread_closes_its_connection(loopback: tuple[str, list[int]]) -> None:
    url, ports = loopback
    with httpx.Client(transport=DataTransport(), base_url=url) as c:
        with c.stream("GET", "/v2/images/x/file") as resp:
            next(resp.iter_raw())  # one chunk of 3 MiB, then closed early
        assert c.get("/v2/images/x").json() == {"ok": True}
    assert len(ports) == 2 and ports[0] != ports[1]


def test_an_image_client_that_only_reads_never_loads_httpcore(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import json, sys
        from cowfleet.images.client import ImageClient
        with ImageClient(sys.argv[1], "t") as c:
            c.get("x")
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in
                                ("httpcore", "h11", "trio", "anyio"))))
        """
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Record)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        out = subprocess.run(
            [sys.executable, "-c", code, f"http://127.0.0.1:{server.server_address[1]}"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=tmp_path,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert json.loads(out.stdout) == []


class _Record(http.server.BaseHTTPRequestHandler):
    """An image record, as ``GET /v2/images/{id}`` answers it."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps(
            {"id": "x", "name": "x", "status": "active", "visibility": "private"}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass
