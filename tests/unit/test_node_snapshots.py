"""``node.snapshots``: the job's order of steps and its clean-up (fake driver and image
client; the chain is a real qcow2 overlay written by cowfleet on a raw base)."""

from __future__ import annotations

import json
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest

from cowfleet.compute import flatten
from cowfleet.compute.drivers.base import DomainInfo
from cowfleet.compute.drivers.libvirt_snapshot import _strip_overlay, snapshot_xml
from cowfleet.errors import ConflictError, StorageFullError
from cowfleet.node import snapshots as snap

MiB = 1 << 20


class FakeImages:
    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[str, Any]] = []
        self.received = b""

    def update(self, image_id: str, changes: Any) -> None:
        self.calls.append(("update", dict(changes)))

    def upload(self, image_id: str, data: Any, *, size: int | None = None) -> None:
        for chunk in data:
            self.received += bytes(chunk)
            if self.fail is not None:
                raise self.fail
        self.calls.append(("upload", size))

    def delete(self, image_id: str) -> None:
        self.calls.append(("delete", image_id))

    def close(self) -> None:
        self.calls.append(("close", None))


class FakeLiveDriver:
    name = "libvirt"
    can_run = True

    def __init__(self) -> None:
        self.steps: list[str] = []

    def info(self, uuid: str) -> DomainInfo:
        return DomainInfo(uuid, "vm", 1, "running", True)

    def disk_snapshot(self, uuid: str, target: str, overlay: Path) -> float:
        self.steps.append(f"snapshot {target} {overlay.name}")
        return 0.01

    def commit_back(self, uuid: str, target: str, overlay: Path) -> float:
        self.steps.append(f"commit {target} {overlay.name}")
        return 0.02


def _instance(tmp_path: Path) -> tuple[Path, str]:
    uuid = str(uuidlib.uuid4())
    folder = tmp_path / uuid
    folder.mkdir()
    (folder / "disk").write_bytes(b"\x42" * MiB)  # read as the chain's only layer
    return folder, uuid


def _chain(path: Path) -> flatten.ChainMap:
    """What ``qemu-img map`` says of a 4 MiB disk whose first MiB holds data."""
    return flatten.ChainMap(4 * MiB, ((str(path), "raw"),), (flatten.Extent(0, MiB, 0, 0),))


def _run(tmp_path: Path, images: FakeImages, driver: Any) -> tuple[snap.SnapshotView, Path]:
    folder, uuid = _instance(tmp_path)
    s = snap.Snapshots(tmp_path, driver, lambda token: images, chain_map=_chain)
    image_id = str(uuidlib.uuid4())
    s.start(uuid, image_id, "tok")
    return s.wait(uuid, 60), folder


def test_a_live_snapshot_switches_streams_then_commits(tmp_path: Path) -> None:
    images, driver = FakeImages(), FakeLiveDriver()
    view, folder = _run(tmp_path, images, driver)
    assert view.state == "done" and view.live and view.pause_ms == 30.0
    assert driver.steps == ["snapshot vda disk.snap", "commit vda disk.snap"]
    assert images.calls[0] == ("update", {"disk_format": "qcow2", "container_format": "bare"})
    assert ("upload", view.bytes_sent) in images.calls
    assert images.received[:4] == b"QFI\xfb" and view.allocated == MiB
    assert images.received[-MiB:] == b"\x42" * MiB  # the one data run, last
    assert not (folder / snap.MARKER).exists()


def test_a_failed_upload_deletes_the_image_and_still_commits(tmp_path: Path) -> None:
    images = FakeImages(fail=StorageFullError("no space left (HTTP 507)"))
    driver = FakeLiveDriver()
    view, folder = _run(tmp_path, images, driver)
    assert view.state == "failed" and "507" in (view.fault or "")
    assert ("delete", view.image_id) in images.calls
    assert driver.steps[-1] == "commit vda disk.snap"
    assert not (folder / snap.MARKER).exists()


def test_one_snapshot_at_a_time_and_recover_cleans_markers(tmp_path: Path) -> None:
    folder, uuid = _instance(tmp_path)
    images = FakeImages()
    s = snap.Snapshots(tmp_path, object(), lambda token: images)
    (folder / snap.MARKER).write_text(json.dumps({"image_id": "img-1", "token": "t"}))
    with pytest.raises(ConflictError):
        s.start(uuid, str(uuidlib.uuid4()), "tok")
    (folder / snap.OVERLAY).write_bytes(b"left over")
    assert s.recover() == [uuid]
    assert ("delete", "img-1") in images.calls
    assert not (folder / snap.MARKER).exists() and not (folder / snap.OVERLAY).exists()
    assert (folder / "disk").exists()


def test_snapshot_xml_keeps_the_other_disks_out() -> None:
    xml = snapshot_xml("vda", Path("/i/u/disk.snap"), ["vda", "vdb", "vdc"])
    assert "<disk name=\"vda\" snapshot='external'>" in xml
    assert '<source file="/i/u/disk.snap"/>' in xml
    assert "<disk name=\"vdb\" snapshot='no'/>" in xml and "vdc" in xml


def test_strip_overlay_puts_the_disk_back() -> None:
    xml = (
        "<domain><devices><disk type='file'><source file='/i/u/disk.snap'/>"
        "<backingStore type='file'><source file='/i/u/disk'/></backingStore>"
        "<target dev='vda'/></disk><disk type='file'><source file='/i/u/disk.local'/>"
        "<target dev='vdb'/></disk></devices></domain>"
    )
    out = _strip_overlay(xml, "vda", Path("/i/u/disk.snap"))
    assert "disk.snap" not in out and "backingStore" not in out
    assert 'source file="/i/u/disk"' in out and "/i/u/disk.local" in out
