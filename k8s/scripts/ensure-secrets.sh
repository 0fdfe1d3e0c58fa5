#!/usr/bin/env bash
# Creates the project's Secrets with random values, once. Run by `make deploy`.
#
#   dlu-s3-credentials  keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
#                       in namespace dlu (MinIO root user, MLflow, bucket Job) and in namespace
#                       kubeflow (KFP launcher via kfp-launcher providers, pipeline steps),
#                       with the SAME values in both
#   mlflow-postgres     key POSTGRES_PASSWORD, in namespace dlu
#   optuna-postgres     key OPTUNA_DB_PASSWORD, in namespace dlu (PostgreSQL creates the role
#                       "optuna" with it) and in namespace kubeflow (tuning-pipeline steps log
#                       in with it), with the SAME value in both
#
# Idempotent: an existing Secret is never regenerated, so a redeploy does not rotate the
# credentials under a running MinIO/PostgreSQL. The copy in kubeflow is (re)synchronised from
# dlu, which is the source of truth. Values go through stdin only: never argv, never stdout.
#
# usage: ensure-secrets.sh        (env KUBECTL, default kubectl; needs openssl and base64)
set -euo pipefail

kubectl="${KUBECTL:-kubectl}"
app_ns="${DLU_NAMESPACE:-dlu}"
kfp_ns="${KFP_NAMESPACE:-kubeflow}"
s3_secret="dlu-s3-credentials"
pg_secret="mlflow-postgres"
optuna_secret="optuna-postgres"

for tool in openssl base64; do
  command -v "$tool" >/dev/null 2>&1 || { echo "ensure-secrets: '$tool' not found on PATH" >&2; exit 1; }
done

exists() {  # namespace name
  "$kubectl" -n "$1" get secret "$2" >/dev/null 2>&1
}

key_b64() {  # namespace name key -> base64 value
  "$kubectl" -n "$1" get secret "$2" -o "jsonpath={.data.$3}"
}

create_from_env() {  # namespace name ; env lines on stdin
  "$kubectl" -n "$1" create secret generic "$2" --from-env-file=/dev/stdin \
    --dry-run=client -o yaml \
    | "$kubectl" label --local -f - -o yaml app.kubernetes.io/part-of=dl-uncertainty \
    | "$kubectl" apply -f - >/dev/null
  echo "ensure-secrets: created secret $1/$2"
}

apply_b64() {  # namespace name key1 b64value1 [key2 b64value2 ...]
  local ns="$1" name="$2"
  shift 2
  {
    cat <<YAML
apiVersion: v1
kind: Secret
type: Opaque
metadata:
  name: $name
  namespace: $ns
  labels:
    app.kubernetes.io/part-of: dl-uncertainty
data:
YAML
    while [ "$#" -gt 0 ]; do
      printf '  %s: %s\n' "$1" "$2"
      shift 2
    done
  } | "$kubectl" apply -f - >/dev/null
}

for ns in "$app_ns" "$kfp_ns"; do
  "$kubectl" get namespace "$ns" >/dev/null 2>&1 \
    || { echo "ensure-secrets: namespace $ns does not exist yet (deploy creates it first)" >&2; exit 1; }
done

# S3 credentials: keep what exists (dlu first, else a copy left in kubeflow), else generate.
if ! exists "$app_ns" "$s3_secret"; then
  if exists "$kfp_ns" "$s3_secret"; then
    apply_b64 "$app_ns" "$s3_secret" \
      AWS_ACCESS_KEY_ID "$(key_b64 "$kfp_ns" "$s3_secret" AWS_ACCESS_KEY_ID)" \
      AWS_SECRET_ACCESS_KEY "$(key_b64 "$kfp_ns" "$s3_secret" AWS_SECRET_ACCESS_KEY)"
    echo "ensure-secrets: copied secret $kfp_ns/$s3_secret to $app_ns"
  else
    printf 'AWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' \
      "$(openssl rand -hex 10)" "$(openssl rand -hex 20)" \
      | create_from_env "$app_ns" "$s3_secret"
  fi
fi

access_b64="$(key_b64 "$app_ns" "$s3_secret" AWS_ACCESS_KEY_ID)"
secret_b64="$(key_b64 "$app_ns" "$s3_secret" AWS_SECRET_ACCESS_KEY)"
if [ -z "$access_b64" ] || [ -z "$secret_b64" ]; then
  echo "ensure-secrets: $app_ns/$s3_secret lacks AWS_ACCESS_KEY_ID or AWS_SECRET_ACCESS_KEY" >&2
  exit 1
fi
if ! exists "$kfp_ns" "$s3_secret" \
   || [ "$(key_b64 "$kfp_ns" "$s3_secret" AWS_ACCESS_KEY_ID)" != "$access_b64" ] \
   || [ "$(key_b64 "$kfp_ns" "$s3_secret" AWS_SECRET_ACCESS_KEY)" != "$secret_b64" ]; then
  apply_b64 "$kfp_ns" "$s3_secret" \
    AWS_ACCESS_KEY_ID "$access_b64" AWS_SECRET_ACCESS_KEY "$secret_b64"
  echo "ensure-secrets: synchronised secret $kfp_ns/$s3_secret from $app_ns"
fi

# PostgreSQL password for MLflow's backend store.
if ! exists "$app_ns" "$pg_secret"; then
  printf 'POSTGRES_PASSWORD=%s\n' "$(openssl rand -hex 24)" \
    | create_from_env "$app_ns" "$pg_secret"
fi

# Optuna's database password: dlu is the source of truth, kubeflow gets a copy.
if ! exists "$app_ns" "$optuna_secret"; then
  if exists "$kfp_ns" "$optuna_secret"; then
    apply_b64 "$app_ns" "$optuna_secret" OPTUNA_DB_PASSWORD "$(key_b64 "$kfp_ns" "$optuna_secret" OPTUNA_DB_PASSWORD)"
    echo "ensure-secrets: copied secret $kfp_ns/$optuna_secret to $app_ns"
  else
    printf 'OPTUNA_DB_PASSWORD=%s\n' "$(openssl rand -hex 24)" | create_from_env "$app_ns" "$optuna_secret"
  fi
fi
optuna_b64="$(key_b64 "$app_ns" "$optuna_secret" OPTUNA_DB_PASSWORD)"
if [ -z "$optuna_b64" ]; then
  echo "ensure-secrets: $app_ns/$optuna_secret lacks OPTUNA_DB_PASSWORD" >&2
  exit 1
fi
if ! exists "$kfp_ns" "$optuna_secret" \
   || [ "$(key_b64 "$kfp_ns" "$optuna_secret" OPTUNA_DB_PASSWORD)" != "$optuna_b64" ]; then
  apply_b64 "$kfp_ns" "$optuna_secret" OPTUNA_DB_PASSWORD "$optuna_b64"
  echo "ensure-secrets: synchronised secret $kfp_ns/$optuna_secret from $app_ns"
fi

echo "ensure-secrets: secrets present ($app_ns/$s3_secret, $kfp_ns/$s3_secret, $app_ns/$pg_secret," \
  "$app_ns/$optuna_secret, $kfp_ns/$optuna_secret)"
