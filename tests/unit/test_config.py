"""The configuration object: precedence, validation, derived paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from cowfleet import config
from cowfleet.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cowfleet.toml"
    p.write_text(text)
    return p


def test_defaults_live_under_home(tmp_path: Path) -> None:
    cfg = config.load(None, env={"COWFLEET_HOME": str(tmp_path)})
    assert cfg.home == tmp_path
    assert cfg.instances_path == tmp_path / "instances"
    assert cfg.base_dir == tmp_path / "instances" / "_base"
    assert cfg.locks_dir == tmp_path / "instances" / "locks"
    assert cfg.data_dir == tmp_path / "images"
    assert cfg.token_file == tmp_path / "images" / "token"
    assert cfg.database_url == f"sqlite:///{tmp_path / 'images' / 'catalog.sqlite'}"
    assert cfg.endpoint == "http://127.0.0.1:9292"
    assert cfg.max_virtual_size == 4 * 1024**4


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
home = "/from/file"
[compute]
driver = "none"
virt_type = "qemu"
[images]
url = "http://127.0.0.1:1111"
""",
    )
    cfg = config.load(f, env={})
    assert (cfg.home, cfg.driver, cfg.virt_type) == (Path("/from/file"), "none", "qemu")
    assert cfg.endpoint == "http://127.0.0.1:1111"

    cfg = config.load(f, env={"COWFLEET_DRIVER": "libvirt", "COWFLEET_HOME": "/from/env"})
    assert (cfg.home, cfg.driver) == (Path("/from/env"), "libvirt")

    cfg = config.load(
        f, env={"COWFLEET_DRIVER": "libvirt"}, flags={"driver": "none", "home": None}
    )
    assert cfg.driver == "none"
    assert cfg.home == Path("/from/file")  # None flag means "not given"


def test_instances_path_overrides(tmp_path: Path) -> None:
    cfg = config.load(
        None, env={"COWFLEET_HOME": str(tmp_path), "COWFLEET_INSTANCES_PATH": "/srv/nova"}
    )
    assert cfg.base_dir == Path("/srv/nova/_base")


def test_user_flavors_from_toml(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
[flavors.m1.custom]
vcpus = 2
ram_mb = 1024
root_gb = 5
swap_mb = 256
""",
    )
    cfg = config.load(f, env={})
    assert cfg.flavors == (
        config.FlavorSpec("m1.custom", vcpus=2, ram_mb=1024, root_gb=5, swap_mb=256),
    )


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[compute]\ndriver = 'xen'\n", "driver must be one of"),
        ("[compute]\nvirt_type = 'lxc'\n", "virt_type must be one of"),
        ("[images]\nport = 'eighty'\n", "invalid value for images_port"),
        ("[images]\nport = 70000\n", "port out of range"),
        ("[cache]\nforce_raw = 'maybe'\n", "invalid value for force_raw"),
        ("[cache]\nwhat = 1\n", "unknown setting cache.what"),
        ("bogus = 1\n", "unknown setting 'bogus'"),
        ("[flavors.x]\nvcpus = 0\nram_mb = 1\n", "vcpus must be a positive integer"),
        ("[flavors.x]\nvcpus = 1\n", "ram_mb"),
        ("this is = = not toml", "not valid TOML"),
        ("[limits]\nmax_virtual_size = -5\n", "must be positive"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        config.load(write(tmp_path, text), env={})


def test_missing_file_and_bad_env(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="COWFLEET_FETCH_CONCURRENCY"):
        config.load(None, env={"COWFLEET_FETCH_CONCURRENCY": "lots"})
    with pytest.raises(ConfigError, match="unknown setting"):
        config.load(None, env={}, flags={"no_such_setting": 1})


def test_config_file_from_env(tmp_path: Path) -> None:
    f = write(tmp_path, "[compute]\ndriver = 'none'\n")
    assert config.load(None, env={"COWFLEET_CONFIG": str(f)}).driver == "none"
