"""Every setting, once: type, range, default, TOML key, environment variable, flags, unit, help.

:data:`SETTING_ROWS` is the one table. :mod:`cowfleet.config` parses the TOML
file, the environment and flags from it; the CLI builds each setting's option
and its ``--help`` from it (:func:`flag_help`); the README's settings table is
:func:`markdown_table` (``python3 -m cowfleet.config --markdown``), and a unit
test keeps the README equal to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
DEFAULT_FETCH_CONCURRENCY = 4
DEFAULT_FETCH_DEADLINE = 3600.0
DEFAULT_FETCH_RETRIES = 5
DEFAULT_MAX_UNUSED_AGE = 86400.0  # Nova's remove_unused_original_minimum_age_seconds
DEFAULT_PART_MAX_AGE = 3600.0
DEFAULT_MIN_FREE_PERCENT = 5.0
DEFAULT_VERIFY_INTERVAL = 7 * 86400.0
DEFAULT_VERIFY_RATE = 64 * 1024 * 1024
DEFAULT_NODE_INTERVAL = 600.0
DEFAULT_API_HOST = "127.0.0.1"
DEFAULT_API_PORT = 8774
PLACEMENTS = ("spread", "pack")
DEFAULT_NODE_HOST = "127.0.0.1"
DEFAULT_NODE_PORT = 8775
DEFAULT_NODE_BUILD_WORKERS = 8
DRIVERS = ("libvirt", "none")
VIRT_TYPES = ("kvm", "qemu")
LOG_FORMATS = ("text", "json")
# The filesystems compute.ephemeral can make (its MKFS_TEMPLATES; a unit test keeps both equal).
EPHEMERAL_FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs", "vfat")

# Units a setting may name (the help and the README say them).
BYTES, SECONDS, BYTES_PER_S, PERCENT = "bytes", "seconds", "bytes/s", "percent"


def _bool(v: str) -> bool:
    low = v.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("not a boolean (true/false, yes/no, on/off, 1/0)")


@dataclass(frozen=True)
class Setting:
    """One setting, everything about it in one row.

    ``kind`` is ``int``, ``float``, ``bool``, ``str`` or ``Path``; numbers may have
    bounds (``at_least``/``above`` below, ``at_most``/``below`` above) and strings
    a fixed set of ``choices``. ``default`` is the value when nothing sets it;
    ``None`` with ``derived`` says how it is worked out from other settings
    (``<home>/instances``). ``toml`` is the dotted key in the file, ``env`` the
    environment variable, ``flags`` the command-line options that set it (every
    command that takes the setting spells it this way). ``note`` is shown after
    the default in the README (``4 TiB``). :meth:`parse` turns a raw value from a
    TOML file (already typed), the environment or a flag into the value, or
    raises :class:`ValueError` saying what is wrong with it.
    """

    name: str
    kind: type
    default: Any
    toml: str
    env: str | None
    help: str
    flags: tuple[str, ...] = ()
    unit: str = ""
    derived: str = ""
    note: str = ""
    metavar: str = ""
    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def toml_keys(self) -> tuple[str, ...]:
        return tuple(self.toml.split("."))

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

    # -- documentation -------------------------------------------------------------
    def range_text(self) -> str:
        """``1-65535``, ``>= 1``, ``> 0``, ``[0, 100)``, ``kvm, qemu`` or ``""``."""
        if self.choices:
            return ", ".join(self.choices)
        lo = self.at_least
        if lo is not None and self.at_most is not None:
            return f"{_num(lo)}-{_num(self.at_most)}"
        if lo is not None and self.below is not None:
            return f"[{_num(lo)}, {_num(self.below)})"
        low = (
            f">= {_num(lo)}"
            if lo is not None
            else (f"> {_num(self.above)}" if self.above is not None else "")
        )
        high = (
            f"<= {_num(self.at_most)}"
            if self.at_most is not None
            else (f"< {_num(self.below)}" if self.below is not None else "")
        )
        return ", ".join(p for p in (low, high) if p)

    def default_text(self) -> str:
        """The default as the README shows it (a value, or how it is derived)."""
        if self.default is None:
            return self.derived or "(none)"
        if isinstance(self.default, bool):
            shown = "true" if self.default else "false"
        else:
            shown = str(self.default)
        return f"`{shown}`" + (f" ({self.note})" if self.note else "")

    def plain_help(self) -> str:
        return self.help.replace("`", "")


_KIND_NAMES = {int: "a whole number", float: "a number", str: "a string", Path: "a path"}
_TYPE_NAMES = {int: "integer", float: "number", bool: "boolean", str: "string", Path: "path"}


def _num(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


def _row(name: str, kind: type, default: Any, toml: str, help: str, **kw: Any) -> Setting:
    """A row whose environment variable is ``COWFLEET_<NAME>`` (``env=None``: none)."""
    env = kw.pop("env", f"COWFLEET_{name.upper()}")
    return Setting(name, kind, default, toml, env, help, **kw)


# Every setting. A new one needs a row here and a field of the same name in
# config.Config (a unit test keeps both in step); the README table is generated.
SETTING_ROWS: tuple[Setting, ...] = (
    _row("home", Path, DEFAULT_HOME, "home", "root of all state when nothing more specific is set",
         flags=("--home",), metavar="DIR"),
    _row("instances_path", Path, None, "instances_path",
         "instances path: `_base/`, `locks/`, one folder per instance",
         flags=("--instances-path",), derived="`<home>/instances`", metavar="DIR"),
    _row("max_virtual_size", int, DEFAULT_MAX_VIRTUAL_SIZE, "limits.max_virtual_size",
         "largest virtual size an image may declare (policy cap)",
         unit=BYTES, note="4 TiB", at_least=1),
    _row("max_image_size", int, DEFAULT_MAX_IMAGE_SIZE, "limits.max_image_size",
         "largest upload the image service accepts (413 above)",
         unit=BYTES, note="1 TiB", at_least=1),
    _row("image_url", str, None, "images.url",
         "image service endpoint used by the client and the cache",
         flags=("--image-url",), derived="`http://<images_host>:<images_port>`", metavar="URL"),
    _row("image_token", str, None, "images.token",
         "token sent as `X-Auth-Token` (else read from the token file)",
         derived="(none: read from the token file)"),
    _row("image_token_file", Path, None, "images.token_file",
         "file holding the `X-Auth-Token`, shared by `serve images` (which creates it 0600 "
         "when missing) and the client",
         flags=("--token-file",), derived="`<images_data_dir>/token`", metavar="FILE"),
    _row("images_data_dir", Path, None, "images.data_dir",
         "image service data (store, staging files, catalog, token)",
         flags=("--data-dir",), derived="`<home>/images`", metavar="DIR"),
    _row("images_database", str, None, "images.database",
         "catalog database URL (SQLite, or `postgresql+psycopg://user:pw@host/db`)",
         flags=("--database",), derived="`sqlite:///<images_data_dir>/catalog.sqlite`",
         metavar="URL"),
    _row("images_host", str, DEFAULT_IMAGE_HOST, "images.host",
         "address `serve images` binds to (the default is loopback only)",
         flags=("--host",), metavar="ADDR"),
    _row("images_port", int, DEFAULT_IMAGE_PORT, "images.port",
         "TCP port `serve images` listens on", flags=("--port",), metavar="PORT",
         at_least=1, at_most=65535),
    _row("images_direct_io", bool, True, "images.direct_io",
         "write uploads with `O_DIRECT`, past the page cache, where the filesystem allows it "
         "(see docs/image-service.md)"),
    _row("images_cache_min_uses", int, DEFAULT_CACHE_MIN_USES, "images.cache_min_uses",
         "the image service keeps an image in the page cache from its N-th download on; "
         "earlier downloads read it from disk and drop what they read "
         "(`1`: always keep, `0`: never)", unit="downloads", at_least=0),
    _row("images_property_quota", int, DEFAULT_PROPERTY_QUOTA, "images.property_quota",
         "most free-form properties one image may hold (413 above; Glance's "
         "`image_property_quota`)", unit="properties", at_least=0),
    _row("images_max_uploads", int, DEFAULT_MAX_UPLOADS, "images.max_uploads",
         "uploads in flight on the image service; one more is answered 503 with `Retry-After`",
         unit="uploads", at_least=1),
    _row("images_max_uploads_per_token", int, DEFAULT_MAX_UPLOADS_PER_TOKEN,
         "images.max_uploads_per_token",
         "uploads in flight per `X-Auth-Token` (503 with `Retry-After` above)",
         unit="uploads", at_least=1),
    _row("images_max_header_bytes", int, DEFAULT_MAX_HEADER_BYTES, "images.max_header_bytes",
         "largest request line plus headers the image service reads; above it the answer is "
         "431 and the connection closes", unit=BYTES, note="64 KiB", at_least=1024),
    _row("images_header_timeout", float, DEFAULT_HEADER_TIMEOUT, "images.header_timeout",
         "time a client has to send a request's headers (from the connection's start or the "
         "request's first byte); then the connection is closed", unit=SECONDS, above=0),
    _row("images_orphan_grace", float, DEFAULT_ORPHAN_GRACE, "images.orphan_grace",
         "at start, `serve images` removes store files that no active image explains once "
         "they are this old (a kill between the catalog delete and the file delete)",
         unit=SECONDS, note="1 h", at_least=0),
    _row("images_allow_insecure_token_file", bool, False, "images.allow_insecure_token_file",
         "accept a token file that others may read or write (group/other permission bits, or "
         "another owner); refused otherwise (exit 2)"),
    _row("images_tokens_file", Path, None, "images.tokens_file",
         "the shared tokens file (`[[token]]` token/project/role): `serve images` accepts its "
         "tokens instead of the token file's, and image visibility follows each token's "
         "project (docs/image-service.md)",
         flags=("--tokens-file",), derived="(none: the single token file)", metavar="FILE"),
    _row("force_raw", bool, False, "cache.force_raw",
         "convert bases to raw after download (Nova's `force_raw_images`)"),
    _row("fetch_concurrency", int, DEFAULT_FETCH_CONCURRENCY, "cache.fetch_concurrency",
         "downloads of different images at once on a node", unit="downloads", at_least=1),
    _row("fetch_deadline", float, DEFAULT_FETCH_DEADLINE, "cache.fetch_deadline",
         "overall deadline of one fetch, retries included", unit=SECONDS, note="1 h", above=0),
    _row("fetch_retries", int, DEFAULT_FETCH_RETRIES, "cache.fetch_retries",
         "retries of a dropped download (resumed with Range)", unit="retries", at_least=0),
    _row("max_unused_age", float, DEFAULT_MAX_UNUSED_AGE, "cache.max_unused_age",
         "time since last use after which an unused base is removed "
         "(`cache clean --min-age` overrides)", unit=SECONDS, note="24 h", at_least=0),
    _row("part_max_age", float, DEFAULT_PART_MAX_AGE, "cache.part_max_age",
         "age after which a `.part` whose download nobody holds is removed",
         unit=SECONDS, note="1 h", at_least=0),
    _row("max_cache_bytes", int, 0, "cache.max_cache_bytes",
         "byte budget of `_base`; over it, unused bases go least recently used first",
         unit=BYTES, note="no budget", at_least=0),
    _row("min_free_percent", float, DEFAULT_MIN_FREE_PERCENT, "cache.min_free_percent",
         "keep this share of the filesystem free; below it, unused bases go LRU first",
         unit=PERCENT, at_least=0, below=100),
    _row("verify_interval", float, DEFAULT_VERIFY_INTERVAL, "cache.verify_interval",
         "`node run` re-hashes each base this often (`0`: never)",
         unit=SECONDS, note="7 d", at_least=0),
    _row("verify_rate", int, DEFAULT_VERIFY_RATE, "cache.verify_rate",
         "most bytes per second re-verification reads", unit=BYTES_PER_S, note="64 MiB/s",
         at_least=1),
    _row("node_interval", float, DEFAULT_NODE_INTERVAL, "node.interval",
         "time between two passes of `node run`", flags=("--interval",), unit=SECONDS,
         note="10 min", metavar="SECONDS", above=0),
    _row("node_api_url", str, None, "node.api_url",
         "`serve node`: the compute API it registers and heartbeats with",
         flags=("--api-url",), derived="(none: required)", metavar="URL"),
    _row("node_token_file", Path, None, "node.token_file",
         "`serve node`: file holding the node token (mode 0600); accepted from the controller, "
         "sent to the compute API and the image service",
         flags=("--token-file",), derived="(none: required)", metavar="FILE"),
    _row("node_host", str, DEFAULT_NODE_HOST, "node.host",
         "address the node agent's API binds to (the default is loopback only)",
         flags=("--host",), metavar="ADDR"),
    _row("node_port", int, DEFAULT_NODE_PORT, "node.port", "TCP port of the node agent's API",
         flags=("--port",), metavar="PORT", at_least=1, at_most=65535),
    _row("node_hostname", str, None, "node.hostname",
         "the node's name in the fleet (1-255 of `A-Z a-z 0-9 . _ -`)",
         flags=("--hostname",), derived="the host's name", metavar="NAME"),
    _row("node_vcpus", int, 0, "node.vcpus", "vCPUs the node offers (`0`: the host's CPUs)",
         flags=("--vcpus",), unit="vCPUs", metavar="N", at_least=0),
    _row("node_ram_mb", int, 0, "node.ram_mb", "memory the node offers (`0`: the host's)",
         flags=("--ram-mb",), unit="MiB", metavar="MIB", at_least=0),
    _row("node_disk_gb", int, 0, "node.disk_gb",
         "disk the node offers (`0`: the size of the instances path's filesystem)",
         flags=("--disk-gb",), unit="GiB", metavar="GIB", at_least=0),
    _row("node_build_workers", int, DEFAULT_NODE_BUILD_WORKERS, "node.build_workers",
         "builds the node agent runs at once (more wait in line as BUILDING)",
         flags=("--build-workers",), unit="builds", metavar="N", at_least=1, at_most=256),
    _row("snapshot_format", str, "qcow2", "node.snapshot_format",
         "disk format of the images `createImage` makes (qcow2: allocated data only)",
         choices=("qcow2", "raw")),
    _row("snapshot_compression", str, "none", "node.snapshot_compression",
         "compression of qcow2 snapshots (`zlib`: deflated clusters, spooled beside the disk "
         "first; qcow2 format only)", choices=("none", "zlib")),
    _row("snapshot_compress_workers", int, 0, "node.snapshot_compress_workers",
         "threads that deflate a snapshot's clusters (`0`: the CPUs the agent may use)",
         unit="threads", metavar="N", at_least=0, at_most=256),
    _row("node_peer_stall_timeout", float, 10.0, "node.peer_stall_timeout",
         "a peer that sends no byte for this long is given up (the next source resumes at "
         "the same offset); also how long a peer serving its own download waits for a byte "
         "to land", unit=SECONDS, above=0),
    _row("driver", str, "libvirt", "compute.driver", "hypervisor driver",
         flags=("--driver",), choices=DRIVERS),
    _row("libvirt_uri", str, DEFAULT_LIBVIRT_URI, "compute.libvirt_uri",
         "libvirt connection URI", flags=("--libvirt-uri",), metavar="URI"),
    _row("virt_type", str, "kvm", "compute.virt_type",
         "libvirt domain type (`qemu`: TCG, no KVM)", flags=("--virt-type",), choices=VIRT_TYPES),
    _row("ephemeral_fs", str, "ext4", "compute.ephemeral_fs", "filesystem of ephemeral disks",
         choices=EPHEMERAL_FILESYSTEMS),
    _row("api_host", str, DEFAULT_API_HOST, "api.host",
         "address `serve api` binds to (the default is loopback only)",
         flags=("--host",), metavar="ADDR"),
    _row("api_port", int, DEFAULT_API_PORT, "api.port",
         "TCP port `serve api` listens on (the compute endpoint is `http://HOST:PORT/v2.1`)",
         flags=("--port",), metavar="PORT", at_least=1, at_most=65535),
    _row("api_data_dir", Path, None, "api.data_dir",
         "the compute API's data folder (its SQLite database)",
         flags=("--data-dir",), derived="`<home>/api`", metavar="DIR"),
    _row("api_database", str, None, "api.database",
         "the compute API's database URL (SQLite, or `postgresql+psycopg://user:pw@host/db`; "
         "replicas share one PostgreSQL)",
         flags=("--database",), derived="`sqlite:///<api_data_dir>/compute.sqlite`",
         metavar="URL"),
    _row("api_tokens_file", Path, None, "api.tokens_file",
         "the shared tokens file (`[[token]]` with token, project, role) the compute API "
         "checks `X-Auth-Token` against; it needs one `node` token",
         flags=("--tokens-file",), derived="`<api_data_dir>/tokens.toml`", metavar="FILE"),
    _row("api_cpu_allocation_ratio", float, 4.0, "api.cpu_allocation_ratio",
         "a node offers its vCPUs times this to claims", unit="ratio", above=0),
    _row("api_ram_allocation_ratio", float, 1.0, "api.ram_allocation_ratio",
         "a node offers its RAM times this to claims", unit="ratio", above=0),
    _row("api_disk_allocation_ratio", float, 1.0, "api.disk_allocation_ratio",
         "a node offers its disk times this to claims", unit="ratio", above=0),
    _row("api_cache_weight", float, 2.0, "api.cache_weight",
         "scheduler weight of a node that already holds (or is fetching) the image "
         "(`0`: the cache weigher is off)", unit="weight", at_least=0),
    _row("api_ram_weight", float, 1.0, "api.ram_weight",
         "scheduler weight of free RAM, normalised to [0, 1] across the candidates",
         unit="weight", at_least=0),
    _row("api_placement", str, "spread", "api.placement",
         "`spread`: most free RAM first; `pack`: least free RAM first",
         choices=PLACEMENTS),
    _row("api_build_attempts", int, 3, "api.build_attempts",
         "hosts a build is tried on before the server ends in ERROR", unit="hosts",
         at_least=1, at_most=100),
    _row("api_build_timeout", float, 3600.0, "api.build_timeout",
         "time a node may take to build a server before it is tried elsewhere",
         unit=SECONDS, note="1 h", above=0),
    _row("api_node_timeout", float, 30.0, "api.node_timeout",
         "time for one request from the compute API to a node agent", unit=SECONDS, above=0),
    _row("api_node_down_after", float, 60.0, "api.node_down_after",
         "time without a heartbeat after which a node is down (its servers' `host_status` "
         "is UNKNOWN)", unit=SECONDS, above=0),
    _row("api_heartbeat_interval", float, 10.0, "api.heartbeat_interval",
         "time between heartbeats, told to each node agent; also the API's sweep interval",
         unit=SECONDS, above=0),
    _row("api_max_body", int, 1 << 20, "api.max_body",
         "largest request body the compute API reads (413 above)", unit=BYTES, note="1 MiB",
         at_least=1024),
    _row("api_build_workers", int, 32, "api.build_workers",
         "builds one compute API process dispatches to node agents at once", unit="builds",
         at_least=1, at_most=1024),
    _row("api_precache_concurrency", int, 0, "api.precache_concurrency",
         "nodes a pre-cache asks to fetch at once (`0`: every node at once, since peers "
         "carry the load; Nova's `precache_concurrency` is 1)", unit="nodes",
         at_least=0, at_most=100000),
    _row("metrics_public", bool, False, "metrics.public",
         "serve `/metrics` without a token on any address; otherwise it needs the service's "
         "token unless the service is bound to loopback (docs/metrics.md)"),
    _row("log_format", str, "text", "logging.format",
         "log lines as `text` or one JSON object per line, each with its request id",
         choices=LOG_FORMATS),
    _row("api_url", str, None, "client.api_url",
         "the compute API the CLI talks to (`http://HOST:PORT`, with or without `/v2.1`); when "
         "set, `server`, `flavor` and `hypervisor` commands go through it instead of this node",
         flags=("--api-url",), derived="(none: the commands work on this node)", metavar="URL"),
    _row("api_token", str, None, "client.api_token",
         "token the CLI sends to the compute API as `X-Auth-Token` (and to the image service "
         "for image names; one tokens file serves both)",
         derived="(none: read from the token file)"),
    _row("api_token_file", Path, None, "client.api_token_file",
         "file holding the CLI's compute API token (mode 0600)",
         flags=("--api-token-file",), derived="(none)", metavar="FILE"),
    _row("api_peer_fanout", int, 2, "api.peer_fanout",
         "nodes one holder of an image (a peer, or the origin) feeds at once when the API "
         "assigns sources (`0`: every node fetches from the image service)", unit="nodes",
         at_least=0, at_most=1000),
    _row("api_peer_stripes", int, 2, "api.peer_stripes",
         "stripes the API cuts an image into when it assigns peer sources: leaf `i` travels "
         "down stripe `i % k`'s own tree, so a node forwards only its home stripe "
         "(`1`: one tree, as `api_peer_fanout` says)", unit="stripes", at_least=1, at_most=8),
    _row("api_peer_stripe_fanout", int, 3, "api.peer_stripe_fanout",
         "nodes one feeder serves in each stripe's tree when `api_peer_stripes` is 2 or more; "
         "keep it above the stripes (equal makes chains, see docs/distribution.md)",
         unit="nodes", at_least=1, at_most=1000),
)  # fmt: skip
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTING_ROWS}


def default(name: str) -> Any:
    """The default of setting ``name`` (``None`` when derived from other settings)."""
    return BY_NAME[name].default


def flag_help(row: Setting, extra: str = "") -> str:
    """An option's ``--help``: what it is, its unit, choices, variable and default."""
    parts = [row.plain_help() + (f" {extra}" if extra else "")]
    facts = []
    if row.unit:
        facts.append(f"in {row.unit}")
    if row.choices:
        facts.append(f"one of {', '.join(row.choices)}")
    if row.env:
        facts.append(f"env {row.env}")
    facts.append("default " + row.default_text().replace("`", ""))
    parts.append(f"({'; '.join(facts)})")
    return " ".join(parts).replace("%", "%%")


MARKDOWN_HEADER = (
    "| setting | type | range | default | unit | TOML key | environment | flag | meaning |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
)


def markdown_table() -> str:
    """The README's settings table, one line per row of :data:`SETTING_ROWS`."""
    lines = list(MARKDOWN_HEADER)
    for s in SETTING_ROWS:
        cells = (
            f"`{s.name}`",
            _TYPE_NAMES[s.kind],
            s.range_text() or "-",
            s.default_text(),
            s.unit or "-",
            f"`{s.toml}`",
            f"`{s.env}`" if s.env else "-",
            ", ".join(f"`{f}`" for f in s.flags) or "-",
            s.help,
        )
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
