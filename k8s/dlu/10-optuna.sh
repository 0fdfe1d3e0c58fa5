#!/bin/sh
# Optuna's own role and database in MLflow's PostgreSQL, for the tuning-pipeline's shared study.
# Run by the postgres image on an empty data directory (k8s/dlu/postgres.yaml mounts this file from
# a ConfigMap into /docker-entrypoint-initdb.d) and by `make stack-up`: one script for both.
# Idempotent: `make deploy` runs it after every apply, so a volume initialised before it existed gets it:
#   kubectl -n dlu exec mlflow-postgres-0 -- sh /docker-entrypoint-initdb.d/10-optuna.sh
# Environment: POSTGRES_USER, POSTGRES_DB (a superuser and a database to connect to),
# OPTUNA_DB_PASSWORD; PGHOST/PGPORT where the server is not the local default.
# No `set -eu`: the image's entrypoint sources this file, and would keep those settings.
psql -v ON_ERROR_STOP=1 -v pw="$OPTUNA_DB_PASSWORD" --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
SELECT 'CREATE ROLE optuna LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'optuna')\gexec
ALTER ROLE optuna PASSWORD :'pw';
SELECT 'CREATE DATABASE optuna OWNER optuna' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'optuna')\gexec
SQL
