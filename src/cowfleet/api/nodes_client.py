"""The controller's HTTP client to node agents (their public ``/v1`` API only).

Every answer is checked: a node that times out, refuses, or answers something that is
not the instance object we asked about raises :class:`NodeError`, which the caller
treats as "this node failed" (release the claim, try the next host).
"""

from __future__ import annotations

from typing import Any

import httpx

from cowfleet.errors import BackendUnavailableError
from cowfleet.logs import httpx_hooks

NODE_STATES = ("BUILDING", "ACTIVE", "SHUTOFF", "ERROR", "DELETING")


class NodeError(BackendUnavailableError):
    """A node agent failed a request (unreachable, timeout, error status, garbage)."""


class NodeConflict(NodeError):
    """The node refused an action for the instance's state (HTTP 409)."""


class NodesClient:
    def __init__(self, token: str, *, timeout: float = 30.0) -> None:
        self._client = httpx.Client(
            timeout=timeout,
            headers={"X-Auth-Token": token},
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            event_hooks=httpx_hooks(),  # the request id goes on to the node
        )

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, url: str, **kw: Any) -> httpx.Response:
        try:
            return self._client.request(method, url, **kw)
        except httpx.TimeoutException as exc:
            raise NodeError(f"node at {url} timed out") from exc
        except httpx.HTTPError as exc:
            raise NodeError(f"node at {url} cannot be reached: {exc}") from exc

    @staticmethod
    def _instance(resp: httpx.Response, uuid: str, url: str) -> dict[str, Any]:
        try:
            doc = resp.json()
        except ValueError:
            raise NodeError(f"node at {url} answered something that is not JSON") from None
        if isinstance(doc, dict) and isinstance(doc.get("server"), dict):
            doc = doc["server"]
        if (
            not isinstance(doc, dict)
            or doc.get("uuid") != uuid
            or doc.get("state") not in NODE_STATES
        ):
            raise NodeError(f"node at {url} answered an unexpected document")
        return doc

    def build(self, node_url: str, spec: dict[str, Any]) -> dict[str, Any]:
        """PUT the build spec; the node's instance object (202/200), NodeError otherwise."""
        url = f"{node_url.rstrip('/')}/v1/servers/{spec['uuid']}"
        resp = self._call("PUT", url, json=spec)
        if resp.status_code not in (200, 201, 202):
            raise NodeError(f"node at {node_url} refused the build: HTTP {resp.status_code}")
        return self._instance(resp, spec["uuid"], node_url)

    def delete(self, node_url: str, uuid: str) -> bool:
        """Ask the node to delete; True when it no longer has the instance (204/404)."""
        resp = self._call("DELETE", f"{node_url.rstrip('/')}/v1/servers/{uuid}")
        if resp.status_code in (204, 404):
            return True
        if resp.status_code in (200, 202):
            return False
        raise NodeError(f"node at {node_url} refused the delete: HTTP {resp.status_code}")

    def action(self, node_url: str, uuid: str, action: str, kind: str | None = None) -> None:
        body: dict[str, Any] = {"action": action}
        if kind:
            body["type"] = kind
        resp = self._call("POST", f"{node_url.rstrip('/')}/v1/servers/{uuid}/action", json=body)
        if resp.status_code == 409:
            raise NodeConflict(f"node at {node_url} refused {action}: wrong state")
        if resp.status_code not in (200, 202, 204):
            raise NodeError(f"node at {node_url} refused {action}: HTTP {resp.status_code}")

    def precache(self, node_url: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a pre-cache request (``/v1/precache``); the node's job (202/200)."""
        resp = self._call("POST", f"{node_url.rstrip('/')}/v1/precache", json=body)
        if resp.status_code not in (200, 202):
            raise NodeError(
                f"node at {node_url} refused the pre-cache: HTTP {resp.status_code} "
                f"{resp.text[:200]}"
            )
        try:
            doc = resp.json()
        except ValueError:
            raise NodeError(f"node at {node_url} answered something that is not JSON") from None
        if not isinstance(doc, dict):
            raise NodeError(f"node at {node_url} answered an unexpected document")
        return doc

    # -- createImage (api/snapshots.py) --------------------------------------------------
    def snapshot(self, node_url: str, uuid: str, image_id: str, token: str) -> dict[str, Any]:
        """Ask the node to stream the instance's root disk into ``image_id``."""
        url = f"{node_url.rstrip('/')}/v1/servers/{uuid}/snapshot"
        resp = self._call("POST", url, json={"image_id": image_id, "token": token})
        if resp.status_code == 409:
            raise NodeConflict(f"node at {node_url} refused the snapshot: {resp.text[:300]}")
        if resp.status_code != 202:
            raise NodeError(f"node at {node_url} refused the snapshot: HTTP {resp.status_code}")
        return self._snapshot_doc(resp, node_url)

    def snapshot_status(self, node_url: str, uuid: str) -> dict[str, Any] | None:
        """The node's snapshot job of ``uuid``; None when the node has none (restarted)."""
        resp = self._call("GET", f"{node_url.rstrip('/')}/v1/servers/{uuid}/snapshot")
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise NodeError(f"node at {node_url}: snapshot status HTTP {resp.status_code}")
        return self._snapshot_doc(resp, node_url)

    @staticmethod
    def _snapshot_doc(resp: httpx.Response, node_url: str) -> dict[str, Any]:
        try:
            doc = resp.json()
        except ValueError:
            raise NodeError(f"node at {node_url} answered something that is not JSON") from None
        if not isinstance(doc, dict) or doc.get("state") not in ("running", "done", "failed"):
            raise NodeError(f"node at {node_url} answered an unexpected snapshot document")
        return doc
