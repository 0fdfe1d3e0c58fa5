#!/usr/bin/env bash
# The cluster's service stack on one machine, with the same servers and flags that k8s/ deploys:
#   PostgreSQL  MLflow's backend store (Debian's postgresql; user and database "mlflow"), and
#               Optuna's database made by k8s/dlu/10-optuna.sh, the cluster's own init script
#   S3          moto's HTTP S3 server standing in for MinIO, buckets as the MinIO job makes them
#   MLflow      k8s/dlu/mlflow-server.sh, the launcher the cluster's Deployment runs
#
#   local-stack.sh up       start all three (idempotent), write <state>/env, print how to use it
#   local-stack.sh down     stop them and delete the state folder (runs, artifacts, database)
#   local-stack.sh status   say what is running (exits 0 either way: a query, not a check)
#
# Environment: STACK_DIR (default .stack), STACK_MLFLOW_PORT (5050), STACK_S3_PORT (9000),
# STACK_PG_PORT (55432), VENV (.venv: mlflow, moto_server, psycopg), PG_BIN (initdb's folder).
# A failed `up` stops whatever it started, so nothing half-started stays behind.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
state=$(realpath -m "${STACK_DIR:-$root/.stack}")
venv=${VENV:-$root/.venv}
mlflow_port=${STACK_MLFLOW_PORT:-5050}
s3_port=${STACK_S3_PORT:-9000}
pg_port=${STACK_PG_PORT:-55432}
buckets="mlpipeline mlflow datasets"  # as k8s/dlu/minio-buckets-job.yaml creates them in MinIO

say() { echo "stack: $*"; }
die() { echo "stack: error: $*" >&2; exit 1; }

pg_bin() {
  if [ -n "${PG_BIN:-}" ]; then echo "$PG_BIN"; return 0; fi
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$found" ] && { echo "$found"; return 0; }
  command -v initdb >/dev/null && { dirname "$(command -v initdb)"; return 0; }
  die "PostgreSQL not found; install it (apt-get install postgresql) or set PG_BIN"
}

# PostgreSQL refuses to run as root: use the "postgres" account then, with its data in a folder
# that account can reach (the state folder may sit under a private one, such as /tmp/pytest-of-root).
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pg_dir() {
  if [ -f "$state/pgdir" ]; then cat "$state/pgdir"; return 0; fi
  [ -d "$state" ] || { echo "$state/postgres"; return 0; }
  local dir=$state/postgres
  if [ "$(id -u)" = 0 ] && ! runuser -u postgres -- test -x "$state"; then
    dir=$(mktemp -d -t dlu-stack-pg-XXXXXX)
  fi
  echo "$dir" | tee "$state/pgdir"
}

random() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
alive() { [ -f "$state/$1.pid" ] && kill -0 "$(cat "$state/$1.pid")" 2>/dev/null; }
healthy() { curl -fs -o /dev/null --max-time 2 "$1"; }
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # name url seconds
  local i
  for ((i = 0; i < $3 * 2; i++)); do
    healthy "$2" && return 0
    alive "$1" || { tail -n 15 "$state/$1.log" >&2; die "$1 exited during start-up (log: $state/$1.log)"; }
    sleep 0.5
  done
  tail -n 15 "$state/$1.log" >&2
  die "$1 did not answer at $2 within $3 s (log: $state/$1.log)"
}

start_bg() {  # name command...: its own process group, so `down` stops its children too
  local name=$1; shift
  setsid "$@" >"$state/$name.log" 2>&1 < /dev/null &
  echo $! >"$state/$name.pid"
}

stop_bg() {
  alive "$1" || return 0
  local pid; pid=$(cat "$state/$1.pid")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL -- "-$pid" 2>/dev/null || true
}

