"""Serving bases to other nodes: ``GET``/``HEAD /peer/v1/images/{image_id}`` with ``Range``.

Behind the node API's token gate (the node token, else ``401``). The image is named by
its id only: anything but a UUID is ``400``; the id is resolved through the cache's own
records (:mod:`cowfleet.cache.layout`, :mod:`cowfleet.cache.metadata`), so no part of
a request path reaches the filesystem. Served, in this order:

- a verified base whose file is the image's bytes (a base converted to raw is not, a
  base whose record says ``failed`` is never served, a quarantined one is no longer in
  ``_base``): ``404`` otherwise;
- a download in progress on this node (:mod:`cowfleet.cache.live`): only bytes of
  leaves that passed the hash-tree check; bytes not landed yet are waited for up to
  ``wait`` seconds each, then the answer is cut short (the reader takes another source);
- an image on its way here (a build of it queued, ``ensure_cached`` running) is waited
  for, up to ``wait`` seconds, to become one of the above: a node asked to feed others
  at the same moment it was asked to fetch does not send them to the origin.

``Range: bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` gives ``206`` with ``Content-Range``;
a range starting past the end is ``416`` (``Content-Range: bytes */size``); no range,
or one this parser does not take (several ranges), is the whole image with ``200``.
With ``?stripe=t&stripes=k&leaf=SIZE`` the answer is one stripe of the image
(:mod:`cowfleet.node.peerstripes`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from cowfleet.cache import metadata as md
from cowfleet.cache.layout import Layout, canonical_image_id, is_image_id
from cowfleet.cache.live import LiveFetch, LiveFetches
from cowfleet.errors import NotFoundError
from cowfleet.node.peerstripes import (
    BadStripe,
    PastEnd,
    StripeRequest,
    parse_stripe,
    wants_stripe,
)

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class Unsatisfiable(Exception):
    """The range starts past the end of the image."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(first, last)`` byte of a single ``Range`` (inclusive), None for the whole image;
    :class:`Unsatisfiable` when it starts at or past ``size``."""
    if header is None:
        return None
    m = _RANGE.match(header.strip().replace(" ", ""))
    if m is None or (not m.group(1) and not m.group(2)):
        return None  # not a form we take (several ranges, other units): the whole image
    first_s, last_s = m.groups()
    if not first_s:  # the last n bytes
        n = int(last_s)
        if n == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - n), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if last_s and last < first:
        return None  # invalid: ignored
    if first >= size:
        raise Unsatisfiable
    return first, min(last, size - 1)


@dataclass
class _Held:
    size: int
    fd: int = -1  # a verified base
    live: LiveFetch | None = None  # or a download in progress


def _open_base(layout: Layout, image_id: str) -> _Held | None:
    paths = layout.paths(image_id)
    meta = md.read_meta(paths.meta)
    if (
        meta is None
        or meta.image_id != image_id
        or meta.state != md.STATE_VERIFIED
        or meta.converted_from is not None
        or meta.file_size != meta.image_size
    ):
        return None
    try:
        fd = os.open(paths.base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size != meta.file_size:
        os.close(fd)
        return None
    return _Held(st.st_size, fd=fd)


def resolve(layout: Layout, live: LiveFetches, image_id: str) -> _Held | None:
    """What this node can serve of ``image_id`` (a canonical id), or None."""
    held = _open_base(layout, image_id)
    if held is not None:
        return held
    entry = live.get(image_id)
    if entry is None:
        return None
    try:
        entry.open_reader()
    except NotFoundError:  # it ended just now: installed, or failed
        return _open_base(layout, image_id)
    return _Held(entry.size, live=entry)


def _release(held: _Held) -> None:
    if held.fd >= 0:
        os.close(held.fd)
        held.fd = -1
    if held.live is not None:
        held.live.close_reader()
        held.live = None


def _body(held: _Held, spans: list[tuple[int, int]], wait: float) -> Iterator[bytes]:
    """The bytes of ``spans`` ((first byte, bytes) each), in order: one range, or the
    leaves of one stripe."""
    pos = 0
    try:
        for begin, size in spans:
            pos, end = begin, begin + size
            while pos < end:
                n = min(CHUNK, end - pos)
                if held.live is not None:
                    data = held.live.read(pos, n, wait)
                else:
                    data = os.pread(held.fd, n, pos)
                    if not data:
                        raise OSError(f"base ended at byte {pos}")
                yield data
                pos += len(data)
    except Exception as exc:  # the answer is cut short: the reader takes another source
        log.warning("peer read stopped at byte %d: %s", pos, exc)
        raise
    finally:
        _release(held)


POLL = 0.05


def _error(code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=code)


def add_peer_routes(
    app: FastAPI,
    layout: Layout,
    live: LiveFetches,
    *,
    wait: float,
    expecting: Callable[[str], bool] = lambda _image_id: False,
) -> None:
    """Add the peer routes to the node API ``app`` (behind its token gate).

    ``expecting(image_id)``: whether the image is on its way to this node (a build or a
    pre-cache of it has started); a request for it then waits up to ``wait`` seconds
    for its download to begin instead of answering 404 at once.
    """

    @app.api_route("/peer/v1/images/{image_id}", methods=["GET", "HEAD"])
    async def peer_image(image_id: str, request: Request) -> Response:
        if not is_image_id(image_id):
            return _error(400, f"image id must be a UUID, not {image_id!r}")
        iid = canonical_image_id(image_id)
        striped: StripeRequest | None = None
        if wants_stripe(request.query_params):  # one stripe (cowfleet.node.peerstripes)
            try:
                striped = parse_stripe(request.query_params, request.headers.get("range"))
            except BadStripe as exc:
                return _error(400, str(exc))
        held = await run_in_threadpool(resolve, layout, live, iid)
        if held is None and (expecting(iid) or live.expected(iid)):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait
            while held is None and loop.time() < deadline:
                await asyncio.sleep(POLL)
                held = await run_in_threadpool(resolve, layout, live, iid)
                if held is None and not (expecting(iid) or live.expected(iid)):
                    break
        if held is None:
            return _error(404, f"image {iid} is not held by this node")
        size = held.size
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if striped is not None:
            try:
                headers.update(striped.headers(size))
            except PastEnd:
                _release(held)
                return Response(
                    status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"}
                )
            if request.method == "HEAD":
                _release(held)
                return Response(status_code=206, headers=headers)
            body = _body(held, striped.leaves(size), wait)
            return StreamingResponse(body, status_code=206, headers=headers)
        try:
            wanted = parse_range(request.headers.get("range"), size)
        except Unsatisfiable:
            _release(held)
            return Response(
                status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"}
            )
        first, last = wanted if wanted is not None else (0, size - 1)
        status = 206 if wanted is not None else 200
        if wanted is not None:
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        headers["Content-Length"] = str(max(0, last + 1 - first))
        if request.method == "HEAD" or size == 0:
            _release(held)
            return Response(status_code=status, headers=headers)
        return StreamingResponse(
            _body(held, [(first, last + 1 - first)], wait), status_code=status, headers=headers
        )
