"""The compute API client: Nova faults become the error tree, names resolve, pages follow."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from cowfleet.api.client import ComputeClient, endpoint_of
from cowfleet.errors import (
    BackendUnavailableError,
    ConflictError,
    NotFoundError,
    RemoteError,
    UsageError,
    ValidationError,
)


def _client(handler: Any) -> ComputeClient:
    return ComputeClient("http://api.test:8774", "tok", transport=httpx.MockTransport(handler))


def _fault(code: int, name: str, message: str) -> httpx.Response:
    return httpx.Response(code, json={name: {"code": code, "message": message}})


@pytest.mark.parametrize(
    ("code", "name", "error", "exit_code"),
    [
        (400, "badRequest", ValidationError, 6),
        (401, "unauthorized", UsageError, 2),
        (404, "itemNotFound", NotFoundError, 4),
        (409, "conflictingRequest", ConflictError, 5),
        (413, "overLimit", ValidationError, 6),
        (503, "serviceUnavailable", RemoteError, 8),
    ],
)
def test_a_nova_fault_becomes_its_error_with_the_api_message(
    code: int, name: str, error: type[Exception], exit_code: int
) -> None:
    api = _client(lambda req: _fault(code, name, "the API says why"))
    with api, pytest.raises(error) as info:
        api.delete_server("abc")
    assert "the API says why" in str(info.value)
    assert info.value.exit_code == exit_code  # type: ignore[attr-defined]


def test_the_token_and_microversion_go_with_every_request() -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(200, json={"hypervisors": []})

    with _client(handler) as api:
        assert api.hypervisors() == []
    assert seen[0].url == "http://api.test:8774/v2.1/os-hypervisors/detail"
    assert seen[0].headers["X-Auth-Token"] == "tok"
    assert seen[0].headers["OpenStack-API-Version"] == "compute 2.81"


def test_a_refused_connection_is_backend_unavailable() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    with _client(handler) as api, pytest.raises(BackendUnavailableError, match="unreachable"):
        api.servers()


def test_servers_by_name_follow_pages_and_refuse_ambiguity() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/servers/detail"):
            marker = req.url.params.get("marker")
            if marker is None:
                return httpx.Response(
                    200,
                    json={
                        "servers": [{"id": "2", "name": "web"}],
                        "servers_links": [{"rel": "next", "href": "x"}],
                    },
                )
            assert marker == "2"
            return httpx.Response(200, json={"servers": [{"id": "1", "name": "web"}]})
        return _fault(404, "itemNotFound", "Instance web could not be found.")

    with _client(handler) as api:
        assert [s["id"] for s in api.servers()] == ["2", "1"]
        with pytest.raises(ConflictError, match="more than one server is named 'web'"):
            api.find_server("web")


def test_no_token_and_a_bad_url_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="COWFLEET_API_TOKEN"):
        ComputeClient("http://api.test", "")
    with pytest.raises(UsageError, match="http://"):
        endpoint_of("api.test:8774")
    assert endpoint_of("http://h:1/v2.1/") == endpoint_of("http://h:1") == "http://h:1/v2.1"
