"""Prometheus metrics: every family cowfleet exports, and the ``/metrics`` endpoint.

Each service builds its own object (:class:`NodeMetrics`, :class:`ApiMetrics`,
:class:`ImageMetrics`) holding its own :class:`~prometheus_client.CollectorRegistry`,
never the library's global one, so several services in one process (tests) keep their
numbers apart. Call sites get the object injected and call one method; ``None`` means
"no metrics" (the CLI's one-shot commands). Gauges that describe state (bases by state,
heartbeat age) are read at scrape time by a collector, so they cannot drift.

:class:`MetricsEndpoint` is a pure ASGI middleware that answers ``GET /metrics`` and,
when given an :class:`HttpMetrics`, counts every other request by route template
(never the raw path), method and status. docs/metrics.md lists every family.

Access (:func:`metrics_open`): without a token only when the service is bound to
loopback or the ``metrics_public`` setting says so; otherwise the service's own token
check applies (401 without it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool

log = logging.getLogger(__name__)

PATH = "/metrics"
FETCH_SOURCES = ("origin", "peer")
BUILD_PHASES = ("fetch", "disks", "hypervisor")


def source_label(name: str) -> str:
    """The metrics label of a fetch source: ``origin``, or ``peer`` for any peer host."""
    return "origin" if name == "origin" else "peer"


PLACED, NO_VALID_HOST = "placed", "no_valid_host"
UNMATCHED = "unmatched"  # the route label of a request no route matched

# Buckets: HTTP requests are milliseconds to seconds; fetches and builds seconds to an hour.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LONG_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)


def is_loopback(host: str) -> bool:
    """Whether a bind address is loopback only (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def metrics_open(bind_host: str, public: bool) -> bool:
    """Whether ``/metrics`` answers without a token (see the module docstring)."""
    return public or is_loopback(bind_host)


class HttpMetrics:
    """Requests of one HTTP service, by route template, method and status."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "cowfleet_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "cowfleet_http_request_duration_seconds",
            "time to answer an HTTP request, by route template and method",
            ["route", "method"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.seconds.labels(route, method).observe(seconds)


# -- node -------------------------------------------------------------------------


def clean_reason(action: str, kind: str, reason: str) -> str:
    """A small fixed label for why a clean pass removed or quarantined a file.

    The report's reason is prose with ages and sizes in it; a label must not be.
    """
    if action == "quarantine":
        return "failed_verification"
    if kind == "temp":
        return "temp_left_behind"
    if kind in ("part", "converted"):
        return "abandoned_download"
    if reason.startswith("over the budget"):
        return "over_budget"
    return "unused"


class CacheCollector(Collector):
    """Bases of one ``_base`` by state, with their bytes, read from the cache's own
    metadata at scrape time: ``verified``/``failed`` (the per-base records),
    ``fetching`` (a ``.part`` with a resume record) and ``quarantined``."""

    def __init__(self, instances_path: Path) -> None:
        from cowfleet.cache.layout import Layout

        self.layout = Layout(instances_path)

    def states(self) -> dict[str, tuple[int, int]]:
        from cowfleet.cache import metadata as md

        counts: dict[str, list[int]] = {
            s: [0, 0] for s in ("verified", "failed", "fetching", "quarantined")
        }
        meta_dir = self.layout.meta_dir
        try:
            names = os.listdir(meta_dir)
        except OSError:
            names = []
        for name in names:
            if name.endswith(".part.json"):
                part = self.layout.base_dir / name[: -len(".json")]
                try:
                    size = os.stat(part).st_size
                except OSError:
                    continue
                counts["fetching"][0] += 1
                counts["fetching"][1] += size
            elif name.endswith(".json") and not name.endswith(".failed.json"):
                meta = md.read_meta(meta_dir / name)
                if meta is None:
                    continue
                slot = counts.setdefault(meta.state, [0, 0])
                slot[0] += 1
                slot[1] += meta.file_size
        try:
            quarantined = [n for n in os.listdir(self.layout.quarantine_dir)]
        except OSError:
            quarantined = []
        for name in quarantined:
            if name.endswith(".json"):
                continue
            try:
                size = os.stat(self.layout.quarantine_dir / name).st_size
            except OSError:
                continue
            counts["quarantined"][0] += 1
            counts["quarantined"][1] += size
        return {k: (v[0], v[1]) for k, v in counts.items()}

    def collect(self) -> Iterable[Metric]:
        bases = GaugeMetricFamily(
            "cowfleet_cache_bases", "bases in _base by state", labels=["state"]
        )
        sizes = GaugeMetricFamily(
            "cowfleet_cache_bytes", "bytes of the bases in _base by state", labels=["state"]
        )
        for state, (n, size) in sorted(self.states().items()):
            bases.add_metric([state], n)
            sizes.add_metric([state], size)
        yield bases
        yield sizes

    def describe(self) -> Iterable[Metric]:
        return []


class NodeMetrics:
    """The node agent's families (fetches, cache, cleaning, builds, HTTP)."""

    def __init__(self, instances_path: Path | None = None) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.http = HttpMetrics(r)
        self.fetch_bytes = Counter(
            "cowfleet_fetch_bytes", "bytes fetched into _base, by source", ["source"], registry=r
        )
        self.fetch_seconds = Histogram(
            "cowfleet_fetch_duration_seconds",
            "time to fetch and verify one base, by source",
            ["source"],
            buckets=LONG_BUCKETS,
            registry=r,
        )
        self.hits = Counter("cowfleet_cache_hits", "lookups served from _base", registry=r)
        self.misses = Counter(
            "cowfleet_cache_misses", "lookups that had to fetch the image", registry=r
        )
        self.quarantines = Counter(
            "cowfleet_cache_quarantines",
            "bases moved to quarantine, by reason",
            ["reason"],
            registry=r,
        )
        self.removals = Counter(
            "cowfleet_cache_removals",
            "files the clean pass removed, by reason",
            ["reason"],
            registry=r,
        )
        self.removed_bytes = Counter(
            "cowfleet_cache_removed_bytes",
            "bytes the clean pass freed, by reason",
            ["reason"],
            registry=r,
        )
        self.build_seconds = Histogram(
            "cowfleet_build_phase_duration_seconds",
            "time of one phase of a server build (fetch, disks, hypervisor)",
            ["phase"],
            buckets=LONG_BUCKETS,
            registry=r,
        )
        for source in FETCH_SOURCES:  # present from the start: rate() needs a zero
            self.fetch_bytes.labels(source)
            self.fetch_seconds.labels(source)
        for phase in BUILD_PHASES:
            self.build_seconds.labels(phase)
        if instances_path is not None:
            r.register(CacheCollector(instances_path))

    def hit(self) -> None:
        self.hits.inc()

    def fetched(self, source: str, nbytes: int, seconds: float) -> None:
        """A miss that fetched ``nbytes`` from ``source`` (origin or peer) in ``seconds``."""
        self.misses.inc()
        self.fetch_bytes.labels(source).inc(nbytes)
        self.fetch_seconds.labels(source).observe(seconds)

    def fetched_from(self, by_source: Mapping[str, int], main: str, seconds: float) -> None:
        """A miss fed by several sources: ``by_source`` maps "origin" or a peer's
        hostname to the bytes it sent; each counts under its own label (``origin`` or
        ``peer``), the fetch's time under the label of ``main`` (who sent the most)."""
        self.misses.inc()
        for name, nbytes in by_source.items():
            if nbytes > 0:
                self.fetch_bytes.labels(source_label(name)).inc(nbytes)
        self.fetch_seconds.labels(source_label(main)).observe(seconds)

    def phase(self, phase: str, seconds: float) -> None:
        self.build_seconds.labels(phase).observe(seconds)

    def cleaned(self, decisions: Iterable[Any]) -> None:
        """Count what a clean pass did (its report's decisions that were carried out)."""
        for d in decisions:
            if not d.done or d.action not in ("remove", "quarantine"):
                continue
            reason = clean_reason(d.action, d.kind, d.reason)
            if d.action == "quarantine":
                self.quarantines.labels(reason).inc()
            else:
                self.removals.labels(reason).inc()
                self.removed_bytes.labels(reason).inc(d.allocated)


# -- compute API ------------------------------------------------------------------


class HeartbeatCollector(Collector):
    """Seconds since each node's last heartbeat, read from the API's database."""

    def __init__(
        self, heartbeats: Callable[[], Iterable[tuple[str, float]]], clock: Callable[[], float]
    ) -> None:
        self.heartbeats = heartbeats
        self.clock = clock

    def collect(self) -> Iterable[Metric]:
        age = GaugeMetricFamily(
            "cowfleet_node_heartbeat_age_seconds",
            "seconds since the node's last heartbeat",
            labels=["node"],
        )
        now = self.clock()
        try:
            rows = list(self.heartbeats())
        except Exception as exc:  # a scrape must not fail on a database hiccup
            log.warning("metrics: cannot read heartbeats: %s", exc)
            rows = []
        for node, last in rows:
            age.add_metric([node], max(now - last, 0.0))
        yield age

    def describe(self) -> Iterable[Metric]:
        return []


class ApiMetrics:
    """The compute API's families (HTTP, scheduler, heartbeats, pre-cache progress)."""

    def __init__(
        self,
        heartbeats: Callable[[], Iterable[tuple[str, float]]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.http = HttpMetrics(r)
        self.decisions = Counter(
            "cowfleet_scheduler_decisions",
            "scheduler decisions, by outcome (placed, no_valid_host)",
            ["outcome"],
            registry=r,
        )
        for outcome in (PLACED, NO_VALID_HOST):
            self.decisions.labels(outcome)
        self.precache_done = Gauge(
            "cowfleet_precache_bytes_done",
            "bytes of an image a node has pre-cached so far",
            ["host", "image"],
            registry=r,
        )
        if heartbeats is not None:
            r.register(HeartbeatCollector(heartbeats, clock))

    def decision(self, outcome: str) -> None:
        self.decisions.labels(outcome).inc()

    def precache_progress(self, host: str, image: str, done_bytes: int | None) -> None:
        """Set the pre-cache progress of ``image`` on ``host``; ``None`` drops the series."""
        if done_bytes is None:
            with contextlib.suppress(KeyError):  # never set: nothing to drop
                self.precache_done.remove(host, image)
            return
        self.precache_done.labels(host, image).set(done_bytes)


# -- image service ----------------------------------------------------------------


class ImageMetrics:
    """The image service's families (HTTP, uploads refused by the safety policy)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.http = HttpMetrics(r)
        self.refused = Counter(
            "cowfleet_upload_refusals",
            "uploads the safety policy refused, by failure name",
            ["failure"],
            registry=r,
        )

    def upload_refused(self, failures: Iterable[Any]) -> None:
        """One refused upload; ``failures`` are the policy's (each with a ``code``)."""
        codes = {str(getattr(f, "code", f)) for f in failures} or {"unknown"}
        for code in sorted(codes):
            self.refused.labels(code).inc()


# -- the endpoint -----------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def route_template(path: str, route_path: str | None) -> str:
    """The route template of a request to ``path`` answered by a route of ``route_path``.

    A route included under a prefix knows only its own part (``/servers/{server_id}``);
    the prefix is the request's leading segments, literal by construction (``/v2.1``).
    """
    if route_path is None:
        return UNMATCHED
    if ":path}" in route_path:
        return route_path
    own = route_path.strip("/").split("/") if route_path.strip("/") else []
    given = path.strip("/").split("/") if path.strip("/") else []
    if len(given) <= len(own):
        return route_path
    prefix = "/".join(given[: len(given) - len(own)])
    return f"/{prefix}{route_path}" if route_path != "/" else f"/{prefix}"


def _route_of(scope: Scope) -> str:
    path = getattr(scope.get("route"), "path", None)
    return route_template(scope.get("path", ""), path if isinstance(path, str) else None)


class MetricsEndpoint:
    """Pure ASGI middleware: ``GET /metrics`` (exposition format), and request counts.

    ``authorised(token)`` is the service's own token check, used unless ``open``.
    """

    def __init__(
        self,
        app: ASGIApp,
        registry: CollectorRegistry,
        *,
        open: bool,
        authorised: Callable[[str], bool],
        http: HttpMetrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.registry = registry
        self.open = open
        self.authorised = authorised
        self.http = http
        self.monotonic = monotonic

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == PATH:
            await self._metrics(scope, send)
            return
        if self.http is None:
            await self.app(scope, receive, send)
            return
        started = self.monotonic()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.http.observe(_route_of(scope), scope["method"], status, self.monotonic() - started)

    async def _metrics(self, scope: Scope, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await _answer(send, 405, b"only GET\n", "text/plain", [(b"allow", b"GET, HEAD")])
            return
        if not self.open and not self.authorised(_token_of(scope)):
            await _answer(send, 401, b"missing or wrong X-Auth-Token\n", "text/plain")
            return
        # Collectors read files and the database: off the event loop.
        body = await run_in_threadpool(generate_latest, self.registry)
        await _answer(send, 200, b"" if scope["method"] == "HEAD" else body, CONTENT_TYPE_LATEST)


def _token_of(scope: Scope) -> str:
    """``X-Auth-Token``, else an ``Authorization: Bearer`` token (what Prometheus's
    ``authorization`` scrape option sends)."""
    bearer = ""
    for name, value in scope["headers"]:
        if name == b"x-auth-token":
            return str(value.decode("latin-1"))
        if name == b"authorization":
            kind, _, rest = value.decode("latin-1").partition(" ")
            if kind.lower() == "bearer":
                bearer = rest.strip()
    return bearer


async def _answer(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    extra: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    headers = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
