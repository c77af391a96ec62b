"""What the checks look at, behind one seam: programs, files, users, HTTP, the clock.

:class:`Probes` is what :mod:`.checks` receives; :func:`real_probes` builds the real
one. Unit tests pass their own. Every probe translates its failures: a missing
program or file is ``None``, an unreachable service is a :class:`HttpAnswer` with
``error`` set; nothing raises into the checks.
"""

from __future__ import annotations

import email.utils
import grp
import os
import pwd
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cowfleet.doctor.access import Identity, Node


@dataclass(frozen=True)
class ProgramRun:
    returncode: int
    output: str  # stdout then stderr


@dataclass(frozen=True)
class HttpAnswer:
    status: int | None  # None: no answer (``error`` says why)
    date: float | None = None  # the Date header, as a Unix time
    sent_at: float = 0.0  # local clock before the request and after the answer
    received_at: float = 0.0
    error: str | None = None
    body: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Space:
    total: int
    free: int  # for unprivileged users (f_bavail)


@dataclass(frozen=True)
class StrayFile:
    """A ``_base`` entry no cowfleet metadata explains (from the cache's own listing)."""

    name: str
    state: str  # "foreign" or "stray"
    reason: str
    bytes: int


@dataclass(frozen=True)
class Probes:
    which: Callable[[str], str | None]
    run: Callable[[Sequence[str]], ProgramRun | None]
    read_text: Callable[[str], str | None]
    stat: Callable[[str], Node | None]
    can_rw: Callable[[str], bool]  # this process: read+write access
    user: Callable[[str], Identity | None]  # by name or "+UID"
    group_id: Callable[[str], int | None]  # by name or "+GID"
    qemu_uids: Callable[[], tuple[int, ...]]  # uids of running QEMU processes
    space: Callable[[Path], Space | None]
    cache_bytes: Callable[[Path], int]
    strays: Callable[[Path], tuple[StrayFile, ...]]
    http_get: Callable[[str, str | None], HttpAnswer]
    read_token: Callable[[Path, bool], str]  # (path, allow_insecure); raises CowfleetError
    now: Callable[[], float]


def _which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def _run(argv: Sequence[str]) -> ProgramRun | None:
    from cowfleet import proc
    from cowfleet.errors import CowfleetError, NotFoundError

    try:
        done = proc.run(argv, timeout=15.0, check=False)
    except NotFoundError:
        return None
    except CowfleetError as exc:
        return ProgramRun(-1, str(exc))
    return ProgramRun(done.returncode, done.stdout + done.stderr)


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(1 << 20)
    except OSError:
        return None


def _stat(path: str) -> Node | None:
    try:
        s = os.stat(path)
    except OSError:
        return None
    return Node(s.st_mode, s.st_uid, s.st_gid)


def _can_rw(path: str) -> bool:
    return os.access(path, os.R_OK | os.W_OK)


def _user(name: str) -> Identity | None:
    try:
        pw = pwd.getpwuid(int(name[1:])) if name.startswith("+") else pwd.getpwnam(name)
    except (KeyError, ValueError):
        if name.startswith("+") and name[1:].isdigit():
            uid = int(name[1:])
            return Identity(name, uid, frozenset({uid}))
        return None
    gids = {pw.pw_gid, *(g.gr_gid for g in grp.getgrall() if pw.pw_name in g.gr_mem)}
    return Identity(pw.pw_name, pw.pw_uid, frozenset(gids))


def _group_id(name: str) -> int | None:
    if name.startswith("+") and name[1:].isdigit():
        return int(name[1:])
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _qemu_uids() -> tuple[int, ...]:
    uids: set[int] = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return ()
    for pid in pids:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            if not comm.startswith(("qemu-system", "qemu-kvm")):
                continue
            uids.add(os.stat(f"/proc/{pid}").st_uid)
        except OSError:
            continue
    return tuple(sorted(uids))


def _space(path: Path) -> Space | None:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        s = os.statvfs(path)
    except OSError:
        return None
    return Space(s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize)


def _cache_bytes(instances_path: Path) -> int:
    from cowfleet.cache.layout import Layout
    from cowfleet.cache.listing import list_entries
    from cowfleet.cache.usage import Usage

    nobody = Usage(instances_path, 0, 0, {}, {})
    try:
        return sum(e.allocated for e in list_entries(Layout(instances_path), nobody))
    except OSError:
        return 0


def _strays(instances_path: Path) -> tuple[StrayFile, ...]:
    from cowfleet.cache.layout import Layout
    from cowfleet.cache.listing import list_entries
    from cowfleet.cache.usage import Usage

    nobody = Usage(instances_path, 0, 0, {}, {})
    return tuple(
        StrayFile(e.name, e.state, e.failure or e.state, e.allocated)
        for e in list_entries(Layout(instances_path), nobody)
        if e.state in ("foreign", "stray")
    )


def _http_get(url: str, token: str | None) -> HttpAnswer:
    import httpx

    headers = {"X-Auth-Token": token} if token else {}
    sent = time.time()
    try:
        resp = httpx.get(url, headers=headers, timeout=10.0, follow_redirects=False)
    except httpx.HTTPError as exc:
        return HttpAnswer(None, sent_at=sent, received_at=time.time(), error=str(exc) or repr(exc))
    received = time.time()
    date = None
    if "date" in resp.headers:
        try:
            date = email.utils.parsedate_to_datetime(resp.headers["date"]).timestamp()
        except (TypeError, ValueError):
            date = None
    body: dict[str, object] = {}
    try:
        doc = resp.json()
        if isinstance(doc, dict):
            body = doc
    except ValueError:
        pass
    return HttpAnswer(resp.status_code, date, sent, received, None, body)


def _read_token(path: Path, allow_insecure: bool) -> str:
    from cowfleet.errors import ConfigError
    from cowfleet.images.token_file import read_token_file

    try:
        token = read_token_file(path, allow_insecure=allow_insecure)
    except FileNotFoundError as exc:
        raise ConfigError(f"token file not found: {path}", path=str(path)) from exc
    if not token:
        raise ConfigError(f"token file {path} is empty", path=str(path))
    return token


def real_probes() -> Probes:
    return Probes(
        which=_which,
        run=_run,
        read_text=_read_text,
        stat=_stat,
        can_rw=_can_rw,
        user=_user,
        group_id=_group_id,
        qemu_uids=_qemu_uids,
        space=_space,
        cache_bytes=_cache_bytes,
        strays=_strays,
        http_get=_http_get,
        read_token=_read_token,
        now=time.time,
    )
