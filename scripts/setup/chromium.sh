#!/usr/bin/env bash
# Headless Chromium for the fleet status page's e2e test (tests/e2e/test_status_page.py):
# Debian's `chromium` package, installed when missing. Idempotent. Sourced by
# scripts/test.sh (exports COWFLEET_TEST_CHROMIUM) or run on its own.
_cf_chromium_setup() {
  local bin=/usr/bin/chromium
  if [[ ! -x "${bin}" ]]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
  fi
  if [[ -x "${bin}" ]]; then
    export COWFLEET_TEST_CHROMIUM="${bin}"
    echo "chromium.sh: $("${bin}" --version 2>/dev/null || echo chromium)" >&2
  else
    echo "chromium.sh: chromium could not be installed" >&2
  fi
}
_cf_chromium_setup
