"""A tiny real node agent speaking docs/fleet-protocol.md, for the compute API's tests.

It is not the real agent (``cowfleet serve node``): it builds nothing, it only keeps
the instance table the protocol describes, answers ``/v1`` on its own loopback
address with the node token, heartbeats to the API, and pushes events. ``mode``
makes it misbehave: ``garbage`` answers builds with bytes that are not JSON,
``hang`` never answers them, ``refuse`` answers 500.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx


class StubNode:
    def __init__(
        self,
        hostname: str,
        address: str,
        api_url: str,
        token: str,
        *,
        vcpus: int = 8,
        ram_mb: int = 8192,
        disk_gb: int = 100,
        mode: str = "ok",
        interval: float = 1.0,
    ) -> None:
        self.hostname, self.address, self.api_url, self.token = hostname, address, api_url, token
        self.capacity = {"vcpus": vcpus, "ram_mb": ram_mb, "disk_gb": disk_gb}
        self.mode = mode
        self.interval = interval
        self.instances: dict[str, dict[str, Any]] = {}
        self.builds: list[str] = []
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.server = ThreadingHTTPServer((address, 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://{address}:{self.server.server_address[1]}"
        self._threads = [
            threading.Thread(target=self.server.serve_forever, daemon=True),
            threading.Thread(target=self._heartbeats, daemon=True),
        ]

    def start(self) -> StubNode:
        for t in self._threads:
            t.start()
        self.heartbeat()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.server.shutdown()
        self.server.server_close()

    # -- node -> API ------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        with self.lock:
            instances = [dict(i) for i in self.instances.values()]
        return {
            "hostname": self.hostname,
            "url": self.url,
            "hypervisor_type": "none",
            **self.capacity,
            "disk_free_gb": self.capacity["disk_gb"],
            "cache": [],
            "instances": instances,
        }

    def heartbeat(self) -> None:
        httpx.put(
            f"{self.api_url}/internal/nodes/{self.hostname}",
            json=self.report(),
            headers={"X-Auth-Token": self.token},
            timeout=10,
        ).raise_for_status()

    def _heartbeats(self) -> None:
        while not self.stopped.wait(self.interval):
            with contextlib.suppress(httpx.HTTPError):
                self.heartbeat()

    def _event(self, instance: dict[str, Any]) -> None:
        with contextlib.suppress(httpx.HTTPError):  # the next heartbeat repairs a lost one
            httpx.post(
                f"{self.api_url}/internal/nodes/{self.hostname}/events",
                json=instance,
                headers={"X-Auth-Token": self.token},
                timeout=10,
            )

    # -- API -> node ------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        node = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, doc: Any = None, raw: bytes | None = None) -> None:
                body = (
                    raw if raw is not None else (b"" if doc is None else json.dumps(doc).encode())
                )
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _auth(self) -> bool:
                if self.headers.get("X-Auth-Token") != node.token:
                    self._send(401, {"error": {"code": 401, "message": "bad token"}})
                    return False
                return True

            def _body(self) -> Any:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"null")

            def do_PUT(self) -> None:
                if not self._auth():
                    return
                spec = self._body()
                uuid = self.path.rsplit("/", 1)[1]
                node.builds.append(uuid)
                if node.mode == "garbage":
                    self._send(202, raw=b"\x00\x01 not json")
                    return
                if node.mode == "hang":
                    time.sleep(3600)
                    return
                if node.mode == "refuse":
                    self._send(500, {"error": {"code": 500, "message": "no"}})
                    return
                assert spec["uuid"] == uuid
                with node.lock:
                    inst = node.instances.setdefault(
                        uuid, {"uuid": uuid, "state": "ACTIVE", "power_state": 1, "fault": None}
                    )
                self._send(202, inst)
                node._event(inst)

            def do_GET(self) -> None:
                if not self._auth():
                    return
                if self.path == "/v1/servers":
                    self._send(200, {"servers": list(node.instances.values())})
                    return
                inst = node.instances.get(self.path.rsplit("/", 1)[1])
                self._send(200, inst) if inst else self._send(404, {"error": {"code": 404}})

            def do_DELETE(self) -> None:
                if not self._auth():
                    return
                with node.lock:
                    gone = node.instances.pop(self.path.rsplit("/", 1)[1], None)
                self._send(204 if gone is None else 202)

            def do_POST(self) -> None:
                if not self._auth():
                    return
                uuid = self.path.split("/")[3]
                body = self._body()
                with node.lock:
                    inst = node.instances.get(uuid)
                    if inst is None:
                        self._send(404, {"error": {"code": 404, "message": "absent"}})
                        return
                    action = body.get("action")
                    want = {"start": "SHUTOFF", "stop": "ACTIVE", "reboot": None}[action]
                    if want and inst["state"] != want:
                        self._send(409, {"error": {"code": 409, "message": "wrong state"}})
                        return
                    inst["state"] = "SHUTOFF" if action == "stop" else "ACTIVE"
                    inst["power_state"] = 4 if action == "stop" else 1
                    snapshot = dict(inst)
                self._send(202, snapshot)
                node._event(snapshot)

        return Handler
