"""Fakes for the compute API's unit tests: the image service and node agents."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from cowfleet.api.app import create_app
from cowfleet.api.faults import ApiFault
from cowfleet.api.images import ImageInfo, ImageLookup
from cowfleet.api.nodes_client import NodeError, NodesClient
from cowfleet.api.settings import ApiSettings
from cowfleet.tokens import parse_tokens

ADMIN, MEMBER_A, MEMBER_B, NODE = (
    "admin-token-0123456789",
    "member-a-token-0123456789",
    "member-b-token-0123456789",
    "node-token-0123456789ab",
)
TOKENS = parse_tokens(
    f"""
[[token]]
token = "{ADMIN}"
project = "admin"
role = "admin"
[[token]]
token = "{MEMBER_A}"
project = "alpha"
role = "member"
[[token]]
token = "{MEMBER_B}"
project = "beta"
role = "member"
[[token]]
token = "{NODE}"
project = "service"
role = "node"
"""
)
IMAGE = "0b8f1f6e-7d6c-4a47-9d5a-3c1e2b9a0f11"
PRIVATE_B = "5f0c7e2a-1111-4c3b-8a9d-2e4f6a8b0c1d"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeImages(ImageLookup):
    """IMAGE is public; PRIVATE_B is visible to project beta only."""

    def __init__(self) -> None:
        self.images = {
            IMAGE: ImageInfo(IMAGE, "active", 0, 0, {}),
            PRIVATE_B: ImageInfo(PRIVATE_B, "active", 0, 0, {}),
        }

    def close(self) -> None:
        pass

    def get(self, image_id: str, token: str) -> ImageInfo:
        info = self.images.get(image_id)
        if info is None or (image_id == PRIVATE_B and token != MEMBER_B):
            raise ApiFault(400, f"Image {image_id} could not be found.")
        return info


class FakeNodes(NodesClient):
    """Node agents that build at once; ``failing`` URLs refuse, ``garbage`` ones babble."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.builds: list[tuple[str, dict[str, Any]]] = []
        self.deletes: list[tuple[str, str]] = []
        self.actions: list[tuple[str, str, str, str | None]] = []
        self.lock = threading.Lock()

    def close(self) -> None:
        pass

    def build(self, node_url: str, spec: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.builds.append((node_url, spec))
        if node_url in self.failing:
            raise NodeError(f"node at {node_url} refused the build: HTTP 500")
        return {"uuid": spec["uuid"], "state": "ACTIVE", "power_state": 1}

    def delete(self, node_url: str, uuid: str) -> bool:
        with self.lock:
            self.deletes.append((node_url, uuid))
        return True

    def action(self, node_url: str, uuid: str, action: str, kind: str | None = None) -> None:
        with self.lock:
            self.actions.append((node_url, uuid, action, kind))


@contextmanager
def api(
    tmp_path: Path, nodes: FakeNodes | None = None, **settings: Any
) -> Iterator[tuple[TestClient, Any, Clock]]:
    """The compute API over ``nodes`` (a :class:`FakeNodes` or a subclass; a new one by
    default), fake images and a stepped clock."""
    nodes, clock = nodes if nodes is not None else FakeNodes(), Clock()
    cfg = ApiSettings(
        database_url=f"sqlite:///{tmp_path / 'compute.sqlite'}",
        tokens_file=tmp_path / "tokens.toml",
        image_url="http://127.0.0.1:9",
        **settings,
    )
    app = create_app(cfg, TOKENS, sweep=False, images=FakeImages(), nodes=nodes, clock=clock)
    with TestClient(app) as client:
        yield client, nodes, clock


def headers(token: str = ADMIN, version: str = "2.81") -> dict[str, str]:
    return {"X-Auth-Token": token, "OpenStack-API-Version": f"compute {version}"}


def register(
    client: TestClient,
    hostname: str,
    *,
    vcpus: int = 8,
    ram_mb: int = 8192,
    disk_gb: int = 100,
    instances: list[dict[str, Any]] | None = None,
    cache: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    body = {
        "hostname": hostname,
        "url": f"http://{hostname}.test:8775",
        "hypervisor_type": "none",
        "vcpus": vcpus,
        "ram_mb": ram_mb,
        "disk_gb": disk_gb,
        "disk_free_gb": disk_gb,
        "cache": cache or [],
        "instances": instances or [],
        **extra,
    }
    resp = client.put(f"/internal/nodes/{hostname}", json=body, headers={"X-Auth-Token": NODE})
    assert resp.status_code == 200, resp.text
    doc: dict[str, Any] = resp.json()
    return doc


def wait_for(check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def create(client: TestClient, name: str = "vm", token: str = ADMIN, **server: Any) -> Any:
    body = {"name": name, "imageRef": IMAGE, "flavorRef": "1", "networks": "none", **server}
    return client.post("/v2.1/servers", json={"server": body}, headers=headers(token))


def status_of(client: TestClient, server_id: str, token: str = ADMIN) -> str:
    resp = client.get(f"/v2.1/servers/{server_id}", headers=headers(token))
    return (
        str(resp.json()["server"]["status"]) if resp.status_code == 200 else str(resp.status_code)
    )
