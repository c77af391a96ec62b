"""Issue 13, items 1 and 3: the cache manager restores quarantined bases still in use,
survives read errors while re-verifying, and outlives a failing pass.

Real bases (ImageCache with a fake image service); the read errors are injected
here (the real EIO from a device-mapper error target is in
tests/integration/test_cache_faults.py).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cowfleet.cache import metadata as md
from cowfleet.cache import verify as verify_mod
from cowfleet.cache.clean import QUARANTINE
from cowfleet.cache.listing import STATE_IMAGE_GONE, base_note, list_entries
from cowfleet.cache.manager import IMAGE_GONE, RESTORED, CacheManager
from cowfleet.cache.usage import Holders
from cowfleet.config import Config
from cowfleet.errors import ConfigError
from tests.unit._cache_fakes import FakeClient
from tests.unit.test_cache_clean import Clock, Node

KiB = 1024


class ClosingClient(FakeClient):
    def close(self) -> None:
        pass


class NoSources:
    def holders(self, base_dir: Path) -> Holders:
        return Holders()


@pytest.fixture
def node(tmp_path: Path) -> Node:
    n = Node(tmp_path, Clock(time.time()))
    n.client = ClosingClient()
    n.cache.__init__(n.cfg, n.client, clock=n.clock, sleep=lambda _s: None)  # type: ignore[misc]
    return n


def _manager(node: Node, **kw: Any) -> CacheManager:
    cfg = Config(
        home=node.tmp,
        instances_path=node.cfg.instances_path,
        verify_interval=0.001,
        verify_rate=1 << 30,
        min_free_percent=0,
    )
    kw.setdefault("sources", lambda _cfg: [NoSources()])
    return CacheManager(cfg, clock=node.clock, client=lambda: node.client, **kw)


def _corrupt(path: Path) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.write(b"\xffBAD")


def test_read_error_while_reverifying_fails_the_base_and_quarantines_it(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    iid = node.base()
    node.clock.t += 10
    real_read = os.read

    def eio(fd: int, n: int) -> bytes:
        if os.path.samefile(f"/proc/self/fd/{fd}", node.path(iid)):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_read(fd, n)

    monkeypatch.setattr(verify_mod.os, "read", eio)
    report = _manager(node).run_pass()
    [v] = report.verified
    assert (v.ok, v.state) == (False, md.STATE_FAILED)
    assert v.failure is not None and "Input/output error" in v.failure
    [d] = [d for d in report.clean.decisions if d.name == node.name(iid)]
    assert (d.action, d.done) == (QUARANTINE, True)
    assert not node.path(iid).exists()


def test_unreadable_base_fails_verification(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    iid = node.base()
    node.clock.t += 10
    real_open = os.open

    def eacces(path: Any, flags: int, *a: Any, **kw: Any) -> int:
        if Path(path) == node.path(iid):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(verify_mod.os, "open", eacces)
    [v] = node.cache.verify()
    assert not v.ok and v.failure is not None and "Permission denied" in v.failure


def test_directory_in_place_of_a_base_fails_and_is_moved_aside(node: Node) -> None:
    iid = node.base()
    node.clock.t += 10
    os.chmod(node.path(iid), 0o644)
    node.path(iid).unlink()
    node.path(iid).mkdir()
    report = _manager(node).run_pass()
    assert [(v.ok, v.failure) for v in report.verified] == [
        (False, "base path is not a regular file")
    ]
    [d] = [d for d in report.clean.decisions if d.name == node.name(iid)]
    assert (d.action, d.done) == (QUARANTINE, True) and not os.path.lexists(node.path(iid))


def test_quarantined_base_still_in_use_is_fetched_again_then_image_gone(node: Node) -> None:
    iid = node.base(16 * KiB)
    data = node.path(iid).read_bytes()
    folder = node.instance(iid)  # a stopped instance: only its disk names the base
    node.clock.t += 10
    _corrupt(node.path(iid))
    mgr = _manager(node)

    report = mgr.run_pass()
    [d] = [d for d in report.clean.decisions if d.name == node.name(iid)]
    assert (d.action, d.done) == (QUARANTINE, True)
    assert [(r.image_id, r.outcome) for r in report.restored] == [(iid, RESTORED)]
    assert node.path(iid).read_bytes() == data  # back, under the same name
    meta = md.read_meta(node.layout.paths(iid).meta)
    assert meta is not None and meta.state == md.STATE_VERIFIED
    assert base_note(node.layout, node.path(iid)) is None

    # the image is deleted from the service; the base goes bad again
    del node.client.images[iid]
    node.clock.t += 10
    _corrupt(node.path(iid))
    report = mgr.run_pass()
    assert [(r.image_id, r.outcome) for r in report.restored] == [(iid, IMAGE_GONE)]
    assert not node.path(iid).exists()
    states = {e.state for e in list_entries(node.layout) if e.kind == "quarantined"}
    assert STATE_IMAGE_GONE in states
    note = base_note(node.layout, node.path(iid))
    assert note is not None and "image gone" in note and iid in note
    assert folder.exists()


def test_quarantined_base_no_disk_needs_is_not_fetched(node: Node) -> None:
    iid = node.base()
    node.clock.t += 10
    _corrupt(node.path(iid))
    report = _manager(node).run_pass()
    assert report.restored == () and not node.path(iid).exists()


class Boom:
    def __init__(self, exc: BaseException, times: int = 1) -> None:
        self.exc, self.times = exc, times

    def holders(self, base_dir: Path) -> Holders:
        if self.times:
            self.times -= 1
            raise self.exc
        return Holders()


def test_loop_logs_an_unexpected_error_and_goes_on(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    boom = Boom(RuntimeError("something nobody expected"))
    mgr = _manager(node, sources=lambda _cfg: [boom])
    mgr.cfg = Config(home=node.tmp, instances_path=node.cfg.instances_path, node_interval=0.01)
    with caplog.at_level(logging.DEBUG, logger="cowfleet.cache.manager"):
        assert mgr.run(threading.Event(), max_passes=3) == 3
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    msg = errors[0].getMessage()
    assert "pass 1" in msg and "RuntimeError: something nobody expected" in msg
    assert str(node.cfg.instances_path) in msg and errors[0].exc_info is None
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)
    assert sum("pass 2: re-verified" in r.getMessage() for r in caplog.records) == 1


def test_loop_ends_on_a_configuration_error(node: Node) -> None:
    def bad(_cfg: Config) -> list[Any]:
        raise ConfigError("driver must be one of libvirt, none")

    mgr = _manager(node, sources=bad)
    with pytest.raises(ConfigError):
        mgr.run(threading.Event(), max_passes=3)
    assert mgr.passes == 0
