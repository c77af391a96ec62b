"""The one configuration object: defaults < TOML file < ``COWFLEET_*`` env < flags.

Built once at the entry point (:func:`load`) and handed down; no other module
reads the environment. Every path defaults to somewhere under ``home``. Each
setting's type and range are one :class:`Setting` row in :data:`SETTING_ROWS`;
a value is checked where it is read, so an error names its source.

TOML layout (all keys optional)::

    home = "/var/lib/cowfleet"
    instances_path = "/var/lib/cowfleet/instances"

    [limits]
    max_virtual_size = 4398046511104     # bytes; 4 TiB
    max_image_size = 1099511627776       # upload cap, bytes

    [images]            # the image service (server side) and the client
    url = "http://127.0.0.1:9292"
    token_file = "..."                   # client & server
    data_dir = "..."                     # server
    database = "sqlite:///..."           # server
    host = "127.0.0.1"
    port = 9292
    property_quota = 128                 # server: properties per image (413 above)
    max_uploads = 16                     # server: uploads in flight (503 above)
    max_uploads_per_token = 4            # server: uploads in flight per token
    max_header_bytes = 65536             # server: request line + headers (431 above)
    header_timeout = 30.0                # server: s to send a request's headers
    orphan_grace = 3600.0                # server: s before a file no record explains goes
    allow_insecure_token_file = false    # client & server: accept a token file others can read

    [cache]
    force_raw = false
    fetch_concurrency = 4
    fetch_deadline = 3600.0
    fetch_retries = 5
    max_unused_age = 86400.0             # s since last use before an unused base goes
    part_max_age = 3600.0                # s before an abandoned .part is removed
    max_cache_bytes = 0                  # byte budget of _base (0: none)
    min_free_percent = 5.0               # keep this much of the filesystem free
    verify_interval = 604800.0           # re-hash each base this often (0: never)
    verify_rate = 67108864               # bytes/s read by re-verification

    [node]
    interval = 600.0                     # s between two passes of `node run`
    api_url = "http://127.0.0.1:8774"    # serve node: the compute API it registers with
    token_file = "..."                   # serve node: file holding the node token (0600)
    host = "127.0.0.1"                   # serve node: address of its HTTP API
    port = 8775
    hostname = "node-1"                  # serve node: its name in the fleet (default: host's)
    vcpus = 0                            # serve node: capacity offered (0: the host's)
    ram_mb = 0
    disk_gb = 0
    build_workers = 8                    # serve node: builds run at once

    [compute]
    driver = "libvirt"                   # or "none"
    libvirt_uri = "qemu:///system"
    virt_type = "kvm"                    # or "qemu"
    ephemeral_fs = "ext4"

    [flavors.m1.custom]                  # user-defined flavors
    vcpus = 1
    ram_mb = 512
    root_gb = 1
    ephemeral_gb = 0
    swap_mb = 0
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cowfleet.errors import ConfigError

TIB = 1024**4
DEFAULT_HOME = Path("~/.local/share/cowfleet")
DEFAULT_MAX_VIRTUAL_SIZE = 4 * TIB
DEFAULT_MAX_IMAGE_SIZE = 1 * TIB
DEFAULT_IMAGE_PORT = 9292
DEFAULT_IMAGE_HOST = "127.0.0.1"
# The image service keeps an image in the page cache from its second download on.
DEFAULT_CACHE_MIN_USES = 2
# Image service limits (Glance's image_property_quota is 128 too).
DEFAULT_PROPERTY_QUOTA = 128
DEFAULT_MAX_UPLOADS = 16
DEFAULT_MAX_UPLOADS_PER_TOKEN = 4
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
DEFAULT_HEADER_TIMEOUT = 30.0
DEFAULT_ORPHAN_GRACE = 3600.0
DEFAULT_LIBVIRT_URI = "qemu:///system"
DEFAULT_MAX_UNUSED_AGE = 86400.0  # Nova's remove_unused_original_minimum_age_seconds
DEFAULT_PART_MAX_AGE = 3600.0
DEFAULT_MIN_FREE_PERCENT = 5.0
DEFAULT_VERIFY_INTERVAL = 7 * 86400.0
DEFAULT_VERIFY_RATE = 64 * 1024 * 1024
DEFAULT_NODE_INTERVAL = 600.0
DEFAULT_NODE_HOST = "127.0.0.1"
DEFAULT_NODE_PORT = 8775
DEFAULT_NODE_BUILD_WORKERS = 8
DRIVERS = ("libvirt", "none")
VIRT_TYPES = ("kvm", "qemu")
# The filesystems compute.ephemeral can make (its MKFS_TEMPLATES; a unit test keeps both equal).
EPHEMERAL_FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs", "vfat")


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
    home: Path
    instances_path: Path
    # limits
    max_virtual_size: int = DEFAULT_MAX_VIRTUAL_SIZE
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE
    # image service: client side
    image_url: str | None = None
    image_token: str | None = None
    image_token_file: Path | None = None
    # image service: server side
    images_data_dir: Path | None = None
    images_database: str | None = None
    images_host: str = DEFAULT_IMAGE_HOST
    images_port: int = DEFAULT_IMAGE_PORT
    images_direct_io: bool = True
    images_cache_min_uses: int = DEFAULT_CACHE_MIN_USES
    images_property_quota: int = DEFAULT_PROPERTY_QUOTA
    images_max_uploads: int = DEFAULT_MAX_UPLOADS
    images_max_uploads_per_token: int = DEFAULT_MAX_UPLOADS_PER_TOKEN
    images_max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    images_header_timeout: float = DEFAULT_HEADER_TIMEOUT
    images_orphan_grace: float = DEFAULT_ORPHAN_GRACE
    images_allow_insecure_token_file: bool = False
    # node cache
    force_raw: bool = False
    fetch_concurrency: int = 4
    fetch_deadline: float = 3600.0
    fetch_retries: int = 5
    # cache manager
    max_unused_age: float = DEFAULT_MAX_UNUSED_AGE
    part_max_age: float = DEFAULT_PART_MAX_AGE
    max_cache_bytes: int = 0
    min_free_percent: float = DEFAULT_MIN_FREE_PERCENT
    verify_interval: float = DEFAULT_VERIFY_INTERVAL
    verify_rate: int = DEFAULT_VERIFY_RATE
    node_interval: float = DEFAULT_NODE_INTERVAL
    # node agent (serve node)
    node_api_url: str | None = None
    node_token_file: Path | None = None
    node_host: str = DEFAULT_NODE_HOST
    node_port: int = DEFAULT_NODE_PORT
    node_hostname: str | None = None
    node_vcpus: int = 0
    node_ram_mb: int = 0
    node_disk_gb: int = 0
    node_build_workers: int = DEFAULT_NODE_BUILD_WORKERS
    # compute
    driver: str = "libvirt"
    libvirt_uri: str = DEFAULT_LIBVIRT_URI
    virt_type: str = "kvm"
    ephemeral_fs: str = "ext4"
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
        """Token file shared by ``images serve`` and the client."""
        return self.image_token_file or self.data_dir / "token"

    @property
    def endpoint(self) -> str:
        return self.image_url or f"http://{self.images_host}:{self.images_port}"

    @property
    def base_dir(self) -> Path:
        return self.instances_path / "_base"

    @property
    def locks_dir(self) -> Path:
        return self.instances_path / "locks"

    def with_overrides(self, **kw: Any) -> Config:
        """A copy with some values replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


