"""The image server and its CLI reach other libraries through public names only: no
``_``-prefixed attribute of anything but the object's own ``self``/``cls``, no dunder
reached with ``getattr`` (``receive.__self__`` was how the old fast paths found uvicorn's
connection), no ``_``-prefixed module of uvicorn, Starlette or httpx."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "cowfleet"
FILES = [*sorted((SRC / "images" / "server").glob("*.py")), SRC / "cli" / "images.py"]
LIBRARIES = ("uvicorn", "starlette", "fastapi", "httpx", "httptools", "h11")
# Whose underscore names may be used: the object's own, and argparse's subparsers type
# (annotations of the CLI's register functions; the standard library, not a server).
OWNERS = ("self", "cls", "argparse")


def private(name: str) -> bool:
    """``_x`` and ``__self__`` (the bound method's owner); other dunders are the
    language's own (``__name__``, ``__cause__``, ``super().__init__``)."""
    dunder = name.startswith("__") and name.endswith("__")
    return name == "__self__" or (name.startswith("_") and not dunder)


def offences(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in OWNERS):
                found.append(f"line {node.lineno}: .{node.attr}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and private(str(node.args[1].value))
        ):
            found.append(f"line {node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
        if isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] in LIBRARIES and any(p.startswith("_") for p in parts):
                    found.append(f"line {node.lineno}: import {name}")
    return sorted(found)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_private_names_of_other_libraries(path: Path) -> None:
    assert offences(ast.parse(path.read_text(), str(path))) == []


def test_the_check_sees_what_the_old_fast_paths_did() -> None:
    old = (
        "cycle = getattr(request.receive, '__self__', None)\n"
        "t = client._transport\n"
        "from uvicorn._types import Scope\n"
        "self._own = 1\n"
        "name = fn.__name__\n"
    )
    assert [o.split(":")[0] for o in offences(ast.parse(old))] == ["line 1", "line 2", "line 3"]
