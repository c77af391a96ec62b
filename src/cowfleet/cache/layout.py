"""Where the node cache keeps things under ``instances_path``.

Nova-compatible layout::

    <instances_path>/_base/<sha1(image_id)>           a verified base (never rewritten)
    <instances_path>/_base/<sha1(image_id)>.part      a download in progress (never a base)
    <instances_path>/_base/.cowfleet/<sha1>.json      per-base metadata (ours)
    <instances_path>/_base/.cowfleet/<sha1>.part.json resume record of the .part
    <instances_path>/_base/.cowfleet/quarantine/      bases that failed verification
    <instances_path>/locks/cowfleet-<name>            fcntl lock files

Metadata lives in a hidden sub-directory rather than beside the base: Nova's
image cache manager classifies every *file* in ``_base`` by its name (40 hex
digits = an original base, ``<sha1>_<x>`` = a resized base that it deletes
after an hour, ``swap_*``/``ephemeral_*``), and old Nova releases deleted
``<sha1>.info`` files; a directory whose name is none of those is ignored by
it, so a real Nova node sharing ``_base`` never deletes or misreads our files.
Every file name is derived from a hash, never taken from a user string.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cowfleet.errors import UsageError

META_DIRNAME = ".cowfleet"
QUARANTINE_DIRNAME = "quarantine"  # under META_DIRNAME: bases that failed verification
PART_SUFFIX = ".part"
CONVERTED_SUFFIX = ".converted"
LOCK_PREFIX = "cowfleet-"
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
# The spellings Python's uuid.UUID accepts for a hex UUID (without importing uuid,
# which pulls in platform & co. at start-up): optional braces/urn prefix, optional hyphens.
_H = "[0-9a-fA-F]"
_UUID_RE = re.compile(
    rf"^(?:urn:uuid:)?\{{?({_H}{{8}})-?({_H}{{4}})-?({_H}{{4}})-?({_H}{{4}})-?({_H}{{12}})\}}?$"
)


def canonical_image_id(image_id: str) -> str:
    """The canonical (lower-case, hyphenated) form of a UUID image id.

    Raises :class:`UsageError` for anything that is not a UUID, so no user
    string ever reaches a file name.
    """
    m = _UUID_RE.match(image_id.strip()) if isinstance(image_id, str) else None
    if m is None:
        raise UsageError(f"image id must be a UUID, not {image_id!r}")
    return "-".join(m.groups()).lower()


def is_image_id(text: str) -> bool:
    try:
        canonical_image_id(text)
    except UsageError:
        return False
    return True


def base_name(image_id: str) -> str:
    """The base file name of an image: sha1 hex of its canonical UUID string (as Nova)."""
    return hashlib.sha1(canonical_image_id(image_id).encode()).hexdigest()


@dataclass(frozen=True)
class BasePaths:
    """Every path belonging to one base."""

    name: str
    base: Path
    part: Path
    converted: Path
    meta: Path
    part_meta: Path
    failed: Path  # the last failed fetch (so waiters need not repeat it)


@dataclass(frozen=True)
class Layout:
    """The cache directories of one instances path."""

    instances_path: Path

    @property
    def base_dir(self) -> Path:
        return self.instances_path / "_base"

    @property
    def meta_dir(self) -> Path:
        return self.base_dir / META_DIRNAME

    @property
    def quarantine_dir(self) -> Path:
        return self.meta_dir / QUARANTINE_DIRNAME

    @property
    def locks_dir(self) -> Path:
        return self.instances_path / "locks"

    def paths_for_name(self, name: str) -> BasePaths:
        if not SHA1_RE.match(name):
            raise UsageError(f"not a base name: {name!r}")
        return BasePaths(
            name=name,
            base=self.base_dir / name,
            part=self.base_dir / (name + PART_SUFFIX),
            converted=self.base_dir / (name + CONVERTED_SUFFIX),
            meta=self.meta_dir / (name + ".json"),
            part_meta=self.meta_dir / (name + PART_SUFFIX + ".json"),
            failed=self.meta_dir / (name + ".failed.json"),
        )

    def paths(self, image_id: str) -> BasePaths:
        return self.paths_for_name(base_name(image_id))

    def ensure_dirs(self) -> None:
        for d in (self.instances_path, self.base_dir, self.meta_dir, self.locks_dir):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)


def base_path(cfg_or_instances: object, image_id: str) -> Path:
    """``<instances_path>/_base/<sha1(image_id)>`` for a Config or an instances path."""
    inst = getattr(cfg_or_instances, "instances_path", cfg_or_instances)
    if not isinstance(inst, Path):
        inst = Path(str(inst))
    return Layout(inst).paths(image_id).base