up_postgres() {
  local bin pg; bin=$(pg_bin); pg=$(pg_dir)
  if [ ! -f "$pg/data/PG_VERSION" ]; then
    mkdir -p "$pg/data" "$pg/run"
    if [ "$(id -u)" = 0 ]; then chown -R postgres:postgres "$pg"; fi
    chmod 700 "$pg/data"
    as_pg "$bin/initdb" -D "$pg/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
      >"$state/postgres-init.log" 2>&1 || { tail -5 "$state/postgres-init.log" >&2; die "initdb failed"; }
  fi
  if ! as_pg "$bin/pg_ctl" -D "$pg/data" status >/dev/null 2>&1; then
    port_free "$pg_port" || die "port $pg_port is in use; set STACK_PG_PORT to a free one"
    as_pg "$bin/pg_ctl" -D "$pg/data" -l "$pg/run/postgres.log" -w -t 60 \
      -o "-p $pg_port -k $pg/run -c listen_addresses=127.0.0.1" start >/dev/null \
      || { tail -5 "$pg/run/postgres.log" >&2; die "PostgreSQL did not start (log: $pg/run/postgres.log)"; }
  fi
  local sql=("$bin/psql" -h "$pg/run" -p "$pg_port" -U postgres -v ON_ERROR_STOP=1 -qtA)
  if [ -z "$(as_pg "${sql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'mlflow'")" ]; then
    as_pg "${sql[@]}" -c "CREATE ROLE mlflow LOGIN PASSWORD '$PG_PASSWORD'" \
      -c "CREATE DATABASE mlflow OWNER mlflow" >/dev/null
  fi
  PATH="$bin:$PATH" PGHOST="$pg/run" PGPORT=$pg_port POSTGRES_USER=postgres POSTGRES_DB=postgres \
    OPTUNA_DB_PASSWORD=$OPTUNA_PASSWORD as_pg sh "$root/k8s/dlu/10-optuna.sh" >/dev/null \
    || die "creating Optuna's database failed (k8s/dlu/10-optuna.sh)"
}

up() {
  mkdir -p "$state"
  trap 'status=$?; if [ "$status" != 0 ]; then down >/dev/null 2>&1; fi; exit "$status"' EXIT
  [ -x "$venv/bin/mlflow" ] || die "no mlflow in $venv; run \`make install\` first"
  [ -x "$venv/bin/moto_server" ] || die "no moto_server in $venv; run \`make install\` (dev extras)"
  command -v curl >/dev/null || die "curl not found; install it"
  if [ -f "$state/secrets" ]; then . "$state/secrets"; else
    PG_PASSWORD=$(random) S3_SECRET=$(random) OPTUNA_PASSWORD=$(random)
    (umask 077; printf 'PG_PASSWORD=%s\nS3_SECRET=%s\nOPTUNA_PASSWORD=%s\n' \
      "$PG_PASSWORD" "$S3_SECRET" "$OPTUNA_PASSWORD" >"$state/secrets")
  fi
  up_postgres

  local s3=http://127.0.0.1:$s3_port
  if ! alive s3; then
    port_free "$s3_port" || die "port $s3_port is in use; set STACK_S3_PORT to a free one"
    start_bg s3 "$venv/bin/moto_server" -H 127.0.0.1 -p "$s3_port"
  fi
  wait_for s3 "$s3/" 30
  export AWS_ACCESS_KEY_ID=dlu AWS_SECRET_ACCESS_KEY=$S3_SECRET AWS_DEFAULT_REGION=us-east-1
  "$venv/bin/python" - "$s3" $buckets <<'PY' || die "could not create the S3 buckets"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
have = {b["Name"] for b in s3.list_buckets()["Buckets"]}
for name in sys.argv[2:]:
    if name not in have:
        s3.create_bucket(Bucket=name)
PY

  local mlflow=http://127.0.0.1:$mlflow_port
  if ! alive mlflow; then
    port_free "$mlflow_port" || die "port $mlflow_port is in use; set STACK_MLFLOW_PORT to a free one"
    MLFLOW="$venv/bin/mlflow" MLFLOW_HOST=127.0.0.1 MLFLOW_PORT=$mlflow_port \
    MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:$PG_PASSWORD@127.0.0.1:$pg_port/mlflow" \
    MLFLOW_ALLOWED_HOSTS="127.0.0.1:$mlflow_port,localhost:$mlflow_port,127.0.0.1,localhost" \
    MLFLOW_S3_ENDPOINT_URL=$s3 PATH="$venv/bin:$PATH" \
      start_bg mlflow sh "$root/k8s/dlu/mlflow-server.sh"
  fi
  wait_for mlflow "$mlflow/health" 120

  (umask 077; cat >"$state/env" <<ENV
export MLFLOW_TRACKING_URI=$mlflow
export MLFLOW_S3_ENDPOINT_URL=$s3
export AWS_ENDPOINT_URL=$s3
export AWS_ACCESS_KEY_ID=dlu
export AWS_SECRET_ACCESS_KEY=$S3_SECRET
export AWS_DEFAULT_REGION=us-east-1
export DLU_TUNE_STORAGE=postgresql+psycopg2://optuna:$OPTUNA_PASSWORD@127.0.0.1:$pg_port/optuna
export DLU_STACK_MLFLOW=$mlflow
ENV
  )
  say "up: MLflow $mlflow (PostgreSQL 127.0.0.1:$pg_port, artifacts in s3://mlflow), S3 $s3, Optuna studies in PostgreSQL"
  say "use it:  source $state/env   (make run, train, tune and evaluate use it while it is up)"
}

down() {
  stop_bg mlflow
  stop_bg s3
  local pg; pg=$(pg_dir)
  if [ -f "$pg/data/PG_VERSION" ]; then
    as_pg "$(pg_bin)/pg_ctl" -D "$pg/data" -m fast -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$pg" "$state"
  say "down: stopped, and $state deleted"
}

status() {  # a query, not a check: exits 0 whatever it finds
  local up=0
  for name in mlflow s3; do
    if alive "$name"; then say "$name running (pid $(cat "$state/$name.pid"))"; up=$((up + 1)); else say "$name not running"; fi
  done
  local pg; pg=$(pg_dir)
  if [ -f "$pg/data/PG_VERSION" ] && as_pg "$(pg_bin)/pg_ctl" -D "$pg/data" status >/dev/null 2>&1; then
    say "postgres running (port $pg_port)"; up=$((up + 1))
  else say "postgres not running"; fi
  case $up in
    3) say "up" ;;
    0) say "down (\`make stack-up\` starts it)" ;;
    *) say "partly up (\`make stack-up\` starts the rest; \`make stack-down\` stops it all)" ;;
  esac
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 {up|down|status}" >&2; exit 2 ;;
esac
