"""Register, heartbeat and push events to the compute API (docs/fleet-protocol.md).

:class:`Heartbeat` sends the node's whole status every ``heartbeat_interval``
seconds (the API's answer sets it). When the API is down or answers an error it
backs off (1, 2, 4 ... up to ``max_backoff`` seconds) and tries again, forever:
a transient error never ends the agent. The clock and the wait are injected.

:class:`EventSender` pushes single instance changes from a queue on its own
thread; a lost event is repaired by the next heartbeat, so it never retries.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import httpx

from cowfleet.errors import BackendUnavailableError, CowfleetError, RemoteError, UsageError
from cowfleet.logs import httpx_hooks
from cowfleet.node.spec import InstanceView

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 10.0
MIN_INTERVAL = 0.05
MAX_INTERVAL = 3600.0
BACKOFF_START = 1.0
MAX_BACKOFF = 60.0
EVENT_QUEUE = 10000


class Controller(Protocol):
    def heartbeat(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def event(self, body: dict[str, Any]) -> None: ...


class ControllerClient:
    """The node's HTTP client of the compute API's internal routes."""

    def __init__(
        self,
        api_url: str,
        token: str,
        hostname: str,
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        url = api_url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"API URL must start with http:// or https://: {api_url!r}")
        self.api_url = url
        self.hostname = hostname
        self._http = httpx.Client(
            base_url=url,
            headers={"X-Auth-Token": token, "User-Agent": "cowfleet-node"},
            timeout=httpx.Timeout(timeout),
            transport=transport,
            follow_redirects=False,
            event_hooks=httpx_hooks(),
        )

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            resp = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise BackendUnavailableError(
                f"compute API {self.api_url} unreachable: {type(exc).__name__}: {exc}",
                url=self.api_url,
            ) from exc
        if resp.status_code >= 500:
            raise BackendUnavailableError(
                f"compute API {self.api_url} answered {resp.status_code} to {method} {path}",
                status=resp.status_code,
            )
        if resp.status_code >= 400:
            raise RemoteError(
                f"compute API {self.api_url} refused {method} {path}: "
                f"{resp.status_code} {resp.text[:200]}",
                status=resp.status_code,
            )
        return resp

    def heartbeat(self, body: dict[str, Any]) -> dict[str, Any]:
        resp = self._send("PUT", f"/internal/nodes/{self.hostname}", body)
        try:
            data = resp.json()
        except ValueError as exc:
            raise BackendUnavailableError(
                f"compute API {self.api_url} answered a heartbeat with no JSON"
            ) from exc
        return data if isinstance(data, dict) else {}

    def event(self, body: dict[str, Any]) -> None:
        self._send("POST", f"/internal/nodes/{self.hostname}/events", body)

    def precache_progress(self, precache_id: str, body: dict[str, Any]) -> None:
        self._send("POST", f"/internal/nodes/{self.hostname}/precache/{precache_id}", body)

    def peer_report(self, peer: str, image_id: str, reason: str) -> None:
        """Tell the API that ``peer`` sent a piece of ``image_id`` that failed the hash tree."""
        body = {"peer": peer, "image_id": image_id, "reason": reason[:500]}
        self._send("POST", f"/internal/nodes/{self.hostname}/peer-reports", body)


def _interval(answer: dict[str, Any], current: float) -> float:
    raw = answer.get("heartbeat_interval", current)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return current
    return min(max(float(raw), MIN_INTERVAL), MAX_INTERVAL)


class Heartbeat:
    """Register and heartbeat until ``stop`` is set; never ends on a transient error."""

    def __init__(
        self,
        controller: Controller,
        status: Callable[[], dict[str, Any]],
        *,
        interval: float = DEFAULT_INTERVAL,
        max_backoff: float = MAX_BACKOFF,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.controller = controller
        self.status = status
        self.interval = interval
        self.max_backoff = max_backoff
        self.monotonic = monotonic
        self.node_id: str | None = None
        self.sent = 0
        self.failures = 0  # consecutive

    def beat(self) -> float:
        """Send one heartbeat; the seconds to wait before the next."""
        started = self.monotonic()
        try:
            answer = self.controller.heartbeat(self.status())
        except Exception as exc:
            self.failures += 1
            delay = min(self.max_backoff, BACKOFF_START * float(2 ** min(self.failures - 1, 30)))
            expected = isinstance(exc, CowfleetError)
            # the first failure, then every tenth: a lasting outage stays visible, not noisy
            if self.failures % 10 == 1 or not expected:
                log.log(
                    logging.WARNING if expected else logging.ERROR,
                    "heartbeat failed (%d in a row), next try in %.0fs: %s: %s",
                    self.failures,
                    delay,
                    type(exc).__name__,
                    exc,
                )
                if not expected:
                    log.debug("heartbeat: traceback", exc_info=True)
            else:
                log.debug("heartbeat failed (%d in a row): %s", self.failures, exc)
            return delay
        if self.failures or self.node_id is None:
            log.info(
                "registered with the compute API (node id %s)%s",
                answer.get("node_id"),
                f" after {self.failures} failed tries" if self.failures else "",
            )
        self.failures = 0
        self.sent += 1
        node_id = answer.get("node_id")
        self.node_id = str(node_id) if node_id is not None else self.node_id or ""
        self.interval = _interval(answer, self.interval)
        return max(0.0, self.interval - (self.monotonic() - started))

    def run(self, stop: threading.Event, wait: Callable[[float], bool] | None = None) -> None:
        """Beat, wait, repeat until ``stop`` (``wait`` returns True when stopped)."""
        wait = wait or stop.wait
        while not stop.is_set():
            delay = self.beat()
            if wait(delay):
                break


class EventSender:
    """Pushes instance changes to the API from a queue, on its own thread."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._queue: queue.Queue[InstanceView | None] = queue.Queue(EVENT_QUEUE)
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self.sent = 0
        self.dropped = 0

    def start(self) -> None:
        self._thread.start()

    def post(self, view: InstanceView) -> None:
        try:
            self._queue.put_nowait(view)
        except queue.Full:
            self.dropped += 1  # the next heartbeat carries the state anyway

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for at most ``timeout`` seconds), then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            view = self._queue.get()
            if view is None:
                return
            try:
                self.controller.event(view.to_dict())
                self.sent += 1
            except Exception as exc:
                self.dropped += 1
                log.debug("event for %s not sent (%s): %s", view.uuid, view.state, exc)
