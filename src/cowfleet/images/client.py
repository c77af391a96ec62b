"""A Glance v2 image API client (works against cowfleet's embedded server and real Glance).

Synchronous httpx with one pooled connection set per client. Every httpx
exception and every non-2xx status is translated here (see :mod:`.http`) into
the cowfleet error tree. Image bodies are read through a second client on the
project's data-plane transport (:mod:`.transport`, plugged in through httpx's
``transport=``). Downloads to disk (:meth:`ImageClient.download`) go through the fetch
engine (:mod:`cowfleet.fetch`), which resumes, retries and verifies.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import ssl
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from cowfleet.closing import Closing
from cowfleet.errors import (
    ConflictError,
    IntegrityError,
    NotFoundError,
    RemoteError,
    UsageError,
    ValidationError,
)
from cowfleet.fetch.buffers import EXTENSION, BufferPool
from cowfleet.fetch.engine import Progress
from cowfleet.fetch.retry import Budget, RetryPolicy
from cowfleet.hashtree import (
    DIGEST_SIZE,
    LEAF_SIZE_PROPERTY,
    ROOT_PROPERTY,
    Tree,
    TreeVerifier,
    check_leaf_size,
    leaf_count,
)
from cowfleet.images.body import upload_body
from cowfleet.images.http import raise_for_status, send, transport_error
from cowfleet.images.models import Image, Member
from cowfleet.images.token_file import read_token_file
from cowfleet.images.transport import DataTransport
from cowfleet.logs import httpx_hooks

if TYPE_CHECKING:
    from cowfleet.config import Config

__all__ = ["DownloadStream", "Image", "ImageClient", "Progress", "Tree"]

log = logging.getLogger(__name__)

PATCH_MEDIA_TYPE = "application/openstack-images-v2.1-json-patch"
# Fields Glance keeps as typed attributes (everything else is a string property).
_INT_FIELDS = frozenset({"min_disk", "min_ram"})
_BOOL_FIELDS = frozenset({"protected", "os_hidden"})
_CORE_FIELDS = frozenset(
    {"name", "visibility", "container_format", "disk_format"} | _INT_FIELDS | _BOOL_FIELDS
)
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")


@dataclass
class DownloadStream:
    """One HTTP response of ``GET /v2/images/{id}/file``."""

    status: int  # 200 or 206
    offset: int  # first byte delivered (0 for 200)
    total_size: int | None  # whole image size (Content-Range total or Content-Length)
    content_md5: str | None  # whole-image md5 (hex) from Content-MD5 if given
    _response: httpx.Response = field(repr=False)
    _endpoint: str = field(repr=False, default="")
    _what: str = field(repr=False, default="download")

    def iter_chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The body in chunks of about ``chunk_size`` bytes (the last may be shorter).

        Pieces at least that large (the data transport's) are passed on as they are;
        they may be memoryviews of the fetch's pooled buffers.
        """
        # Our own coalescing (not iter_raw(chunk_size)) so that bytes received before a
        # dropped connection are still delivered and a resume starts after them.
        parts: list[bytes] = []
        held = 0
        try:
            for piece in self._response.iter_raw():
                if not parts and len(piece) >= chunk_size:
                    yield piece
                    continue
                parts.append(piece)
                held += len(piece)
                if held >= chunk_size:
                    yield parts[0] if len(parts) == 1 else b"".join(parts)
                    parts, held = [], 0
        except httpx.HTTPError as exc:
            if parts:
                yield b"".join(parts)
            raise transport_error(exc, self._endpoint, self._what) from exc
        if parts:
            yield b"".join(parts)


