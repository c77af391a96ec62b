"""The one configuration object: defaults < TOML file < ``COWFLEET_*`` env < flags.

Built once at the entry point (:func:`load`) and handed down; no other module
reads the environment. Every setting (type, range, default, TOML key,
environment variable, flags, unit, help) is one row of
:data:`cowfleet.settings_table.SETTING_ROWS`; this module reads the sources
from that table. A value is checked where it is read, so an error names the
setting and its source. ``python3 -m cowfleet.config --markdown`` prints the
README's settings table.

Besides the settings (``home``, ``instances_path`` and the ``[limits]``,
``[images]``, ``[cache]``, ``[node]`` and ``[compute]`` tables), the TOML file
may define flavors::

    [flavors.m1.custom]                  # user-defined flavors
    vcpus = 1
    ram_mb = 512
    root_gb = 1
    ephemeral_gb = 0
    swap_mb = 0
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cowfleet.errors import ConfigError
from cowfleet.settings_table import (  # re-exported: the names callers already use
    BY_NAME,
    DEFAULT_CACHE_MIN_USES,
    DEFAULT_FETCH_CONCURRENCY,
    DEFAULT_FETCH_DEADLINE,
    DEFAULT_FETCH_RETRIES,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_HOME,
    DEFAULT_IMAGE_HOST,
    DEFAULT_IMAGE_PORT,
    DEFAULT_LIBVIRT_URI,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_IMAGE_SIZE,
    DEFAULT_MAX_UNUSED_AGE,
    DEFAULT_MAX_UPLOADS,
    DEFAULT_MAX_UPLOADS_PER_TOKEN,
    DEFAULT_MAX_VIRTUAL_SIZE,
    DEFAULT_MIN_FREE_PERCENT,
    DEFAULT_NODE_INTERVAL,
    DEFAULT_ORPHAN_GRACE,
    DEFAULT_PART_MAX_AGE,
    DEFAULT_PROPERTY_QUOTA,
    DEFAULT_VERIFY_INTERVAL,
    DEFAULT_VERIFY_RATE,
    DRIVERS,
    EPHEMERAL_FILESYSTEMS,
    SETTING_ROWS,
    TIB,
    VIRT_TYPES,
    Setting,
    default,
    markdown_table,
)

__all__ = [
    "DEFAULT_CACHE_MIN_USES",
    "DEFAULT_FETCH_CONCURRENCY",
    "DEFAULT_FETCH_DEADLINE",
    "DEFAULT_FETCH_RETRIES",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_HOME",
    "DEFAULT_IMAGE_HOST",
    "DEFAULT_IMAGE_PORT",
    "DEFAULT_LIBVIRT_URI",
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_IMAGE_SIZE",
    "DEFAULT_MAX_UNUSED_AGE",
    "DEFAULT_MAX_UPLOADS",
    "DEFAULT_MAX_UPLOADS_PER_TOKEN",
    "DEFAULT_MAX_VIRTUAL_SIZE",
    "DEFAULT_MIN_FREE_PERCENT",
    "DEFAULT_NODE_INTERVAL",
    "DEFAULT_ORPHAN_GRACE",
    "DEFAULT_PART_MAX_AGE",
    "DEFAULT_PROPERTY_QUOTA",
    "DEFAULT_VERIFY_INTERVAL",
    "DEFAULT_VERIFY_RATE",
    "DRIVERS",
    "EPHEMERAL_FILESYSTEMS",
    "SETTINGS",
    "SETTING_ROWS",
    "TIB",
    "VIRT_TYPES",
    "Config",
    "FlavorSpec",
    "Setting",
    "load",
]

SETTINGS = frozenset(BY_NAME)


@dataclass(frozen=True)
class FlavorSpec:
    """A flavor as configured (built-ins live in :mod:`cowfleet.compute.flavors`)."""

    name: str
    vcpus: int
    ram_mb: int
    root_gb: int
    ephemeral_gb: int = 0
    swap_mb: int = 0


@dataclass(frozen=True)
class Config:
    """Every setting, one attribute per row of ``SETTING_ROWS`` (same name, defaults from there).

    ``None`` on an optional path or URL means "derived" (see the properties below).
    """

    home: Path
    instances_path: Path
    # limits
    max_virtual_size: int = default("max_virtual_size")
    max_image_size: int = default("max_image_size")
    # image service: client side
    image_url: str | None = None  # derived or unset: see its row
    image_token: str | None = None  # derived or unset: see its row
    image_token_file: Path | None = None  # derived: see its row
    # image service: server side
    images_data_dir: Path | None = None  # derived: see its row
    images_database: str | None = None  # derived or unset: see its row
    images_host: str = default("images_host")
    images_port: int = default("images_port")
    images_direct_io: bool = default("images_direct_io")
    images_cache_min_uses: int = default("images_cache_min_uses")
    images_property_quota: int = default("images_property_quota")
    images_max_uploads: int = default("images_max_uploads")
    images_max_uploads_per_token: int = default("images_max_uploads_per_token")
    images_max_header_bytes: int = default("images_max_header_bytes")
    images_header_timeout: float = default("images_header_timeout")
    images_orphan_grace: float = default("images_orphan_grace")
    images_allow_insecure_token_file: bool = default("images_allow_insecure_token_file")
    images_tokens_file: Path | None = None  # unset: see its row
    # node cache
    force_raw: bool = default("force_raw")
    fetch_concurrency: int = default("fetch_concurrency")
    fetch_deadline: float = default("fetch_deadline")
    fetch_retries: int = default("fetch_retries")
    # cache manager
    max_unused_age: float = default("max_unused_age")
    part_max_age: float = default("part_max_age")
    max_cache_bytes: int = default("max_cache_bytes")
    min_free_percent: float = default("min_free_percent")
    verify_interval: float = default("verify_interval")
    verify_rate: int = default("verify_rate")
    node_interval: float = default("node_interval")
    # node agent (serve node)
    node_api_url: str | None = None  # required by serve node: see its row
    node_token_file: Path | None = None  # required by serve node: see its row
    node_host: str = default("node_host")
    node_port: int = default("node_port")
    node_hostname: str | None = None  # derived: the host name
    node_vcpus: int = default("node_vcpus")
    node_ram_mb: int = default("node_ram_mb")
    node_disk_gb: int = default("node_disk_gb")
    node_build_workers: int = default("node_build_workers")
    snapshot_format: str = default("snapshot_format")
    snapshot_compression: str = default("snapshot_compression")
    snapshot_compress_workers: int = default("snapshot_compress_workers")
    node_peer_stall_timeout: float = default("node_peer_stall_timeout")
    # compute
    driver: str = default("driver")
    libvirt_uri: str = default("libvirt_uri")
    virt_type: str = default("virt_type")
    ephemeral_fs: str = default("ephemeral_fs")
    api_host: str = default("api_host")
    api_port: int = default("api_port")
    api_data_dir: Path | None = None  # derived: see its row
    api_database: str | None = None  # derived: see its row
    api_tokens_file: Path | None = None  # derived: see its row
    api_cpu_allocation_ratio: float = default("api_cpu_allocation_ratio")
    api_ram_allocation_ratio: float = default("api_ram_allocation_ratio")
    api_disk_allocation_ratio: float = default("api_disk_allocation_ratio")
    api_cache_weight: float = default("api_cache_weight")
    api_ram_weight: float = default("api_ram_weight")
    api_placement: str = default("api_placement")
    api_build_attempts: int = default("api_build_attempts")
    api_build_timeout: float = default("api_build_timeout")
    api_node_timeout: float = default("api_node_timeout")
    api_node_down_after: float = default("api_node_down_after")
    api_heartbeat_interval: float = default("api_heartbeat_interval")
    api_max_body: int = default("api_max_body")
    api_build_workers: int = default("api_build_workers")
    api_precache_concurrency: int = default("api_precache_concurrency")
    # metrics and logs
    metrics_public: bool = default("metrics_public")
    log_format: str = default("log_format")
    # client of the compute API (server, flavor, hypervisor commands)
    api_url: str | None = None  # unset: the commands work on this node
    api_token: str | None = None  # unset: read from api_token_file
    api_token_file: Path | None = None
    api_peer_fanout: int = default("api_peer_fanout")
    api_peer_stripes: int = default("api_peer_stripes")
    api_peer_stripe_fanout: int = default("api_peer_stripe_fanout")
    flavors: tuple[FlavorSpec, ...] = field(default_factory=tuple)

    # Derived locations -------------------------------------------------
    @property
    def data_dir(self) -> Path:
        """Image service data directory (server side)."""
        return self.images_data_dir or self.home / "images"

    @property
    def database_url(self) -> str:
        return self.images_database or f"sqlite:///{self.data_dir / 'catalog.sqlite'}"

    @property
    def token_file(self) -> Path:
        """Token file shared by ``serve images`` and the client."""
        return self.image_token_file or self.data_dir / "token"

    @property
    def endpoint(self) -> str:
        return self.image_url or f"http://{self.images_host}:{self.images_port}"

    @property
    def api_dir(self) -> Path:
        """The compute API's data folder (its SQLite database)."""
        return self.api_data_dir or self.home / "api"

    @property
    def api_database_url(self) -> str:
        return self.api_database or f"sqlite:///{self.api_dir / 'compute.sqlite'}"

    @property
    def api_tokens_path(self) -> Path:
        return self.api_tokens_file or self.api_dir / "tokens.toml"

    @property
    def base_dir(self) -> Path:
        return self.instances_path / "_base"

    @property
    def locks_dir(self) -> Path:
        return self.instances_path / "locks"

    def with_overrides(self, **kw: Any) -> Config:
        """A copy with some values replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


def _convert(name: str, raw: Any, origin: str) -> Any:
    """``raw`` checked against the setting's row; a bad value names the setting and ``origin``."""
    try:
        return BY_NAME[name].parse(raw)
    except ValueError as exc:
        raise ConfigError(
            f"invalid setting {name} = {raw!r} (from {origin}): {exc}", setting=name, origin=origin
        ) from exc


