# Helpers for .ci/run (sourced).

CACHE_DIR="${OUTBOX_CI_CACHE:-$HOME/.cache/outbox-ci}"
mkdir -p "$CACHE_DIR"
# Builds are kept between runs on the same machine; a fresh machine just builds from scratch.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE_DIR/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

ci_step() { printf '\n==> %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }

# Starts the machine's PostgreSQL cluster if it is not accepting connections.
ensure_postgres() {
  if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    echo "PostgreSQL is down; starting it"
    local version
    version="$(ls /etc/postgresql | sort -V | tail -n 1)"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
  fi
  for _ in $(seq 1 60); do
    pg_isready -h 127.0.0.1 -p 5432 -q && return 0
    sleep 1
  done
  echo "PostgreSQL did not become ready on 127.0.0.1:5432" >&2
  return 1
}

# Drops and re-creates database $1; prints its URL.
fresh_database() {
  local db="$1"
  psql -h 127.0.0.1 -U postgres -d postgres -v ON_ERROR_STOP=1 -q \
    -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
  echo "postgres://postgres@127.0.0.1:5432/$db"
}