def _bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("not a boolean (true/false, yes/no, on/off, 1/0)")


@dataclass(frozen=True)
class Setting:
    """One setting's type and allowed values: the one place they are spelled.

    ``kind`` is ``int``, ``float``, ``bool``, ``str`` or ``Path``; numbers may have
    bounds (``at_least``/``above`` below, ``at_most``/``below`` above) and strings
    a fixed set of ``choices``. :meth:`parse` turns a raw value from a TOML file
    (already typed), the environment or a flag (text, or typed by argparse) into
    the value, or raises :class:`ValueError` saying what is wrong with it.
    """

    name: str
    kind: type
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    choices: tuple[str, ...] = ()

    def parse(self, raw: Any) -> Any:
        value = self._typed(raw)
        if self.kind in (int, float):
            self._check_range(value)
        if self.choices and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}")
        return value

    def _typed(self, raw: Any) -> Any:
        kind = self.kind
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, str):
                return _bool(raw)
            raise ValueError("not a boolean")
        if isinstance(raw, bool):  # bool is an int subclass; true is no number or text
            raise ValueError(f"a boolean where {_KIND_NAMES[kind]} is expected")
        if kind is int:
            if isinstance(raw, int):
                return raw
            if isinstance(raw, str):
                try:
                    return int(raw.strip(), 10)
                except ValueError:
                    raise ValueError("not a whole number") from None
            raise ValueError("not a whole number")
        if kind is float:
            if isinstance(raw, (int, float)):
                value = float(raw)
            elif isinstance(raw, str):
                try:
                    value = float(raw)
                except ValueError:
                    raise ValueError("not a number") from None
            else:
                raise ValueError("not a number")
            if not math.isfinite(value):
                raise ValueError("not a finite number")
            return value
        if kind is Path:
            if isinstance(raw, Path):
                return raw
            if isinstance(raw, str) and raw:
                return Path(raw)
            raise ValueError("not a path")
        if isinstance(raw, str):
            return raw
        raise ValueError("not a string")

    def _check_range(self, value: float) -> None:
        if self.at_least is not None and value < self.at_least:
            raise ValueError(f"must be at least {_num(self.at_least)}")
        if self.above is not None and value <= self.above:
            raise ValueError(f"must be above {_num(self.above)}")
        if self.at_most is not None and value > self.at_most:
            raise ValueError(f"must be at most {_num(self.at_most)}")
        if self.below is not None and value >= self.below:
            raise ValueError(f"must be below {_num(self.below)}")


