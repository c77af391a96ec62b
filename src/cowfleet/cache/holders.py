"""Uses of ``_base`` files that no instance folder shows.

Two sources, each behind the small :class:`HolderSource` interface the clean
pass and ``cache list`` receive (so tests inject fakes and a node without a
hypervisor passes none):

- :class:`DomainHolders`: every disk of every libvirt domain defined on the
  node, running or not, wherever its overlay lives. The domain lister is
  injected (:class:`DomainDiskLister`; the real one is
  :meth:`cowfleet.compute.drivers.libvirt.LibvirtDriver.domain_disks`), and the
  backing chains are read from the qcow2 headers by :mod:`cowfleet.cache.usage`.
  A hypervisor that cannot be asked is a problem: the pass then removes nothing.
- :class:`ProcessHolders`: every regular file on the ``_base`` filesystem that a
  running process holds open (``/proc/PID/fd``) or has mapped
  (``/proc/PID/maps``), compared by ``(st_dev, st_ino)``: a QEMU holding a base
  is proof of use. Processes that cannot be read (gone, another user's) are
  skipped: their files are still seen through the disks and domains that name them.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cowfleet.cache.usage import FileId, HeldFile, Holders, Problem
from cowfleet.errors import CowfleetError

if TYPE_CHECKING:
    from cowfleet.config import Config

log = logging.getLogger(__name__)

DELETED = " (deleted)"


class HolderSource(Protocol):
    """Something outside the instance folders that may use ``_base`` files."""

    def holders(self, base_dir: Path) -> Holders:
        """Files it uses now; problems when it cannot say (the pass then removes nothing)."""


@dataclass(frozen=True)
class DomainDisk:
    """One disk (or kernel/initrd) file of a hypervisor domain."""

    domain: str
    path: str
    format: str | None  # the driver type libvirt is told ("qcow2", "raw"), None: unsaid


class DomainDiskLister(Protocol):
    def domain_disks(self) -> list[DomainDisk]:
        """Files of every domain defined on the node, running or not."""


class DomainHolders:
    """The disks of every domain a hypervisor has defined."""

    def __init__(self, lister: DomainDiskLister, *, where: str = "libvirt") -> None:
        self.lister = lister
        self.where = where

    def holders(self, base_dir: Path) -> Holders:
        try:
            disks = self.lister.domain_disks()
        except CowfleetError as exc:
            why = f"cannot list the domains: {exc}"
            return Holders(problems=(Problem(self.where, self.where, why),))
        files = tuple(
            HeldFile(
                f"{self.where} domain {d.domain}",
                path=d.path,
                # a raw disk's first bytes are the guest's: counted, never parsed
                chain=(d.format or "qcow2") == "qcow2",
            )
            for d in disks
        )
        return Holders(files=files)


class ProcessHolders:
    """Files of the ``_base`` filesystem that running processes hold open or mapped."""

    def __init__(self, proc: Path = Path("/proc"), *, own_pid: int | None = None) -> None:
        self.proc = proc
        self.own_pid = os.getpid() if own_pid is None else own_pid

    def holders(self, base_dir: Path) -> Holders:
        try:
            dev = os.stat(base_dir).st_dev
            pids = [int(n) for n in os.listdir(self.proc) if n.isdigit()]
        except OSError:
            return Holders()  # no _base (nothing to protect) or no /proc
        files: list[HeldFile] = []
        for pid in sorted(pids):
            if pid == self.own_pid:
                continue
            found = self._held(pid, dev)
            if found:
                label = f"process {pid} {self._comm(pid)}"
                files.extend(HeldFile(label, ident=i) for i in sorted(found))
        return Holders(files=tuple(files))

    def _comm(self, pid: int) -> str:
        try:
            return (self.proc / str(pid) / "comm").read_text(errors="replace").strip() or "?"
        except OSError:
            return "?"

    def _held(self, pid: int, dev: int) -> set[FileId]:
        root = self.proc / str(pid)
        found: set[FileId] = set()
        try:
            fds = os.listdir(root / "fd")
        except OSError:  # gone, or not ours to read
            fds = []
        for fd in fds:
            try:
                st = os.stat(root / "fd" / fd)  # the open file itself, even renamed
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_dev == dev:
                found.add((st.st_dev, st.st_ino))
        try:
            maps = (root / "maps").read_text(errors="replace")
        except OSError:
            return found
        found.update(i for i in parse_maps(maps.splitlines()) if i[0] == dev)
        return found


def parse_maps(lines: Iterable[str]) -> set[FileId]:
    """``(st_dev, st_ino)`` of every file-backed mapping in ``/proc/PID/maps`` lines."""
    out: set[FileId] = set()
    for line in lines:
        # address perms offset dev inode [path]
        parts = line.split(None, 5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        major, _, minor = parts[3].partition(":")
        try:
            ident = (os.makedev(int(major, 16), int(minor, 16)), int(parts[4]))
        except ValueError:
            continue
        if ident[1]:
            out.add(ident)
    return out


def collect(sources: Sequence[HolderSource], base_dir: Path) -> Holders:
    """Everything the sources hold; a source that fails is a problem, not a crash."""
    total = Holders()
    for source in sources:
        try:
            total = total + source.holders(base_dir)
        except (OSError, CowfleetError) as exc:
            name = type(source).__name__
            total = total + Holders(problems=(Problem(name, str(base_dir), str(exc)),))
    return total


SourceFactory = Callable[["Config"], list[HolderSource]]


def node_sources(cfg: Config) -> list[HolderSource]:
    """The sources of a node: its processes, and libvirt's domains when it is the driver.

    The caller closes nothing: the libvirt connection is opened and closed per call.
    """
    sources: list[HolderSource] = [ProcessHolders()]
    if cfg.driver == "libvirt":
        sources.append(DomainHolders(_LibvirtLister(cfg.libvirt_uri)))
    return sources


class _LibvirtLister:
    """Opens a connection for each listing (a pass every few minutes needs no more)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def domain_disks(self) -> list[DomainDisk]:
        from cowfleet.compute.drivers.libvirt import LibvirtDriver

        driver = LibvirtDriver(self.uri)
        try:
            return driver.domain_disks()
        finally:
            driver.close()
