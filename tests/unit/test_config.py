"""The configuration object: precedence, validation, derived paths."""

from __future__ import annotations

import os
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

    cfg = config.load(f, env={"COWFLEET_DRIVER": "libvirt"}, flags={"driver": "none", "home": None})
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
        ("[compute]\ndriver = 'xen'\n", "driver = 'xen'.*must be one of libvirt, none"),
        ("[compute]\nvirt_type = 'lxc'\n", "virt_type = 'lxc'.*must be one of kvm, qemu"),
        ("[images]\nport = 'eighty'\n", "invalid setting images_port = 'eighty'"),
        ("[images]\nport = 70000\n", "images_port = 70000 .*must be at most 65535"),
        ("[cache]\nforce_raw = 'maybe'\n", "invalid setting force_raw = 'maybe'"),
        ("[cache]\nwhat = 1\n", "unknown setting cache.what"),
        ("bogus = 1\n", "unknown setting 'bogus'"),
        ("[flavors.x]\nvcpus = 0\nram_mb = 1\n", "vcpus must be a positive integer"),
        ("[flavors.x]\nvcpus = 1\n", "ram_mb"),
        ("this is = = not toml", "not valid TOML"),
        ("[limits]\nmax_virtual_size = -5\n", "max_virtual_size = -5 .*must be at least 1"),
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


# -- every setting has a type and a range (issue 13, item 8) ------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "reason"),
    [
        ("cache", "fetch_retries", "-1", "must be at least 0"),
        ("cache", "fetch_deadline", "-1.0", "must be above 0"),
        ("cache", "fetch_deadline", "0", "must be above 0"),
        ("cache", "fetch_concurrency", "0", "must be at least 1"),
        ("cache", "min_free_percent", "100.0", "must be below 100"),
        ("cache", "max_cache_bytes", "-1", "must be at least 0"),
        ("cache", "verify_interval", "-0.5", "must be at least 0"),
        ("cache", "part_max_age", "'soon'", "not a number"),
        ("cache", "fetch_retries", "2.5", "not a whole number"),
        ("cache", "fetch_retries", "true", "a boolean where a whole number is expected"),
        ("cache", "max_unused_age", "nan", "not a finite number"),
        ("cache", "verify_rate", "inf", "not a whole number"),
        ("images", "cache_min_uses", "-2", "must be at least 0"),
        ("images", "direct_io", "3", "not a boolean"),
        ("images", "url", "9292", "not a string"),
        ("images", "data_dir", "''", "not a path"),
        ("node", "interval", "0", "must be above 0"),
        ("compute", "ephemeral_fs", "'zfs'", "must be one of ext2, ext3, ext4, xfs, vfat"),
    ],
)
def test_bad_value_in_file_names_setting_file_and_key(
    tmp_path: Path, section: str, key: str, value: str, reason: str
) -> None:
    f = write(tmp_path, f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        config.load(f, env={})
    msg = str(info.value)
    assert f"(from {f}, key {section}.{key})" in msg
    assert msg.endswith(reason)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("COWFLEET_FETCH_CONCURRENCY", "lots", "fetch_concurrency = 'lots' "),
        ("COWFLEET_FETCH_CONCURRENCY", "-3", "must be at least 1"),
        ("COWFLEET_MAX_UNUSED_AGE", "-1", "must be at least 0"),
        ("COWFLEET_NODE_INTERVAL", "often", "not a number"),
        ("COWFLEET_EPHEMERAL_FS", "zfs", "must be one of"),
        ("COWFLEET_DRIVER", "xen", "must be one of libvirt, none"),
        ("COWFLEET_FORCE_RAW", "perhaps", "not a boolean"),
        ("COWFLEET_MIN_FREE_PERCENT", "-5", "must be at least 0"),
    ],
)
def test_bad_value_in_environment_names_the_variable(var: str, value: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, env={var: value})
    assert f"(from environment variable {var})" in str(info.value)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "flag", "needle"),
    [
        ("images_port", 0, "--port", "images_port = 0 (from command-line flag --port)"),
        ("node_interval", -5.0, "--interval", "must be above 0"),
        ("fetch_retries", -1, None, "(from command-line flag --fetch-retries)"),
        ("virt_type", "lxc", "--virt-type", "must be one of kvm, qemu"),
    ],
)
def test_bad_flag_names_the_flag(name: str, value: object, flag: str | None, needle: str) -> None:
    names = {name: flag} if flag else None
    with pytest.raises(ConfigError) as info:
        config.load(None, env={}, flags={name: value}, flag_names=names)
    assert needle in str(info.value)
    assert f"flag {flag or '--' + name.replace('_', '-')}" in str(info.value)


def test_later_sources_are_checked_even_when_overridden_earlier(tmp_path: Path) -> None:
    # A bad value is an error where it is written, whichever source would win.
    f = write(tmp_path, "[cache]\nfetch_retries = -1\n")
    with pytest.raises(ConfigError, match=r"key cache\.fetch_retries"):
        config.load(f, env={}, flags={"fetch_retries": 3})


