#!/usr/bin/env bash
# Sourced by scripts/test.sh (never `exit` here): make sure Debian's Prometheus server is
# installed (the metrics integration test starts its own on loopback, with a generated
# configuration and a temporary storage folder; no system service is used) and export
# COWFLEET_TEST_PROMETHEUS, the path of its binary. Idempotent.

_cf_prometheus_setup() {
  if ! dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -q "install ok installed"; then
    echo "prometheus.sh: installing Debian's prometheus" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -qq --no-install-recommends prometheus; } \
      || { echo "prometheus.sh: cannot install prometheus" >&2; return 0; }
  fi
  local bin
  bin="$(command -v prometheus || true)"
  if [[ -z "${bin}" ]]; then
    echo "prometheus.sh: no prometheus binary after installing" >&2
    return 0
  fi
  export COWFLEET_TEST_PROMETHEUS="${bin}"
  echo "prometheus.sh: $("${bin}" --version 2>&1 | head -1)" >&2
}
_cf_prometheus_setup
unset -f _cf_prometheus_setup
