"""The qemu-img wrapper: info, check, convert and create through :func:`cowfleet.proc.run`.

Always an explicit ``-f`` (qemu never probes a format), argument lists (never a
shell), ``--output=json`` parsed into frozen dataclasses, and :data:`proc.UNTRUSTED`
limits plus a timeout whenever the input may be hostile. Failures raise
:class:`~cowfleet.errors.CommandError` carrying argv, exit code and stderr.

cowfleet does not need qemu-img for overlays or ``disk info`` (see
:mod:`cowfleet.formats.overlay` and :mod:`cowfleet.formats.info`); this module is for
conversion, checks, and as the baseline in tests and benchmarks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cowfleet import proc
from cowfleet.errors import CommandError, UsageError

log = logging.getLogger(__name__)

PROGRAM = "qemu-img"
INFO_TIMEOUT = 60.0
CHECK_TIMEOUT = 300.0
CONVERT_TIMEOUT = 3600.0
CREATE_TIMEOUT = 60.0
# Conversion of a large image legitimately uses minutes of CPU; keep the memory cap.
CONVERT_LIMITS = proc.Limits(cpu_seconds=None, address_space=proc.UNTRUSTED.address_space)

# qemu-img check exit codes (qemu-img.c): 0 clean, 1 check failed to run,
# 2 corruptions found, 3 only leaks found, 63 format does not support checks.
CHECK_CLEAN, CHECK_FAILED, CHECK_CORRUPT, CHECK_LEAKS, CHECK_UNSUPPORTED = 0, 1, 2, 3, 63

Runner = Callable[..., proc.Completed]


@dataclass(frozen=True)
class QemuImgInfo:
    """``qemu-img info --output=json`` for one image (keys renamed to snake_case)."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int | None
    cluster_size: int | None
    dirty_flag: bool | None
    backing_filename: str | None
    full_backing_filename: str | None
    backing_filename_format: str | None
    format_specific: Mapping[str, Any] | None
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)
    # With ``backing_chain=True``: the lower layers, top to bottom (this image excluded).
    chain: tuple[QemuImgInfo, ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> QemuImgInfo:
        try:
            return cls(
                filename=str(data["filename"]),
                format=str(data["format"]),
                virtual_size=int(data["virtual-size"]),
                actual_size=_opt_int(data.get("actual-size")),
                cluster_size=_opt_int(data.get("cluster-size")),
                dirty_flag=data.get("dirty-flag"),
                backing_filename=data.get("backing-filename"),
                full_backing_filename=data.get("full-backing-filename"),
                backing_filename_format=data.get("backing-filename-format"),
                format_specific=data.get("format-specific"),
                raw=dict(data),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CommandError(f"unexpected qemu-img info output: {exc!r}") from exc


@dataclass(frozen=True)
class CheckResult:
    """``qemu-img check --output=json``; corruptions and leaks are fields, not exceptions."""

    filename: str
    format: str
    returncode: int
    check_errors: int
    corruptions: int
    leaks: int
    corruptions_fixed: int
    leaks_fixed: int
    image_end_offset: int | None
    total_clusters: int | None
    allocated_clusters: int | None
    fragmented_clusters: int | None
    compressed_clusters: int | None
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def clean(self) -> bool:
        """No errors, no corruptions and no leaks."""
        return (
            self.returncode == CHECK_CLEAN
            and not self.check_errors
            and not self.corruptions
            and not self.leaks
        )

    @property
    def corrupt(self) -> bool:
        return self.returncode == CHECK_CORRUPT or self.corruptions > 0 or self.check_errors > 0

    @property
    def leaked(self) -> bool:
        return self.leaks > 0


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _parse_json(result: proc.Completed) -> Any:
    try:
        return json.loads(result.stdout)
    except ValueError as exc:
        raise CommandError(
            "qemu-img printed output that is not JSON",
            argv=result.argv,
            returncode=result.returncode,
            stderr=result.stderr,
        ) from exc


def info_argv(
    path: Path,
    fmt: str,
    *,
    backing_chain: bool = False,
    force_share: bool = True,
    program: str = PROGRAM,
) -> list[str]:
    _require_format(fmt)
    argv = [program, "info", "-f", fmt, "--output=json"]
    if backing_chain:
        argv.append("--backing-chain")
    if force_share:
        argv.append("--force-share")  # read images a running VM holds locked
    argv.append(str(path))
    return argv


def info(
    path: Path,
    fmt: str,
    *,
    backing_chain: bool = False,
    force_share: bool = True,
    timeout: float = INFO_TIMEOUT,
    program: str = PROGRAM,
    runner: Runner = proc.run,
) -> QemuImgInfo:
    """``qemu-img info -f FMT --output=json PATH`` under untrusted-input limits.

    With ``backing_chain`` the lower layers are in ``result.chain`` (top to bottom).
    """
    argv = info_argv(
        path, fmt, backing_chain=backing_chain, force_share=force_share, program=program
    )
    result = runner(argv, timeout=timeout, limits=proc.UNTRUSTED)
    data = _parse_json(result)
    if backing_chain:
        if not isinstance(data, list) or not data:
            raise CommandError("qemu-img info --backing-chain did not print a list", argv=argv)
        layers = [QemuImgInfo.from_json(d) for d in data]
        top = layers[0]
        return QemuImgInfo(
            **{k: getattr(top, k) for k in top.__dataclass_fields__ if k != "chain"},
            chain=tuple(layers[1:]),
        )
    if not isinstance(data, dict):
        raise CommandError("qemu-img info did not print a JSON object", argv=argv)
    return QemuImgInfo.from_json(data)


def info_chain(path: Path, fmt: str, **kwargs: Any) -> list[QemuImgInfo]:
    """Every layer of ``path``'s backing chain, top first."""
    top = info(path, fmt, backing_chain=True, **kwargs)
    return [top, *top.chain]


def check(
    path: Path,
    fmt: str,
    *,
    timeout: float = CHECK_TIMEOUT,
    program: str = PROGRAM,
    runner: Runner = proc.run,
) -> CheckResult:
    """``qemu-img check -f FMT --output=json PATH``.

    Exit 2 (corruptions) and 3 (leaks) come back as fields of the result; exit 1
    (could not check) and anything else raise :class:`CommandError`.
    """
    _require_format(fmt)
    argv = [program, "check", "-f", fmt, "--output=json", str(path)]
    result = runner(
        argv,
        timeout=timeout,
        limits=proc.UNTRUSTED,
        ok_codes=(CHECK_CLEAN, CHECK_CORRUPT, CHECK_LEAKS),
    )
    data = _parse_json(result)
    if not isinstance(data, dict):
        raise CommandError("qemu-img check did not print a JSON object", argv=argv)

    def n(key: str) -> int:
        return int(data.get(key, 0) or 0)

    return CheckResult(
        filename=str(data.get("filename", path)),
        format=str(data.get("format", fmt)),
        returncode=result.returncode,
        check_errors=n("check-errors"),
        corruptions=n("corruptions"),
        leaks=n("leaks"),
        corruptions_fixed=n("corruptions-fixed"),
        leaks_fixed=n("leaks-fixed"),
        image_end_offset=_opt_int(data.get("image-end-offset")),
        total_clusters=_opt_int(data.get("total-clusters")),
        allocated_clusters=_opt_int(data.get("allocated-clusters")),
        fragmented_clusters=_opt_int(data.get("fragmented-clusters")),
        compressed_clusters=_opt_int(data.get("compressed-clusters")),
        raw=dict(data),
    )


def convert(
    src: Path,
    src_fmt: str,
    dst: Path,
    dst_fmt: str = "raw",
    *,
    sparse: bool = True,
    cache: str | None = None,
    timeout: float = CONVERT_TIMEOUT,
    limits: proc.Limits = CONVERT_LIMITS,
    program: str = PROGRAM,
    runner: Runner = proc.run,
) -> proc.Completed:
    """``qemu-img convert -f SRC_FMT -O DST_FMT SRC DST``.

    qemu-img writes ``dst`` in place (creating or truncating it): the caller passes a
    temporary name and renames it after checking the result. ``sparse=False`` writes
    every zero (``-S 0``); ``cache`` is qemu's ``-t`` mode (e.g. "none").
    """
    _require_format(src_fmt)
    _require_format(dst_fmt)
    argv = [program, "convert", "-f", src_fmt, "-O", dst_fmt]
    if cache:
        argv += ["-t", cache]
    if not sparse:
        argv += ["-S", "0"]
    argv += [str(src), str(dst)]
    return runner(argv, timeout=timeout, limits=limits)


def _escape_option(value: str) -> str:
    return value.replace(",", ",,")  # qemu's option syntax doubles a literal comma


def create(
    path: Path,
    fmt: str,
    size: int | None,
    *,
    backing: Path | None = None,
    backing_fmt: str | None = None,
    options: Mapping[str, str] | None = None,
    timeout: float = CREATE_TIMEOUT,
    program: str = PROGRAM,
    runner: Runner = proc.run,
) -> proc.Completed:
    """``qemu-img create -f FMT [-b BACKING -F BACKING_FMT] [-o K=V,...] PATH [SIZE]``."""
    _require_format(fmt)
    argv: list[str] = [program, "create", "-q", "-f", fmt]
    if backing is not None:
        if not backing_fmt:
            raise UsageError("a backing file needs an explicit backing format")
        argv += ["-b", str(backing), "-F", backing_fmt]
    if options:
        argv += ["-o", ",".join(f"{k}={_escape_option(str(v))}" for k, v in options.items())]
    argv.append(str(path))
    if size is not None:
        argv.append(str(int(size)))
    return runner(argv, timeout=timeout)


def _require_format(fmt: str) -> None:
    if not fmt or not isinstance(fmt, str) or fmt.startswith("-") or "," in fmt:
        raise UsageError(f"invalid image format name {fmt!r}")


__all__: Sequence[str] = (
    "CheckResult",
    "QemuImgInfo",
    "check",
    "convert",
    "create",
    "info",
    "info_chain",
)
