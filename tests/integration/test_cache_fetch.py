"""The node cache against real servers: the embedded image service and a misbehaving one.

Faults use real processes where it matters (``python -m cowfleet cache fetch``
killed with SIGKILL, 8 concurrent fetchers) and a real size-limited filesystem.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cowfleet.cache import metadata as md
from cowfleet.cache.cache import ImageCache
from cowfleet.config import Config
from cowfleet.errors import (
    BackendUnavailableError,
    IntegrityError,
    StorageFullError,
    TimeoutError_,
    UnsafeImageError,
)
from tests.conftest import require_program, small_tmpfs
from tests.integration._cache_rogue import RogueImage, RogueServer

pytestmark = pytest.mark.integration
MiB = 1024 * 1024


def _image_bytes(n: int = 8 * MiB, seed: int = 1) -> bytes:
    rnd = random.Random(seed)
    half = n // 2
    return rnd.randbytes(half) + bytes(n - half - 4096) + rnd.randbytes(4096)


def _client(url: str, token: str | None = None, timeout: float = 10.0) -> Any:
    from cowfleet.images.client import ImageClient

    return ImageClient(url, token, timeout=timeout)


def _cfg(tmp_path: Path, url: str, **kw: Any) -> Config:
    opts: dict[str, Any] = {"fetch_retries": 2, "fetch_deadline": 60.0}
    opts.update(kw)
    return Config(home=tmp_path / "home", instances_path=tmp_path / "inst", image_url=url, **opts)


def _upload(svc: Any, data: bytes, disk_format: str = "raw", **props: str) -> str:
    c = _client(svc.url, svc.token)
    try:
        img = c.create(
            name=f"t-{uuid.uuid4().hex[:8]}",
            disk_format=disk_format,
            container_format="bare",
            **props,
        )
        c.upload(img.id, io.BytesIO(data), size=len(data))
        return str(img.id)
    finally:
        c.close()


def _leftovers(cfg: Config) -> list[str]:
    try:
        return sorted(n for n in os.listdir(cfg.base_dir) if not n.startswith("."))
    except FileNotFoundError:
        return []


def _fetch_cmd(cfg: Config, image: str, token_file: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cowfleet",
        "cache",
        "fetch",
        image,
        "--output",
        "json",
        "--home",
        str(cfg.home),
        "--instances-path",
        str(cfg.instances_path),
        "--image-url",
        cfg.endpoint,
        "--token-file",
        str(token_file),
        *extra,
    ]


@pytest.fixture
def rogue() -> Iterator[RogueServer]:
    with RogueServer() as srv:
        yield srv


@pytest.fixture
def dummy_token(tmp_path: Path) -> Path:
    p = tmp_path / "token"
    p.write_text("rogue-does-not-check\n")
    p.chmod(0o600)
    return p


# -- the embedded image service --------------------------------------------------------


def test_fetch_hit_list_verify(image_service: Any, tmp_path: Path) -> None:
    data = _image_bytes()
    iid = _upload(image_service, data)
    cfg = _cfg(tmp_path, image_service.url)
    cache = ImageCache(cfg, _client(image_service.url, image_service.token))
    base = cache.ensure_cached(iid)
    assert base.fetched and base.path.read_bytes() == data
    assert base.path.stat().st_blocks * 512 < len(data)  # zeros left as holes
    hit = cache.ensure_cached(iid)
    assert not hit.fetched and hit.path == base.path
    assert [r.ok for r in cache.verify(iid)] == [True]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "cowfleet",
            "cache",
            "list",
            "--output",
            "json",
            "--home",
            str(cfg.home),
            "--instances-path",
            str(cfg.instances_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    [entry] = json.loads(out.stdout)
    assert entry["image_id"] == iid and entry["state"] == "verified"
    assert entry["allocated"] < len(data) and entry["virtual_size"] == len(data)


def test_qcow2_kept_or_converted_to_raw(image_service: Any, tmp_path: Path) -> None:
    qemu_img = require_program("qemu-img")
    raw = tmp_path / "src.raw"
    raw.write_bytes(_image_bytes(4 * MiB, seed=2))
    q = tmp_path / "src.qcow2"
    subprocess.run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(q)], check=True)
    iid = _upload(image_service, q.read_bytes(), "qcow2")
    kept = ImageCache(
        _cfg(tmp_path / "a", image_service.url), _client(image_service.url, image_service.token)
    ).ensure_cached(iid)
    assert kept.format == "qcow2" and kept.virtual_size == 4 * MiB
    conv_cache = ImageCache(
        _cfg(tmp_path / "b", image_service.url, force_raw=True),
        _client(image_service.url, image_service.token),
    )
    conv = conv_cache.ensure_cached(iid)
    assert conv.format == "raw" and conv.path.read_bytes() == raw.read_bytes()
    assert [r.ok for r in conv_cache.verify()] == [True]
    assert _leftovers(conv_cache.cfg) == [conv.path.name]


def test_threads_share_one_download(image_service: Any, tmp_path: Path) -> None:
    iid = _upload(image_service, _image_bytes(seed=3))
    cache = ImageCache(
        _cfg(tmp_path, image_service.url), _client(image_service.url, image_service.token)
    )
    results: list[Any] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.ensure_cached(iid))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and sum(r.fetched for r in results) == 1
    assert cache.downloads == 1


def test_eight_processes_share_one_download(image_service: Any, tmp_path: Path) -> None:
    data = _image_bytes(16 * MiB, seed=4)
    iid = _upload(image_service, data)
    cfg = _cfg(tmp_path, image_service.url)
    procs = [
        subprocess.Popen(
            _fetch_cmd(cfg, iid, image_service.token_file),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [e for _, e in outs]
    answers = [json.loads(o) for o, _ in outs]
    assert sum(a["fetched"] for a in answers) == 1
    assert {a["path"] for a in answers} == {str(cfg.base_dir / answers[0]["path"].split("/")[-1])}
    assert Path(answers[0]["path"]).read_bytes() == data


def test_fetch_by_name_and_cli_verify_exit_codes(image_service: Any, tmp_path: Path) -> None:
    data = _image_bytes(2 * MiB, seed=5)
    c = _client(image_service.url, image_service.token)
    name = f"named-{uuid.uuid4().hex[:6]}"
    img = c.create(name=name, disk_format="raw", container_format="bare")
    c.upload(img.id, io.BytesIO(data), size=len(data))
    cfg = _cfg(tmp_path, image_service.url)
    out = subprocess.run(
        _fetch_cmd(cfg, name, image_service.token_file), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    path = Path(json.loads(out.stdout)["path"])
    verify = [
        sys.executable,
        "-m",
        "cowfleet",
        "cache",
        "verify",
        "--home",
        str(cfg.home),
        "--instances-path",
        str(cfg.instances_path),
    ]
    assert subprocess.run(verify, capture_output=True).returncode == 0
    with open(path, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"tampered")
    assert subprocess.run(verify, capture_output=True).returncode == 7
    again = subprocess.run(
        _fetch_cmd(cfg, img.id, image_service.token_file), capture_output=True, text=True
    )
    assert again.returncode == 7 and "failed verification" in again.stderr


def test_cli_fetch_brings_the_kernel_and_ramdisk_too(image_service: Any, tmp_path: Path) -> None:
    from cowfleet.cache.layout import base_name

    kernel, ramdisk = _image_bytes(MiB, seed=11), _image_bytes(2 * MiB, seed=12)
    root = _image_bytes(3 * MiB, seed=13)
    kid = _upload(image_service, kernel, "aki")
    rid = _upload(image_service, ramdisk, "ari")
    iid = _upload(image_service, root, "ami", kernel_id=kid, ramdisk_id=rid)
    cfg = _cfg(tmp_path, image_service.url)
    out = subprocess.run(
        _fetch_cmd(cfg, iid, image_service.token_file), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    # Today's main fetched only the root image: _base held one file.
    assert _leftovers(cfg) == sorted(base_name(i) for i in (iid, kid, rid))
    for image_id, data in ((iid, root), (kid, kernel), (rid, ramdisk)):
        assert (cfg.base_dir / base_name(image_id)).read_bytes() == data, image_id
    got = json.loads(out.stdout)
    assert (got["image_id"], got["kernel"]["image_id"], got["ramdisk"]["image_id"]) == (
        iid,
        kid,
        rid,
    )
    assert got["fetched"] and got["kernel"]["fetched"] and got["ramdisk"]["fetched"]
    assert Path(got["kernel"]["path"]) == cfg.base_dir / base_name(kid)

    # Again, in human form: all three already cached (the links read from the base's metadata).
    human = [
        a for a in _fetch_cmd(cfg, iid, image_service.token_file) if a not in ("--output", "json")
    ]
    again = subprocess.run(human, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert len(lines) == 3 and all("already cached" in line for line in lines), again.stdout
    assert lines[1].startswith(f"  kernel: {cfg.base_dir / base_name(kid)} (")
    assert lines[2].startswith(f"  ramdisk: {cfg.base_dir / base_name(rid)} (")


def test_symlinks_planted_in_base_dir(image_service: Any, tmp_path: Path) -> None:
    data = _image_bytes(2 * MiB, seed=6)
    iid = _upload(image_service, data)
    cfg = _cfg(tmp_path, image_service.url)
    cache = ImageCache(cfg, _client(image_service.url, image_service.token))
    cache.layout.ensure_dirs()
    paths = cache.layout.paths(iid)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, paths.part)
    os.symlink(victim, paths.base)
    base = cache.ensure_cached(iid)
    assert victim.read_bytes() == b"precious"
    assert not base.path.is_symlink() and base.path.read_bytes() == data


def test_disk_full(image_service: Any, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small") as small:
        iid = _upload(image_service, random.Random(7).randbytes(16 * MiB))
        cfg = Config(
            home=tmp_path / "home",
            instances_path=small / "inst",
            image_url=image_service.url,
            fetch_retries=1,
        )
        cache = ImageCache(cfg, _client(image_service.url, image_service.token))
        with pytest.raises(StorageFullError):
            cache.ensure_cached(iid)
        assert _leftovers(cfg) == []
        left = os.listdir(cfg.base_dir / ".cowfleet")
        assert [n for n in left if not n.endswith(".failed.json")] == []


def test_server_down(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cache = ImageCache(_cfg(tmp_path, url), _client(url), sleep=lambda s: None)
    with pytest.raises(BackendUnavailableError):
        cache.ensure_cached(str(uuid.uuid4()))
    assert _leftovers(cache.cfg) == []


# -- a misbehaving server ----------------------------------------------------------------


def _rogue_cache(tmp_path: Path, rogue: RogueServer, **kw: Any) -> ImageCache:
    timeout = kw.pop("client_timeout", 10.0)
    return ImageCache(
        _cfg(tmp_path, rogue.url, **kw), _client(rogue.url, timeout=timeout), backoff=0.05
    )


def test_5xx_is_retried_then_reported(rogue: RogueServer, tmp_path: Path) -> None:
    img = rogue.add(RogueImage(str(uuid.uuid4()), _image_bytes(MiB), mode="5xx"))
    cache = _rogue_cache(tmp_path, rogue)
    with pytest.raises(BackendUnavailableError):
        cache.ensure_cached(img.id)
    assert len(rogue.file_requests(img.id)) == 3  # 1 + fetch_retries
    assert not cache.layout.paths(img.id).base.exists()


def test_dropped_connection_resumes_with_range(rogue: RogueServer, tmp_path: Path) -> None:
    data = _image_bytes(4 * MiB, seed=8)
    img = rogue.add(RogueImage(str(uuid.uuid4()), data, mode="dropfirst"))
    base = _rogue_cache(tmp_path, rogue).ensure_cached(img.id)
    assert base.path.read_bytes() == data
    ranges = rogue.file_requests(img.id)
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert int(ranges[1][6:].rstrip("-")) > 0


def test_stalled_stream_hits_the_deadline(rogue: RogueServer, tmp_path: Path) -> None:
    img = rogue.add(RogueImage(str(uuid.uuid4()), _image_bytes(4 * MiB), mode="stall"))
    cache = _rogue_cache(tmp_path, rogue, fetch_deadline=2.0, client_timeout=30.0)
    start = time.monotonic()
    with pytest.raises(TimeoutError_):
        cache.ensure_cached(img.id)
    assert time.monotonic() - start < 15  # the deadline, not the 30 s read timeout
    assert not cache.layout.paths(img.id).base.exists()


@pytest.mark.parametrize(
    ("mode", "error", "match"),
    [
        ("truncate", IntegrityError, "truncated"),
        ("extra", IntegrityError, "more bytes than declared"),
        ("wronghash", IntegrityError, "mismatch"),
    ],
)
def test_bad_bodies_leave_nothing(
    rogue: RogueServer, tmp_path: Path, mode: str, error: type[Exception], match: str
) -> None:
    data = _image_bytes(2 * MiB, seed=9)
    img = RogueImage(str(uuid.uuid4()), data, mode=mode)
    if mode == "wronghash":
        img.mode, img.hash_value = "ok", hashlib.sha512(b"other").hexdigest()
    rogue.add(img)
    cache = _rogue_cache(tmp_path, rogue)
    with pytest.raises(error, match=match):
        cache.ensure_cached(img.id)
    assert _leftovers(cache.cfg) == []


def test_connection_dropping_every_time(rogue: RogueServer, tmp_path: Path) -> None:
    data = _image_bytes(8 * MiB, seed=12)
    img = rogue.add(RogueImage(str(uuid.uuid4()), data, mode="drop"))
    cache = _rogue_cache(tmp_path, rogue)
    with pytest.raises(BackendUnavailableError, match="peer closed"):
        cache.ensure_cached(img.id)
    paths = cache.layout.paths(img.id)
    assert not paths.base.exists()
    assert paths.part.exists()  # kept (with its record) for a later resume
    assert [e.state for e in cache.list()] == ["resumable"]
    img.mode = "ok"
    assert cache.ensure_cached(img.id).path.read_bytes() == data
    assert rogue.file_requests(img.id)[-1] not in (None, "bytes=0-")


def test_server_ignoring_range_gets_a_full_refetch(rogue: RogueServer, tmp_path: Path) -> None:
    data = _image_bytes(4 * MiB, seed=10)
    img = rogue.add(RogueImage(str(uuid.uuid4()), data, mode="norange"))
    cache = _rogue_cache(tmp_path, rogue)
    cache.layout.ensure_dirs()
    paths = cache.layout.paths(img.id)
    md.write_atomic(
        paths.part_meta,
        md.PartMeta(
            img.id, len(data), "sha512", hashlib.sha512(data).hexdigest(), "x", 0.0
        ).to_json(),
    )
    paths.part.write_bytes(data[:MiB])
    assert cache.ensure_cached(img.id).path.read_bytes() == data
    assert rogue.file_requests(img.id) == [f"bytes={MiB}-"]


def test_unsafe_image_is_refused(rogue: RogueServer, tmp_path: Path) -> None:
    qemu_img = require_program("qemu-img")
    evil = tmp_path / "evil.qcow2"
    subprocess.run(
        [qemu_img, "create", "-f", "qcow2", "-F", "raw", "-b", "/etc/passwd", str(evil), "1M"],
        check=True,
        capture_output=True,
    )
    for fmt in ("qcow2", "raw"):
        img = rogue.add(RogueImage(str(uuid.uuid4()), evil.read_bytes(), disk_format=fmt))
        cache = _rogue_cache(tmp_path / fmt, rogue)
        with pytest.raises(UnsafeImageError):
            cache.ensure_cached(img.id)
        assert _leftovers(cache.cfg) == []


def test_fetch_concurrency_bounds_processes(
    rogue: RogueServer, tmp_path: Path, dummy_token: Path
) -> None:
    """Different images, three processes, fetch_concurrency=1: bodies never overlap."""
    imgs = [
        rogue.add(
            RogueImage(
                str(uuid.uuid4()), _image_bytes(2 * MiB, seed=20 + i), mode="slow", rate=8 * MiB
            )
        )
        for i in range(3)
    ]
    cfg = _cfg(tmp_path, rogue.url)
    env = {**os.environ, "COWFLEET_FETCH_CONCURRENCY": "1"}
    procs = [
        subprocess.Popen(
            _fetch_cmd(cfg, img.id, dummy_token),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for img in imgs
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
    spans = sorted((start, end) for _, start, end in rogue.spans)
    assert len(spans) == 3
    for (_s1, e1), (s2, _e2) in itertools.pairwise(spans):
        assert s2 >= e1 - 0.05  # the next body starts after the previous one ended


def test_kill_9_at_random_points(rogue: RogueServer, tmp_path: Path, dummy_token: Path) -> None:
    """SIGKILL the fetching process 20 times: no partial file ever becomes a base."""
    data = _image_bytes(8 * MiB, seed=11)
    digest = hashlib.sha512(data).hexdigest()
    img = rogue.add(RogueImage(str(uuid.uuid4()), data, mode="slow", rate=12 * MiB))
    cfg = _cfg(tmp_path, rogue.url)
    rnd = random.Random(1234)
    base = cfg.base_dir / hashlib.sha1(img.id.encode()).hexdigest()
    completed = 0
    for _ in range(20):
        p = subprocess.Popen(
            _fetch_cmd(cfg, img.id, dummy_token, "-v"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(rnd.uniform(0.05, 1.2))
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=30)
        if os.path.lexists(base):
            assert not base.is_symlink()
            assert hashlib.sha512(base.read_bytes()).hexdigest() == digest
            completed += 1
            base.unlink()  # evict, so the next trial fetches again
    resumed_before = sum(1 for r in rogue.file_requests(img.id) if r)
    out = subprocess.run(
        _fetch_cmd(cfg, img.id, dummy_token), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert hashlib.sha512(base.read_bytes()).hexdigest() == digest
    assert resumed_before >= 1  # some trial continued a killed one's .part with Range
    assert _leftovers(cfg) == [base.name]
