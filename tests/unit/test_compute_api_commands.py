"""``image precache`` and ``server image create`` go through the one compute API client.

Every request of both commands is sent by :class:`cowfleet.api.client.ComputeClient`
(here given a scripted transport: a command with an httpx client of its own would
never reach it), with the URL and token of the ``api_url``/``api_token``/
``api_token_file`` settings, and every fault maps to the exit codes of the client's
table (docs/exit-codes.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from cowfleet.api.client import ComputeClient
from cowfleet.cli.main import main

IMAGE = "0b8f1f6e-7d6c-4a47-9d5a-3c1e2b9a0f11"
SERVER = "5d0c1c52-2a4f-4f7e-9a53-7e8c3b1d2f60"
PRECACHE = ["image", "precache", IMAGE, "--all", "--no-wait", "--output", "json"]
SNAPSHOT = ["server", "image", "create", "--name", "snap", SERVER]
FAULTS = {
    401: "unauthorized",
    403: "forbidden",
    404: "itemNotFound",
    409: "conflictingRequest",
    413: "overLimit",
    422: "unprocessableEntity",
    500: "computeFault",
    503: "serviceUnavailable",
}
EXIT = {401: 2, 403: 2, 404: 4, 409: 5, 413: 6, 422: 6, 500: 8, 503: 8}


class Api:
    """A scripted compute API: the server exists; POSTs answer ``status``."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.method == "GET" and request.url.path == f"/v2.1/servers/{SERVER}":
            return httpx.Response(200, json={"server": {"id": SERVER, "name": "vm"}})
        if request.method != "POST":
            return httpx.Response(404, json={"itemNotFound": {"code": 404, "message": "no"}})
        if self.status == 202:
            if request.url.path.endswith("/action"):
                return httpx.Response(202, json={"image_id": IMAGE})
            doc = {"id": "p1", "image_id": IMAGE, "state": "done", "counts": {}, "nodes": []}
            return httpx.Response(202, json={"precache": doc})
        name = FAULTS[self.status]
        body = {name: {"code": self.status, "message": f"the API says {self.status}"}}
        return httpx.Response(self.status, json=body)


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[int], Api]:
    real = ComputeClient.__init__

    def install(status: int) -> Api:
        script = Api(status)

        def init(self: ComputeClient, url: str, token: str, **kw: Any) -> None:
            real(self, url, token, **{**kw, "transport": httpx.MockTransport(script)})

        monkeypatch.setattr(ComputeClient, "__init__", init)
        monkeypatch.setenv("COWFLEET_HOME", str(tmp_path / "home"))
        monkeypatch.delenv("COWFLEET_CONFIG", raising=False)
        monkeypatch.setenv("COWFLEET_API_URL", "http://api.test:8774")
        monkeypatch.setenv("COWFLEET_API_TOKEN", "admin-token")
        return script

    return install


@pytest.mark.parametrize("argv", [PRECACHE, SNAPSHOT], ids=["precache", "server-image-create"])
@pytest.mark.parametrize("status", sorted(EXIT))
def test_both_commands_map_faults_through_the_client(
    api: Callable[[int], Api],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    status: int,
) -> None:
    script = api(status)
    assert main(argv) == EXIT[status]
    err = capsys.readouterr().err
    assert f"the API says {status}" in err
    if status == 401:  # the client's own advice, whatever the command
        assert "check COWFLEET_API_TOKEN or the token file (--api-token-file)" in err
    assert script.requests, "the command did not use the compute API client"
    for req in script.requests:
        assert req.headers["User-Agent"] == "cowfleet-cli"
        assert req.headers["X-Auth-Token"] == "admin-token"


def test_server_image_create_sends_create_image_at_2_45_and_prints_the_id(
    api: Callable[[int], Api], capsys: pytest.CaptureFixture[str]
) -> None:
    script = api(202)
    assert main([*SNAPSHOT, "--property", "k=v"]) == 0
    assert capsys.readouterr().out.strip() == IMAGE
    post = script.requests[-1]
    assert post.url == f"http://api.test:8774/v2.1/servers/{SERVER}/action"
    assert post.headers["OpenStack-API-Version"] == "compute 2.45"
    assert json.loads(post.content) == {"createImage": {"name": "snap", "metadata": {"k": "v"}}}


@pytest.mark.parametrize("argv", [PRECACHE, SNAPSHOT], ids=["precache", "server-image-create"])
def test_both_commands_read_the_token_file_setting(
    api: Callable[[int], Api],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
) -> None:
    script = api(202)
    monkeypatch.delenv("COWFLEET_API_TOKEN")
    token = tmp_path / "token"
    token.write_text("from-the-file\n")
    token.chmod(0o600)
    assert main([*argv, "--api-token-file", str(token)]) == 0
    assert {r.headers["X-Auth-Token"] for r in script.requests} == {"from-the-file"}
    token.chmod(0o644)  # others can read it: refused, as for every compute API command
    assert main([*argv, "--api-token-file", str(token)]) == 2
    assert str(token) in capsys.readouterr().err
