"""The demo's sample image set.

Preferred: the offline test guest of ``scripts/setup/guest.sh`` (Debian's
cloud kernel as an ``aki``, a busybox initramfs as an ``ari``, a small ext4 root
disk built with ``mkfs.ext4 -d``), built once into a cache directory and
reused. When that cannot be built (no apt, no busybox, script not shipped), a
generated ext4 disk image stands in; it cannot boot, and the demo says so.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from cowfleet import proc
from cowfleet.errors import CowfleetError

log = logging.getLogger(__name__)

GUEST_FILES = ("vmlinuz", "initramfs.img", "root.img")
GENERATED_SIZE = 16 << 20


@dataclass(frozen=True)
class GuestSet:
    """Files to upload. ``kernel``/``ramdisk`` are None for a generated image."""

    kind: str  # "debian" (bootable test guest) or "generated" (disk only)
    root: Path
    kernel: Path | None
    ramdisk: Path | None
    detail: str  # kernel release, or why the Debian guest was not built
    built_now: bool

    @property
    def bootable(self) -> bool:
        return self.kernel is not None and self.ramdisk is not None


def guest_script() -> Path | None:
    """``scripts/setup/guest.sh`` of the source tree this package runs from, if present."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "scripts" / "setup" / "guest.sh"
        if candidate.is_file():
            return candidate
    return None


def _complete(d: Path) -> bool:
    return all((d / f).is_file() and (d / f).stat().st_size > 0 for f in GUEST_FILES)


def _debian(d: Path, built_now: bool) -> GuestSet:
    kver = (d / "kernel-version").read_text().strip() if (d / "kernel-version").exists() else "?"
    return GuestSet(
        kind="debian",
        root=d / "root.img",
        kernel=d / "vmlinuz",
        ramdisk=d / "initramfs.img",
        detail=f"Debian linux-image-cloud-amd64 {kver}",
        built_now=built_now,
    )


def build_debian_guest(cache_dir: Path, script: Path | None) -> GuestSet | str:
    """Build (or reuse) the test guest in ``cache_dir``; the reason as text when impossible."""
    if script is None:
        return "scripts/setup/guest.sh is not part of this installation"
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    was_complete = _complete(cache_dir)
    try:
        done = proc.run(
            ["bash", "-c", 'set -euo pipefail; source "$1"', "guest.sh", str(script)],
            env={**_clean_env(), "COWFLEET_TEST_GUEST_DIR": str(cache_dir)},
            timeout=900,
        )
    except CowfleetError as exc:
        return f"guest.sh failed: {exc}"
    if not _complete(cache_dir):
        reason = done.stderr.strip().splitlines()
        return reason[-1] if reason else "guest.sh built nothing"
    return _debian(cache_dir, built_now=not was_complete)


def generated_disk(work: Path) -> GuestSet:
    """A 16 MiB ext4 disk image (``mkfs.ext4 -d``), or plain bytes without e2fsprogs."""
    work.mkdir(parents=True, exist_ok=True)
    tree = work / "rootfs" / "etc"
    tree.mkdir(parents=True, exist_ok=True)
    (tree / "motd").write_text("cowfleet demo root disk (generated)\n")
    root = work / "root.img"
    with root.open("wb") as fh:
        fh.truncate(GENERATED_SIZE)
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mkfs.ext4", path="/usr/sbin:/sbin")
    if mkfs is not None:
        proc.run(
            [mkfs, "-q", "-F", "-L", "cowfleet-root", "-d", str(work / "rootfs"), str(root)],
            timeout=120,
        )
        what = "ext4 filesystem made with mkfs.ext4 -d"
    else:
        with root.open("r+b") as fh:
            fh.write(b"cowfleet demo root disk (generated, no filesystem)\n")
        what = "raw bytes (mkfs.ext4 not installed)"
    return GuestSet("generated", root, None, None, what, built_now=True)


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("COWFLEET_")}
