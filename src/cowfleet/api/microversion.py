"""Compute API microversions: parsing the request headers (pure).

Clients send ``OpenStack-API-Version: compute 2.81`` and/or the legacy
``X-OpenStack-Nova-API-Version: 2.81``; ``latest`` means the newest we serve; no
header means the oldest (2.1). A value that is not ``X.Y`` is a 400, one outside
[:data:`MIN_VERSION`, :data:`MAX_VERSION`] a 406.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cowfleet.errors import UsageError

SERVICE = "compute"
HEADER = "OpenStack-API-Version"
LEGACY_HEADER = "X-OpenStack-Nova-API-Version"

_VERSION = re.compile(r"^([1-9][0-9]*)\.(0|[1-9][0-9]*)$")


@dataclass(frozen=True, order=True)
class Version:
    major: int
    minor: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"

    def at_least(self, text: str) -> bool:
        return self >= parse(text)


class MalformedVersion(UsageError):
    """The header's version is not ``X.Y`` or ``latest`` (HTTP 400)."""


class UnsupportedVersion(UsageError):
    """A well-formed version outside the range served (HTTP 406)."""


@functools.lru_cache(maxsize=128)  # views ask at_least("2.x") several times per server
def parse(text: str) -> Version:
    match = _VERSION.match(text.strip())
    if not match:
        raise MalformedVersion(
            f"API version string {text.strip()!r} is not of the form MajorNum.MinorNum"
        )
    return Version(int(match.group(1)), int(match.group(2)))


MIN_VERSION = Version(2, 1)
MAX_VERSION = Version(2, 81)


def _from_openstack_header(values: Iterable[str]) -> str | None:
    """The compute entry of ``OpenStack-API-Version`` values (``service version`` pairs)."""
    for value in values:
        for item in value.split(","):
            parts = item.strip().split()
            if len(parts) == 2 and parts[0].lower() == SERVICE:
                return parts[1]
            if len(parts) == 1 and parts[0].lower() == SERVICE:
                raise MalformedVersion(f"{HEADER} {item.strip()!r} names no version")
    return None


def requested(openstack: Iterable[str], legacy: Iterable[str]) -> Version:
    """The version a request asks for, from its header values (the new header wins)."""
    raw = _from_openstack_header(openstack)
    if raw is None:
        legacy_values = [v.strip() for v in legacy if v.strip()]
        raw = legacy_values[0] if legacy_values else None
    if raw is None:
        return MIN_VERSION
    if raw.lower() == "latest":
        return MAX_VERSION
    version = parse(raw)
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise UnsupportedVersion(
            f"Version {version} is not supported by the API. "
            f"Minimum is {MIN_VERSION} and maximum is {MAX_VERSION}."
        )
    return version


def response_headers(version: Version) -> list[tuple[bytes, bytes]]:
    """The headers a microversioned response carries."""
    return [
        (HEADER.lower().encode(), f"{SERVICE} {version}".encode()),
        (LEGACY_HEADER.lower().encode(), str(version).encode()),
        (b"vary", f"{HEADER}, {LEGACY_HEADER}".encode()),
    ]