_KIND_NAMES = {int: "a whole number", float: "a number", str: "a string", Path: "a path"}


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


# Every setting, its type and its range. A new setting needs a row here (and a
# field in Config, a TOML key and, if it has one, an environment variable below).
SETTING_ROWS: tuple[Setting, ...] = (
    Setting("home", Path),
    Setting("instances_path", Path),
    Setting("max_virtual_size", int, at_least=1),
    Setting("max_image_size", int, at_least=1),
    Setting("image_url", str),
    Setting("image_token", str),
    Setting("image_token_file", Path),
    Setting("images_data_dir", Path),
    Setting("images_database", str),
    Setting("images_host", str),
    Setting("images_port", int, at_least=1, at_most=65535),
    Setting("images_direct_io", bool),
    Setting("images_cache_min_uses", int, at_least=0),
    Setting("images_property_quota", int, at_least=0),
    Setting("images_max_uploads", int, at_least=1),
    Setting("images_max_uploads_per_token", int, at_least=1),
    Setting("images_max_header_bytes", int, at_least=1024),
    Setting("images_header_timeout", float, above=0),
    Setting("images_orphan_grace", float, at_least=0),
    Setting("images_allow_insecure_token_file", bool),
    Setting("force_raw", bool),
    Setting("fetch_concurrency", int, at_least=1),
    Setting("fetch_deadline", float, above=0),
    Setting("fetch_retries", int, at_least=0),
    Setting("max_unused_age", float, at_least=0),
    Setting("part_max_age", float, at_least=0),
    Setting("max_cache_bytes", int, at_least=0),
    Setting("min_free_percent", float, at_least=0, below=100),
    Setting("verify_interval", float, at_least=0),
    Setting("verify_rate", int, at_least=1),
    Setting("node_interval", float, above=0),
    Setting("node_api_url", str),
    Setting("node_token_file", Path),
    Setting("node_host", str),
    Setting("node_port", int, at_least=1, at_most=65535),
    Setting("node_hostname", str),
    Setting("node_vcpus", int, at_least=0),
    Setting("node_ram_mb", int, at_least=0),
    Setting("node_disk_gb", int, at_least=0),
    Setting("node_build_workers", int, at_least=1, at_most=256),
    Setting("driver", str, choices=DRIVERS),
    Setting("libvirt_uri", str),
    Setting("virt_type", str, choices=VIRT_TYPES),
    Setting("ephemeral_fs", str, choices=EPHEMERAL_FILESYSTEMS),
)
_BY_NAME = {s.name: s for s in SETTING_ROWS}

