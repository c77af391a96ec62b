"""Worker processes of ``test_cache_clean_race.py`` (run with ``sys.executable``).

``cleaner RESULT STOPFILE``
    Runs ``cowfleet.cache.clean.clean(cfg, min_age=0)`` in a tight loop (so any unused,
    unpinned base is removed at once) until STOPFILE exists; writes the number of
    passes, every removal it carried out and any exception to RESULT (JSON).

``booter RESULT COUNT IMAGE_ID...``
    Creates COUNT instances with the ``none`` driver through the library code
    ``server create`` uses (``Provisioner.create`` on a real ``ImageCache`` and
    ``ImageClient``), cycling through the images and flavors, and deletes older
    instances (``ServerManager.delete``, as ``server delete``) so only a few exist
    at a time. After each create it reads every disk's backing chain from the
    qcow2 headers (its own parser, not cowfleet's) and ``lstat``s every file of
    it; it keeps the chain files open and, before deleting an instance, checks
    that every path still names the very file it opened (a base removed while in
    use and fetched again has another inode). Every 25th boot and for every
    instance left at the end it also runs
    ``qemu-img info --backing-chain -f qcow2 --output=json``. Writes counts and
    every failure to RESULT (JSON).

Configuration comes from the environment (``COWFLEET_*``) through
``cowfleet.config.load``, as for the CLI.
"""

from __future__ import annotations

import collections
import json
import os
import random
import stat
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

QCOW2_MAGIC = b"QFI\xfb"
KEEP_ALIVE = 2  # instances kept at a time: the other images' bases become unused
QEMU_EVERY = 25


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


# -- cleaner --------------------------------------------------------------------------


def run_cleaner(result: Path, stop_file: Path) -> int:
    from cowfleet.cache.clean import REMOVE, clean
    from cowfleet.config import load

    cfg = load()
    passes = 0
    removed: collections.Counter[str] = collections.Counter()
    removed_kinds: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    unreadable_passes = 0
    kept_reasons: collections.Counter[str] = collections.Counter()
    ready = result.with_name(result.name + ".ready")
    started = time.monotonic()
    while not stop_file.exists():
        try:
            report = clean(cfg, min_age=0)
        except Exception:
            errors.append(traceback.format_exc())
            if len(errors) > 50:
                break
            continue
        passes += 1
        if report.unreadable:
            unreadable_passes += 1
        for d in report.decisions:
            if d.action == REMOVE and d.done:
                removed[d.name] += 1
                removed_kinds[d.kind] += 1
            elif d.action == "keep" and d.reason.startswith(("pinned", "a provisioning")):
                kept_reasons[d.reason.partition(":")[0]] += 1
        if passes == 1:
            ready.write_text("1")
    _write_json(
        result,
        {
            "passes": passes,
            "seconds": time.monotonic() - started,
            "removed": dict(removed),
            "removed_kinds": dict(removed_kinds),
            "errors": errors,
            "unreadable_passes": unreadable_passes,
            "kept_for_pins": dict(kept_reasons),
        },
    )
    print(f"cleaner: {passes} passes, {sum(removed.values())} removals", flush=True)
    return 0


# -- booter ---------------------------------------------------------------------------


class ChainError(Exception):
    pass


