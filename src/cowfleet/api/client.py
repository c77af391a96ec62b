"""A small client of the compute API (``cowfleet serve api``) for the CLI.

It speaks the Nova v2.1 subset of ``docs/compute-api.md`` at one fixed microversion
and turns every error into the one exception tree (``cowfleet.errors``), with the
API's own message (Nova's fault shape ``{"badRequest": {"code": 400, "message": ...}}``):

====================  ===========================  =========
HTTP status           error                        exit code
====================  ===========================  =========
401, 403              UsageError                   2
404                   NotFoundError                4
409                   ConflictError                5
400, 413, other 4xx   ValidationError              6
5xx, no answer        BackendUnavailableError      8
timeout               TimeoutError_                10
====================  ===========================  =========

The same mapping serves every command that talks to the compute API: ``server``,
``flavor``, ``hypervisor``, ``server image create`` and ``image precache``.

Servers and flavors are named by id or by name (:meth:`ComputeClient.find_server`,
:meth:`ComputeClient.find_flavor`), as ``openstack`` does: an id first, then the
one item of that name.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from cowfleet.closing import Closing
from cowfleet.errors import (
    BackendUnavailableError,
    ConflictError,
    CowfleetError,
    NotFoundError,
    RemoteError,
    TimeoutError_,
    UsageError,
    ValidationError,
)

MICROVERSION = "2.81"
# createImage answers the image id in its body from 2.45 on (as in Nova).
SNAPSHOT_MICROVERSION = "2.45"
DEFAULT_TIMEOUT = 30.0
PLACEMENT_KEY = "cowfleet:placement"
# States a server leaves only by itself (or never): what --wait waits for.
SETTLED = frozenset({"ACTIVE", "SHUTOFF", "ERROR"})
_MAX_MESSAGE = 400
_FAULT_ERRORS: dict[int, type[CowfleetError]] = {
    401: UsageError,
    403: UsageError,
    404: NotFoundError,
    409: ConflictError,
}


def fault_message(resp: httpx.Response) -> str:
    """The message of a Nova fault body (or the start of whatever else came back)."""
    try:
        doc = resp.json()
    except ValueError:
        return " ".join(resp.text.split())[:_MAX_MESSAGE]
    if isinstance(doc, dict) and len(doc) == 1:
        (body,) = doc.values()
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            return str(body["message"])[:_MAX_MESSAGE]
    return " ".join(resp.text.split())[:_MAX_MESSAGE]


def error_for(resp: httpx.Response, what: str, endpoint: str) -> CowfleetError:
    """The error of the tree for a non-2xx answer of the compute API."""
    status = resp.status_code
    msg = fault_message(resp) or f"HTTP {status}"
    if status == 401:
        return UsageError(
            f"{what}: the compute API at {endpoint} refused the token (HTTP 401: {msg}); "
            "check COWFLEET_API_TOKEN or the token file (--api-token-file)",
            status=status,
        )
    cls = _FAULT_ERRORS.get(status)
    if cls is not None:
        return cls(f"{what}: {msg} (HTTP {status})", status=status)
    if 400 <= status < 500:
        return ValidationError(f"{what}: {msg} (HTTP {status})", status=status)
    return RemoteError(f"{what}: the compute API answered HTTP {status}: {msg}", status=status)


def endpoint_of(url: str) -> str:
    """``http://HOST:PORT/v2.1`` from the URL given with or without ``/v2.1``."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"compute API URL must start with http:// or https://: {url!r}")
    if url.endswith("/v2.1"):
        return url
    return url + "/v2.1"


@dataclass(frozen=True)
class CreateResult:
    """What a create request answered: the first server's id (Nova answers only that)."""

    first_id: str
    name: str
    count: int
    started: float


