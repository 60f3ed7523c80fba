#!/usr/bin/env bash
# Install this checkout on every host of the slice, then start `jaxgen train` on all
# of them at once (one process per host):
#
#   launch/tpu/run.sh --config configs/my.yaml --run-dir /mnt/runs/my-run [KEY=VALUE ...]
#
# The arguments go to `jaxgen train`. --run-dir must be storage every host sees
# (e.g. a Filestore NFS mount): every host writes its part of each checkpoint.
# --cluster jax lets JAX find the slice's hosts through the TPU metadata server.
# Exit status 75 means the run saved a checkpoint on SIGTERM (maintenance or Spot
# preemption); run the same command again, on a new slice if needed, to resume.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$(dirname "$0")/env.sh"

repo="$(cd "$(dirname "$0")/../.." && pwd)"
archive="$(mktemp -d)/jaxgen.tar.gz"
git -C "$repo" archive --format=tar.gz --prefix=jaxgen/ -o "$archive" HEAD

gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME": --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="set -e; rm -rf jaxgen; tar -xzf jaxgen.tar.gz; python3 -m pip install -q 'jax[tpu]' ./jaxgen"

train_args="$(printf '%q ' "$@")"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd jaxgen && python3 -m jaxgen train --cluster jax ${train_args}"
