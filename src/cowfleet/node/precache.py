"""The node side of a pre-cache: ``POST /v1/precache`` runs a fetch through the cache.

A job is keyed by its pre-cache id, so the API may ask twice (after a restart, or
when a report was lost): the second ask returns the job and repeats its last report.
The fetch is the cache's own ``ensure_cached`` (one download per image on the node,
the same verification); a node that already holds the image reports ``cached`` at
once with no source, having fetched nothing.

While the fetch runs, the job samples the ``.part`` file and its resume record every
``interval`` seconds and reports ``fetching`` (bytes so far, total, rate) or
``verifying`` (all bytes in, the checks and install still running) to the API, with
the source sending bytes now (the origin, or a peer's hostname: the cache's live
download records each switch); then ``cached`` (its source: the one that sent the
most bytes) or ``failed`` with the error. So the API hears from a node at most once
per interval per job, plus the final word.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
import uuid as uuidlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from cowfleet import precache as pc
from cowfleet.cache import metadata as md
from cowfleet.cache.layout import Layout, canonical_image_id
from cowfleet.errors import NotFoundError, ValidationError
from cowfleet.fetch.sources import Peer
from cowfleet.fetch.stripes import parse_stripes

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.5  # s between two reports of one job
MAX_JOBS = 1000  # finished jobs remembered (the oldest are forgotten first)
MAX_SOURCES = 64

Report = Callable[[str, dict[str, Any]], None]


class CacheLike(Protocol):
    layout: Layout

    def ensure_cached(self, image_id: str) -> Any: ...


@dataclass(frozen=True)
class Source:
    host: str
    url: str


@dataclass(frozen=True)
class PrecacheRequest:
    precache_id: str
    image_id: str
    sources: tuple[Source, ...] = ()
    stripes: tuple[tuple[Peer, ...], ...] = ()  # the peers of each stripe (optional)

    @classmethod
    def from_json(cls, doc: Any) -> PrecacheRequest:
        if not isinstance(doc, dict):
            raise ValidationError("the body must be a JSON object")
        try:
            pid = str(uuidlib.UUID(str(doc.get("precache_id"))))
        except ValueError:
            raise ValidationError("'precache_id' must be a UUID") from None
        try:
            image_id = canonical_image_id(str(doc.get("image_id")))
        except Exception:
            raise ValidationError("'image_id' must be an image UUID") from None
        raw = doc.get("sources", [])
        if not isinstance(raw, list) or len(raw) > MAX_SOURCES:
            raise ValidationError(f"'sources' must be a list of at most {MAX_SOURCES} objects")
        sources = []
        for s in raw:
            if (
                not isinstance(s, dict)
                or not isinstance(s.get("host"), str)
                or not isinstance(s.get("url"), str)
                or not s["url"].startswith(("http://", "https://"))
            ):
                raise ValidationError('each source is {"host": NAME, "url": http(s) URL}')
            sources.append(Source(s["host"], s["url"]))
        return cls(pid, image_id, tuple(sources), parse_stripes(doc.get("stripes")))


@dataclass
class Job:
    request: PrecacheRequest
    progress: pc.NodeProgress = field(default_factory=lambda: pc.NodeProgress(pc.QUEUED))

    def to_dict(self) -> dict[str, Any]:
        return {
            "precache_id": self.request.precache_id,
            "image_id": self.request.image_id,
            **self.progress.to_dict(),
        }


def _accepts_sources(fn: Callable[..., Any]) -> bool:
    try:
        return "sources" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class Precacher:
    """Pre-cache jobs of one node; ``report(precache_id, body)`` tells the API."""

    def __init__(
        self,
        cache: CacheLike,
        report: Report,
        *,
        workers: int = 4,
        interval: float = PROGRESS_INTERVAL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.report = report
        self.interval = interval
        self.monotonic = monotonic
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="precache")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, req: PrecacheRequest) -> Job:
        """Start the job (or return the one already known, repeating its last report)."""
        with self._lock:
            job = self._jobs.get(req.precache_id)
            if job is None:
                job = self._jobs[req.precache_id] = Job(req)
                self._forget_old()
                new = True
            else:
                new = False
        if new:
            self._pool.submit(self._run, job)
        elif job.progress.state in pc.TERMINAL:
            self._pool.submit(self._send, job)
        return job

    def get(self, precache_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(precache_id)
        if job is None:
            raise NotFoundError(f"no pre-cache {precache_id} on this node")
        return job

    def _forget_old(self) -> None:
        while len(self._jobs) > MAX_JOBS:
            oldest = next(iter(self._jobs))
            if self._jobs[oldest].progress.state not in pc.TERMINAL:
                break
            del self._jobs[oldest]

    # -- one job -----------------------------------------------------------------------

    def _send(self, job: Job) -> None:
        try:
            self.report(job.request.precache_id, job.progress.to_dict())
        except Exception as exc:  # the API asks again when it hears nothing
            log.debug("pre-cache %s: report not sent: %s", job.request.precache_id, exc)

    def _set(self, job: Job, progress: pc.NodeProgress) -> None:
        job.progress = progress
        self._send(job)

    def _fetch(self, req: PrecacheRequest) -> Any:
        ensure = self.cache.ensure_cached
        if (req.sources or req.stripes) and _accepts_sources(ensure):
            peers: dict[str, Any] = {"sources": tuple(Peer(s.host, s.url) for s in req.sources)}
            if req.stripes:
                peers["stripes"] = req.stripes
            return ensure(req.image_id, **peers)
        return ensure(req.image_id)

    def _sending(self, image_id: str) -> str:
        """Who sends ``image_id``'s bytes to this node now: a peer's hostname, or the
        origin (also when the cache has no peering, or the download has not begun)."""
        peering = getattr(self.cache, "peering", None)
        live = peering.live.get(image_id) if peering is not None else None
        source = getattr(live, "source", None) if live is not None else None
        return source if isinstance(source, str) and source else pc.ORIGIN

    def _run(self, job: Job) -> None:
        req = job.request
        paths = self.cache.layout.paths(req.image_id)
        outcome: dict[str, Any] = {}

        def fetch() -> None:
            try:
                outcome["result"] = self._fetch(req)
            except Exception as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=fetch, name=f"precache-{req.image_id[:8]}", daemon=True)
        thread.start()
        meter = pc.RateMeter()
        seen = False
        while True:
            thread.join(self.interval)
            if not thread.is_alive():
                break
            done, total = _sample(paths.part, paths.part_meta)
            seen = seen or done > 0
            if done == 0 and seen:  # the .part was renamed: everything is in, checks run
                total = total or job.progress.bytes_total
                done = total or job.progress.bytes_done
            state = pc.VERIFYING if seen and total and done >= total else pc.FETCHING
            rate = meter.sample(self.monotonic(), done)
            source = self._sending(req.image_id)
            self._set(
                job,
                pc.NodeProgress(state, done, total or job.progress.bytes_total, rate, source),
            )
        if "error" in outcome:
            exc = outcome["error"]
            log.warning("pre-cache %s of %s failed: %s", req.precache_id, req.image_id, exc)
            self._set(
                job,
                replace(
                    job.progress,
                    state=pc.FAILED,
                    rate=0.0,
                    source=job.progress.source or pc.ORIGIN,
                    error=f"{type(exc).__name__}: {exc}",
                ),
            )
            return
        got = outcome.get("result")
        meta = md.read_meta(paths.meta)
        size = meta.image_size if meta is not None else int(getattr(got, "size", 0) or 0)
        fetched = bool(getattr(got, "fetched", True))
        most = (getattr(got, "source", None) or pc.ORIGIN) if fetched else None  # most bytes
        self._set(job, pc.NodeProgress(pc.CACHED, size, size, 0.0, most))
        log.info(
            "pre-cache %s: image %s %s",
            req.precache_id,
            req.image_id,
            f"fetched from {most}" if fetched else "was already cached",
        )


def _sample(part: os.PathLike[str], part_meta: os.PathLike[str]) -> tuple[int, int | None]:
    """Bytes in the ``.part`` so far and the image's size from its resume record."""
    try:
        done = os.stat(part).st_size
    except OSError:
        return 0, None
    record = md.read_part_meta(part_meta)  # type: ignore[arg-type]
    return done, record.image_size if record is not None else None


def install(app: FastAPI, precacher: Precacher) -> None:
    """The node routes: ``POST /v1/precache`` (202) and ``GET /v1/precache/{id}``."""

    @app.post("/v1/precache")
    async def post_precache(request: Request) -> JSONResponse:
        import json

        try:
            body = json.loads(await request.body() or b"null")
        except ValueError as exc:
            raise ValidationError(f"request body is not JSON: {exc}") from exc
        req = PrecacheRequest.from_json(body)
        job = await run_in_threadpool(precacher.submit, req)
        return JSONResponse(job.to_dict(), status_code=202)

    @app.get("/v1/precache/{precache_id}")
    async def get_precache(precache_id: str) -> JSONResponse:
        return JSONResponse(precacher.get(precache_id).to_dict())
