#!/usr/bin/env bash
# Ask for a TPU slice through a queued resource, which waits for capacity instead of
# failing, and block until it is ACTIVE:
#
#   launch/tpu/create_queued.sh            # on-demand
#   launch/tpu/create_queued.sh --spot     # preemptible
#
# Extra arguments go to `gcloud compute tpus queued-resources create`.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "$0")/env.sh"

gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" \
  --node-id="$TPU_NAME" --zone="$ZONE" \
  --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "$@"

while true; do
  state="$(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" --zone="$ZONE" --format='value(state.state)')"
  case "$state" in
    ACTIVE) echo "queued resource $QUEUED_RESOURCE is ACTIVE: TPU VM $TPU_NAME is ready"; exit 0 ;;
    FAILED|SUSPENDED) echo "queued resource $QUEUED_RESOURCE is $state" >&2; exit 1 ;;
    *) echo "queued resource $QUEUED_RESOURCE: $state; checking again in 60 s"; sleep 60 ;;
  esac
done
