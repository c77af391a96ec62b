#!/usr/bin/env bash
# Install cowfleet (editable) with the extras named in $1 (default: none).
set -euo pipefail
cd "$(dirname "$0")/../.."
extras="${1:-}"
if ! python3 -m pip --version >/dev/null 2>&1; then
  # A stock Debian 12 python3 has no pip; this machine image's python3 (pyenv) does.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip python3-venv
fi
# Debian's own python3 marks itself externally managed (PEP 668); cowfleet installs into it
# on purpose (a node tool run as root), so say so. Ignored by interpreters without the mark.
export PIP_BREAK_SYSTEM_PACKAGES=1
python3 -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
