"""The data-plane transport is an ordinary httpx transport, used only where it fits."""

from __future__ import annotations

import httpx
import pytest

from cowfleet.fetch.buffers import BufferPool
from cowfleet.images import client as client_mod
from cowfleet.images.transport import DataTransport


def test_it_is_an_httpx_transport_and_other_methods_go_to_the_fallback() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        return httpx.Response(201, json={"ok": True})

    transport = DataTransport(fallback=httpx.MockTransport(handler))
    assert isinstance(transport, httpx.BaseTransport)
    with httpx.Client(transport=transport, base_url="http://127.0.0.1:9") as c:
        assert c.post("/x", json={}).status_code == 201
    assert seen == ["POST"]


def test_a_refused_connection_is_an_httpx_connect_error() -> None:
    with (
        httpx.Client(transport=DataTransport(), base_url="http://127.0.0.1:9") as c,
        pytest.raises(httpx.ConnectError),
    ):
        c.get("/v2/images/x/file")


@pytest.mark.parametrize(
    ("env", "proxied"),
    [
        ({}, False),
        ({"HTTP_PROXY": "http://proxy:3128"}, True),
        ({"HTTP_PROXY": "http://proxy:3128", "NO_PROXY": "images.example"}, False),
        ({"HTTPS_PROXY": "http://proxy:3128"}, False),  # another scheme
    ],
)
def test_a_proxy_for_the_endpoint_means_httpx_own_transport(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], proxied: bool
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert client_mod._proxied("http://images.example:9292") is proxied
    c = client_mod.ImageClient("http://images.example:9292")
    try:
        assert isinstance(c.data_transport, DataTransport) is not proxied
    finally:
        c.close()


def test_a_transport_given_by_the_caller_is_used_for_bodies_too() -> None:
    mock = httpx.MockTransport(lambda request: httpx.Response(200, content=iter([b"ab", b"c"])))
    with client_mod.ImageClient("http://images.example:9292", transport=mock) as c:
        assert c.data_transport is mock
        with c.open_download("x") as stream:
            assert b"".join(stream.iter_chunks()) == b"abc"


def test_buffers_given_back_are_reused_and_foreign_ones_ignored() -> None:
    pool = BufferPool(2, 16)
    a, b = pool.take(), pool.take()
    pool.give(memoryview(bytearray(16)))  # not ours
    pool.give(memoryview(a)[:3])
    assert pool.take(timeout=0.1) is a
    with pytest.raises(TimeoutError):
        pool.take(timeout=0.01)
    pool.give(memoryview(b))
    assert pool.take() is b
