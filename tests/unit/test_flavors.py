from __future__ import annotations

from pathlib import Path

import pytest

from cowfleet import config
from cowfleet.compute.flavors import BUILTIN, GIB, Flavor, all_flavors, get_flavor
from cowfleet.errors import NotFoundError


def _cfg(tmp_path: Path, toml: str | None = None) -> config.Config:
    path = None
    if toml is not None:
        path = tmp_path / "c.toml"
        path.write_text(toml)
    return config.load(path, env={"COWFLEET_HOME": str(tmp_path)})


def test_builtins_have_classic_sizes(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    sizes = {f.name: (f.vcpus, f.ram_mb, f.root_gb) for f in all_flavors(cfg)}
    assert sizes == {
        "m1.tiny": (1, 512, 1),
        "m1.small": (1, 2048, 20),
        "m1.medium": (2, 4096, 40),
        "m1.large": (4, 8192, 80),
        "m1.xlarge": (8, 16384, 160),
    }
    assert get_flavor(cfg, "m1.tiny").root_bytes == GIB


def test_user_flavors_add_and_replace(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        "[flavors.c1.eph]\nvcpus = 2\nram_mb = 256\nroot_gb = 1\nephemeral_gb = 1\nswap_mb = 64\n"
        "[flavors.m1.tiny]\nvcpus = 1\nram_mb = 128\nroot_gb = 2\n",
    )
    eph = get_flavor(cfg, "c1.eph")
    assert eph == Flavor("c1.eph", 2, 256, 1, 1, 64)
    assert get_flavor(cfg, "m1.tiny").ram_mb == 128
    assert len(all_flavors(cfg)) == len(BUILTIN) + 1


def test_unknown_flavor_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"m9\.huge.*m1\.tiny"):
        get_flavor(_cfg(tmp_path), "m9.huge")


def test_round_trip_dict() -> None:
    f = Flavor("x", 1, 2, 3, 4, 5)
    assert Flavor.from_dict(f.to_dict()) == f
