"""`cowfleet doctor` against a real image service and compute API on loopback.

A node configuration (driver none, its node token) passes every check; a file in
`_base` that no cache metadata explains makes it exit 11 naming that file; a token
the API does not hold fails the API check; a stopped API fails it too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.compute_api import NODE_TOKEN, ComputeApi, write_tokens
from tests.fixtures.images import ImageService

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "admin-token-" + "d" * 16


@dataclass
class Services:
    root: Path
    images: ImageService
    api: ComputeApi
    token_file: Path

    def doctor(self, instances: Path, *extra: str, token_file: Path | None = None) -> Any:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
        env["COWFLEET_HOME"] = str(self.root / "home")
        argv = [
            sys.executable,
            "-m",
            "cowfleet",
            "doctor",
            "--output",
            "json",
            "--driver",
            "none",
            "--api-url",
            self.api.url,
            "--token-file",
            str(token_file or self.token_file),
            "--image-url",
            self.images.url,
            "--instances-path",
            str(instances),
            *extra,
        ]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert done.stdout, done.stderr
        return done.returncode, json.loads(done.stdout)


@pytest.fixture
def services(
    tmp_path: Path, image_service_factory: Callable[..., ImageService]
) -> Iterator[Services]:
    tokens = write_tokens(tmp_path / "tokens.toml", ADMIN_TOKEN)
    images = image_service_factory(tokens_file=tokens)
    api = ComputeApi(tmp_path / "api", images.url, tokens)
    api.start()
    token_file = tmp_path / "node-token"
    token_file.write_text(NODE_TOKEN + "\n")
    token_file.chmod(0o600)
    try:
        yield Services(tmp_path, images, api, token_file)
    finally:
        api.stop()


def _by_check(doc: Any) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for f in doc["findings"]:
        out.setdefault(f["check"], []).append(f)
    return out


def test_doctor_passes_a_healthy_node_then_names_an_unexplained_base_file(
    services: Services, tmp_path: Path
) -> None:
    instances = tmp_path / "instances"
    (instances / "_base").mkdir(parents=True)
    rc, doc = services.doctor(instances)
    found = _by_check(doc)
    assert rc == 0, [f for f in doc["findings"] if f["verdict"] == "fail"]
    assert doc["ok"] is True
    assert found["api"][0]["verdict"] == "ok"
    assert found["images"][0]["verdict"] == "ok"
    assert found["clock"][0]["verdict"] == "ok"  # same host: no skew
    assert found["qemu-img"][0]["verdict"] == "ok" and found["qemu-img"][0]["detail"]["version"]

    planted = instances / "_base" / "left-by-someone.img"
    planted.write_bytes(b"\0" * 4096)
    rc, doc = services.doctor(instances)
    assert rc == 11 and doc["exit_code"] == 11 and doc["ok"] is False
    failed = [f for f in doc["findings"] if f["verdict"] == "fail"]
    assert [f["check"] for f in failed] == ["base-files"]
    assert str(planted) in failed[0]["message"] and failed[0]["fix"]

    # the human output says the same, on stdout, with the fix
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    human = subprocess.run(
        [
            sys.executable, "-m", "cowfleet", "doctor", "--driver", "none",
            "--api-url", services.api.url, "--token-file", str(services.token_file),
            "--image-url", services.images.url, "--instances-path", str(instances),
        ],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert human.returncode == 11
    assert "FAIL  base-files" in human.stdout and "left-by-someone.img" in human.stdout
    assert "this node needs fixing" in human.stderr


def test_doctor_fails_a_token_the_api_refuses_and_an_api_that_is_down(
    services: Services, tmp_path: Path
) -> None:
    instances = tmp_path / "instances"
    (instances / "_base").mkdir(parents=True)
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-a-known-token-0000\n")
    wrong.chmod(0o600)
    rc, doc = services.doctor(instances, token_file=wrong)
    found = _by_check(doc)
    assert rc == 11
    assert found["api"][0]["verdict"] == "fail" and "401" in found["api"][0]["message"]
    assert found["images"][0]["verdict"] == "fail"

    services.api.stop()
    rc, doc = services.doctor(instances)
    found = _by_check(doc)
    assert rc == 11 and found["api"][0]["verdict"] == "fail"
    assert "does not answer" in found["api"][0]["message"]
    assert found["images"][0]["verdict"] == "ok"
