"""``cowfleet image`` in-process, with the client on an httpx.MockTransport."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from cowfleet.cli import image as image_cli
from cowfleet.cli.main import main
from cowfleet.images.client import ImageClient

IID = "11111111-2222-4333-8444-555555555555"


def record(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": IID,
        "name": "img",
        "status": "queued",
        "disk_format": "qcow2",
        "container_format": "bare",
        "size": None,
        "virtual_size": None,
        "checksum": None,
        "os_hash_algo": None,
        "os_hash_value": None,
        "min_disk": 0,
        "min_ram": 0,
        "visibility": "shared",
        "protected": False,
        "owner": None,
        "created_at": "t",
        "updated_at": "t",
    }
    base.update(over)
    return base


@pytest.fixture
def requests(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> list[httpx.Request]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST":
            body = json.loads(request.content)
            return httpx.Response(201, json=record(**body))
        if request.url.path == "/v2/images":
            name = request.url.params.get("name")
            return httpx.Response(200, json={"images": [record()] if name == "img" else []})
        return httpx.Response(200, json=record())

    monkeypatch.setattr(
        image_cli,
        "client_factory",
        lambda cfg: ImageClient("http://svc", transport=httpx.MockTransport(handler)),
    )
    monkeypatch.setenv("COWFLEET_HOME", str(tmp_path))
    return seen


def test_create_sends_fields_and_properties(
    requests: list[httpx.Request], capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        [
            "image",
            "create",
            "--name",
            "n",
            "--disk-format",
            "qcow2",
            "--min-disk",
            "2",
            "--property",
            "kernel_id=k",
            "--property",
            "os_type=linux",
            "-o",
            "json",
        ]
    )
    assert rc == 0
    body = json.loads(requests[0].content)
    assert body == {
        "name": "n",
        "disk_format": "qcow2",
        "container_format": "bare",
        "min_disk": 2,
        "kernel_id": "k",
        "os_type": "linux",
    }
    out = json.loads(capsys.readouterr().out)
    assert out["properties"] == {"kernel_id": "k", "os_type": "linux"}


def test_show_by_name_and_human_table(
    requests: list[httpx.Request], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["image", "show", "img"]) == 0
    out = capsys.readouterr().out
    assert "Field" in out and IID in out and "qcow2" in out


def test_unknown_name_exits_not_found(
    requests: list[httpx.Request], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["image", "show", "nope"]) == 4
    assert "no image with id or name 'nope'" in capsys.readouterr().err


def test_bad_property_and_empty_set_are_usage_errors(
    requests: list[httpx.Request], capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["image", "create", "--name", "n", "--disk-format", "raw", "--property", "novalue"])
        == 2
    )
    assert main(["image", "set", "img"]) == 2
    assert requests == []  # refused before anything was sent


def test_download_to_a_folder_or_missing_parent_fails_before_any_request(
    requests: list[httpx.Request], capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    assert main(["image", "download", "img", "--file", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["image", "download", "img", "--file", str(tmp_path / "no" / "img")]) == 2
    assert "no" in capsys.readouterr().err
    assert requests == []  # nothing was asked of the service


def test_download_refuses_a_symlink_at_the_destination(
    requests: list[httpx.Request], capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "img").symlink_to(victim)
    assert main(["image", "download", "img", "--file", str(tmp_path / "img")]) == 2
    assert "refusing to follow symlink" in capsys.readouterr().err
    assert victim.read_bytes() == b"keep" and requests == []