class ComputeClient(Closing):
    """Client of one compute API; a context manager (it owns its connection pool)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not token:
            raise UsageError(
                "no token for the compute API: set COWFLEET_API_TOKEN or a token file "
                "(--api-token-file, [client] api_token_file)"
            )
        self.endpoint = endpoint_of(url)
        self._clock = clock
        self._sleep = sleep
        headers = {
            "X-Auth-Token": token,
            "OpenStack-API-Version": f"compute {MICROVERSION}",
            "Accept": "application/json",
            "User-Agent": "cowfleet-cli",
        }
        try:
            self._http = httpx.Client(
                base_url=self.endpoint + "/",
                headers=headers,
                timeout=httpx.Timeout(timeout),
                transport=transport,
                follow_redirects=False,
            )
        except (httpx.HTTPError, ValueError) as exc:
            raise UsageError(f"invalid compute API URL {url!r}: {exc}") from exc

    def close(self) -> None:
        self._http.close()

    # -- plumbing ------------------------------------------------------------------
    def _call(self, method: str, path: str, what: str, **kw: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path.lstrip("/"), **kw)
        except httpx.TimeoutException as exc:
            raise TimeoutError_(f"{what}: the compute API at {self.endpoint} timed out") from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailableError(
                f"{what}: the compute API at {self.endpoint} is unreachable: "
                f"{exc or type(exc).__name__}",
                endpoint=self.endpoint,
            ) from exc
        if not 200 <= resp.status_code < 300:
            raise error_for(resp, what, self.endpoint)
        return resp

    def _json(self, method: str, path: str, what: str, key: str, **kw: Any) -> Any:
        resp = self._call(method, path, what, **kw)
        try:
            doc = resp.json()
            return doc[key]
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteError(
                f"{what}: the compute API sent an answer without {key!r}",
                status=resp.status_code,
            ) from exc

    def _pages(self, path: str, key: str, what: str, params: dict[str, str]) -> Iterator[Any]:
        """Every item of a paged list, following ``<key>_links`` markers."""
        query = dict(params)
        while True:
            resp = self._call("GET", path, what, params=query)
            doc = resp.json()
            items = doc.get(key) or []
            yield from items
            if not items or not any(
                link.get("rel") == "next" for link in doc.get(f"{key}_links") or ()
            ):
                return
            query = {**params, "marker": str(items[-1]["id"])}

    # -- servers ---------------------------------------------------------------------
    def create_servers(
        self, name: str, image_id: str, flavor_id: str, *, min_count: int = 1, max_count: int = 1
    ) -> CreateResult:
        """One create request for ``max_count`` servers (named ``NAME-1`` ... when more
        than one), of which at least ``min_count`` must fit."""
        body = {
            "server": {
                "name": name,
                "imageRef": image_id,
                "flavorRef": flavor_id,
                "networks": "none",
                "min_count": min_count,
                "max_count": max_count,
            }
        }
        started = self._clock()
        doc = self._json("POST", "servers", f"create server {name}", "server", json=body)
        return CreateResult(str(doc["id"]), name, max_count, started)

    def created(self, result: CreateResult) -> list[dict[str, Any]]:
        """The servers ``result``'s request made, oldest first.

        The API answers only the first id; the others are the servers named
        ``NAME-N`` created since (a list ordered newest first, cut at the first id).
        """
        if result.count == 1:
            return [self.server(result.first_id)]
        pattern = f"^{re.escape(result.name)}-[0-9]+$"
        found: list[dict[str, Any]] = []
        for s in self._pages("servers/detail", "servers", "list servers", {"name": pattern}):
            found.append(s)
            if s["id"] == result.first_id:
                break
        else:
            raise NotFoundError(f"the servers of request {result.first_id} are gone")
        return list(reversed(found[-result.count :]))

    def servers(self, *, all_projects: bool = False, **filters: str) -> list[dict[str, Any]]:
        params = dict(filters)
        if all_projects:
            params["all_tenants"] = "1"
        return list(self._pages("servers/detail", "servers", "list servers", params))

    def server(self, server_id: str) -> dict[str, Any]:
        path = f"servers/{quote(server_id, safe='')}"
        doc: dict[str, Any] = self._json("GET", path, f"server {server_id}", "server")
        return doc

    def find_server(self, name_or_id: str, *, all_projects: bool = False) -> dict[str, Any]:
        """The server with this id, else the one server with exactly this name."""
        try:
            return self.server(name_or_id)
        except NotFoundError:
            pass
        pattern = f"^{re.escape(name_or_id)}$"
        matches = self.servers(all_projects=all_projects, name=pattern)
        if not matches:
            raise NotFoundError(f"no server with id or name {name_or_id!r}", server=name_or_id)
        if len(matches) > 1:
            ids = ", ".join(s["id"] for s in matches)
            raise ConflictError(
                f"more than one server is named {name_or_id!r} ({ids}); use an id",
                server=name_or_id,
            )
        return matches[0]

    def delete_server(self, server_id: str) -> None:
        self._call("DELETE", f"servers/{quote(server_id, safe='')}", f"delete server {server_id}")

    def action(self, server_id: str, body: dict[str, Any]) -> None:
        """``os-start``, ``os-stop`` or ``reboot`` (409 from the API: the wrong state)."""
        (name,) = body
        self._call(
            "POST",
            f"servers/{quote(server_id, safe='')}/action",
            f"{name} server {server_id}",
            json=body,
        )

    def wait(
        self,
        server_id: str,
        done: Callable[[dict[str, Any] | None], bool],
        *,
        timeout: float,
        interval: float = 0.5,
    ) -> dict[str, Any] | None:
        """Poll the server until ``done(server)`` (None once it is gone); the last view."""
        deadline = self._clock() + timeout
        while True:
            try:
                current: dict[str, Any] | None = self.server(server_id)
            except NotFoundError:
                current = None
            if done(current):
                return current
            if self._clock() >= deadline:
                state = "gone" if current is None else current.get("status")
                raise TimeoutError_(
                    f"server {server_id} still {state} after {timeout:.0f} s", server=server_id
                )
            self._sleep(interval)

    # -- flavors and hypervisors ---------------------------------------------------------
    def flavors(self) -> list[dict[str, Any]]:
        return list(self._pages("flavors/detail", "flavors", "list flavors", {}))

    def find_flavor(self, name_or_id: str) -> dict[str, Any] | None:
        """The flavor with this id, else the one of this name; None when neither exists."""
        try:
            doc: dict[str, Any] = self._json(
                "GET", f"flavors/{quote(name_or_id, safe='')}", f"flavor {name_or_id}", "flavor"
            )
            return doc
        except NotFoundError:
            pass
        for f in self.flavors():
            if f.get("name") == name_or_id:
                return f
        return None

    def create_flavor(
        self,
        name: str,
        *,
        vcpus: int,
        ram_mb: int,
        disk_gb: int,
        ephemeral_gb: int = 0,
        swap_mb: int = 0,
        flavor_id: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": name,
            "vcpus": vcpus,
            "ram": ram_mb,
            "disk": disk_gb,
            "OS-FLV-EXT-DATA:ephemeral": ephemeral_gb,
            "swap": swap_mb,
        }
        if flavor_id:
            body["id"] = flavor_id
        doc: dict[str, Any] = self._json(
            "POST", "flavors", f"create flavor {name}", "flavor", json={"flavor": body}
        )
        return doc

    def delete_flavor(self, flavor_id: str) -> None:
        self._call("DELETE", f"flavors/{quote(flavor_id, safe='')}", f"delete flavor {flavor_id}")

    def hypervisors(self) -> list[dict[str, Any]]:
        return list(self._pages("os-hypervisors/detail", "hypervisors", "list hypervisors", {}))

    # -- snapshots and pre-cache -------------------------------------------------------
    def create_image(
        self, server_id: str, name: str, metadata: dict[str, str] | None = None
    ) -> str:
        """``createImage`` of a server: the new image's id (answered from microversion 2.45)."""
        body: dict[str, Any] = {"createImage": {"name": name}}
        if metadata:
            body["createImage"]["metadata"] = dict(metadata)
        image_id: Any = self._json(
            "POST",
            f"servers/{quote(server_id, safe='')}/action",
            f"snapshot of server {server_id}",
            "image_id",
            json=body,
            headers={"OpenStack-API-Version": f"compute {SNAPSHOT_MICROVERSION}"},
        )
        return str(image_id)

    def start_precache(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v2.1/cowfleet/precache`` (admin): the new pre-cache's progress document."""
        what = f"pre-cache of image {body.get('image_id')}"
        return dict(self._json("POST", "cowfleet/precache", what, "precache", json=body))

    def precache(self, precache_id: str) -> dict[str, Any]:
        """The progress document of a pre-cache."""
        path = f"cowfleet/precache/{quote(precache_id, safe='')}"
        return dict(self._json("GET", path, f"pre-cache {precache_id}", "precache"))