SETTINGS = frozenset(_BY_NAME)

_ENV = {
    "COWFLEET_HOME": "home",
    "COWFLEET_INSTANCES_PATH": "instances_path",
    "COWFLEET_MAX_VIRTUAL_SIZE": "max_virtual_size",
    "COWFLEET_MAX_IMAGE_SIZE": "max_image_size",
    "COWFLEET_IMAGE_URL": "image_url",
    "COWFLEET_IMAGE_TOKEN": "image_token",
    "COWFLEET_IMAGE_TOKEN_FILE": "image_token_file",
    "COWFLEET_IMAGES_DATA_DIR": "images_data_dir",
    "COWFLEET_IMAGES_DATABASE": "images_database",
    "COWFLEET_IMAGES_DIRECT_IO": "images_direct_io",
    "COWFLEET_IMAGES_CACHE_MIN_USES": "images_cache_min_uses",
    "COWFLEET_IMAGES_PROPERTY_QUOTA": "images_property_quota",
    "COWFLEET_IMAGES_MAX_UPLOADS": "images_max_uploads",
    "COWFLEET_IMAGES_MAX_UPLOADS_PER_TOKEN": "images_max_uploads_per_token",
    "COWFLEET_IMAGES_MAX_HEADER_BYTES": "images_max_header_bytes",
    "COWFLEET_IMAGES_HEADER_TIMEOUT": "images_header_timeout",
    "COWFLEET_IMAGES_ORPHAN_GRACE": "images_orphan_grace",
    "COWFLEET_IMAGES_ALLOW_INSECURE_TOKEN_FILE": "images_allow_insecure_token_file",
    "COWFLEET_FORCE_RAW": "force_raw",
    "COWFLEET_FETCH_CONCURRENCY": "fetch_concurrency",
    "COWFLEET_MAX_UNUSED_AGE": "max_unused_age",
    "COWFLEET_MAX_CACHE_BYTES": "max_cache_bytes",
    "COWFLEET_MIN_FREE_PERCENT": "min_free_percent",
    "COWFLEET_VERIFY_INTERVAL": "verify_interval",
    "COWFLEET_VERIFY_RATE": "verify_rate",
    "COWFLEET_NODE_INTERVAL": "node_interval",
    "COWFLEET_NODE_API_URL": "node_api_url",
    "COWFLEET_NODE_TOKEN_FILE": "node_token_file",
    "COWFLEET_NODE_HOST": "node_host",
    "COWFLEET_NODE_PORT": "node_port",
    "COWFLEET_NODE_HOSTNAME": "node_hostname",
    "COWFLEET_NODE_VCPUS": "node_vcpus",
    "COWFLEET_NODE_RAM_MB": "node_ram_mb",
    "COWFLEET_NODE_DISK_GB": "node_disk_gb",
    "COWFLEET_NODE_BUILD_WORKERS": "node_build_workers",
    "COWFLEET_DRIVER": "driver",
    "COWFLEET_LIBVIRT_URI": "libvirt_uri",
    "COWFLEET_VIRT_TYPE": "virt_type",
    "COWFLEET_EPHEMERAL_FS": "ephemeral_fs",
}

