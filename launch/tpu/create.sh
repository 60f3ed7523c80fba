#!/usr/bin/env bash
# Create a Cloud TPU VM slice now (fails if the zone has no capacity; see create_queued.sh):
#
#   launch/tpu/create.sh            # on-demand
#   launch/tpu/create.sh --spot     # preemptible: cheaper, may be taken back (SIGTERM, then gone)
#
# Extra arguments go to `gcloud compute tpus tpu-vm create`.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "$0")/env.sh"

gcloud compute tpus tpu-vm create "$TPU_NAME" \
  --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "$@"
