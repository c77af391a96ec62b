"""Shared plumbing for the fleet benchmarks: image service, compute API(s), node agents.

Everything is a real process on loopback, started with the test fixtures' classes:
``cowfleet serve images --tokens-file`` (one tokens file shared with the API),
``cowfleet serve api`` (one or more replicas on one database), and N
``cowfleet serve node --driver none`` on 127.0.0.2, 127.0.0.3, ... The node agents
fetch images through a :class:`CountingProxy`, which counts the downloads the image
service serves (the API's own image look-ups go straight to the service).
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fixtures.compute_api import NODE_TOKEN, ComputeApi, write_tokens  # noqa: E402
from tests.fixtures.images import ImageService  # noqa: E402
from tests.fixtures.node_agent import CountingProxy, NodeAgent  # noqa: E402

ADMIN_TOKEN = "bench-admin-token-" + "a" * 16
MICROVERSION = "compute 2.81"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command: state(0) ... utime(11) stime(12).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def parse_ts(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC).timestamp()


def pct(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values``, nearest rank."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"p50 {statistics.median(values):.2f} s, p99 {pct(values, 0.99):.2f} s"


@dataclass
class Fleet:
    """Image service + proxy + API replica(s) + node agents, under one work directory."""

    root: Path
    agents_n: int
    capacity: tuple[int, int, int]  # vcpus, ram_mb, disk_gb offered by each agent
    api_settings: dict[str, str] = field(default_factory=dict)
    database: str | None = None
    replicas: int = 1
    node_env: dict[str, str] = field(default_factory=dict)
    # Per agent, when they differ (else ``capacity`` for every agent).
    capacities: list[tuple[int, int, int]] = field(default_factory=list)
    images: ImageService | None = None
    proxy: CountingProxy | None = None
    apis: list[ComputeApi] = field(default_factory=list)
    agents: list[NodeAgent] = field(default_factory=list)
    tokens: Path | None = None

    # -- the shared image service (kept across fleets of one run) --------------------

    @staticmethod
    def image_service(root: Path) -> tuple[ImageService, Path]:
        tokens = write_tokens(root / "tokens.toml", ADMIN_TOKEN)
        svc = ImageService(
            root / "images",
            tokens_file=tokens,
            settings={
                "COWFLEET_IMAGES_DIRECT_IO": "false",
                "COWFLEET_IMAGES_CACHE_MIN_USES": "1",
            },
        )
        svc.start()
        svc.token = ADMIN_TOKEN
        return svc, tokens

    def start(self, images: ImageService, tokens: Path, proxy: CountingProxy) -> Fleet:
        self.images, self.tokens, self.proxy = images, tokens, proxy
        settings = {
            "COWFLEET_API_HEARTBEAT_INTERVAL": "2",
            "COWFLEET_API_NODE_DOWN_AFTER": "60",
            **self.api_settings,
        }
        for i in range(self.replicas):
            api = ComputeApi(
                self.root / f"api-{i}", images.url, tokens, database=self.database,
                settings=settings,
            )  # fmt: skip
            api.start()
            self.apis.append(api)
        node_token = self.root / "node-token"
        node_token.write_text(NODE_TOKEN + "\n")
        node_token.chmod(0o600)
        for i in range(self.agents_n):
            agent = NodeAgent(
                self.root / f"node-{i}",
                self.apis[i % self.replicas].url,
                proxy.url,
                node_token,
                host=f"127.0.0.{i + 2}",
                hostname=f"node-{i:02d}",
                capacity=self.capacities[i] if self.capacities else self.capacity,
                extra_env=self.node_env,
            )
            agent.start()
            self.agents.append(agent)
        deadline = time.monotonic() + 60
        while len(self.hypervisors()) < self.agents_n:
            if time.monotonic() > deadline:
                raise SystemExit("not every node agent registered with the API in 60 s")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        for api in self.apis:
            api.stop()

    # -- calls -----------------------------------------------------------------------

    def api_pid(self, i: int = 0) -> int:
        proc = self.apis[i].proc
        assert proc is not None
        return proc.pid

    def client(self) -> httpx.Client:
        return httpx.Client(
            headers={"X-Auth-Token": ADMIN_TOKEN, "OpenStack-API-Version": MICROVERSION},
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
            timeout=300,
        )

    def hypervisors(self) -> list[dict[str, Any]]:
        with self.client() as c:
            resp = c.get(f"{self.apis[0].endpoint}/os-hypervisors/detail")
        hv: list[dict[str, Any]] = resp.json().get("hypervisors", [])
        return hv

    def servers(self, c: httpx.Client, replica: int = 0) -> list[dict[str, Any]]:
        """Every server (all projects), following the pages."""
        out: list[dict[str, Any]] = []
        url: str | None = f"{self.apis[replica].endpoint}/servers/detail?all_tenants=1"
        while url:
            doc = c.get(url).json()
            out += doc["servers"]
            url = next((ln["href"] for ln in doc.get("servers_links", ())), None)
        return out

    def wait_settled(
        self, c: httpx.Client, want: int, timeout: float, poll: float = 1.0
    ) -> list[dict[str, Any]]:
        """Poll (every ``poll`` s, a light load) until ``want`` servers are out of BUILD."""
        deadline = time.monotonic() + timeout
        while True:
            servers = self.servers(c)
            if len(servers) >= want and all(s["status"] != "BUILD" for s in servers):
                return servers
            if time.monotonic() > deadline:
                counts: dict[str, int] = {}
                for s in servers:
                    counts[s["status"]] = counts.get(s["status"], 0) + 1
                raise SystemExit(f"servers not settled in {timeout:.0f} s: {counts}")
            time.sleep(poll)


@contextmanager
def shared_services(root: Path) -> Iterator[tuple[ImageService, Path, CountingProxy]]:
    """The image service (tokens file shared with the APIs) and the counting proxy."""
    images, tokens = Fleet.image_service(root)
    proxy = CountingProxy(images.url)
    try:
        yield images, tokens, proxy
    finally:
        proxy.close()
        images.stop()


def create_body(name: str, image_id: str, flavor: str = "1", count: int = 1) -> dict[str, Any]:
    server: dict[str, Any] = {
        "name": name,
        "imageRef": image_id,
        "flavorRef": flavor,
        "networks": "none",
    }
    if count > 1:
        server.update(min_count=1, max_count=count)
    return {"server": server}


def concurrent_posts(
    urls: list[str], bodies: list[dict[str, Any]], clients: int = 64
) -> list[tuple[int, float, float]]:
    """POST ``bodies[i]`` to ``urls[i]``, all at once from ``clients`` threads.

    Each answer as (status, wall-clock send time, seconds the POST took).
    """
    out: list[tuple[int, float, float] | None] = [None] * len(bodies)
    gate = threading.Barrier(min(clients, len(bodies)))
    lock = threading.Lock()
    nxt = [0]

    def worker() -> None:
        with httpx.Client(
            headers={"X-Auth-Token": ADMIN_TOKEN, "OpenStack-API-Version": MICROVERSION},
            timeout=300,
        ) as c:
            gate.wait()
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= len(bodies):
                    return
                t = time.time()
                t0 = time.perf_counter()
                resp = c.post(urls[i], json=bodies[i])
                out[i] = (resp.status_code, t, time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(min(clients, len(bodies)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [o if o is not None else (0, 0.0, 0.0) for o in out]
