#!/usr/bin/env bash
# Install what cowfleet needs and run the demo on embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup/system.sh
bash scripts/setup/python.sh
cowfleet --version
