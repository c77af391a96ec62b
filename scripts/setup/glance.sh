#!/usr/bin/env bash
# Sourced by scripts/test.sh (never call exit here): install real OpenStack Glance 33 in its
# own venv so the integration tier can check cowfleet's image client against it, and export
# COWFLEET_TEST_GLANCE_VENV. Idempotent: a venv that already runs glance 33 is kept.
# The venv also gets pyuwsgi (glance-api is served as a WSGI app; uWSGI handles chunked
# uploads with http-chunked-input; the tests serve it both as --http11-socket and as plain
# --http-socket) and a copy of the stock glance-api-paste.ini at
# $VENV/etc/glance/glance-api-paste.ini for the test fixture.

_cf_glance_setup() {
  local venv="${COWFLEET_TEST_GLANCE_VENV:-/opt/cowfleet-test/glance-venv}"
  local version=33.0.0
  local py
  py="$(command -v python3.11 || command -v python3)"
  if [[ -x "${venv}/bin/python" ]] \
      && "${venv}/bin/python" -c "import importlib.metadata as m, sys; \
sys.exit(m.version('glance') != '${version}')" 2>/dev/null \
      && [[ -x "${venv}/bin/uwsgi" ]] \
      && [[ -f "${venv}/etc/glance/glance-api-paste.ini" ]]; then
    echo "glance.sh: glance ${version} already installed in ${venv}" >&2
  else
    echo "glance.sh: installing glance ${version} into ${venv}" >&2
    mkdir -p "$(dirname "${venv}")"
    "${py}" -m venv "${venv}"
    "${venv}/bin/python" -m pip install --quiet --upgrade pip
    "${venv}/bin/python" -m pip install --quiet "glance==${version}" pyuwsgi
    # pip puts data files under the venv's etc/glance; fall back to the package's own copy.
    if [[ ! -f "${venv}/etc/glance/glance-api-paste.ini" ]]; then
      local found
      found="$(find "${venv}" -name glance-api-paste.ini -print -quit)"
      if [[ -z "${found}" ]]; then
        echo "glance.sh: glance-api-paste.ini not found in ${venv}" >&2
        return 1
      fi
      mkdir -p "${venv}/etc/glance"
      cp "${found}" "${venv}/etc/glance/glance-api-paste.ini"
    fi
  fi
  export COWFLEET_TEST_GLANCE_VENV="${venv}"
}
_cf_glance_setup