def _tls_context(endpoint: str) -> ssl.SSLContext:
    """httpx's TLS context for an ``https://`` endpoint. A plain ``http://`` endpoint
    never uses TLS (redirects are not followed): it gets a context that trusts no CA, so
    loading the CA bundle (tens of milliseconds per process) is skipped and a TLS
    connection, should one ever be made, fails verification instead of trusting."""
    if endpoint.startswith("https://"):
        return httpx.create_ssl_context()
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class ImageClient(Closing):
    """Client of a Glance v2 image service; also a context manager."""

    def __init__(
        self,
        endpoint: str,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
        retries: int = 5,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        endpoint = endpoint.strip().rstrip("/")
        if endpoint.endswith("/v2"):
            endpoint = endpoint[: -len("/v2")]
        if not endpoint.startswith(("http://", "https://")):
            raise UsageError(f"image service URL must start with http:// or https://: {endpoint!r}")
        self.endpoint = endpoint
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.retry_policy = RetryPolicy(retries=retries, backoff=backoff)
        self._sleep = sleep
        headers = {"Accept": "application/json", "User-Agent": "cowfleet-image-client"}
        if token:
            headers["X-Auth-Token"] = token
        # One TLS setup (httpx's: its CA bundle, SSL_CERT_FILE) for the API and the data plane.
        tls = _tls_context(endpoint)
        try:
            # GET requests (image records, trees, bodies) go through the project's
            # transport, unless the caller gave a transport (honoured for everything) or
            # a proxy applies (httpx's own proxy support); it hands other methods to
            # httpx's transport, made on first use, so a fetch never loads httpcore.
            api_transport = transport
            self.data_transport: httpx.BaseTransport | None = transport
            if transport is None and not _proxied(endpoint):
                api_transport = DataTransport(ssl_context=tls)
                self.data_transport = DataTransport(ssl_context=tls)
            self._http = self._new_http(endpoint, headers, tls, api_transport)
            self._data = self._new_http(endpoint, headers, tls, self.data_transport)
        except (httpx.HTTPError, ValueError) as exc:
            raise UsageError(f"invalid image service URL {endpoint!r}: {exc}") from exc

    def _new_http(
        self,
        endpoint: str,
        headers: dict[str, str],
        tls: ssl.SSLContext,
        transport: httpx.BaseTransport | None,
    ) -> httpx.Client:
        return httpx.Client(
            base_url=endpoint + "/",
            headers=headers,
            timeout=httpx.Timeout(self.timeout),
            verify=tls,
            transport=transport,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
            follow_redirects=False,
            event_hooks=httpx_hooks(),  # a request id, when serving one, goes along
        )

    @classmethod
    def from_config(cls, cfg: Config) -> ImageClient:
        """Endpoint from ``cfg.endpoint``; token from ``cfg.image_token``, else the token
        file (``cfg.token_file``, refused when others may read it) when it exists, else
        none (a Glance without keystone)."""
        token = cfg.image_token
        if not token:
            path = cfg.token_file
            try:
                token = (
                    read_token_file(path, allow_insecure=cfg.images_allow_insecure_token_file)
                    or None
                )
            except FileNotFoundError:
                token = None
        return cls(cfg.endpoint, token, retries=cfg.fetch_retries)

    # -- plumbing ------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()
        self._data.close()

    def _request(
        self,
        method: str,
        url: str,
        what: str,
        *,
        rewind: Callable[[], bool] | None = None,
        **kw: Any,
    ) -> httpx.Response:
        resp = send(self._http, method, url, what=what, endpoint=self.endpoint, rewind=rewind, **kw)
        raise_for_status(resp, what)
        return resp

    def _json(self, resp: httpx.Response, what: str) -> Any:
        try:
            return resp.json()
        except ValueError as exc:
            raise RemoteError(
                f"{what}: the image service sent invalid JSON", status=resp.status_code
            ) from exc

    @staticmethod
    def _path(image_id: str, suffix: str = "") -> str:
        if not image_id:
            raise UsageError("empty image id")
        return f"v2/images/{quote(image_id, safe='')}{suffix}"

    # -- API -------------------------------------------------------------------------
    def create(self, **fields: Any) -> Image:
        """``POST /v2/images``: a new ``queued`` image. ``properties={...}`` is flattened."""
        body: dict[str, Any] = {}
        extra = fields.pop("properties", None) or {}
        for key, value in {**fields, **extra}.items():
            if value is not None:
                body[key] = value
        what = f"create image {body.get('name')!r}"
        resp = self._request("POST", "v2/images", what, json=body)
        return Image.from_json(self._json(resp, what))

    def upload(
        self,
        image_id: str,
        data: IO[bytes] | Iterable[bytes] | bytes,
        *,
        size: int | None = None,
        progress: Progress | None = None,
    ) -> Image:
        """``PUT /v2/images/{id}/file``: stream ``data`` (a binary file, bytes or an
        iterable of bytes); sends ``Content-Length`` when the size is known, else chunked (chunks of
        at most 512 KiB). Sent again from its start if the connection was stale (see
        :mod:`.body`)."""
        body, size = upload_body(data, size, progress)
        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            headers["Content-Length"] = str(size)
        what = f"upload image {image_id}"
        # The service hashes and inspects after the last byte: allow it time to answer.
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, 600.0))
        self._request(
            "PUT",
            self._path(image_id, "/file"),
            what,
            content=body,
            rewind=body.rewind,
            headers=headers,
            timeout=timeout,
        )
        return self.get(image_id)

    def get(self, image_id: str) -> Image:
        what = f"image {image_id}"
        resp = self._request("GET", self._path(image_id), what)
        return Image.from_json(self._json(resp, what))

    def find(self, name_or_id: str) -> Image:
        """The image with this id, else the one image with this name."""
        if _is_uuid(name_or_id):
            try:
                return self.get(name_or_id)
            except NotFoundError:
                pass
        matches = []
        for image in self.list(name=name_or_id):
            matches.append(image)
            if len(matches) > 1:
                break
        if not matches:
            raise NotFoundError(f"no image with id or name {name_or_id!r}", image=name_or_id)
        if len(matches) > 1:
            ids = ", ".join(m.id for m in self.list(name=name_or_id))
            raise ConflictError(
                f"more than one image is named {name_or_id!r} ({ids}); use an id", image=name_or_id
            )
        return matches[0]

    def list(self, **filters: Any) -> Iterator[Image]:
        """``GET /v2/images`` with filters (name, status, disk_format, visibility, sort_key,
        sort_dir, limit = page size ...), following ``next`` links to the end."""
        params = {k: str(v) for k, v in filters.items() if v is not None}
        url: str | None = "v2/images"
        seen: set[str] = set()
        while url is not None:
            # httpx replaces a URL's query with ``params`` even when empty: pass None.
            resp = self._request("GET", url, "list images", params=params or None)
            body = self._json(resp, "list images")
            if not isinstance(body, dict) or not isinstance(body.get("images"), list):
                raise RemoteError("list images: the reply has no 'images' list")
            for item in body["images"]:
                yield Image.from_json(item)
            nxt = body.get("next")
            if not nxt or not body["images"]:
                return
            if not isinstance(nxt, str) or nxt in seen:
                raise RemoteError(f"list images: bad or repeating next link {nxt!r}")
            seen.add(nxt)
            url = _relative_next(nxt)
            params = {}  # the next link carries the query

    def update(self, image_id: str, changes: Mapping[str, str | int | bool | None]) -> Image:
        """``PATCH`` (JSON patch): set each key, or remove it when the value is None."""
        if not changes:
            return self.get(image_id)
        current = self.get(image_id)
        ops: list[dict[str, Any]] = []
        for key, value in changes.items():
            if not key or "/" in key or "~" in key:
                raise ValidationError(f"invalid property name {key!r}")
            path = f"/{key}"
            if value is None:
                ops.append({"op": "remove", "path": path})
                continue
            exists = key in _CORE_FIELDS or key in current.properties
            ops.append(
                {"op": "replace" if exists else "add", "path": path, "value": _typed(key, value)}
            )
        what = f"update image {image_id}"
        resp = self._request(
            "PATCH",
            self._path(image_id),
            what,
            json=ops,
            headers={"Content-Type": PATCH_MEDIA_TYPE},
        )
        return Image.from_json(self._json(resp, what))

    def delete(self, image_id: str) -> None:
        self._request("DELETE", self._path(image_id), f"delete image {image_id}")

    # -- members of shared images (Glance v2) ----------------------------------------
    def _member_path(self, image_id: str, project: str) -> str:
        if not project:
            raise UsageError("empty project id")
        return self._path(image_id, f"/members/{quote(project, safe='')}")

    def add_member(self, image_id: str, project: str) -> Member:
        """Share a ``shared`` image with ``project`` (status ``pending``)."""
        what = f"share image {image_id} with {project}"
        path = self._path(image_id, "/members")
        resp = self._request("POST", path, what, json={"member": project})
        return Member.from_json(self._json(resp, what))

    def list_members(self, image_id: str) -> tuple[Member, ...]:
        what = f"list members of image {image_id}"
        data = self._json(self._request("GET", self._path(image_id, "/members"), what), what)
        members = data.get("members") if isinstance(data, dict) else None
        if not isinstance(members, list):
            raise RemoteError(f"{what}: the answer has no members list")
        return tuple(Member.from_json(m) for m in members)

    def set_member(self, image_id: str, project: str, status: str) -> Member:
        """Accept, reject (or reset to pending) ``project``'s membership: as that project."""
        what = f"set {project}'s membership of image {image_id} to {status}"
        path = self._member_path(image_id, project)
        resp = self._request("PUT", path, what, json={"status": status})
        return Member.from_json(self._json(resp, what))

    def remove_member(self, image_id: str, project: str) -> None:
        what = f"stop sharing image {image_id} with {project}"
        self._request("DELETE", self._member_path(image_id, project), what)

    def open_download(
        self,
        image_id: str,
        *,
        offset: int = 0,
        buffers: BufferPool | None = None,
        end: int | None = None,
    ) -> AbstractContextManager[DownloadStream]:
        """``GET /v2/images/{id}/file`` from ``offset`` (a ``Range`` request when > 0),
        up to byte ``end`` (inclusive; None: the last); the body may be read into
        ``buffers`` (see :mod:`cowfleet.fetch.buffers`)."""
        return self._open_download(image_id, offset, buffers, end)

    @contextmanager
    def _open_download(
        self, image_id: str, offset: int, buffers: BufferPool | None, end: int | None = None
    ) -> Iterator[DownloadStream]:
        if offset < 0:
            raise UsageError(f"negative download offset {offset}")
        if end is not None and end < offset:
            raise UsageError(f"download range {offset}-{end} ends before it starts")
        what = f"download image {image_id}"
        headers = {"Accept": "application/octet-stream", "Accept-Encoding": "identity"}
        if end is not None:
            headers["Range"] = f"bytes={offset}-{end}"
        elif offset:
            headers["Range"] = f"bytes={offset}-"
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, 60.0))
        resp = send(
            self._data,
            "GET",
            self._path(image_id, "/file"),
            what=what,
            endpoint=self.endpoint,
            stream=True,
            headers=headers,
            timeout=timeout,
            extensions={EXTENSION: buffers} if buffers is not None else None,
        )
        try:
            if resp.status_code >= 300:
                try:
                    resp.read()
                except httpx.HTTPError as exc:
                    raise transport_error(exc, self.endpoint, what) from exc
                raise_for_status(resp, what, image_id=image_id)
            if resp.status_code == 204:
                raise ConflictError(f"{what}: the image has no data yet", image_id=image_id)
            yield _stream_of(resp, self.endpoint, what)
        finally:
            resp.close()

    def download(self, image_id: str, dest: Path, *, progress: Progress | None = None) -> Image:
        """Fetch the image into ``dest`` through the fetch engine: resumes by ``Range``,
        retries with backoff, verifies while streaming (with the image's hash tree when it
        has one, else its digest), renames only a verified file (see
        :mod:`cowfleet.fetch.tofile`)."""
        from cowfleet.fetch.tofile import download_to

        budget = self.budget()
        image = budget.call(lambda: self.get(image_id), what=f"image {image_id}")
        tree = None
        if image.status == "active":  # (download_to says why another image cannot be)
            tree = budget.call(lambda: self.get_tree(image), what=f"hash tree of image {image_id}")
        download_to(
            lambda offset, pool: self.open_download(image.id, offset=offset, buffers=pool),
            image,
            Path(dest),
            budget,
            tree=tree,
            progress=progress,
        )
        return image

    def budget(self, policy: RetryPolicy | None = None) -> Budget:
        """A retry budget under ``policy`` (default: this client's), sleeping as it does."""
        return (policy or self.retry_policy).start(sleep=self._sleep)

    def get_tree(self, image: Image) -> Tree | None:
        """The image's sha256 hash tree (see :mod:`cowfleet.hashtree`), checked against
        the root the image record publishes; None when the record publishes none (an
        image uploaded before trees, or real Glance). Pass ``TreeVerifier.from_tree``
        the result to verify the data as it lands.

        Raises :class:`~cowfleet.errors.IntegrityError` when the leaf list served does
        not hash to the published root (or has the wrong size), RemoteError when the
        published tree properties are malformed, ConflictError when the image is not
        active, NotFoundError when the record names a tree the service cannot serve.
        """
        root = image.properties.get(ROOT_PROPERTY)
        if root is None:
            return None
        what = f"hash tree of image {image.id}"
        if image.status != "active" or image.size is None:
            raise ConflictError(
                f"{what}: the image is {image.status}, not active", image_id=image.id
            )
        raw_leaf = image.properties.get(LEAF_SIZE_PROPERTY, "")
        try:
            leaf_size = check_leaf_size(int(raw_leaf) if raw_leaf.isdigit() else -1)
        except UsageError as exc:
            raise RemoteError(
                f"{what}: the image service published {LEAF_SIZE_PROPERTY}={raw_leaf!r}: {exc}"
            ) from None
        want = leaf_count(image.size, leaf_size) * DIGEST_SIZE
        leaves = self._read_capped(self._path(image.id, "/tree"), what, want, image.id)
        verifier = TreeVerifier(root, leaf_size, image.size, leaves, image_id=image.id)
        return verifier.tree

    def _read_capped(self, url: str, what: str, cap: int, image_id: str) -> bytes:
        """GET ``url`` and read at most ``cap`` bytes of it (more is an IntegrityError)."""
        headers = {"Accept": "application/octet-stream", "Accept-Encoding": "identity"}
        resp = send(
            self._http, "GET", url, what=what, endpoint=self.endpoint, stream=True, headers=headers
        )
        try:
            if resp.status_code >= 300:
                try:
                    resp.read()
                except httpx.HTTPError as exc:
                    raise transport_error(exc, self.endpoint, what) from exc
                raise_for_status(resp, what, image_id=image_id)
            body = bytearray()
            try:
                for piece in resp.iter_bytes():
                    body += piece
                    if len(body) > cap:
                        raise IntegrityError(
                            f"{what}: the service sent more than the {cap} bytes expected",
                            image_id=image_id,
                        )
            except httpx.HTTPError as exc:
                raise transport_error(exc, self.endpoint, what) from exc
            return bytes(body)
        finally:
            resp.close()


