"""The image client and the node cache against Glance 33 under uWSGI's plain ``http-socket``.

That mode answers HTTP/1.1 without ``Connection: close`` and then closes the
connection, so a client that reuses it right away (an upload after its create, a
download after its ``GET``) races the close; and it refuses chunks above 1 MB in
a chunked upload (uWSGI's default ``chunked-input-limit``). Every round here runs
with no retry budget of its own (``retries=0``, ``fetch_retries=0``): only the
client's resend of a request dropped on a stale connection may save it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cowfleet.cache.cache import ImageCache
from cowfleet.config import Config
from cowfleet.images.client import ImageClient
from tests.fixtures.glance import GlanceServer

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
ROUNDS = 50


def test_fifty_rounds_of_upload_show_download_and_cache_fetch(
    glance_http_socket: GlanceServer, tmp_path: Path
) -> None:
    client = ImageClient(glance_http_socket.url, retries=0)
    cfg = Config(
        home=tmp_path / "home",
        instances_path=tmp_path / "instances",
        image_url=glance_http_socket.url,
        fetch_retries=0,
        fetch_deadline=60.0,
    )
    cache = ImageCache(cfg, client)
    body = os.urandom(3 * MiB)
    src = tmp_path / "disk.raw"
    failures: list[str] = []
    try:
        for n in range(ROUNDS):
            data = n.to_bytes(4, "big") + body  # a distinct image (and checksum) per round
            src.write_bytes(data)
            sha512 = hashlib.sha512(data).hexdigest()
            try:
                image = client.create(name=f"round-{n}", disk_format="raw", container_format="bare")
                with src.open("rb") as fh:
                    client.upload(image.id, fh)
                shown = client.get(image.id)
                assert (shown.status, shown.size, shown.os_hash_value) == (
                    "active",
                    len(data),
                    sha512,
                )
                dest = tmp_path / f"download-{n}.raw"
                client.download(image.id, dest)
                assert dest.read_bytes() == data
                dest.unlink()
                base = cache.ensure_cached(image.id)
                assert base.fetched and base.path.read_bytes() == data
            except Exception as exc:  # every round runs; the failures are listed at the end
                failures.append(f"round {n}: {type(exc).__name__}: {exc}")
    finally:
        client.close()
    assert failures == [], f"{len(failures)} of {ROUNDS} rounds failed:\n" + "\n".join(failures)


def test_stdin_upload_is_chunked_within_the_default_limit(
    glance_http_socket: GlanceServer, tmp_path: Path
) -> None:
    data = os.urandom(5 * MiB + 17)  # several chunks, more than uWSGI's 1 MB chunk limit
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
    env["COWFLEET_HOME"] = str(tmp_path / "home")
    env["COWFLEET_IMAGE_URL"] = glance_http_socket.url
    argv = [sys.executable, "-m", "cowfleet", "image", "upload", "--name", "from-stdin"]
    argv += ["--disk-format", "raw", "--container-format", "bare", "--output", "json", "-"]
    done = subprocess.run(argv, input=data, capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    uploaded = json.loads(done.stdout)
    assert uploaded["status"] == "active" and uploaded["size"] == len(data)
    assert uploaded["os_hash_value"] == hashlib.sha512(data).hexdigest()
    with ImageClient(glance_http_socket.url) as client:
        client.download(uploaded["id"], tmp_path / "copy.raw")
    assert (tmp_path / "copy.raw").read_bytes() == data
