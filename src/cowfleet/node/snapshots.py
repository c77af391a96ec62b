"""Snapshots of instances' root disks into the image service (``createImage``), on the node.

One job per instance at a time, in its own thread:

1. a marker ``.snapshot.json`` (0600) is written into the instance folder: the image
   id, the caller's token (needed to delete the image if the agent dies) and the
   temporary overlay's name;
2. a running guest (a driver with ``disk_snapshot``) is switched to a new temporary
   overlay ``disk.snap`` by a disk-only external snapshot, so ``disk`` and its base
   stop changing; a stopped guest (or the ``none`` driver) needs nothing;
3. the chain ``disk`` -> base is flattened and streamed to the image service
   (:mod:`cowfleet.compute.flatten`; no temporary copy), with the caller's token: the
   image is the caller's project's, and the service inspects it like any upload; with
   ``snapshot_compression = zlib`` the data clusters are first deflated into a spool
   ``disk.spool`` (:mod:`cowfleet.compute.compress`), removed when the job ends;
4. a running guest's writes in ``disk.snap`` are committed back into ``disk`` and the
   guest pivots to it (``commit_back``); ``disk.snap`` and the marker are removed.

Any failure (the image service full, the upload refused, the instance deleted)
deletes the image and still does step 4: the instance is left as it was.
:meth:`Snapshots.recover` runs at agent start: for every marker left by a dead agent
it deletes the image, merges or removes the temporary overlay and removes the spool.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from cowfleet.compute import compress, flatten
from cowfleet.compute.instance import is_uuid
from cowfleet.errors import ConflictError, CowfleetError, NotFoundError, ValidationError
from cowfleet.images.put_stream import prefetched, put_stream
from cowfleet.node.spec import one_line

log = logging.getLogger(__name__)

MARKER = ".snapshot.json"
OVERLAY = "disk.snap"
SPOOL = "disk.spool"
ROOT = "disk"
ROOT_TARGET = "vda"
RUNNING, DONE, FAILED = "running", "done", "failed"


class Images(Protocol):
    def update(self, image_id: str, changes: Any) -> Any: ...
    def upload(self, image_id: str, data: Any, *, size: int | None = None) -> Any: ...
    def delete(self, image_id: str) -> None: ...
    def close(self) -> None: ...


ImagesFor = Callable[[str], Images]  # the caller's token -> an image client speaking for it


@dataclass(frozen=True)
class SnapshotView:
    uuid: str
    image_id: str
    state: str
    format: str = ""
    live: bool = False
    bytes_sent: int = 0
    allocated: int = 0
    seconds: float = 0.0
    pause_ms: float = 0.0  # snapshot call + pivot: the time the guest may be held
    snapshot_ms: float = 0.0  # the disk-only external snapshot call
    pivot_ms: float = 0.0  # the block commit's pivot
    fault: str | None = None
    compression: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Snapshots:
    def __init__(
        self,
        instances_path: Path,
        driver: Any,
        images_for: ImagesFor,
        *,
        fmt: str = "qcow2",
        can_start: Callable[[str], None] = lambda _uuid: None,
        clock: Callable[[], float] = time.monotonic,
        chain_map: Callable[[Path], flatten.ChainMap] = flatten.chain_map,
        compression: str = "none",
        compress_workers: int = 0,
        spool_memory: int = compress.SPOOL_IN_MEMORY,
    ) -> None:
        if fmt not in flatten.FORMATS:
            raise ValidationError(f"snapshot format {fmt!r}: use qcow2 or raw")
        if compression not in compress.COMPRESSIONS:
            raise ValidationError(f"snapshot compression {compression!r}: use none or zlib")
        if compression != "none" and fmt != "qcow2":
            raise ValidationError(
                f"snapshot compression {compression!r} needs snapshot format qcow2, not {fmt!r}"
            )
        self.compression = compression
        self.compress_workers = compress_workers
        self.spool_memory = spool_memory  # chains holding less data spool to memory
        self.instances_path = instances_path
        self.driver = driver
        self.images_for = images_for
        self.fmt = fmt
        self.can_start = can_start  # raises ConflictError/NotFoundError when the instance is busy
        self.clock = clock
        self.chain_map = chain_map  # qemu-img map (tests: a fake)
        self._lock = threading.Lock()
        self._jobs: dict[str, SnapshotView] = {}
        self._threads: dict[str, threading.Thread] = {}

    # -- API -------------------------------------------------------------------------
    def start(self, uuid: str, image_id: str, token: str) -> SnapshotView:
        if not is_uuid(uuid) or not is_uuid(image_id):
            raise ValidationError("a snapshot needs a server uuid and an image uuid")
        if not token:
            raise ValidationError("a snapshot needs the caller's token for the image service")
        folder = self.instances_path / uuid
        if not (folder / ROOT).is_file():
            raise NotFoundError(f"server {uuid} has no root disk on this node", server=uuid)
        with self._lock:
            job = self._jobs.get(uuid)
            if job is not None and job.state == RUNNING:
                raise ConflictError(
                    f"server {uuid} already has a snapshot running (image {job.image_id})",
                    server=uuid,
                )
            self.can_start(uuid)
            if (folder / MARKER).exists():
                raise ConflictError(f"server {uuid} has an unfinished snapshot", server=uuid)
            view = SnapshotView(uuid, image_id, RUNNING, self.fmt, compression=self.compression)
            self._jobs[uuid] = view
            thread = threading.Thread(
                target=self._run, args=(view, token), name=f"snapshot-{uuid[:8]}", daemon=True
            )
            self._threads[uuid] = thread
            thread.start()
        log.info("snapshot of %s into image %s started", uuid, image_id)
        return view

    def get(self, uuid: str) -> SnapshotView:
        with self._lock:
            job = self._jobs.get(uuid)
        if job is None:
            raise NotFoundError(f"server {uuid} has no snapshot on this node", server=uuid)
        return job

    def running(self, uuid: str) -> bool:
        with self._lock:
            job = self._jobs.get(uuid)
            return job is not None and job.state == RUNNING

    def wait(self, uuid: str, timeout: float | None = None) -> SnapshotView:
        with self._lock:
            thread = self._threads.get(uuid)
        if thread is not None:
            thread.join(timeout)
        return self.get(uuid)

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            threads = list(self._threads.values())
        for t in threads:
            t.join(timeout)

    # -- the job ---------------------------------------------------------------------
    def _set(self, view: SnapshotView) -> None:
        with self._lock:
            self._jobs[view.uuid] = view

    def _live(self, uuid: str) -> bool:
        if not getattr(self.driver, "can_run", False) or not hasattr(self.driver, "disk_snapshot"):
            return False
        info = self.driver.info(uuid)
        return info is not None and info.active

    def _run(self, view: SnapshotView, token: str) -> None:
        uuid, image_id = view.uuid, view.image_id
        folder = self.instances_path / uuid
        started = self.clock()
        snap_s = pivot_s = 0.0
        sent = 0
        fault: str | None = None
        live = False
        images = self.images_for(token)
        flat: flatten.Flattened | compress.Compressed | None = None
        try:
            live = self._live(uuid)
            _write_marker(
                folder, {"image_id": image_id, "token": token, "overlay": OVERLAY, "live": live}
            )
            if live:
                snap_s = self.driver.disk_snapshot(uuid, ROOT_TARGET, folder / OVERLAY)
            chain = self.chain_map(folder / ROOT)
            self._set(replace(view, live=live, allocated=chain.allocated))
            if self.compression == "zlib":  # a first pass into the spool: see compute.compress
                flat = compress.compress(
                    chain,
                    spool_path=folder / SPOOL,
                    workers=self.compress_workers,
                    memory_limit=self.spool_memory,
                )
            else:
                flat = flatten.plan(chain, self.fmt)
            images.update(image_id, {"disk_format": flat.format, "container_format": "bare"})
            stream = flat.chunks(chain)

            def counted() -> Any:
                nonlocal sent
                for chunk in prefetched(iter(stream)):
                    yield chunk
                    sent += len(chunk)

            endpoint = getattr(images, "endpoint", None)
            if isinstance(endpoint, str):  # the image client: the stream at wire speed
                put_stream(endpoint, token, image_id, counted(), flat.size)
            else:
                images.upload(image_id, counted(), size=flat.size)
            view = replace(view, allocated=chain.allocated)
        except Exception as exc:
            fault = one_line(
                f"{type(exc).__name__}: {exc}" if not isinstance(exc, CowfleetError) else str(exc)
            )
            log.warning("snapshot of %s into image %s failed: %s", uuid, image_id, fault)
            log.debug("snapshot %s: traceback", uuid, exc_info=True)
            _delete_image(images, image_id)
        finally:
            if isinstance(flat, compress.Compressed):
                flat.close()
        try:
            if live:
                pivot_s = self.driver.commit_back(uuid, ROOT_TARGET, folder / OVERLAY)
            _remove(folder / MARKER)
        except Exception as exc:  # the marker stays: the next agent start merges it
            msg = one_line(f"merging the temporary overlay back failed: {exc}")
            log.error("snapshot of %s: %s", uuid, msg)
            fault = fault or msg
        finally:
            images.close()
        done = replace(
            view,
            state=FAILED if fault else DONE,
            live=live,
            bytes_sent=sent,
            seconds=round(self.clock() - started, 3),
            pause_ms=round((snap_s + pivot_s) * 1000, 1),
            snapshot_ms=round(snap_s * 1000, 1),
            pivot_ms=round(pivot_s * 1000, 1),
            fault=fault,
        )
        self._set(done)
        log.info(
            "snapshot of %s into image %s %s: %d bytes in %.1f s, guest pause %.1f ms",
            uuid,
            image_id,
            done.state,
            sent,
            done.seconds,
            done.pause_ms,
        )

    # -- after a crash ---------------------------------------------------------------
    def recover(self) -> list[str]:
        """Clean up after snapshots a dead agent left: delete their images, merge or
        remove their temporary overlays. The uuids of the instances cleaned."""
        cleaned: list[str] = []
        try:
            folders = [p for p in self.instances_path.iterdir() if is_uuid(p.name)]
        except OSError as exc:
            log.warning("cannot scan %s for unfinished snapshots: %s", self.instances_path, exc)
            return cleaned
        for folder in folders:
            marker = folder / MARKER
            overlay = folder / OVERLAY
            spool = folder / SPOOL
            if not marker.exists() and not overlay.exists() and not spool.exists():
                continue
            uuid = folder.name
            try:
                doc = _read_marker(marker)
                image_id, token = str(doc.get("image_id", "")), str(doc.get("token", ""))
                if image_id and token:
                    images = self.images_for(token)
                    try:
                        _delete_image(images, image_id)
                    finally:
                        images.close()
                if overlay.exists():
                    recover = getattr(self.driver, "recover_overlay", None)
                    if recover is not None:
                        recover(uuid, ROOT_TARGET, folder / ROOT, overlay)
                    else:
                        _remove(overlay)
                _remove(spool)
                _remove(marker)
                cleaned.append(uuid)
                log.warning(
                    "unfinished snapshot of %s cleaned up (image %s)", uuid, doc.get("image_id")
                )
            except Exception as exc:
                log.error("cannot clean up the unfinished snapshot of %s: %s", uuid, exc)
        return cleaned


def _write_marker(folder: Path, doc: dict[str, Any]) -> None:
    path = folder / MARKER
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps(doc).encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_marker(path: Path) -> dict[str, Any]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return {}
    try:
        doc = json.loads(os.read(fd, 65536) or b"{}")
    except ValueError:
        return {}
    finally:
        os.close(fd)
    return doc if isinstance(doc, dict) else {}


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _delete_image(images: Images, image_id: str) -> None:
    try:
        images.delete(image_id)
        log.info("image %s deleted", image_id)
    except NotFoundError:
        pass
    except CowfleetError as exc:
        log.warning("cannot delete image %s: %s", image_id, exc)
