#!/usr/bin/env bash
# Delete the slice (and its queued resource, if it came from create_queued.sh):
#
#   launch/tpu/delete.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "$0")/env.sh"

if gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" --zone="$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" --zone="$ZONE" --force --quiet
else
  gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
fi