def _flag_of(row: Setting) -> str:
    return row.flags[0] if row.flags else f"--{row.name.replace('_', '-')}"


def _from_toml(data: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """The settings a parsed TOML file sets; an unknown key or a non-table section is an error."""
    sections = {r.toml_keys[0] for r in SETTING_ROWS if len(r.toml_keys) > 1}
    top = {r.toml for r in SETTING_ROWS if len(r.toml_keys) == 1}
    for key in data:
        if key not in top | sections | {"flavors"}:
            raise ConfigError(f"{origin}: unknown setting {key!r}")
    keys = {r.toml for r in SETTING_ROWS}
    for section in sorted(sections):
        sec = data.get(section, {})
        if not isinstance(sec, dict):
            raise ConfigError(f"{origin}: [{section}] must be a table")
        for key in sec:
            if f"{section}.{key}" not in keys:
                raise ConfigError(f"{origin}: unknown setting {section}.{key}")
    values: dict[str, Any] = {}
    for row in SETTING_ROWS:
        node: Any = data
        for k in row.toml_keys:
            if not isinstance(node, dict) or k not in node:
                break
            node = node[k]
        else:
            values[row.name] = _convert(row.name, node, f"{origin}, key {row.toml}")
    return values


def _flavors_from_toml(table: Any, origin: str) -> tuple[FlavorSpec, ...]:
    if not isinstance(table, dict):
        raise ConfigError(f"{origin}: [flavors] must be a table")
    out: list[FlavorSpec] = []

    def walk(prefix: str, node: dict[str, Any]) -> None:
        # "m1.custom" in TOML is a nested table; a leaf table has a "vcpus" key.
        if "vcpus" in node:
            try:
                out.append(
                    FlavorSpec(
                        name=prefix,
                        vcpus=_posint(node["vcpus"], "vcpus"),
                        ram_mb=_posint(node["ram_mb"], "ram_mb"),
                        root_gb=_nonneg(node.get("root_gb", 0), "root_gb"),
                        ephemeral_gb=_nonneg(node.get("ephemeral_gb", 0), "ephemeral_gb"),
                        swap_mb=_nonneg(node.get("swap_mb", 0), "swap_mb"),
                    )
                )
            except (KeyError, ValueError) as exc:
                raise ConfigError(f"{origin}: flavor {prefix!r}: {exc}") from exc
            return
        for key, sub in node.items():
            if not isinstance(sub, dict):
                raise ConfigError(f"{origin}: flavor {prefix + '.' + key!r} is not a table")
            walk(f"{prefix}.{key}" if prefix else key, sub)

    walk("", table)
    return tuple(out)


def _posint(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{what} must be a positive integer")
    return v


def _nonneg(v: Any, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"{what} must be a non-negative integer")
    return v


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"configuration file not found: {path}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc


def load(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration. ``flags`` values of ``None`` mean "not given".

    ``flag_names`` maps a setting to the option that set it (``images_port`` ->
    ``--port``) so an error names what the user typed; by default ``--images-port``.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    flavors: tuple[FlavorSpec, ...] = ()

    if config_file is None and env.get("COWFLEET_CONFIG"):
        config_file = Path(env["COWFLEET_CONFIG"])
    if config_file is not None:
        data = _read_toml(config_file)
        values.update(_from_toml(data, str(config_file)))
        if "flavors" in data:
            flavors = _flavors_from_toml(data["flavors"], str(config_file))

    for row in SETTING_ROWS:
        if row.env and env.get(row.env):
            values[row.name] = _convert(row.name, env[row.env], f"environment variable {row.env}")

    for name, raw in (flags or {}).items():
        if raw is None:
            continue
        if name not in BY_NAME:
            raise ConfigError(f"unknown setting {name!r}")
        flag = (flag_names or {}).get(name) or _flag_of(BY_NAME[name])
        values[name] = _convert(name, raw, f"command-line flag {flag}")

    home = Path(values.pop("home", DEFAULT_HOME)).expanduser()
    home = home if home.is_absolute() else Path.cwd() / home
    instances = Path(values.pop("instances_path", home / "instances")).expanduser()
    return Config(home=home, instances_path=instances.absolute(), flavors=flavors, **values)


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m cowfleet.config --markdown``: print the README's settings table."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["--markdown"]:
        print("usage: python3 -m cowfleet.config --markdown", file=sys.stderr)
        return 2
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
