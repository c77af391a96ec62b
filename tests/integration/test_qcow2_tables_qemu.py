"""The on-disk qcow2 table check against images the real qemu-img and qemu-io built.

Valid images of every layout qemu makes pass; a real image with one entry pointed
past its end, or cut short, is refused by the check, by the real image service
(415, the image stays queued, nothing stored) and by the node cache (nothing left in
``_base``).
"""

from __future__ import annotations

import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cowfleet.errors import UnsafeImageError
from cowfleet.formats.qcow2 import parse_header
from cowfleet.formats.qcow2_tables import check_file
from tests.conftest import require_program
from tests.fixtures.images import ImageService
from tests.integration._cache_rogue import RogueImage, RogueServer
from tests.integration.test_cache_fetch import _leftovers, _rogue_cache
from tests.integration.test_server_http import OCTETS, create, staging_files

pytestmark = pytest.mark.integration
MiB = 1 << 20


def run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 MiB: random bytes, text (compressible), zeros, and an odd-sized random tail."""
    require_program("qemu-img")
    path = tmp_path_factory.mktemp("raw") / "disk.raw"
    import random

    rnd = random.Random(13)
    text = b"".join(b"line %08d of some text\n" % i for i in range(60_000))
    path.write_bytes(rnd.randbytes(2 * MiB) + text[: 2 * MiB] + bytes(MiB) + rnd.randbytes(777_777))
    return path


VARIANTS = {
    "plain": [],
    "compressed": ["-c"],
    "compressed-zstd": ["-c", "-o", "compression_type=zstd"],
    "extended-l2": ["-o", "extended_l2=on"],
    "extended-l2-compressed": ["-c", "-o", "extended_l2=on"],
    "v2": ["-o", "compat=0.10"],
    "cluster-512": ["-o", "cluster_size=512"],
    "cluster-2M-compressed": ["-c", "-o", "cluster_size=2M"],
    "refcount-bits-1": ["-o", "refcount_bits=1"],
}


@pytest.fixture(scope="module")
def real(raw: Path) -> Path:
    """A plain qemu-img image with content, for the hostile edits."""
    out = raw.with_name("real.qcow2")
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, out)
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_qemu_img_convert_variants_pass(raw: Path, tmp_path: Path, variant: str) -> None:
    out = tmp_path / f"{variant}.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", *VARIANTS[variant], raw, out)
    report = check_file(out)
    assert report.data_clusters + report.compressed_clusters > 0
    if "-c" in VARIANTS[variant]:
        assert report.compressed_clusters > 0


def test_qemu_io_writes_snapshots_and_preallocation_pass(tmp_path: Path) -> None:
    require_program("qemu-io")
    img = tmp_path / "snap.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
    run("qemu-io", "-c", "write -P 0x11 0 5M", "-c", "write -c -P 0x22 8M 1M", img)
    run("qemu-img", "snapshot", "-c", "one", img)
    run("qemu-io", "-c", "write -P 0x33 1M 6M", "-c", "write -z 20M 1M", img)
    run("qemu-img", "snapshot", "-c", "two", img)
    run("qemu-io", "-c", "discard 0 2M", "-c", "write -P 0x44 30M 64k", img)
    report = check_file(img)
    assert report.l1_tables == 3 and report.compressed_clusters > 0

    sub = tmp_path / "sub.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", sub, "16M")
    run("qemu-io", "-c", "write -P 1 4k 4k", "-c", "write -z 1M 64k", sub)
    assert check_file(sub).data_clusters == 1

    for opts in ("preallocation=metadata", "preallocation=falloc"):
        pre = tmp_path / "pre.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, pre, "32M")
        assert check_file(pre).data_clusters == 32 * MiB // (64 * 1024)
        pre.unlink()


def _l2_offset(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    h = parse_header(data[:65536], file_size=len(data))
    (l1e,) = struct.unpack_from(">Q", data, h.l1_table_offset)
    return h.l1_table_offset, l1e & 0x00FF_FFFF_FFFF_FE00


def hostile(real: Path, tmp_path: Path, how: str) -> Path:
    data = bytearray(real.read_bytes())
    l1_offset, l2_offset = _l2_offset(real)
    far = (len(data) + 100 * MiB) & ~0xFFFF
    if how == "l1":
        struct.pack_into(">Q", data, l1_offset, far | 1 << 63)
    elif how == "l2":
        struct.pack_into(">Q", data, l2_offset + 8 * 5, far | 1 << 63)
    elif how == "cut":
        del data[len(data) // 2 :]
    out = tmp_path / f"hostile-{how}.qcow2"
    out.write_bytes(bytes(data))
    return out


CODES = {"l1": "l2-table-past-end", "l2": "data-cluster-past-end", "cut": "data-cluster-past-end"}


@pytest.mark.parametrize("how", sorted(CODES))
def test_edited_real_image_is_refused(real: Path, tmp_path: Path, how: str) -> None:
    bad = hostile(real, tmp_path, how)
    with pytest.raises(UnsafeImageError, match=CODES[how]):
        check_file(bad)
    # qemu agrees that these images are broken.
    rc = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(bad)], capture_output=True)
    assert rc.returncode != 0


@pytest.fixture
def http(image_service: ImageService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=image_service.url, headers=image_service.headers, timeout=60) as c:
        yield c


@pytest.mark.parametrize("how", sorted(CODES))
def test_image_service_refuses_the_upload(
    image_service: ImageService, http: httpx.Client, real: Path, tmp_path: Path, how: str
) -> None:
    iid = create(http, disk_format="qcow2")
    r = http.put(
        f"/v2/images/{iid}/file", content=hostile(real, tmp_path, how).read_bytes(), headers=OCTETS
    )
    assert r.status_code == 415, r.text
    assert CODES[how] in r.json()["message"]
    assert http.get(f"/v2/images/{iid}").json()["status"] == "queued"
    assert staging_files(image_service) == []
    assert not (image_service.data_dir / "images" / iid).exists()
    # The same image, unedited, is accepted afterwards.
    r = http.put(f"/v2/images/{iid}/file", content=real.read_bytes(), headers=OCTETS)
    assert r.status_code == 204, r.text
    assert http.get(f"/v2/images/{iid}").json()["status"] == "active"


@pytest.fixture
def rogue() -> Iterator[RogueServer]:
    with RogueServer() as srv:
        yield srv


@pytest.mark.parametrize("force_raw", [False, True])
@pytest.mark.parametrize("how", sorted(CODES))
def test_cache_fetch_refuses_and_leaves_no_trace(
    rogue: RogueServer, real: Path, tmp_path: Path, how: str, force_raw: bool
) -> None:
    img = rogue.add(
        RogueImage(str(uuid.uuid4()), hostile(real, tmp_path, how).read_bytes(), "qcow2")
    )
    cache = _rogue_cache(tmp_path / "node", rogue, force_raw=force_raw)
    with pytest.raises(UnsafeImageError, match=CODES[how]):
        cache.ensure_cached(img.id)
    assert _leftovers(cache.cfg) == []
    good = rogue.add(RogueImage(str(uuid.uuid4()), real.read_bytes(), "qcow2"))
    assert cache.ensure_cached(good.id).path.exists()
