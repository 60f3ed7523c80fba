#!/usr/bin/env bash
# N JAX processes on this machine over loopback, each with M simulated CPU devices:
# the multi-host program on one host, for debugging and tests.
#
#   launch/local.sh --processes 2 --devices-per-process 4 -- train --config configs/lm_tiny.yaml
#
# Output lines carry the process index ("[1] ..."); the exit status is the first
# failing process's (75 after a preemption save), and a failure stops the others.
set -euo pipefail
exec "${PYTHON:-python3}" -m jaxgen launch local "$@"
