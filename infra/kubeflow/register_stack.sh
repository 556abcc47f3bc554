#!/usr/bin/env bash
# Register a ZenML stack that runs sidrec on Kubeflow Pipelines. Documentation-grade: it needs a
# Kubernetes cluster with Kubeflow Pipelines, an object store, a container registry and an MLflow
# tracking server, none of which exist on the offline dev machine. Fill in the variables, then:
#     bash infra/kubeflow/register_stack.sh
#     .venv/bin/zenml stack set sidrec-kubeflow
#     .venv/bin/python run.py train --config configs/quickstart.yaml    # with infra/kubeflow/run_config.yaml, see docs/operations.md
set -euo pipefail

KUBE_CONTEXT="${KUBE_CONTEXT:-my-cluster}"                       # kubectl context of the cluster
KFP_HOST="${KFP_HOST:-https://kubeflow.example.com/pipeline}"     # Kubeflow Pipelines API
KFP_NAMESPACE="${KFP_NAMESPACE:-sidrec}"
ARTIFACT_URI="${ARTIFACT_URI:-s3://my-bucket/sidrec/zenml}"       # remote artifact store (s3:// gs:// az://)
REGISTRY_URI="${REGISTRY_URI:-registry.example.com/sidrec}"       # container registry the steps' image is pushed to
MLFLOW_URI="${MLFLOW_URI:-https://mlflow.example.com}"            # MLflow tracking server (with a DB backend + artifact store)
ZENML=${ZENML:-.venv/bin/zenml}

# kfp + kfp-kubernetes must be installed in the SAME pip command as zenml[local] (see
# /work/shared/notes/ENVIRONMENT.md): `zenml integration install kubeflow` breaks zenml's opentelemetry pin.
$ZENML integration install s3 mlflow --uv -y 2>/dev/null || true

# credentials live in ZenML secrets, never in this file
$ZENML secret create s3_secret --aws_access_key_id="${AWS_ACCESS_KEY_ID:?}" --aws_secret_access_key="${AWS_SECRET_ACCESS_KEY:?}" || true
$ZENML secret create mlflow_secret --username="${MLFLOW_TRACKING_USERNAME:?}" --password="${MLFLOW_TRACKING_PASSWORD:?}" || true

$ZENML orchestrator register kubeflow_orchestrator --flavor=kubeflow \
    --kubernetes_context="$KUBE_CONTEXT" --kubernetes_namespace="$KFP_NAMESPACE"
$ZENML artifact-store register remote_store --flavor=s3 --path="$ARTIFACT_URI" --authentication_secret=s3_secret
$ZENML container-registry register sidrec_registry --flavor=default --uri="$REGISTRY_URI"
$ZENML image-builder register local_docker --flavor=local
$ZENML experiment-tracker register mlflow_tracker --flavor=mlflow --tracking_uri="$MLFLOW_URI" \
    --tracking_username='{{mlflow_secret.username}}' --tracking_password='{{mlflow_secret.password}}'

$ZENML stack register sidrec-kubeflow \
    -o kubeflow_orchestrator -a remote_store -c sidrec_registry -i local_docker -e mlflow_tracker
echo "registered stack sidrec-kubeflow; KFP host: $KFP_HOST (set orchestrator.kubeflow.client_args.host in run_config.yaml)"
