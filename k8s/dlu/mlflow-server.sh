#!/bin/sh
# The MLflow tracking server exactly as dl-uncertainty runs it: in the cluster (k8s/dlu/mlflow.yaml
# mounts this file from a ConfigMap) and on one machine (`make stack-up`). One file, so the two
# cannot drift: PostgreSQL backend store, artifacts proxied by the server (--serve-artifacts) into
# an S3 bucket, so clients need only MLFLOW_TRACKING_URI, one worker, no job runner.
#
# Environment (required): MLFLOW_BACKEND_STORE_URI  the PostgreSQL URI (postgresql://...)
#                         MLFLOW_ALLOWED_HOSTS      Host headers clients send, comma-separated
#                         MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
# Environment (optional): MLFLOW_ARTIFACTS_DESTINATION (s3://mlflow), MLFLOW_HOST (0.0.0.0),
#                         MLFLOW_PORT (5000), MLFLOW (the mlflow command, default: mlflow)
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI (postgresql://...)}"
: "${MLFLOW_ALLOWED_HOSTS:?set MLFLOW_ALLOWED_HOSTS}"
: "${MLFLOW_S3_ENDPOINT_URL:?set MLFLOW_S3_ENDPOINT_URL (the MinIO/S3 endpoint)}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec "${MLFLOW:-mlflow}" server \
  --host "${MLFLOW_HOST:-0.0.0.0}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers 1 \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --serve-artifacts \
  --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:-s3://mlflow}" \
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS"