def test_edges_of_each_range_are_accepted(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
[images]
port = 65535
cache_min_uses = 0
[cache]
fetch_retries = 0
fetch_concurrency = 1
min_free_percent = 0
max_cache_bytes = 0
verify_interval = 0
fetch_deadline = 0.001
[compute]
ephemeral_fs = "vfat"
""",
    )
    cfg = config.load(f, env={"COWFLEET_NODE_INTERVAL": "0.5", "COWFLEET_FORCE_RAW": "yes"})
    assert (cfg.images_port, cfg.fetch_retries, cfg.fetch_concurrency) == (65535, 0, 1)
    assert (cfg.fetch_deadline, cfg.node_interval, cfg.force_raw) == (0.001, 0.5, True)
    assert cfg.ephemeral_fs == "vfat" and cfg.min_free_percent == 0.0


def test_every_setting_has_one_row_and_its_default_is_in_range(tmp_path: Path) -> None:
    defaults = config.Config(home=tmp_path, instances_path=tmp_path / "i")
    field_names = {f for f in vars(defaults) if f != "flavors"}
    assert field_names == config.SETTINGS
    for row in config.SETTING_ROWS:
        default = getattr(defaults, row.name)
        if default is not None:
            assert row.parse(default) == default, row.name


def test_config_fields_are_the_rows_with_their_types_and_defaults(tmp_path: Path) -> None:
    import dataclasses
    import typing

    hints = typing.get_type_hints(config.Config)
    fields = {f.name: f for f in dataclasses.fields(config.Config) if f.name != "flavors"}
    assert list(fields) == [row.name for row in config.SETTING_ROWS]
    for row in config.SETTING_ROWS:
        assert row.kind in typing.get_args(hints[row.name]) or hints[row.name] is row.kind
        if row.name not in ("home", "instances_path"):
            assert fields[row.name].default == row.default, row.name
        if row.default is None:
            assert row.derived, f"{row.name}: no default and no word on how it is derived"
        assert row.help and row.toml


@pytest.mark.parametrize(
    ("var", "value", "attr", "expected"),
    [
        ("COWFLEET_FETCH_DEADLINE", "90", "fetch_deadline", 90.0),
        ("COWFLEET_FETCH_RETRIES", "0", "fetch_retries", 0),
        ("COWFLEET_PART_MAX_AGE", "60.5", "part_max_age", 60.5),
        ("COWFLEET_IMAGES_HOST", "0.0.0.0", "images_host", "0.0.0.0"),
        ("COWFLEET_IMAGES_PORT", "9393", "images_port", 9393),
    ],
)
def test_settings_that_had_no_environment_variable_have_one(
    var: str, value: str, attr: str, expected: object
) -> None:
    assert getattr(config.load(None, env={var: value}), attr) == expected


def test_new_environment_variables_are_checked_and_named() -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, env={"COWFLEET_IMAGES_PORT": "70000"})
    assert str(info.value) == (
        "invalid setting images_port = '70000' (from environment variable "
        "COWFLEET_IMAGES_PORT): must be at most 65535"
    )


def test_every_setting_has_an_environment_variable_named_after_it() -> None:
    for row in config.SETTING_ROWS:
        assert row.env == f"COWFLEET_{row.name.upper()}"


def test_toml_keys_come_from_the_table(tmp_path: Path) -> None:
    lines = []
    for row in config.SETTING_ROWS:
        if isinstance(row.default, (int, float, str)) and not isinstance(row.default, bool):
            section, _, key = row.toml.rpartition(".")
            lines.append((section, f"{key} = {row.default!r}"))
    text = ""
    for section in dict.fromkeys(s for s, _ in lines):
        text += (f"[{section}]\n" if section else "") + "".join(
            f"{kv}\n" for s, kv in lines if s == section
        )
    cfg = config.load(write(tmp_path, text.replace("'", '"')), env={})
    for row in config.SETTING_ROWS:
        if isinstance(row.default, (int, float, str)) and not isinstance(row.default, bool):
            assert getattr(cfg, row.name) == row.default


def test_ephemeral_filesystems_are_the_ones_mkfs_is_known_for() -> None:
    from cowfleet.compute.ephemeral import MKFS_TEMPLATES

    assert set(config.EPHEMERAL_FILESYSTEMS) == set(MKFS_TEMPLATES)


def test_cli_bad_setting_exits_2_naming_setting_and_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cowfleet.cli.main import main

    for var in [v for v in os.environ if v.startswith("COWFLEET_")]:
        monkeypatch.delenv(var)
    home = ["--home", str(tmp_path / "home")]
    f = write(tmp_path, "[cache]\nfetch_retries = -1\n")
    # Today's main reached AssertionError("unreachable") in the fetch loop with this file.
    assert main(["cache", "fetch", "some-image", "--config", str(f), *home]) == 2
    err = capsys.readouterr().err
    assert f"fetch_retries = -1 (from {f}, key cache.fetch_retries): must be at least 0" in err
    assert "Traceback" not in err

    assert main(["serve", "images", "--port", "0", *home]) == 2
    assert "images_port = 0 (from command-line flag --port): must be at least 1" in (
        capsys.readouterr().err
    )

    assert main(["node", "run", "--once", "--interval", "-1", *home]) == 2
    assert "(from command-line flag --interval): must be above 0" in capsys.readouterr().err

    monkeypatch.setenv("COWFLEET_EPHEMERAL_FS", "zfs")
    assert main(["flavor", "list", *home]) == 2
    assert "ephemeral_fs = 'zfs' (from environment variable COWFLEET_EPHEMERAL_FS)" in (
        capsys.readouterr().err
    )
