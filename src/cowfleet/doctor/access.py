"""Can a given user reach a path? A walk over each component's owner and mode bits.

Pure: the caller passes a ``stat`` function. POSIX ACLs and security labels are not
read (a ``+`` in ``ls -l``); the walk answers for the mode bits alone.
"""

from __future__ import annotations

import stat as st
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath


@dataclass(frozen=True)
class Identity:
    """Who: a uid, its primary gid and every group it belongs to."""

    name: str
    uid: int
    gids: frozenset[int]


@dataclass(frozen=True)
class Node:
    """What the walk needs of one path component."""

    mode: int
    uid: int
    gid: int


@dataclass(frozen=True)
class Blocked:
    path: str
    need: str  # "search (x)" or "read (r)" ...
    mode: str  # e.g. "drwx------ 0:0"


R, W, X = 4, 2, 1


def allowed(node: Node, who: Identity, want: int) -> bool:
    """Do the mode bits give ``who`` every bit of ``want`` (``R|W|X``)?"""
    if who.uid == 0:
        # root passes read/write always, and execute/search when any x bit is set (dirs: always)
        return not (want & X) or st.S_ISDIR(node.mode) or bool(node.mode & 0o111)
    if who.uid == node.uid:
        bits = (node.mode >> 6) & 7
    elif node.gid in who.gids:
        bits = (node.mode >> 3) & 7
    else:
        bits = node.mode & 7
    return bits & want == want


def _describe(node: Node) -> str:
    return f"{st.filemode(node.mode)} {node.uid}:{node.gid}"


def _need(want: int) -> str:
    names = [n for bit, n in ((R, "read"), (W, "write"), (X, "search")) if want & bit]
    return "+".join(names)


def walk(
    path: str,
    who: Identity,
    stat: Callable[[str], Node | None],
    *,
    last: int = X,
) -> tuple[Blocked, ...]:
    """Every component of the absolute ``path`` that ``who`` cannot pass.

    Each directory on the way needs search (x); the path itself needs ``last``.
    A component that does not exist is reported as blocked (need "exist").
    """
    p = PurePosixPath(path)
    parts = [PurePosixPath(*p.parts[: i + 1]) for i in range(len(p.parts))]
    out: list[Blocked] = []
    for i, comp in enumerate(parts):
        node = stat(str(comp))
        if node is None:
            out.append(Blocked(str(comp), "exist", "missing"))
            break
        want = last if i == len(parts) - 1 else X
        if not allowed(node, who, want):
            out.append(Blocked(str(comp), _need(want), _describe(node)))
    return tuple(out)