# -- helpers -------------------------------------------------------------------------
def _stream_of(resp: httpx.Response, endpoint: str, what: str) -> DownloadStream:
    status = resp.status_code
    length = _int_header(resp, "Content-Length")
    md5 = _md5_header(resp.headers.get("Content-MD5"))
    if status == 206:
        raw = resp.headers.get("Content-Range", "")
        m = _CONTENT_RANGE.match(raw.strip())
        if m is None:
            raise RemoteError(f"{what}: bad Content-Range {raw!r} on a 206 answer", status=206)
        start = int(m.group(1))
        total = None if m.group(3) == "*" else int(m.group(3))
        return DownloadStream(206, start, total, md5, resp, endpoint, what)
    if status != 200:
        raise RemoteError(f"{what}: unexpected HTTP {status}", status=status)
    return DownloadStream(200, 0, length, md5, resp, endpoint, what)


def _proxied(endpoint: str) -> bool:
    """Whether the environment names a proxy for ``endpoint`` (httpx then handles it)."""
    scheme, _, rest = endpoint.partition("://")
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    proxies = urllib.request.getproxies()
    if not (proxies.get(scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(host.rsplit(":", 1)[0] if "]" not in host else host)


def _int_header(resp: httpx.Response, name: str) -> int | None:
    raw = resp.headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def _md5_header(raw: str | None) -> str | None:
    """Glance sends hex in ``Content-MD5``; RFC 1864 says base64: accept both."""
    if not raw:
        return None
    raw = raw.strip()
    if re.fullmatch(r"[0-9a-fA-F]{32}", raw):
        return raw.lower()
    try:
        digest = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest.hex() if len(digest) == 16 else None


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _relative_next(nxt: str) -> str:
    """Glance's ``next`` is ``/v2/images?...`` (relative to the API root)."""
    if nxt.startswith(("http://", "https://")):
        return nxt
    return nxt.lstrip("/")


def _typed(key: str, value: str | int | bool) -> Any:
    if key in _INT_FIELDS:
        try:
            return int(value)
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"{key} must be an integer, not {value!r}") from exc
    if key in _BOOL_FIELDS:
        if isinstance(value, bool):
            return value
        low = str(value).strip().lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise ValidationError(f"{key} must be true or false, not {value!r}")
    return value if isinstance(value, str) else str(value)
