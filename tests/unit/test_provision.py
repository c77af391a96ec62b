"""Provisioning with the none driver and fake image service / cache (no external programs)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cowfleet import config, proc
from cowfleet.compute import instance as inst
from cowfleet.compute.domain_xml import DomainSpec
from cowfleet.compute.drivers.none import NoneDriver
from cowfleet.compute.ephemeral import ephemeral_base_name
from cowfleet.compute.provision import DEFAULT_CMDLINE, Provisioner
from cowfleet.errors import (
    CommandError,
    ConflictError,
    NotFoundError,
    ValidationError,
)

GIB = 1024**3
IMAGE_ID = "6f1c0b7e-4a53-4e0c-9d3e-0a4d1f1d2b01"
KERNEL_ID = "6f1c0b7e-4a53-4e0c-9d3e-0a4d1f1d2b02"
RAMDISK_ID = "6f1c0b7e-4a53-4e0c-9d3e-0a4d1f1d2b03"
FLAVORS = """
[flavors.t1.full]
vcpus = 1
ram_mb = 256
root_gb = 1
ephemeral_gb = 1
swap_mb = 64
[flavors.t1.small]
vcpus = 1
ram_mb = 128
root_gb = 1
"""


@dataclass(frozen=True)
class FakeImage:
    id: str
    name: str | None = "cirros"
    status: str = "active"
    disk_format: str | None = "raw"
    virtual_size: int | None = 4 * 1024 * 1024
    min_disk: int = 0
    min_ram: int = 0
    properties: Mapping[str, str] = field(default_factory=dict)


class FakeImages:
    def __init__(self, *images: FakeImage) -> None:
        self.by_id = {i.id: i for i in images}

    def find(self, name_or_id: str) -> FakeImage:
        if name_or_id in self.by_id:
            return self.by_id[name_or_id]
        for i in self.by_id.values():
            if i.name == name_or_id:
                return i
        raise NotFoundError(f"image {name_or_id} not found")

    def get(self, image_id: str) -> FakeImage:
        if image_id not in self.by_id:
            raise NotFoundError(f"image {image_id} not found")
        return self.by_id[image_id]


@dataclass(frozen=True)
class FakeBase:
    path: Path
    format: str
    virtual_size: int


class FakeCache:
    """Puts a small raw file in _base the first time an image is asked for."""

    def __init__(self, base_dir: Path, sizes: Mapping[str, int] | None = None) -> None:
        self.base_dir = base_dir
        self.sizes = dict(sizes or {})
        self.calls: list[str] = []

    def ensure_cached(self, image_id: str) -> FakeBase:
        self.calls.append(image_id)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        path = self.base_dir / hashlib.sha1(image_id.encode()).hexdigest()
        size = self.sizes.get(image_id, 4 * 1024 * 1024)
        if not path.exists():
            with open(path, "wb") as fh:
                fh.truncate(size)
                fh.seek(0)
                fh.write(b"BASE-" + image_id.encode())
            os.chmod(path, 0o444)
        return FakeBase(path, "raw", size)


class RecordingDriver(NoneDriver):
    """The none driver, recording calls, optionally failing at a step."""

    can_run = True

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.calls: list[str] = []
        self.specs: list[DomainSpec] = []

    def define(self, spec: DomainSpec) -> None:
        self.calls.append("define")
        self.specs.append(spec)
        if self.fail_on == "define":
            raise ConflictError("domain exists")

    def start(self, uuid: str) -> None:
        self.calls.append("start")
        if self.fail_on == "start":
            raise CommandError("libvirt: start domain: qemu failed", stderr="boom")

    def undefine(self, uuid: str) -> None:
        self.calls.append("undefine")


@contextlib.contextmanager
def _no_lock(_dir: Path, _name: str) -> Iterator[None]:
    yield


class FakeMkfs:
    def __init__(self) -> None:
        self.argvs: list[list[str]] = []

    def __call__(self, argv: list[str], **_kw: Any) -> proc.Completed:
        self.argvs.append(list(argv))
        with open(argv[-1], "r+b") as fh:
            fh.write(b"FS:" + argv[2].encode() if argv[0] == "mkfs" else b"SWAPSPACE2")
        return proc.Completed(tuple(argv), 0, "", "", 0.0)


@dataclass
class Env:
    cfg: config.Config
    images: FakeImages
    cache: FakeCache
    driver: RecordingDriver
    mkfs: FakeMkfs

    def prov(self) -> Provisioner:
        return Provisioner(
            self.cfg,
            images=self.images,
            cache=self.cache,
            driver=self.driver,
            lock=_no_lock,
            runner=self.mkfs,
            durable=False,
        )


@pytest.fixture
def env(tmp_path: Path) -> Env:
    cfgfile = tmp_path / "c.toml"
    cfgfile.write_text(FLAVORS)
    cfg = config.load(
        cfgfile,
        env={"COWFLEET_HOME": str(tmp_path / "home"), "COWFLEET_DRIVER": "none"},
    )
    images = FakeImages(
        FakeImage(IMAGE_ID),
        FakeImage(KERNEL_ID, name="vmlinuz", disk_format="aki"),
        FakeImage(RAMDISK_ID, name="initrd", disk_format="ari"),
    )
    return Env(cfg, images, FakeCache(cfg.base_dir), RecordingDriver(), FakeMkfs())


def _qcow2(path: Path) -> dict[str, Any]:
    """The header fields the tests check, read with struct (independent of cowfleet)."""
    data = path.read_bytes()
    magic, version, bf_off, bf_size, _bits, size = struct.unpack(">4sIQIIQ", data[:32])
    assert magic == b"QFI\xfb"
    header_length = struct.unpack(">I", data[100:104])[0] if version >= 3 else 72
    backing = data[bf_off : bf_off + bf_size].decode()
    fmt = None
    off = header_length
    while off + 8 <= len(data):
        ext, length = struct.unpack(">II", data[off : off + 8])
        if ext == 0:
            break
        if ext == 0xE2792ACA:
            fmt = data[off + 8 : off + 8 + length].decode()
        off += 8 + ((length + 7) & ~7)
    return {"version": version, "backing": backing, "backing_format": fmt, "size": size}


def _snapshot(base_dir: Path) -> dict[str, tuple[Any, ...]]:
    """Identity of every base: content head, size, mtime, inode, mode (bases are sparse)."""
    out: dict[str, tuple[Any, ...]] = {}
    for p in sorted(base_dir.iterdir()):
        if p.is_file():
            st = p.stat()
            with open(p, "rb") as fh:
                head = hashlib.sha256(fh.read(1 << 20)).hexdigest()
            out[p.name] = (head, st.st_size, st.st_mtime_ns, st.st_ino, st.st_mode)
    return out


def _instance_dirs(cfg: config.Config) -> list[str]:
    return sorted(
        p.name for p in cfg.instances_path.iterdir() if p.name not in ("_base", "locks", ".names")
    )


def test_full_flavor_builds_the_nova_layout(env: Env) -> None:
    rec = env.prov().create("web-1", "cirros", "t1.full")
    folder = env.cfg.instances_path / rec.uuid
    assert _instance_dirs(env.cfg) == [rec.uuid]  # no temp folder left
    assert sorted(p.name for p in folder.iterdir()) == [
        "console.log",
        "disk",
        "disk.info",
        "disk.local",
        "disk.swap",
        "instance.json",
    ]
    info = json.loads((folder / "disk.info").read_text())
    assert info == {str(folder / f): "qcow2" for f in ("disk", "disk.local", "disk.swap")}
    assert (folder / "disk.info").read_text().count("\n") == 1
    assert (folder / "console.log").stat().st_size == 0

    root = _qcow2(folder / "disk")
    base = env.cfg.base_dir / hashlib.sha1(IMAGE_ID.encode()).hexdigest()
    assert root == {"version": 3, "backing": str(base), "backing_format": "raw", "size": GIB}
    eph = _qcow2(folder / "disk.local")
    eph_name = ephemeral_base_name(1, "ext4")
    assert eph_name.startswith("ephemeral_1_ext4_ephemeral0_")
    assert eph["backing"] == str(env.cfg.base_dir / eph_name)
    assert eph["backing_format"] == "raw" and eph["size"] == GIB
    swap = _qcow2(folder / "disk.swap")
    assert swap["backing"] == str(env.cfg.base_dir / "swap_64")
    assert swap["backing_format"] == "raw" and swap["size"] == 64 * 1024 * 1024

    # ephemeral/swap bases: formatted once, read-only
    assert env.mkfs.argvs[0][:3] == ["mkfs", "-t", "ext4"]
    assert "-L" in env.mkfs.argvs[0] and "ephemeral0" in env.mkfs.argvs[0]
    assert env.mkfs.argvs[1][0] == "mkswap"
    for name in (eph_name, "swap_64"):
        assert stat.S_IMODE((env.cfg.base_dir / name).stat().st_mode) == 0o444

    saved = inst.read_record(folder)
    assert saved == rec
    assert saved.name == "web-1" and saved.image_id == IMAGE_ID and saved.image_name == "cirros"
    assert saved.flavor.name == "t1.full" and saved.driver == "none"
    assert [(d.file, d.target) for d in saved.disks] == [
        ("disk", "vda"),
        ("disk.local", "vdb"),
        ("disk.swap", "vdc"),
    ]
    assert env.driver.calls == ["define", "start"]


def test_second_instance_shares_every_base(env: Env) -> None:
    a = env.prov().create("a", IMAGE_ID, "t1.full")
    before = _snapshot(env.cfg.base_dir)
    b = env.prov().create("b", IMAGE_ID, "t1.full")
    assert _snapshot(env.cfg.base_dir) == before  # nothing new, nothing rewritten
    assert len(env.mkfs.argvs) == 2  # one mkfs, one mkswap, for both instances
    for f in ("disk", "disk.local", "disk.swap"):
        pa = _qcow2(env.cfg.instances_path / a.uuid / f)
        pb = _qcow2(env.cfg.instances_path / b.uuid / f)
        assert pa["backing"] == pb["backing"]


def test_filesystems_never_share_an_ephemeral_base() -> None:
    fss = ("ext4", "ext3", "xfs", "vfat")
    assert len({ephemeral_base_name(1, fs) for fs in fss}) == 4
    assert all(f"_{fs}_ephemeral0_" in ephemeral_base_name(1, fs) for fs in fss)
    assert ephemeral_base_name(1, "ext4", "data") != ephemeral_base_name(1, "ext4")
    with pytest.raises(ValidationError, match="unsupported ephemeral filesystem"):
        ephemeral_base_name(1, "ntfs;rm")
    with pytest.raises(ValidationError, match="label"):
        ephemeral_base_name(1, "ext4", "../x")


def test_no_ephemeral_or_swap_for_small_flavor(env: Env) -> None:
    rec = env.prov().create("small", IMAGE_ID, "t1.small")
    files = sorted(p.name for p in (env.cfg.instances_path / rec.uuid).iterdir())
    assert files == ["console.log", "disk", "disk.info", "instance.json"]
    assert env.mkfs.argvs == []


def test_name_collision_is_a_conflict_and_leaves_nothing(env: Env) -> None:
    first = env.prov().create("dup", IMAGE_ID, "t1.small")
    with pytest.raises(ConflictError, match="dup"):
        env.prov().create("dup", IMAGE_ID, "t1.small")
    assert _instance_dirs(env.cfg) == [first.uuid]


def test_disk_smaller_than_image(env: Env) -> None:
    big = FakeImage("6f1c0b7e-4a53-4e0c-9d3e-0a4d1f1d2b09", name="big", virtual_size=2 * GIB)
    env.images.by_id[big.id] = big
    with pytest.raises(ValidationError, match=r"root disk \(1 GiB\) is smaller.*2 GiB"):
        env.prov().create("x", "big", "t1.small")
    assert env.cache.calls == []  # refused before any download
    assert not env.cfg.instances_path.exists() or _instance_dirs(env.cfg) == []


def test_disk_smaller_than_cached_base_when_image_does_not_say(env: Env) -> None:
    img = FakeImage("6f1c0b7e-4a53-4e0c-9d3e-0a4d1f1d2b0a", name="unsized", virtual_size=None)
    env.images.by_id[img.id] = img
    env.cache.sizes[img.id] = GIB + 512
    with pytest.raises(ValidationError, match="smaller than the virtual size"):
        env.prov().create("x", "unsized", "t1.small")
    assert _instance_dirs(env.cfg) == []


@pytest.mark.parametrize(
    ("image", "error", "pattern"),
    [
        (FakeImage(IMAGE_ID, status="queued"), ConflictError, "not active"),
        (FakeImage(IMAGE_ID, min_ram=1024), ValidationError, "min_ram"),
        (FakeImage(IMAGE_ID, min_disk=5), ValidationError, "min_disk"),
        (FakeImage(IMAGE_ID, disk_format="aki"), ValidationError, "kernel/ramdisk"),
        (FakeImage(IMAGE_ID, properties={"kernel_id": IMAGE_ID}), ValidationError, "expected aki"),
        (
            FakeImage(IMAGE_ID, properties={"kernel_id": "6f1c0b7e-4a53-4e0c-9d3e-0a4d1f1d2bff"}),
            NotFoundError,
            "not found",
        ),
        (FakeImage(IMAGE_ID, properties={"ramdisk_id": RAMDISK_ID}), ValidationError, "kernel_id"),
    ],
)
def test_bad_requests_are_refused_before_any_work(
    env: Env, image: FakeImage, error: type[Exception], pattern: str
) -> None:
    env.images.by_id[IMAGE_ID] = image
    with pytest.raises(error, match=pattern):
        env.prov().create("x", IMAGE_ID, "t1.small")
    assert env.cache.calls == []
    assert env.driver.calls == []


def test_unknown_flavor_image_and_bad_name(env: Env) -> None:
    with pytest.raises(NotFoundError, match="flavor"):
        env.prov().create("x", IMAGE_ID, "m9.nope")
    with pytest.raises(NotFoundError, match="image"):
        env.prov().create("x", "no-such-image", "t1.small")
    for bad in ("", "-x", "a/b", "a b", "x" * 64, "../etc", IMAGE_ID):
        with pytest.raises(ValidationError):
            env.prov().create(bad, IMAGE_ID, "t1.small")
    assert env.cache.calls == []


@pytest.mark.parametrize("step", ["define", "start"])
def test_driver_failure_rolls_back_and_keeps_bases(env: Env, step: str) -> None:
    env.prov().create("keep", IMAGE_ID, "t1.full")  # bases exist now
    before = _snapshot(env.cfg.base_dir)
    dirs = _instance_dirs(env.cfg)
    env.driver = RecordingDriver(fail_on=step)
    with pytest.raises((ConflictError, CommandError)):
        env.prov().create("broken", IMAGE_ID, "t1.full")
    assert _instance_dirs(env.cfg) == dirs  # the half-made instance is gone
    assert _snapshot(env.cfg.base_dir) == before
    if step == "start":
        assert env.driver.calls == ["define", "start", "undefine"]


def test_overlay_failure_half_way_rolls_back(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    import cowfleet.compute.provision as provision

    real = provision.write_overlay
    seen: list[Path] = []

    def failing(out: Path, *a: Any, **kw: Any) -> Any:
        seen.append(out)
        if out.name == "disk.swap":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(out, *a, **kw)

    monkeypatch.setattr(provision, "write_overlay", failing)
    from cowfleet.errors import StorageFullError

    with pytest.raises(StorageFullError, match="No space"):
        env.prov().create("half", IMAGE_ID, "t1.full")
    assert [p.name for p in seen] == ["disk", "disk.local", "disk.swap"]
    assert _instance_dirs(env.cfg) == []
    assert sorted(_snapshot(env.cfg.base_dir)) == sorted(
        [hashlib.sha1(IMAGE_ID.encode()).hexdigest(), ephemeral_base_name(1, "ext4"), "swap_64"]
    )


def test_kernel_and_ramdisk_are_cached_and_copied(env: Env) -> None:
    env.images.by_id[IMAGE_ID] = FakeImage(
        IMAGE_ID,
        properties={
            "kernel_id": KERNEL_ID,
            "ramdisk_id": RAMDISK_ID,
            "os_command_line": "console=ttyS0 x=1",
        },
    )
    rec = env.prov().create("k", IMAGE_ID, "t1.small")
    assert env.cache.calls == [IMAGE_ID, KERNEL_ID, RAMDISK_ID]
    folder = env.cfg.instances_path / rec.uuid
    kbase = env.cfg.base_dir / hashlib.sha1(KERNEL_ID.encode()).hexdigest()
    assert rec.kernel_base == str(kbase)
    assert (folder / "kernel").read_bytes() == kbase.read_bytes()
    assert (folder / "kernel").stat().st_ino != kbase.stat().st_ino  # a copy, not a link
    assert (folder / "ramdisk").exists()
    spec = env.driver.specs[-1]
    assert spec.kernel == folder / "kernel" and spec.initrd == folder / "ramdisk"
    assert spec.cmdline == "console=ttyS0 x=1"
    assert (
        spec.disks[0].backing[0].path
        == env.cfg.base_dir / hashlib.sha1(IMAGE_ID.encode()).hexdigest()
    )


def test_kernel_without_command_line_gets_default(env: Env) -> None:
    env.images.by_id[IMAGE_ID] = FakeImage(IMAGE_ID, properties={"kernel_id": KERNEL_ID})
    env.prov().create("k2", IMAGE_ID, "t1.small")
    assert env.driver.specs[-1].cmdline == DEFAULT_CMDLINE
    assert env.driver.specs[-1].initrd is None


def test_base_altered_after_caching_is_refused(env: Env, tmp_path: Path) -> None:
    """A cached base that no longer passes inspection (now a qcow2 naming a host file)."""
    from cowfleet.errors import UnsafeImageError
    from cowfleet.formats.overlay import create_overlay

    base = env.cache.ensure_cached(IMAGE_ID).path
    evil = tmp_path / "evil.qcow2"
    create_overlay(evil, Path("/etc/shadow"), "raw", size=1 << 20, backing_virtual_size=1 << 20)
    os.chmod(base, 0o644)
    base.write_bytes(evil.read_bytes().ljust(4 * 1024 * 1024, b"\0"))
    env.cache.calls.clear()
    with pytest.raises(UnsafeImageError):
        env.prov().create("evil", IMAGE_ID, "t1.small")
    assert _instance_dirs(env.cfg) == []
    assert not (env.cfg.instances_path / ".names" / "evil").exists()


def test_write_overlay_refuses_small_sizes_and_existing_files(tmp_path: Path) -> None:
    from cowfleet.compute.disks import write_overlay
    from cowfleet.errors import LocalIOError

    base = tmp_path / "base"
    base.write_bytes(b"\0" * 4096)
    out = tmp_path / "disk"
    with pytest.raises(ValidationError, match="smaller"):
        write_overlay(out, base, "raw", 1024, backing_virtual_size=4096)
    assert not out.exists()
    assert write_overlay(out, base, "raw", 4097, backing_virtual_size=4096) == 4608
    assert _qcow2(out)["size"] == 4608 and _qcow2(out)["backing"] == str(base)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with pytest.raises(LocalIOError):
        write_overlay(out, base, "raw", 4096, backing_virtual_size=4096)  # never overwrites
    with pytest.raises(ValidationError, match="backing format"):
        write_overlay(tmp_path / "x", base, "json:{}", 4096, backing_virtual_size=4096)
