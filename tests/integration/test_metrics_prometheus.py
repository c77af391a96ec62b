"""A real Prometheus server scrapes the whole fleet on loopback; PromQL checks the numbers.

``cowfleet serve images``, ``serve api`` and one ``serve node --driver none`` (127.0.0.2)
run with ``log_format = json`` and ``-v``; Debian's ``prometheus`` (started here with a
generated configuration, a temporary storage folder and a 1 s scrape interval) scrapes
the three ``/metrics`` without a token (each is bound to loopback). After a scripted
workload (an upload, a refused upload, two boots through the compute API, one boot no
host can take), PromQL queries over Prometheus's HTTP API return the expected values.
The same run checks the logs: every line is JSON, and the request id the caller gave
the compute API shows up in the API's, the node's and the image service's lines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import missing, require_program
from tests.fixtures._service import log_tail, stop_process
from tests.fixtures.compute_api import ComputeApi, server_body, write_tokens
from tests.fixtures.fleet import node_token_file
from tests.fixtures.images import ImageService, free_port
from tests.fixtures.node_agent import NodeAgent

pytestmark = pytest.mark.integration

ADMIN_TOKEN = "admin-token-" + "p" * 16
RAW = b"\1" * (2 << 20)
REQUEST_ID = "req-metrics-it-0001"
JSON_LOGS = {"COWFLEET_LOG_FORMAT": "json"}


def prometheus_binary() -> str:
    path = os.environ.get("COWFLEET_TEST_PROMETHEUS") or shutil.which("prometheus")
    if not path or not os.access(path, os.X_OK):
        missing("prometheus not installed (scripts/setup/prometheus.sh)")
        raise AssertionError("unreachable")
    return path


class VerboseImages(ImageService):
    def argv(self) -> list[str]:
        return [*super().argv(), "-v"]


class VerboseApi(ComputeApi):
    def argv(self) -> list[str]:
        return [*super().argv(), "-v"]


class Prometheus:
    """``prometheus`` on 127.0.0.1 scraping ``targets`` (job -> host:port) every second."""

    def __init__(self, root: Path, targets: dict[str, str]) -> None:
        self.root = root
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        jobs = "".join(
            f"  - job_name: {job}\n"
            f"    metrics_path: /metrics\n"
            f"    static_configs:\n"
            f"      - targets: ['{target}']\n"
            for job, target in targets.items()
        )
        self.config = root / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\nscrape_configs:\n" + jobs
        )
        self.log_path = root / "prometheus.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    prometheus_binary(),
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.wait(lambda: self._ready(), "prometheus ready", timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{log_tail(self.log_path)}")
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        doc = resp.json()
        assert resp.status_code == 200 and doc["status"] == "success", doc
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    def scalar(self, promql: str) -> float | None:
        """The one value ``promql`` gives now (None when it gives no series)."""
        result = self.query(promql)
        assert len(result) <= 1, f"{promql}: more than one series: {result}"
        return float(result[0]["value"][1]) if result else None

    def wait_value(self, promql: str, expected: float, timeout: float = 60) -> None:
        last: list[float | None] = [None]

        def check() -> bool:
            last[0] = self.scalar(promql)
            return last[0] == expected

        self.wait(check, f"{promql} == {expected} (last {last})", timeout)

    @staticmethod
    def wait(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.25)

    def stop(self) -> None:
        stop_process(self.proc, timeout=15.0)


class Fleet:
    def __init__(self, root: Path) -> None:
        tokens = write_tokens(root / "tokens.toml", ADMIN_TOKEN)
        self.images = VerboseImages(root / "images", tokens_file=tokens, settings=JSON_LOGS)
        self.images.start()
        self.images.token = ADMIN_TOKEN
        self.api = VerboseApi(
            root / "api",
            self.images.url,
            tokens,
            settings={**JSON_LOGS, "COWFLEET_API_HEARTBEAT_INTERVAL": "1"},
        )
        self.api.start()
        node_token = node_token_file(root)
        self.node = NodeAgent(
            root / "node-a",
            self.api.url,
            self.images.url,
            node_token,
            host="127.0.0.2",
            hostname="node-a",
            extra_env=dict(JSON_LOGS),
        )
        self.node.start()

    def compute(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"X-Auth-Token": ADMIN_TOKEN, **kw.pop("headers", {})}
        return httpx.request(
            method, f"{self.api.endpoint}{path}", headers=headers, timeout=30, **kw
        )

    def boot(self, name: str, flavor: str = "1", request_id: str | None = None) -> str:
        headers = {"X-Request-Id": request_id} if request_id else {}
        body = server_body(name, self.image_id, flavor)
        resp = self.compute("POST", "/servers", json=body, headers=headers)
        assert resp.status_code == 202, resp.text
        if request_id:
            assert resp.headers["x-openstack-request-id"] == request_id
        return str(resp.json()["server"]["id"])

    def wait_status(self, server_id: str, status: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.compute("GET", f"/servers/{server_id}").json()["server"]["status"]
            if last == status:
                return
            time.sleep(0.1)
        raise AssertionError(f"{server_id} not {status} (last {last})")

    def close(self) -> None:
        self.node.stop()
        self.api.stop()
        self.images.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    yield f
    f.close()


def backed_qcow2(tmp_path: Path) -> bytes:
    """A qcow2 image naming a backing file: the safety policy refuses it."""
    path = tmp_path / "backed.qcow2"
    subprocess.run(
        [require_program("qemu-img"), "create", "-q", "-f", "qcow2", "-F", "raw",
         "-b", "/etc/hostname", "-u", str(path), "1M"],
        check=True,
    )  # fmt: skip
    return path.read_bytes()


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a service's log, each parsed as JSON (a line that is not fails)."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{path} line {n} is not JSON: {line!r}") from None
    return out


def test_prometheus_scrapes_the_fleet_and_logs_follow_one_request(
    fleet: Fleet, tmp_path: Path
) -> None:
    prom = Prometheus(
        tmp_path / "prometheus",
        {
            "images": f"127.0.0.1:{fleet.images.port}",
            "api": f"127.0.0.1:{fleet.api.port}",
            "node": f"{fleet.node.host}:{fleet.node.port}",
        },
    )
    try:
        # -- workload --------------------------------------------------------------
        fleet.image_id = fleet.images.upload("cirros", RAW, visibility="public")
        refused = httpx.post(
            f"{fleet.images.url}/v2/images",
            headers=fleet.images.headers,
            json={"name": "backed", "disk_format": "qcow2", "container_format": "bare"},
            timeout=30,
        ).json()["id"]
        put = httpx.put(
            f"{fleet.images.url}/v2/images/{refused}/file",
            headers={**fleet.images.headers, "Content-Type": "application/octet-stream"},
            content=backed_qcow2(tmp_path),
            timeout=30,
        )
        assert put.status_code == 415, put.text
        first = fleet.boot("vm1", request_id=REQUEST_ID)
        fleet.wait_status(first, "ACTIVE")
        second = fleet.boot("vm2")
        fleet.wait_status(second, "ACTIVE")
        too_big = fleet.boot("vm3", flavor="5")  # m1.xlarge: more RAM than the node has
        fleet.wait_status(too_big, "ERROR")

        # -- PromQL ----------------------------------------------------------------
        for job in ("images", "api", "node"):
            prom.wait_value(f'up{{job="{job}"}}', 1)
        prom.wait_value('cowfleet_fetch_bytes_total{job="node",source="origin"}', len(RAW))
        prom.wait_value('cowfleet_fetch_bytes_total{job="node",source="peer"}', 0)
        prom.wait_value('cowfleet_fetch_duration_seconds_count{source="origin"}', 1)
        prom.wait_value('cowfleet_cache_misses_total{job="node"}', 1)
        prom.wait_value('cowfleet_cache_hits_total{job="node"}', 1)
        prom.wait_value('cowfleet_cache_bases{job="node",state="verified"}', 1)
        prom.wait_value('cowfleet_cache_bytes{job="node",state="verified"}', len(RAW))
        for phase in ("fetch", "disks", "hypervisor"):
            prom.wait_value(f'cowfleet_build_phase_duration_seconds_count{{phase="{phase}"}}', 2)
        prom.wait_value('cowfleet_scheduler_decisions_total{outcome="placed"}', 2)
        prom.wait_value('cowfleet_scheduler_decisions_total{outcome="no_valid_host"}', 1)
        prom.wait_value('cowfleet_upload_refusals_total{failure="backing-file"}', 1)
        prom.wait_value(
            'sum(cowfleet_http_requests_total{job="api",route="/v2.1/servers",'
            'method="POST",status="202"})',
            3,
        )
        prom.wait_value(
            'sum(cowfleet_http_requests_total{job="node",route="/v1/servers/{uuid}",method="PUT"})',
            2,
        )
        prom.wait_value(
            'sum(cowfleet_http_requests_total{job="images",route="/v2/images/{image_id}/file",'
            'method="GET",status="200"})',
            1,
        )
        prom.wait_value('count(cowfleet_node_heartbeat_age_seconds{node="node-a"} < 10)', 1)
        age = prom.scalar('cowfleet_node_heartbeat_age_seconds{node="node-a"}')
        assert age is not None and 0 <= age < 10
    finally:
        prom.stop()

    # -- logs: JSON lines, one request id across the three services -------------------
    fleet.node.stop()
    fleet.api.stop()
    fleet.images.stop()
    logs = {
        "api": json_lines(fleet.api.log_path),
        "node": json_lines(fleet.node.log_path),
        "images": json_lines(fleet.images.log_path),
    }
    for service, records in logs.items():
        mine = [r for r in records if r.get("request_id") == REQUEST_ID]
        assert mine, f"no {service} log line carries {REQUEST_ID}"
        assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    api_msgs = [r["message"] for r in logs["api"] if r.get("request_id") == REQUEST_ID]
    assert any("placed on node-a" in m for m in api_msgs), api_msgs
    node_msgs = [r["message"] for r in logs["node"] if r.get("request_id") == REQUEST_ID]
    assert any(m.startswith(f"build {first} queued") for m in node_msgs), node_msgs
    assert any(m.startswith(f"PUT /v1/servers/{first} 202") for m in node_msgs), node_msgs
    image_msgs = [r["message"] for r in logs["images"] if r.get("request_id") == REQUEST_ID]
    assert any(m.startswith(f"GET /v2/images/{fleet.image_id}/file 200") for m in image_msgs), (
        image_msgs
    )
