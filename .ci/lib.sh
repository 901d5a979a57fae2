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

# MariaDB (the MySQL store's tests): started if it is down, as PostgreSQL is.
ensure_mariadb() {
  if ! mysqladmin -h 127.0.0.1 -u root status >/dev/null 2>&1; then
    echo "MariaDB is down; starting it"
    if [ -x /etc/init.d/mariadb ]; then
      /etc/init.d/mariadb start
    else
      (mysqld_safe >/dev/null 2>&1 &)
    fi
  fi
  for _ in $(seq 1 60); do
    mysqladmin -h 127.0.0.1 -u root status >/dev/null 2>&1 && return 0
    sleep 1
  done
  echo "MariaDB did not become ready on 127.0.0.1:3306" >&2
  return 1
}

# RabbitMQ (the conformance cases that do not stop the broker use the machine's; the others
# start private nodes from the same installation): started if it is down.
ensure_rabbitmq() {
  if ! (echo > /dev/tcp/127.0.0.1/5672) 2>/dev/null; then
    echo "RabbitMQ is down; starting it"
    if [ -x /etc/init.d/rabbitmq-server ]; then
      /etc/init.d/rabbitmq-server start
    else
      (rabbitmq-server >/dev/null 2>&1 &)
    fi
  fi
  for _ in $(seq 1 60); do
    (echo > /dev/tcp/127.0.0.1/5672) 2>/dev/null && return 0
    sleep 1
  done
  echo "RabbitMQ did not become ready on 127.0.0.1:5672" >&2
  return 1
}

# Drops the MySQL databases earlier test runs left behind (a test drops its own; one that
# was killed cannot).
drop_stale_mysql_databases() {
  mysql -h 127.0.0.1 -u root -N -e "SELECT schema_name FROM information_schema.schemata
      WHERE schema_name LIKE 'outbox\\_t\\_%' OR schema_name LIKE 'bench\\_%'
         OR schema_name REGEXP '^t[0-9a-f]{8}_'" |
    while read -r db; do mysql -h 127.0.0.1 -u root -e "DROP DATABASE \`$db\`"; done
}

# Drops and re-creates database $1; prints its URL.
fresh_database() {
  local db="$1"
  psql -h 127.0.0.1 -U postgres -d postgres -v ON_ERROR_STOP=1 -q \
    -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db" >/dev/null
  echo "postgres://postgres@127.0.0.1:5432/$db"
}

NISSHI_VERSION=0.8.1
NISSHI_BIN="$CACHE_DIR/nisshi-$NISSHI_VERSION/bin/nisshi"

# Builds the Kafka-protocol broker (nisshi, from crates.io) once per machine; it needs a
# newer rustc than the project, hence the nightly toolchain. ~20 minutes cold on 2 cores.
ensure_broker_binary() {
  if [ -x "$NISSHI_BIN" ]; then return 0; fi
  echo "building nisshi $NISSHI_VERSION (first run on this machine; cached afterwards)"
  if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "the nightly toolchain is missing; nisshi needs rustc >= 1.96" >&2
    return 1
  fi
  env -u CARGO_TARGET_DIR cargo +nightly install --locked "nisshi@$NISSHI_VERSION" \
    --no-default-features --features dynostore --root "$CACHE_DIR/nisshi-$NISSHI_VERSION"
}

# Starts a broker on 127.0.0.1:$1 unless one answers there; stops it when the script exits.
start_broker() {
  local port="$1"
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "a broker already listens on 127.0.0.1:$port"
    return 0
  fi
  "$NISSHI_BIN" broker \
    --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://nisshi/ --group-initial-rebalance-delay 0s \
    >"$CACHE_DIR/broker.log" 2>&1 &
  BROKER_PID=$!
  trap 'kill -CONT "$BROKER_PID" 2>/dev/null; kill "$BROKER_PID" 2>/dev/null' EXIT
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "broker up on 127.0.0.1:$port (pid $BROKER_PID)"
      return 0
    fi
    sleep 0.1
  done
  echo "the broker did not start; see $CACHE_DIR/broker.log" >&2
  return 1
}

# Debian's Chromium for the dashboard's browser test (headless, loopback only).
ensure_chromium() {
  if command -v chromium >/dev/null; then return 0; fi
  echo "installing Debian's chromium for the browser test"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null
}
