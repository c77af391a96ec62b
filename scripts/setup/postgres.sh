#!/usr/bin/env bash
# Sourced by scripts/test.sh (never `exit` here): start Debian's PostgreSQL 15 cluster
# without systemd, create the role and database the catalog tests use, and export
# COWFLEET_TEST_POSTGRES_URL. Idempotent. Uses Debian's tools (/usr/lib/postgresql/15/bin
# via pg_ctlcluster), never a pg_ctl found first on PATH.

_cf_pg_setup() {
  local ver=15 cluster=main
  local bindir="/usr/lib/postgresql/${ver}/bin"
  local user=cowfleet db=cowfleet_test password=cowfleet-test-pw port=5432
  if [[ ! -x "${bindir}/postgres" ]]; then
    echo "postgres.sh: PostgreSQL ${ver} is not installed (scripts/setup/system.sh --full)" >&2
    return 0
  fi
  if [[ ! -d "/etc/postgresql/${ver}/${cluster}" ]]; then
    pg_createcluster "${ver}" "${cluster}" >/dev/null
  fi
  if ! pg_lsclusters -h | awk -v v="${ver}" -v c="${cluster}" '$1==v && $2==c {print $4}' \
      | grep -q online; then
    pg_ctlcluster "${ver}" "${cluster}" start
  fi
  port="$(pg_lsclusters -h | awk -v v="${ver}" -v c="${cluster}" '$1==v && $2==c {print $3}')"
  local i
  for i in $(seq 1 50); do
    "${bindir}/pg_isready" -q -h 127.0.0.1 -p "${port}" && break
    sleep 0.2
  done
  local psql=(runuser -u postgres -- psql -X -q -v ON_ERROR_STOP=1 -p "${port}" -d postgres)
  if [[ "$("${psql[@]}" -tAc "SELECT 1 FROM pg_roles WHERE rolname='${user}'")" != 1 ]]; then
    "${psql[@]}" -c "CREATE ROLE ${user} LOGIN PASSWORD '${password}'"
  else
    "${psql[@]}" -c "ALTER ROLE ${user} LOGIN PASSWORD '${password}'"
  fi
  if [[ "$("${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname='${db}'")" != 1 ]]; then
    "${psql[@]}" -c "CREATE DATABASE ${db} OWNER ${user}"
  fi
  export COWFLEET_TEST_POSTGRES_URL="postgresql+psycopg://${user}:${password}@127.0.0.1:${port}/${db}"
  echo "postgres.sh: PostgreSQL ${ver} on 127.0.0.1:${port}, database ${db}" >&2
}
_cf_pg_setup
unset -f _cf_pg_setup
