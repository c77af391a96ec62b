"""``cowfleet image precache`` against a scripted compute API (httpx MockTransport)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from cowfleet.api.client import ComputeClient
from cowfleet.cli import precache as cli
from cowfleet.cli.main import main
from cowfleet.errors import NotFoundError, TimeoutError_, UsageError, ValidationError

IMAGE = "0b8f1f6e-7d6c-4a47-9d5a-3c1e2b9a0f11"


def _doc(state: str, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    counts = {s: sum(n["state"] == s for n in nodes) for s in cli.pc.STATES}
    return {"id": "p1", "image_id": IMAGE, "state": state, "counts": counts, "nodes": nodes}


def _node(host: str, state: str, error: str | None = None) -> dict[str, Any]:
    return {
        "host": host,
        "state": state,
        "bytes_done": 10 if state == "cached" else 3,
        "bytes_total": 10,
        "rate": 0.0 if state == "cached" else 7.0,
        "source": "origin" if state != "skipped" else None,
        "error": error,
        "updated_at": 1.0,
    }


class Script:
    """POST answers the first document; each GET the next one."""

    def __init__(self, docs: list[dict[str, Any]], post_status: int = 202) -> None:
        self.docs = docs
        self.post_status = post_status
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.method == "POST":
            if self.post_status != 202:
                return httpx.Response(
                    self.post_status,
                    json={"badRequest": {"code": self.post_status, "message": "Image x is queued"}},
                )
            return httpx.Response(202, json={"precache": self.docs[0]})
        doc = self.docs[min(len(self.requests) - 1, len(self.docs) - 1)]
        return httpx.Response(200, json={"precache": doc})


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Any:
    real = ComputeClient.__init__

    def install(script: Script) -> Script:
        def init(self: ComputeClient, url: str, token: str, **kw: Any) -> None:
            real(self, url, token, **{**kw, "transport": httpx.MockTransport(script)})

        monkeypatch.setattr(ComputeClient, "__init__", init)
        monkeypatch.setattr(cli.time, "sleep", lambda _s: None)
        monkeypatch.setenv("COWFLEET_API_URL", "http://api.test:8774")
        monkeypatch.setenv("COWFLEET_API_TOKEN", "admin-token")
        return script

    return install


def test_waits_for_the_end_prints_json_and_exits_8_when_a_node_failed(
    scripted: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    script = scripted(
        Script(
            [
                _doc("running", [_node("a", "queued"), _node("b", "queued")]),
                _doc("running", [_node("a", "fetching"), _node("b", "fetching")]),
                _doc("failed", [_node("a", "cached"), _node("b", "failed", "IntegrityError: x")]),
            ]
        )
    )
    rc = main(["image", "precache", IMAGE, "--host", "a", "--host", "b", "--output", "json"])
    assert rc == 8
    rows = json.loads(capsys.readouterr().out)
    assert rows == [
        {
            "host": "a",
            "state": "cached",
            "bytes_done": 10,
            "bytes_total": 10,
            "source": "origin",
            "error": None,
        },
        {
            "host": "b",
            "state": "failed",
            "bytes_done": 3,
            "bytes_total": 10,
            "source": "origin",
            "error": "IntegrityError: x",
        },
    ]
    post = script.requests[0]
    assert post.url == "http://api.test:8774/v2.1/cowfleet/precache"
    assert json.loads(post.content) == {"image_id": IMAGE, "hosts": ["a", "b"]}
    assert post.headers["x-auth-token"] == "admin-token"


def test_skipped_is_no_failure_and_watch_draws_the_table(
    scripted: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted(
        Script(
            [
                _doc("running", [_node("a", "fetching"), _node("c", "skipped", "node c is down")]),
                _doc("done", [_node("a", "cached"), _node("c", "skipped", "node c is down")]),
            ]
        )
    )
    assert main(["image", "precache", IMAGE, "--aggregate", "rack1", "--watch"]) == 0
    out = capsys.readouterr().out
    assert "cached" in out and "node c is down" in out


def test_bad_input_maps_to_exit_codes(scripted: Any, capsys: pytest.CaptureFixture[str]) -> None:
    scripted(Script([], post_status=400))
    assert main(["image", "precache", IMAGE, "--all"]) == ValidationError.exit_code
    assert "Image x is queued" in capsys.readouterr().err
    scripted(Script([], post_status=404))
    assert main(["image", "precache", IMAGE, "--all"]) == NotFoundError.exit_code
    scripted(Script([], post_status=403))
    assert main(["image", "precache", IMAGE, "--all"]) == UsageError.exit_code


def test_needs_a_target_an_api_and_a_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("COWFLEET_API_URL", raising=False)
    monkeypatch.delenv("COWFLEET_API_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["image", "precache", IMAGE])
    assert exc.value.code == 2
    assert main(["image", "precache", IMAGE, "--all"]) == 2
    assert "COWFLEET_API_URL" in capsys.readouterr().err
    assert main(["image", "precache", IMAGE, "--all", "--api-url", "http://x"]) == 2
    assert "COWFLEET_API_TOKEN" in capsys.readouterr().err


def test_follow_gives_up_at_the_deadline() -> None:
    doc = _doc("running", [_node("a", "fetching")])
    api = ComputeClient("http://api.test", "t", transport=httpx.MockTransport(Script([doc, doc])))
    ticks = iter(range(100))
    with pytest.raises(TimeoutError_):
        cli.follow(api, doc, timeout=3, monotonic=lambda: float(next(ticks)), sleep=lambda _s: None)
