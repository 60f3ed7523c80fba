# shellcheck shell=bash
# Settings shared by the Cloud TPU scripts; set any of them in the environment to override.
# gcloud's default project applies (gcloud config set project PROJECT).
TPU_NAME="${TPU_NAME:-jaxgen}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"  # v4-32: 4 hosts x 4 chips, one jaxgen process per host
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-${TPU_NAME}-qr}"
export TPU_NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION QUEUED_RESOURCE