def backing_chain(disk: Path) -> list[str]:
    """Every file of the backing chain of ``disk`` (itself first), read from qcow2 headers.

    Raises :class:`ChainError` when a file of the chain is missing or not a regular file.
    """
    files: list[str] = []
    cur = os.path.abspath(disk)
    for _ in range(16):
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            raise ChainError(f"{cur} (in the chain of {disk}) is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise ChainError(f"{cur} (in the chain of {disk}) is not a regular file")
        files.append(cur)
        fd = os.open(cur, os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.pread(fd, 4096, 0)
            if head[:4] != QCOW2_MAGIC:
                return files
            offset = int.from_bytes(head[8:16], "big")
            size = int.from_bytes(head[16:20], "big")
            if offset == 0:
                return files
            name = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        cur = os.path.normpath(os.path.join(os.path.dirname(cur), name.decode()))
    raise ChainError(f"chain of {disk} deeper than 16")


class Held:
    """The chain files of one live instance, kept open (as a hypervisor would)."""

    def __init__(self, uuid: str, disks: list[Path]) -> None:
        self.uuid = uuid
        self.disks = disks
        self.files: list[tuple[str, int]] = []

    def open_all(self) -> list[str]:
        problems: list[str] = []
        for disk in self.disks:
            try:
                chain = backing_chain(disk)
            except ChainError as exc:
                problems.append(str(exc))
                continue
            for path in chain:
                try:
                    self.files.append((path, os.open(path, os.O_RDONLY | os.O_CLOEXEC)))
                except OSError as exc:
                    problems.append(f"cannot open {path}: {exc}")
        return problems

    def check(self) -> list[str]:
        """Each path still names the file opened at create time."""
        problems: list[str] = []
        for path, fd in self.files:
            held = os.fstat(fd)
            try:
                now = os.lstat(path)
            except FileNotFoundError:
                problems.append(f"{path} was removed while instance {self.uuid} used it")
                continue
            if held.st_nlink == 0 or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                problems.append(
                    f"{path} was replaced while instance {self.uuid} used it "
                    "(removed and fetched again)"
                )
        return problems

    def close(self) -> None:
        for _path, fd in self.files:
            os.close(fd)
        self.files = []


def qemu_chain(disk: Path) -> list[str]:
    """The chain as qemu-img sees it; raises ChainError when qemu-img fails."""
    proc = subprocess.run(
        ["qemu-img", "info", "--backing-chain", "-f", "qcow2", "--output=json", str(disk)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise ChainError(f"qemu-img info --backing-chain {disk}: {proc.stderr.strip()}")
    info = json.loads(proc.stdout)
    names = [os.path.normpath(entry["filename"]) for entry in info]
    for name in names:
        if not os.path.isfile(name):
            raise ChainError(f"qemu-img names {name} in the chain of {disk}, which is missing")
    return names


def run_booter(result: Path, count: int, image_ids: list[str], flavors: list[str]) -> int:
    from cowfleet.cache.cache import CachedBase, ImageCache
    from cowfleet.compute.drivers import make_driver
    from cowfleet.compute.manager import ServerManager
    from cowfleet.compute.provision import Provisioner
    from cowfleet.config import load
    from cowfleet.images.client import ImageClient

    cfg = load()
    fetches: collections.Counter[str] = collections.Counter()

    class CountingCache(ImageCache):
        """The real cache; records which calls downloaded."""

        def ensure_cached(self, image_id: str) -> CachedBase:
            base = super().ensure_cached(image_id)
            if base.fetched:
                fetches[base.image_id] += 1
            return base

    rng = random.Random(20240611)
    failures: list[str] = []
    boots = deletes = qemu_checks = 0
    flavor_use: collections.Counter[str] = collections.Counter()
    alive: collections.deque[Held] = collections.deque()
    started = time.monotonic()
    driver = make_driver(cfg.driver, cfg)
    with ImageClient.from_config(cfg) as client:
        cache = CountingCache(cfg, client)
        with (
            Provisioner(cfg, images=client, cache=cache, driver=driver) as prov,
            ServerManager(cfg) as mgr,
        ):
            for i in range(count):
                # half round robin (the image next in turn is the one just aged out),
                # half random
                image = image_ids[i % len(image_ids)] if i % 2 else rng.choice(image_ids)
                flavor = flavors[0]
                for n, name in enumerate(flavors[1:], start=1):
                    if i % (5 * n) == 0:
                        flavor = name
                try:
                    record = prov.create(f"race-{i}", image, flavor)
                except Exception:
                    failures.append(f"boot {i} ({image}, {flavor}): {traceback.format_exc()}")
                    continue
                boots += 1
                flavor_use[flavor] += 1
                folder = cfg.instances_path / record.uuid
                disks = [folder / d.file for d in record.disks]
                held = Held(record.uuid, disks)
                failures += [f"boot {i}: {p}" for p in held.open_all()]
                alive.append(held)
                if i % QEMU_EVERY == 0:
                    for disk in disks:
                        qemu_checks += 1
                        try:
                            qemu_chain(disk)
                        except ChainError as exc:
                            failures.append(f"boot {i}: {exc}")
                while len(alive) > KEEP_ALIVE:
                    old = alive.popleft()
                    failures += [f"before delete after boot {i}: {p}" for p in old.check()]
                    old.close()
                    try:
                        mgr.delete(old.uuid)
                        deletes += 1
                    except Exception:
                        failures.append(f"delete {old.uuid}: {traceback.format_exc()}")
            # the instances left: checked while the cleaner still runs
            survivors = []
            for held in alive:
                failures += [f"at the end: {p}" for p in held.check()]
                for disk in held.disks:
                    qemu_checks += 1
                    try:
                        qemu_chain(disk)
                    except ChainError as exc:
                        failures.append(f"at the end: {exc}")
                survivors.append({"uuid": held.uuid, "disks": [str(d) for d in held.disks]})
                held.close()
    driver.close()
    _write_json(
        result,
        {
            "boots": boots,
            "deletes": deletes,
            "failures": failures,
            "fetches": dict(fetches),
            "downloads": cache.downloads,
            "flavors": dict(flavor_use),
            "qemu_checks": qemu_checks,
            "survivors": survivors,
            "seconds": time.monotonic() - started,
        },
    )
    print(f"booter: {boots} boots, {len(failures)} failures", flush=True)
    return 0


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "cleaner":
        return run_cleaner(Path(argv[1]), Path(argv[2]))
    if mode == "booter":
        flavors = os.environ["RACE_FLAVORS"].split(",")
        return run_booter(Path(argv[1]), int(argv[2]), argv[3:], flavors)
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
