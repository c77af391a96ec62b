#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian 12 (as root), start the
# services, then run lint, type checks and the whole test suite (all tiers).
set -euo pipefail
cd "$(dirname "$0")/.."
export CI="${CI:-}"
phase() { echo "== $1 (at ${SECONDS}s)"; }
phase "system packages"
bash scripts/setup/system.sh --full
phase "python packages"
bash scripts/setup/python.sh test,libvirt,postgres
phase "services, Glance, test guest"
source scripts/setup/postgres.sh      # exports COWFLEET_TEST_POSTGRES_URL
source scripts/setup/libvirt.sh       # starts virtlogd + libvirtd
source scripts/setup/glance.sh        # installs real Glance in its own venv, exports COWFLEET_TEST_GLANCE_*
source scripts/setup/guest.sh         # builds the offline test guest, exports COWFLEET_TEST_GUEST_DIR
source scripts/setup/prometheus.sh    # Debian's Prometheus server, exports COWFLEET_TEST_PROMETHEUS
source scripts/setup/chromium.sh      # headless Chromium (status page e2e), exports COWFLEET_TEST_CHROMIUM
phase "ruff"; python3 -m ruff check src tests bench
phase "mypy"; python3 -m mypy
phase "pytest"; python3 -m pytest tests --durations=15 "$@"
phase "done"
