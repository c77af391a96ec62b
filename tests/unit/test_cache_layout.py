from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cowfleet.cache.layout import Layout, base_name, base_path, canonical_image_id
from cowfleet.config import Config
from cowfleet.errors import UsageError

UUID = "4f1c2b0e-8d7a-4c3e-9f10-0123456789ab"


def test_base_name_is_sha1_of_the_uuid_string_like_nova() -> None:
    assert base_name(UUID) == hashlib.sha1(UUID.encode()).hexdigest()


def test_uuid_spellings_map_to_one_base() -> None:
    assert base_name(UUID.upper()) == base_name(UUID)
    assert base_name(UUID.replace("-", "")) == base_name(UUID)
    assert canonical_image_id("{" + UUID + "}") == UUID


@pytest.mark.parametrize(
    "bad", ["", "../../etc/passwd", "cirros", UUID + "/x", UUID[:-1], "0" * 100, " "]
)
def test_non_uuid_ids_are_refused(bad: str) -> None:
    with pytest.raises(UsageError, match="UUID"):
        base_name(bad)


def test_paths(tmp_path: Path) -> None:
    lay = Layout(tmp_path)
    p = lay.paths(UUID)
    name = base_name(UUID)
    assert p.base == tmp_path / "_base" / name
    assert p.part == tmp_path / "_base" / f"{name}.part"
    assert p.meta.parent == tmp_path / "_base" / ".cowfleet"
    assert lay.locks_dir == tmp_path / "locks"
    cfg = Config(home=tmp_path, instances_path=tmp_path / "inst")
    assert base_path(cfg, UUID) == cfg.base_dir / name


def test_paths_for_name_refuses_non_hash_names(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        Layout(tmp_path).paths_for_name("../x")


def test_cache_package_is_import_light() -> None:
    """50 processes may start at once: no web/DB/UI stack on the cache import path."""
    import subprocess
    import sys

    code = (
        "import sys, cowfleet.cache, cowfleet.cache.cache, cowfleet.cli.cache\n"
        "heavy = [m for m in ('httpx', 'fastapi', 'sqlalchemy', 'rich', 'uvicorn')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
