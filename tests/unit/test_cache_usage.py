"""cache.usage.scan: which instance folders have which file in their disks' backing chains."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from cowfleet.cache import usage as usage_mod
from cowfleet.cache.usage import Usage, scan
from cowfleet.formats.overlay import create_overlay

MiB = 1024 * 1024
MAGIC = b"QFI\xfb"
UUID_A = "0b6f4c1e-1d7e-4c2a-9f0e-6a1f2b3c4d01"
UUID_B = "0b6f4c1e-1d7e-4c2a-9f0e-6a1f2b3c4d02"


def _raw(path: Path, size: int = MiB) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(b"RAW BASE " + path.name.encode())
        fh.truncate(size)
    return path


def _overlay(out: Path, backing: Path, fmt: str = "raw") -> Path:
    """A real qcow2 v3 overlay (cowfleet's writer) naming ``backing`` (absolute)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    create_overlay(out, backing, fmt, size=MiB, backing_virtual_size=MiB, durable=False)
    return out


def _qcow2(path: Path, backing: str | bytes, *, offset: int = 120, size: int = 0) -> Path:
    """A hand-made qcow2 v3 header whose backing file name lies at ``offset``.

    ``backing`` may be relative (create_overlay insists on absolute names).
    """
    name = backing.encode() if isinstance(backing, str) else backing
    fields = (MAGIC, 3, offset, len(name), 16, MiB, 0, 0, 0, 0, 0, 0, 0)
    header = struct.pack(">4sIQIIQIIQQIIQ", *fields)
    header += struct.pack(">QQQII", 0, 0, 0, 4, 112) + bytes(8)  # v3 fields, length 112
    header += bytes(8)  # end of the header extensions
    assert offset >= len(header)
    data = bytearray(max(offset + len(name), size, 512))
    data[: len(header)] = header
    data[offset : offset + len(name)] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def _ident(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _inst(tmp_path: Path) -> Path:
    root = tmp_path / "inst"
    (root / "_base").mkdir(parents=True, exist_ok=True)
    return root


def _clean(u: Usage) -> None:
    assert u.unreadable == () and u.broken == ()


def test_direct_backing_is_a_use_of_the_base(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    base = _raw(root / "_base" / ("a" * 40))
    other = _raw(root / "_base" / ("b" * 40))
    _overlay(root / UUID_A / "disk", base)
    _overlay(root / UUID_B / "disk", base)
    _overlay(root / UUID_B / "disk.local", other)
    (root / UUID_B / "console.log").write_bytes(b"")
    u = scan(root)
    _clean(u)
    assert (u.instances, u.disks) == (2, 3)
    assert u.users_of(base) == {UUID_A, UUID_B}
    assert u.users_of(other) == {UUID_B}
    assert u.users_of(_raw(root / "_base" / ("c" * 40))) == frozenset()
    assert u.by_base_name == {}


def test_chain_through_an_intermediate_uses_every_file(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    base = _raw(root / "_base" / ("a" * 40))
    middle = _overlay(tmp_path / "elsewhere" / "snapshot.qcow2", base)
    _overlay(root / UUID_A / "disk", middle, "qcow2")
    u = scan(root)
    _clean(u)
    assert u.users_of(base) == {UUID_A}
    assert u.users_of(middle) == {UUID_A}
    assert set(u.by_id) == {_ident(base), _ident(middle)}


def test_relative_backing_names_resolve_against_the_naming_file(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    base = _raw(root / "_base" / ("a" * 40))
    middle = _qcow2(root / "_base" / "middle.qcow2", "./" + base.name)  # relative to _base
    _qcow2(root / UUID_A / "disk", "../_base/middle.qcow2")  # relative to the folder
    u = scan(root)
    _clean(u)
    assert u.users_of(base) == {UUID_A} and u.users_of(middle) == {UUID_A}


def test_same_base_through_symlinked_paths_is_matched_by_inode(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    base = _raw(root / "_base" / ("a" * 40))
    alias = tmp_path / "alias.img"  # another name: only the inode can match it
    alias.symlink_to(base)
    link_root = tmp_path / "link-to-inst"
    link_root.symlink_to(root, target_is_directory=True)
    _overlay(root / UUID_A / "disk", alias)
    _overlay(root / UUID_B / "disk", link_root / "_base" / base.name)
    for u in (scan(root), scan(link_root)):
        _clean(u)
        assert u.by_base_name == {}  # nothing missing: matched by identity, not by name
        assert set(u.by_id) == {_ident(base)}
        assert u.users_of(base) == {UUID_A, UUID_B}
        assert u.users_of(link_root / "_base" / base.name) == {UUID_A, UUID_B}


def test_missing_backing_under_a_base_dir_counts_by_name_and_is_broken(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    name = "d" * 40
    local = _raw(root / "_base" / name)  # the same base name on this node
    remote = _raw(tmp_path / "other-node" / "_base" / name)  # mounted elsewhere there
    gone = _raw(tmp_path / "scratch" / "gone.img")
    disk = _overlay(root / UUID_A / "disk", remote)
    _overlay(root / UUID_B / "disk", gone)
    shutil.rmtree(tmp_path / "other-node")
    shutil.rmtree(tmp_path / "scratch")
    u = scan(root)
    assert u.unreadable == ()
    assert u.by_base_name == {name: frozenset({UUID_A})}  # "gone.img" is not under _base
    assert u.users_of(local) == {UUID_A}
    assert sorted((p.instance, p.path) for p in u.broken) == [
        (UUID_A, str(disk)),
        (UUID_B, str(root / UUID_B / "disk")),
    ]
    assert any(str(remote) in p.reason for p in u.broken)


def test_missing_base_below_an_intermediate_is_still_a_use_by_name(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    name = "e" * 40
    remote = _raw(tmp_path / "far" / "_base" / name)
    middle = _overlay(tmp_path / "mid.qcow2", remote)
    _overlay(root / UUID_A / "disk", middle, "qcow2")
    shutil.rmtree(tmp_path / "far")
    u = scan(root)
    assert u.users_of(root / "_base" / name) == {UUID_A}  # by name, though absent here
    assert u.users_of(middle) == {UUID_A}
    assert [p.instance for p in u.broken] == [UUID_A] and u.unreadable == ()


@pytest.mark.timeout(20)
def test_backing_loop_is_unreadable_and_does_not_hang(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    a = _raw(root / UUID_A / "disk")
    b = _overlay(tmp_path / "b.qcow2", a)  # B backed by A ...
    _overlay(a, b, "qcow2")  # ... and A (the disk) backed by B
    u = scan(root)
    assert [p.instance for p in u.unreadable] == [UUID_A]
    assert "loops back to" in u.unreadable[0].reason  # found at once, not by depth
    assert u.users_of(b) == {UUID_A}  # what was read is still counted


@pytest.mark.timeout(20)
def test_loop_spelled_differently_each_time_terminates_and_is_reported(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    d = tmp_path / "d"
    d.mkdir()
    (d / "again").symlink_to(".", target_is_directory=True)
    # d/x.qcow2 names "again/x.qcow2": the same file under an ever longer path (the
    # kernel stops resolving it after 40 symlinks, before the depth limit)
    x = _qcow2(d / "x.qcow2", "again/x.qcow2")
    _qcow2(root / UUID_A / "disk", str(x))
    u = scan(root)
    assert [p.instance for p in (*u.unreadable, *u.broken)] == [UUID_A]
    assert u.users_of(x) == {UUID_A}


@pytest.mark.timeout(20)
def test_chain_deeper_than_max_depth_is_unreadable(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    base = _raw(root / "_base" / ("a" * 40))
    below = base
    for i in range(usage_mod.MAX_DEPTH + 5):
        below = _qcow2(tmp_path / "chain" / f"{i}.qcow2", str(below))
    _qcow2(root / UUID_A / "disk", str(below))
    u = scan(root)
    assert [p.instance for p in u.unreadable] == [UUID_A]
    assert str(usage_mod.MAX_DEPTH) in u.unreadable[0].reason
    assert u.users_of(below) == {UUID_A}


def _forged_disk(folder: Path, base: Path) -> Path:
    """A disk whose bytes begin with a valid qcow2 header naming ``base``."""
    return _overlay(folder / "disk", base)


def test_disk_pinned_raw_in_disk_info_is_not_parsed(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    base = _raw(root / "_base" / ("f" * 40))
    forged = _forged_disk(root / UUID_A, base)
    # Nova's disk.info: full path of the final folder -> format
    (root / UUID_A / "disk.info").write_text(json.dumps({str(forged): "raw"}))
    # control: the same bytes, pinned qcow2, are read
    pinned_qcow2 = _forged_disk(root / UUID_B, base)
    (root / UUID_B / "disk.info").write_text(json.dumps({str(pinned_qcow2): "qcow2"}))
    u = scan(root)
    _clean(u)
    assert u.users_of(base) == {UUID_B}
    assert (u.instances, u.disks) == (2, 1)


def test_disk_info_keys_of_the_final_folder_apply_to_a_tmp_folder(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    base = _raw(root / "_base" / ("f" * 40))
    tmp_folder = root / f".{UUID_A}.tmp"
    _forged_disk(tmp_folder, base)
    (tmp_folder / "disk.info").write_text(json.dumps({str(root / UUID_A / "disk"): "raw"}))
    u = scan(root)
    assert u.users_of(base) == frozenset() and u.disks == 0


@pytest.mark.parametrize(
    "head",
    [
        MAGIC + b"\x00\x00\x00\x03" + bytes(20),  # truncated header
        MAGIC + struct.pack(">IQIIQ", 3, 0, 0, 99, MiB) + bytes(200),  # cluster_bits 99
        MAGIC + struct.pack(">I", 9) + os.urandom(300),  # version 9, garbage after it
        MAGIC + struct.pack(">IQII", 3, 120, 5000, 16) + bytes(400),  # name > 1023 bytes
    ],
    ids=["truncated", "bad-cluster-bits", "bad-version", "huge-name"],
)
def test_garbage_qcow2_header_is_unreadable(tmp_path: Path, head: bytes) -> None:
    root = _inst(tmp_path)
    (root / UUID_A).mkdir()
    (root / UUID_A / "disk").write_bytes(head)
    u = scan(root)
    assert [(p.instance, p.path) for p in u.unreadable] == [(UUID_A, str(root / UUID_A / "disk"))]


def test_garbage_header_in_an_intermediate_is_unreadable(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    middle = tmp_path / "mid.qcow2"
    middle.write_bytes(MAGIC + b"\x00\x00\x00\x03" + bytes(20))
    _qcow2(root / UUID_A / "disk", str(middle))
    u = scan(root)
    assert [p.instance for p in u.unreadable] == [UUID_A]


def test_raw_disks_are_not_uses_and_not_problems(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    _raw(root / UUID_A / "disk")
    (root / UUID_A / "disk.config").write_bytes(b"")
    u = scan(root)
    _clean(u)
    assert (u.instances, u.disks) == (1, 0) and u.by_id == {}


def test_unopenable_disk_is_unreadable_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the qemu user after libvirt chowned a 0600 disk: the manager cannot open it.
    # Tests run as root here, so the EACCES is injected.
    root = _inst(tmp_path)
    base = _raw(root / "_base" / ("a" * 40))
    disk = _overlay(root / UUID_A / "disk", base)
    real_open = os.open

    def deny(path: object, *args: object, **kw: object) -> int:
        if os.fspath(path) == str(disk):  # type: ignore[arg-type]
            raise PermissionError(errno.EACCES, "Permission denied", str(disk))
        return real_open(path, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(usage_mod.os, "open", deny)
    u = scan(root)
    assert [(p.instance, p.path) for p in u.unreadable] == [(UUID_A, str(disk))]


def test_hidden_tmp_folders_are_scanned_but_not_base_locks_or_names(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    bases = {k: _raw(root / "_base" / (k * 40)) for k in "abcd"}
    tmp_folder = f".{UUID_A}.tmp"
    _overlay(root / tmp_folder / "disk", bases["a"])
    _overlay(root / "_base" / "disk", bases["b"])
    _overlay(root / "locks" / "disk", bases["c"])
    _overlay(root / ".names" / "disk", bases["d"])
    (root / "stray-file").write_bytes(b"")  # files at the top are not folders
    u = scan(root)
    _clean(u)
    assert u.instances == 1 and u.disks == 1
    assert u.users_of(bases["a"]) == {tmp_folder}
    for k in "bcd":
        assert u.users_of(bases[k]) == frozenset(), k


def test_every_disk_file_of_a_folder_is_read(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    names = ["disk", "disk.local", "disk.swap", "disk.eph0", "disk.rescue"]
    bases = {n: _raw(root / "_base" / f"base-{i}") for i, n in enumerate(names)}
    for n in names:
        _overlay(root / UUID_A / n, bases[n])
    _overlay(root / UUID_A / "notadisk", _raw(root / "_base" / "unused"))
    u = scan(root)
    _clean(u)
    assert u.disks == len(names)
    assert all(u.users_of(b) == {UUID_A} for b in bases.values())
    assert u.users_of(root / "_base" / "unused") == frozenset()


@pytest.mark.parametrize("where", ["disk", "intermediate"])
def test_backing_name_beyond_the_first_4_kib_is_read(tmp_path: Path, where: str) -> None:
    root = _inst(tmp_path)
    base = _raw(root / "_base" / ("a" * 40))
    assert usage_mod.HEAD == 4096
    if where == "disk":
        _qcow2(root / UUID_A / "disk", str(base), offset=5000, size=65536)
        expected = {_ident(base)}
    else:
        middle = _qcow2(tmp_path / "mid.qcow2", str(base), offset=4096 + 8, size=8192)
        _qcow2(root / UUID_A / "disk", str(middle))
        expected = {_ident(base), _ident(middle)}
    u = scan(root)
    _clean(u)
    assert set(u.by_id) == expected
    assert u.users_of(base) == {UUID_A}


def test_backing_name_beyond_64_kib_is_unreadable_not_ignored(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    base = _raw(root / "_base" / ("a" * 40))
    _qcow2(root / UUID_A / "disk", str(base), offset=70000)
    u = scan(root)
    assert [p.instance for p in u.unreadable] == [UUID_A]


def test_missing_instances_path_is_empty(tmp_path: Path) -> None:
    u = scan(tmp_path / "nope")
    assert (u.instances, u.disks, dict(u.by_id)) == (0, 0, {})


def test_header_extensions_past_the_first_4_kib_are_read(tmp_path: Path) -> None:
    """A valid qcow2 whose extensions run past 4 KiB (no backing) is read, not unreadable."""
    root = _inst(tmp_path)
    fields = (MAGIC, 3, 0, 0, 16, MiB, 0, 0, 0, 0, 0, 0, 0)
    header = struct.pack(">4sIQIIQIIQQIIQ", *fields)
    header += struct.pack(">QQQII", 0, 0, 0, 4, 112) + bytes(8)
    header += struct.pack(">II", 0x6F000001, 6000) + bytes(6000)  # an unknown, long extension
    header += bytes(8)  # end of the header extensions
    disk = root / UUID_A / "disk"
    disk.parent.mkdir(parents=True)
    disk.write_bytes(header + bytes(65536 - len(header)))
    u = scan(root)
    _clean(u)
    assert u.disks == 1 and dict(u.by_id) == {}


# -- symlinked disks and folders (issue 13, item 1) ------------------------------------


def test_symlinked_disk_is_followed_and_keeps_its_base(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    base = _raw(root / "_base" / ("a" * 40))
    real = _overlay(tmp_path / "elsewhere" / "vm.qcow2", base)
    (root / UUID_A).mkdir()
    (root / UUID_A / "disk").symlink_to(real)
    u = scan(root)
    _clean(u)
    assert u.users_of(base) == {UUID_A}
    assert u.holders_of(base) == {f"disk {root / UUID_A / 'disk'}"}
    assert u.users_of(real) == {UUID_A}  # the linked file itself is in use too


def test_symlinked_disk_straight_to_a_base_keeps_it(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    base = _raw(root / "_base" / ("a" * 40))
    (root / UUID_A).mkdir()
    (root / UUID_A / "disk").symlink_to(base)  # a raw disk that is the base itself
    (root / UUID_A / "disk.info").write_text(json.dumps({"disk": "raw"}))
    u = scan(root)
    _clean(u)
    assert u.users_of(base) == {UUID_A}


def test_relative_backing_of_a_symlinked_disk_resolves_on_both_sides(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    near = _raw(root / "_base" / ("a" * 40))  # relative to the link: ../_base/<a>
    far = _raw(tmp_path / "_base" / ("a" * 40))  # relative to the target: ../_base/<a>
    real = _qcow2(tmp_path / "store" / "vm.qcow2", "../_base/" + "a" * 40)
    (root / UUID_A).mkdir()
    (root / UUID_A / "disk").symlink_to(real)
    u = scan(root)
    _clean(u)
    assert u.users_of(near) == {UUID_A} and u.users_of(far) == {UUID_A}


def test_symlinked_instance_folder_is_followed_and_keeps_its_base(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    base = _raw(root / "_base" / ("a" * 40))
    real = tmp_path / "moved" / UUID_A
    _overlay(real / "disk", base)
    (root / UUID_A).symlink_to(real, target_is_directory=True)
    u = scan(root)
    _clean(u)
    assert (u.instances, u.disks) == (1, 1)
    assert u.users_of(base) == {UUID_A}


@pytest.mark.parametrize("what", ["disk", "folder", "loop"])
def test_symlink_that_cannot_be_followed_is_unreadable(tmp_path: Path, what: str) -> None:
    root = _inst(tmp_path)
    _raw(root / "_base" / ("a" * 40))
    if what == "disk":
        (root / UUID_A).mkdir()
        (root / UUID_A / "disk").symlink_to(tmp_path / "gone.qcow2")
    elif what == "folder":
        (root / UUID_A).symlink_to(tmp_path / "gone", target_is_directory=True)
    else:
        (root / UUID_A).symlink_to(root / UUID_B, target_is_directory=True)
        (root / UUID_B).symlink_to(root / UUID_A, target_is_directory=True)
    u = scan(root)
    assert u.unreadable, u
    assert {p.instance for p in u.unreadable} <= {UUID_A, UUID_B}


def test_symlink_to_a_file_at_the_top_is_not_a_folder(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    (root / "notes").symlink_to(_raw(tmp_path / "notes.txt"))
    u = scan(root)
    _clean(u)
    assert u.instances == 0


# -- holders: uses found outside the instance folders -----------------------------------


def test_held_disk_outside_the_instances_path_is_read_with_its_chain(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    base = _raw(root / "_base" / ("a" * 40))
    middle = _overlay(tmp_path / "mid.qcow2", base)
    top = _overlay(tmp_path / "vms" / "web.qcow2", middle, "qcow2")
    raw_disk = _raw(root / "_base" / ("b" * 40))
    held = usage_mod.Holders(
        files=(
            usage_mod.HeldFile("libvirt domain web", path=str(top)),
            usage_mod.HeldFile("libvirt domain db", path=str(raw_disk), chain=False),
            usage_mod.HeldFile("process 7 qemu", ident=_ident(base)),
        )
    )
    u = scan(root, held)
    _clean(u)
    assert u.users_of(base) == frozenset()  # no instance folder
    assert u.holders_of(base) == {"libvirt domain web", "process 7 qemu"}
    assert u.holders_of(middle) == {"libvirt domain web"}
    assert u.holders_of(raw_disk) == {"libvirt domain db"}


def test_held_disk_whose_base_is_gone_names_it_missing(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    base = _raw(root / "_base" / ("c" * 40))
    top = _overlay(tmp_path / "vms" / "web.qcow2", base)
    base.unlink()
    u = scan(root, usage_mod.Holders(files=(usage_mod.HeldFile("libvirt domain web", str(top)),)))
    assert u.missing_bases == {"c" * 40}
    assert u.holders_of(base) == {"libvirt domain web"}
    assert [p.instance for p in u.broken] == ["libvirt domain web"]


def test_holder_problems_are_unreadable(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    problem = usage_mod.Problem("libvirt", "libvirt", "cannot list the domains")
    u = scan(root, usage_mod.Holders(problems=(problem,)))
    assert u.unreadable == (problem,)


def test_held_file_naming_a_missing_base_directly_counts_by_name(tmp_path: Path) -> None:
    root = _inst(tmp_path)
    gone = root / "_base" / ("f" * 40)
    held = usage_mod.HeldFile("libvirt domain raw-vm", path=str(gone), chain=False)
    u = scan(root, usage_mod.Holders(files=(held,)))
    assert u.missing_bases == {"f" * 40}
    assert u.holders_of(gone) == {"libvirt domain raw-vm"}