# TOML section/key -> field
_TOML: dict[tuple[str, ...], str] = {
    ("home",): "home",
    ("instances_path",): "instances_path",
    ("limits", "max_virtual_size"): "max_virtual_size",
    ("limits", "max_image_size"): "max_image_size",
    ("images", "url"): "image_url",
    ("images", "token"): "image_token",
    ("images", "token_file"): "image_token_file",
    ("images", "data_dir"): "images_data_dir",
    ("images", "database"): "images_database",
    ("images", "host"): "images_host",
    ("images", "port"): "images_port",
    ("images", "direct_io"): "images_direct_io",
    ("images", "cache_min_uses"): "images_cache_min_uses",
    ("images", "property_quota"): "images_property_quota",
    ("images", "max_uploads"): "images_max_uploads",
    ("images", "max_uploads_per_token"): "images_max_uploads_per_token",
    ("images", "max_header_bytes"): "images_max_header_bytes",
    ("images", "header_timeout"): "images_header_timeout",
    ("images", "orphan_grace"): "images_orphan_grace",
    ("images", "allow_insecure_token_file"): "images_allow_insecure_token_file",
    ("cache", "force_raw"): "force_raw",
    ("cache", "fetch_concurrency"): "fetch_concurrency",
    ("cache", "fetch_deadline"): "fetch_deadline",
    ("cache", "fetch_retries"): "fetch_retries",
    ("cache", "max_unused_age"): "max_unused_age",
    ("cache", "part_max_age"): "part_max_age",
    ("cache", "max_cache_bytes"): "max_cache_bytes",
    ("cache", "min_free_percent"): "min_free_percent",
    ("cache", "verify_interval"): "verify_interval",
    ("cache", "verify_rate"): "verify_rate",
    ("node", "interval"): "node_interval",
    ("node", "api_url"): "node_api_url",
    ("node", "token_file"): "node_token_file",
    ("node", "host"): "node_host",
    ("node", "port"): "node_port",
    ("node", "hostname"): "node_hostname",
    ("node", "vcpus"): "node_vcpus",
    ("node", "ram_mb"): "node_ram_mb",
    ("node", "disk_gb"): "node_disk_gb",
    ("node", "build_workers"): "node_build_workers",
    ("compute", "driver"): "driver",
    ("compute", "libvirt_uri"): "libvirt_uri",
    ("compute", "virt_type"): "virt_type",
    ("compute", "ephemeral_fs"): "ephemeral_fs",
}


def _convert(name: str, raw: Any, origin: str) -> Any:
    """``raw`` checked against the setting's row; a bad value names the setting and ``origin``."""
    try:
        return _BY_NAME[name].parse(raw)
    except ValueError as exc:
        raise ConfigError(
            f"invalid setting {name} = {raw!r} (from {origin}): {exc}", setting=name, origin=origin
        ) from exc


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
        origin = str(config_file)
        known_top = {k[0] for k in _TOML} | {"flavors"}
        for key in data:
            if key not in known_top:
                raise ConfigError(f"{origin}: unknown setting {key!r}")
        for keys, name in _TOML.items():
            node: Any = data
            for k in keys:
                if not isinstance(node, dict) or k not in node:
                    break
                node = node[k]
            else:
                values[name] = _convert(name, node, f"{origin}, key {'.'.join(keys)}")
        for section in ("limits", "images", "cache", "node", "compute"):
            sec = data.get(section, {})
            if not isinstance(sec, dict):
                raise ConfigError(f"{origin}: [{section}] must be a table")
            for key in sec:
                if (section, key) not in _TOML:
                    raise ConfigError(f"{origin}: unknown setting {section}.{key}")
        if "flavors" in data:
            flavors = _flavors_from_toml(data["flavors"], origin)

    for var, name in _ENV.items():
        if env.get(var):
            values[name] = _convert(name, env[var], f"environment variable {var}")

    for name, raw in (flags or {}).items():
        if raw is None:
            continue
        if name not in _BY_NAME:
            raise ConfigError(f"unknown setting {name!r}")
        flag = (flag_names or {}).get(name) or f"--{name.replace('_', '-')}"
        values[name] = _convert(name, raw, f"command-line flag {flag}")

    home = Path(values.pop("home", DEFAULT_HOME)).expanduser()
    home = home if home.is_absolute() else Path.cwd() / home
    instances = Path(values.pop("instances_path", home / "instances")).expanduser()
    return Config(home=home, instances_path=instances.absolute(), flavors=flavors, **values)
