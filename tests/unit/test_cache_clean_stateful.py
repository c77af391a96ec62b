"""Stateful: fetches, provisionings (in one go or held open), deletions and clean passes.

Whatever the interleaving, a clean pass never takes a file out of the backing chain of
an instance disk (finished folders and provisionings in progress alike), and never a
base that a provisioning in progress has pinned.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cowfleet import config, proc
from cowfleet.cache.cache import CachedBase, ImageCache
from cowfleet.cache.clean import REMOVE, Cleaner, CleanPolicy
from cowfleet.cache.layout import Layout
from cowfleet.compute.drivers.none import NoneDriver
from cowfleet.compute.manager import ServerManager
from cowfleet.compute.provision import Plan, Provisioner
from cowfleet.formats.qcow2 import MAGIC, parse_header
from tests.unit._cache_fakes import FakeClient, image_for

KiB = 1024
IMAGE_SIZES = (64 * KiB, 96 * KiB, 128 * KiB, 32 * KiB)
MIN_AGE = 5.0  # seconds of the fake clock before an unused base may go
BUDGET = 160 * KiB  # less than the images together: evictions happen
MAX_PENDING = 2
FLAVORS = """
[flavors.s1]
vcpus = 1
ram_mb = 64
root_gb = 1
[flavors.s1swap]
vcpus = 1
ram_mb = 64
root_gb = 1
swap_mb = 1
"""
SKIP = {"_base", "locks", ".names"}


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass(frozen=True)
class Img:
    """What provisioning reads of an image record."""

    id: str
    name: str | None
    status: str = "active"
    disk_format: str | None = "raw"
    virtual_size: int | None = None
    min_disk: int = 0
    min_ram: int = 0
    properties: Mapping[str, str] = field(default_factory=dict)


class Images:
    def __init__(self, images: list[Img]) -> None:
        self.by_id = {i.id: i for i in images}

    def find(self, name_or_id: str) -> Img:
        return self.by_id[name_or_id]

    def get(self, image_id: str) -> Img:
        return self.by_id[image_id]


def fake_mkswap(argv: list[str], **_kw: Any) -> proc.Completed:
    with open(argv[-1], "r+b") as fh:
        fh.write(b"SWAPSPACE2")
    return proc.Completed(tuple(argv), 0, "", "", 0.0)


@dataclass
class Pending:
    """A provisioning between its pins + ensure_cached and its folder."""

    plan: Plan
    pins: contextlib.ExitStack
    root: CachedBase
    held: list[Path]  # pinned _base files that existed once looked up


def chain(disk: Path) -> list[str]:
    """Every backing file of ``disk``, read from qcow2 headers (independent walk)."""
    out: list[str] = []
    path = str(disk)
    for _ in range(16):
        with open(path, "rb") as fh:
            head = fh.read(64 * KiB)
        if head[:4] != MAGIC:
            return out
        backing = parse_header(head, file_size=os.path.getsize(path)).backing_file
        if not backing:
            return out
        path = os.path.join(os.path.dirname(path), backing)
        out.append(path)
        if not os.path.lexists(path):
            return out
    raise AssertionError(f"backing chain of {disk} too long")


class CacheCleanMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="cowfleet-clean-sm-"))
        cfgfile = self.tmp / "c.toml"
        cfgfile.write_text(FLAVORS)
        self.cfg = config.load(
            cfgfile, env={"COWFLEET_HOME": str(self.tmp / "home"), "COWFLEET_DRIVER": "none"}
        )
        self.clock = Clock(time.time())
        self.client = FakeClient()
        images: list[Img] = []
        for i, size in enumerate(IMAGE_SIZES):
            iid = str(uuid.UUID(int=i + 1, version=4))
            data = os.urandom(size)
            self.client.add(image_for(iid, data, name=f"img{i}"), data)
            images.append(Img(iid, f"img{i}"))
        self.image_ids = [i.id for i in images]
        self.cache = ImageCache(self.cfg, self.client, clock=self.clock, sleep=lambda _s: None)
        self.prov = Provisioner(
            self.cfg,
            images=Images(images),
            cache=self.cache,
            driver=NoneDriver(),
            runner=fake_mkswap,
            clock=self.clock,
            durable=False,
        )
        self.servers = ServerManager(self.cfg)
        self.layout = Layout(self.cfg.instances_path)
        self.pending: list[Pending] = []
        self.finished: list[tuple[str, str]] = []  # (server uuid, image id)
        self.serial = 0
        self.removed = 0  # bases the passes removed (to see that they did something)

    def teardown(self) -> None:
        for p in self.pending:
            p.pins.close()
        self.prov.close()
        self.servers.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _name(self) -> str:
        self.serial += 1
        return f"vm{self.serial}"

    # -- rules ---------------------------------------------------------------
    @rule(image=st.integers(0, len(IMAGE_SIZES) - 1))
    def fetch(self, image: int) -> None:
        base = self.cache.ensure_cached(self.image_ids[image])
        assert base.path.is_file()

    @precondition(lambda self: len(self.pending) < MAX_PENDING)
    @rule(image=st.integers(0, len(IMAGE_SIZES) - 1), swap=st.booleans())
    def begin_provisioning(self, image: int, swap: bool) -> None:
        plan = self.prov.plan(self._name(), self.image_ids[image], "s1swap" if swap else "s1")
        stack = contextlib.ExitStack()
        stack.enter_context(self.prov.pin_bases(plan))
        try:
            root = self.cache.ensure_cached(plan.image.id)
        except BaseException:
            stack.close()
            raise
        held = [
            self.cfg.base_dir / n
            for n in self.prov.base_names(plan)
            if os.path.lexists(self.cfg.base_dir / n)
        ]
        assert root.path in held
        self.pending.append(Pending(plan, stack, root, held))

    @precondition(lambda self: self.pending)
    @rule(pick=st.integers(0, MAX_PENDING - 1))
    def finish_provisioning(self, pick: int) -> None:
        p = self.pending.pop(pick % len(self.pending))
        with p.pins:  # released once the folder is in place, as Provisioner.create does
            record = self.prov.build(p.plan, p.root)
        self.finished.append((record.uuid, record.image_id))

    @rule(image=st.integers(0, len(IMAGE_SIZES) - 1), swap=st.booleans())
    def create_server(self, image: int, swap: bool) -> None:
        record = self.prov.create(self._name(), self.image_ids[image], "s1swap" if swap else "s1")
        self.finished.append((record.uuid, record.image_id))

    @precondition(lambda self: self.finished)
    @rule(pick=st.integers(0, 50))
    def delete_server(self, pick: int) -> None:
        server, _image = self.finished.pop(pick % len(self.finished))
        self._delete(server)

    @precondition(lambda self: self.finished)
    @rule(image=st.integers(0, len(IMAGE_SIZES) - 1))
    def delete_every_server_of(self, image: int) -> None:
        for server, _image in [s for s in self.finished if s[1] == self.image_ids[image]]:
            self.finished.remove((server, _image))
            self._delete(server)

    def _delete(self, server: str) -> None:
        self.servers.delete(server)  # what `cowfleet server delete` does
        assert not (self.cfg.instances_path / server).exists()

    @rule(seconds=st.sampled_from([1.0, MIN_AGE, 60.0, 3600.0]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.t += seconds

    @rule(dry_run=st.booleans(), budget=st.sampled_from([0, BUDGET]))
    def clean(self, dry_run: bool, budget: int) -> None:
        policy = CleanPolicy(max_unused_age=MIN_AGE, part_max_age=60.0, max_cache_bytes=budget)
        report = Cleaner(self.layout, policy, clock=self.clock).run(dry_run=dry_run)
        assert report.unreadable == ()
        pinned = {path.name for p in self.pending for path in p.held}
        removals = [d for d in report.decisions if d.action == REMOVE]
        for d in removals:  # a dry run's answer must be as safe as a real pass
            assert not d.users and d.name not in pinned, d
            assert d.done != dry_run, d
            if d.done:
                assert not os.path.lexists(self.cfg.base_dir / d.name), d
        self.removed += sum(d.done for d in removals)

    # -- invariants ------------------------------------------------------------
    @invariant()
    def no_disk_lost_a_backing_file(self) -> None:
        root = self.cfg.instances_path
        if not root.exists():
            return
        for folder in os.listdir(root):
            if folder in SKIP or not (root / folder).is_dir():
                continue
            for f in os.listdir(root / folder):
                if not f.startswith("disk") or f == "disk.info":
                    continue
                for backing in chain(root / folder / f):
                    assert os.path.lexists(backing), f"{folder}/{f} lost {backing}"

    @invariant()
    def pinned_bases_stay(self) -> None:
        for p in self.pending:
            for path in p.held:
                assert os.path.lexists(path), f"{path} pinned by {p.plan.name} was removed"


CacheCleanMachine.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCacheClean = CacheCleanMachine.TestCase
