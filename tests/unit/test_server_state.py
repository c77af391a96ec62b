"""Folders vs hypervisor: list/show/disks/delete through the manager, with fake drivers."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cowfleet import config
from cowfleet.compute.domain_xml import (
    DiskTarget,
    DomainMetadata,
    DomainSpec,
    build_domain_xml,
    parse_disks,
)
from cowfleet.compute.drivers.base import NO_HYPERVISOR, DomainInfo
from cowfleet.compute.drivers.none import NoneDriver
from cowfleet.compute.manager import ServerManager
from cowfleet.compute.provision import Provisioner
from cowfleet.compute.state import BROKEN_FOLDER, MISSING_DOMAIN, ORPHAN_DOMAIN
from cowfleet.errors import BackendUnavailableError, ConflictError, NotFoundError

IMAGE_ID = "6f1c0b7e-4a53-4e0c-9d3e-0a4d1f1d2b01"


@dataclass(frozen=True)
class Img:
    id: str = IMAGE_ID
    name: str | None = "cirros"
    status: str = "active"
    disk_format: str | None = "raw"
    virtual_size: int | None = 1 << 20
    min_disk: int = 0
    min_ram: int = 0
    properties: dict[str, str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "properties", self.properties or {})


class Images:
    def find(self, ref: str) -> Img:
        return Img()

    def get(self, ref: str) -> Img:
        return Img()


@dataclass(frozen=True)
class Base:
    path: Path
    format: str
    virtual_size: int


class Cache:
    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir

    def ensure_cached(self, image_id: str) -> Base:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        p = self.base_dir / hashlib.sha1(image_id.encode()).hexdigest()
        if not p.exists():
            p.write_bytes(b"\0" * (1 << 20))
            p.chmod(0o444)
        return Base(p, "raw", 1 << 20)


class FakeLibvirt:
    """An in-memory hypervisor with the Driver interface."""

    name = "libvirt"
    can_run = True

    def __init__(self, reachable: bool = True) -> None:
        self.domains: dict[str, tuple[str, str, bool]] = {}  # uuid -> (name, xml, active)
        self.reachable = reachable

    def _up(self) -> None:
        if not self.reachable:
            raise BackendUnavailableError("libvirt is unreachable at test:///")

    def define(self, spec: DomainSpec) -> None:
        self._up()
        if spec.uuid in self.domains or any(n == spec.name for n, _, _ in self.domains.values()):
            raise ConflictError("exists")
        self.domains[spec.uuid] = (spec.name, build_domain_xml(spec), False)

    def start(self, uuid: str) -> None:
        self._up()
        n, x, _ = self.domains[uuid]
        self.domains[uuid] = (n, x, True)

    def stop(self, uuid: str, *, force: bool = False, timeout: float = 60.0) -> None:
        n, x, _ = self.domains[uuid]
        self.domains[uuid] = (n, x, False)

    def undefine(self, uuid: str) -> None:
        self._up()
        self.domains.pop(uuid, None)

    def _info(self, uuid: str) -> DomainInfo:
        from cowfleet.compute.domain_xml import parse_metadata

        n, x, active = self.domains[uuid]
        return DomainInfo(
            uuid,
            n,
            7 if active else None,
            "running" if active else "shut off",
            active,
            parse_metadata(x),
        )

    def info(self, uuid: str) -> DomainInfo | None:
        self._up()
        return self._info(uuid) if uuid in self.domains else None

    def list_domains(self) -> list[DomainInfo]:
        self._up()
        return [self._info(u) for u in self.domains]

    def disks(self, uuid: str) -> list[DiskTarget] | None:
        self._up()
        if uuid not in self.domains:
            raise NotFoundError("no domain")
        return parse_disks(self.domains[uuid][1])

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _no_lock(_d: Path, _n: str) -> Iterator[None]:
    yield


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    return config.load(None, env={"COWFLEET_HOME": str(tmp_path), "COWFLEET_DRIVER": "libvirt"})


def _create(cfg: config.Config, driver: Any, name: str) -> str:
    prov = Provisioner(
        cfg,
        images=Images(),
        cache=Cache(cfg.base_dir),
        driver=driver,
        lock=_no_lock,
        durable=False,
    )
    return prov.create(name, "cirros", "m1.tiny").uuid


def _manager(cfg: config.Config, lv: FakeLibvirt) -> ServerManager:
    return ServerManager(cfg, drivers=lambda n: lv if n == "libvirt" else NoneDriver())


def test_states_come_from_the_hypervisor_and_mismatches_are_reported(
    cfg: config.Config, tmp_path: Path
) -> None:
    lv = FakeLibvirt()
    ok = _create(cfg, lv, "ok")
    gone_folder = _create(cfg, lv, "gone-folder")
    gone_domain = _create(cfg, lv, "gone-domain")
    disks_only = _create(cfg, NoneDriver(), "disks-only")
    # a foreign domain and a cowfleet domain of another instances path: not ours
    other = config.load(None, env={"COWFLEET_HOME": str(tmp_path / "other")})
    lv.define(
        DomainSpec("foreign", "11111111-1111-1111-1111-111111111111", "qemu", 64, 1, (), Path("/x"))
    )
    lv.define(
        DomainSpec(
            "elsewhere",
            "22222222-2222-2222-2222-222222222222",
            "qemu",
            64,
            1,
            (),
            Path("/x"),
            instances_path=other.instances_path,
        )
    )
    import shutil

    shutil.rmtree(cfg.instances_path / gone_folder)
    lv.undefine(gone_domain)
    (cfg.instances_path / "33333333-3333-3333-3333-333333333333").mkdir()  # no record

    with _manager(cfg, lv) as mgr:
        rows = {r.name: r for r in mgr.list_servers()}
    assert rows["ok"].state == "running" and rows["ok"].id == 7 and rows["ok"].uuid == ok
    assert rows["ok"].image == "cirros" and rows["ok"].flavor == "m1.tiny"
    assert rows["gone-folder"].state == ORPHAN_DOMAIN and rows["gone-folder"].uuid == gone_folder
    assert rows["gone-domain"].state == MISSING_DOMAIN and rows["gone-domain"].problem
    assert rows["disks-only"].state == NO_HYPERVISOR and rows["disks-only"].uuid == disks_only
    assert rows["-"].state == BROKEN_FOLDER
    assert "foreign" not in rows and "elsewhere" not in rows
    assert len(rows) == 5


def test_disks_come_from_the_domain_or_the_folder(cfg: config.Config) -> None:
    lv = FakeLibvirt()
    u = _create(cfg, lv, "a")
    n = _create(cfg, NoneDriver(), "b")
    with _manager(cfg, lv) as mgr:
        assert mgr.disks("a") == [DiskTarget("vda", str(cfg.instances_path / u / "disk"))]
        assert mgr.disks(n) == [DiskTarget("vda", str(cfg.instances_path / n / "disk"))]
        detail = mgr.show(u)
        assert detail.row.state == "running" and detail.record is not None
        assert detail.to_dict()["disks"] == [
            {"target": "vda", "source": str(cfg.instances_path / u / "disk")}
        ]
        with pytest.raises(NotFoundError):
            mgr.show("nope")


def test_delete_removes_domain_and_folder_never_the_base(cfg: config.Config) -> None:
    lv = FakeLibvirt()
    u1 = _create(cfg, lv, "a")
    u2 = _create(cfg, lv, "b")
    base = cfg.base_dir / hashlib.sha1(IMAGE_ID.encode()).hexdigest()
    with _manager(cfg, lv) as mgr:
        mgr.delete("a")
        assert u1 not in lv.domains and not (cfg.instances_path / u1).exists()
        # an orphan domain can be deleted by name too
        import shutil

        shutil.rmtree(cfg.instances_path / u2)
        mgr.delete("b")
        assert lv.domains == {}
        assert mgr.list_servers() == []
    assert base.read_bytes() == b"\0" * (1 << 20)


def test_start_redefines_a_missing_domain_and_stop(cfg: config.Config) -> None:
    lv = FakeLibvirt()
    u = _create(cfg, lv, "a")
    lv.undefine(u)
    with _manager(cfg, lv) as mgr:
        assert mgr.start("a").state == "running"
        assert mgr.stop("a").state == "shut off"


def test_none_driver_server_cannot_start(cfg: config.Config) -> None:
    _create(cfg, NoneDriver(), "d")
    with _manager(cfg, FakeLibvirt()) as mgr, pytest.raises(ConflictError, match="none driver"):
        mgr.start("d")


def test_libvirt_unreachable(cfg: config.Config) -> None:
    lv = FakeLibvirt()
    _create(cfg, NoneDriver(), "d")
    lv.reachable = False
    with _manager(cfg, lv) as mgr:
        # only none-driver instances: listed, orphan check skipped with a warning
        assert [r.state for r in mgr.list_servers()] == [NO_HYPERVISOR]
    lv.reachable = True
    _create(cfg, lv, "l")
    lv.reachable = False
    with _manager(cfg, lv) as mgr, pytest.raises(BackendUnavailableError):
        mgr.list_servers()


def test_metadata_marks_instances_path(cfg: config.Config) -> None:
    lv = FakeLibvirt()
    u = _create(cfg, lv, "a")
    info = lv.info(u)
    assert info is not None
    assert info.metadata == DomainMetadata(str(cfg.instances_path), IMAGE_ID, "m1.tiny")


def test_names_are_free_again_after_delete_or_lost_folder(cfg: config.Config) -> None:
    lv = FakeLibvirt()
    first = _create(cfg, lv, "a")
    with _manager(cfg, lv) as mgr:
        mgr.delete("a")
    second = _create(cfg, lv, "a")  # released by delete
    assert second != first
    import shutil

    lv.undefine(second)
    shutil.rmtree(cfg.instances_path / second)  # folder lost by hand: the claim is stale
    third = _create(cfg, lv, "a")
    with _manager(cfg, lv) as mgr:
        assert [r.uuid for r in mgr.list_servers()] == [third]
    with pytest.raises(ConflictError):
        _create(cfg, lv, "a")


def test_folder_without_claim_still_holds_its_name(cfg: config.Config) -> None:
    lv = FakeLibvirt()
    _create(cfg, lv, "restored")
    (cfg.instances_path / ".names" / "restored").unlink()  # e.g. copied in by hand
    with pytest.raises(ConflictError, match="restored"):
        _create(cfg, lv, "restored")
    assert os.path.islink(cfg.instances_path / ".names" / "restored") is False


def test_unfinished_creation_is_reported_and_can_be_deleted(cfg: config.Config) -> None:
    lv = FakeLibvirt()
    _create(cfg, lv, "done")
    uuid = "44444444-4444-4444-4444-444444444444"
    tmp = cfg.instances_path / f".{uuid}.tmp"
    tmp.mkdir()
    (tmp / "disk").write_bytes(b"half")  # a create killed half-way
    with _manager(cfg, lv) as mgr:
        rows = {r.uuid: r for r in mgr.list_servers()}
        assert rows[uuid].state == "incomplete" and "unfinished" in (rows[uuid].problem or "")
        mgr.delete(uuid)
        assert not tmp.exists()
        assert [r.name for r in mgr.list_servers()] == ["done"]
