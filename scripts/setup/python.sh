#!/usr/bin/env bash
# Install cowfleet (editable) with the extras named in $1 (default: none).
set -euo pipefail
cd "$(dirname "$0")/../.."
extras="${1:-}"
python3 -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
