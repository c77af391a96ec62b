#!/usr/bin/env bash
# The README's first command, on a fresh Debian 12 as root:   sudo bash scripts/demo.sh
#
# Installs what cowfleet and its demo need (idempotent: a second run installs nothing):
#   Debian packages   qemu-utils, qemu-system-x86, libvirt, busybox-static, cpio, e2fsprogs ...
#                     (scripts/setup/system.sh --full)
#   Python            cowfleet itself with the libvirt binding (scripts/setup/python.sh libvirt)
#   daemons           virtlogd + libvirtd started by hand, no systemd needed
#                     (scripts/setup/libvirt.sh)
# then runs `cowfleet demo` (see docs/demo.md): an image service on loopback, a test guest
# built from Debian packages, two compute nodes with three real (TCG) guests each, and a
# narrated transcript. Arguments are passed on: `sudo bash scripts/demo.sh --keep`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "$(id -u)" != 0 ]]; then
  echo "demo.sh: run as root (sudo bash scripts/demo.sh): it installs packages and starts libvirtd" >&2
  exit 2
fi
say() { printf '== %s (at %ss)\n' "$*" "$SECONDS"; }
say "system packages (apt)"
bash scripts/setup/system.sh --full
# pip takes ~10 s even when nothing changed: skip it when this checkout is what python3
# imports (editable install) and pyproject.toml is the one installed last time.
stamp=/var/cache/cowfleet/demo-pip.stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $(pwd)"
if [[ "$(cat "$stamp" 2>/dev/null)" == "$want" ]] && python3 -c '
import sys, pathlib, cowfleet, libvirt
sys.exit(0 if pathlib.Path(cowfleet.__file__).resolve().is_relative_to(pathlib.Path("src").resolve()) else 1)
' 2>/dev/null; then
  say "python packages: already installed"
else
  say "python packages (pip install -e .[libvirt])"
  bash scripts/setup/python.sh libvirt
  mkdir -p "$(dirname "$stamp")"
  echo "$want" >"$stamp"
fi
say "libvirt daemons"
# shellcheck source=setup/libvirt.sh
source scripts/setup/libvirt.sh
if [[ -z "${COWFLEET_TEST_LIBVIRT_URI:-}" ]]; then
  echo "demo.sh: libvirt is not answering; the demo will use the 'none' driver (disks only)" >&2
fi
say "cowfleet demo"
exec python3 -m cowfleet demo "$@"
