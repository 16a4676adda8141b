#!/usr/bin/env bash
# Run ViTok training on every worker of an existing Cloud TPU VM (pod slice). Creates nothing.
#
# Usage:
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [extra launch.train flags...]
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=/mnt/shared/vitok/run1 launch/tpu_pod.sh [flags...]
#
# Environment (positional arguments win over these):
#   TPU_NAME, ZONE, WORKDIR   required
#   PROJECT                   GCP project (default: gcloud's configured project)
#   CONFIG                    --config value (default: configs/vitok.py)
#   REPO_DIR                  checkout of this repo on the workers (default: ~/vitok)
#   GIT_REF                   if set, `git fetch && git checkout $GIT_REF` in REPO_DIR first
#   PYTHON                    python on the workers (default: python3)
#   INSTALL                   0: skip `pip install -e ".[tpu]"` on the workers (default: 1)
#   LIBTPU_INIT_ARGS          if set, the TPU compiler's flags on every worker (docs/tpu.md: plan
#                             with the same value; e.g. its asynchronous-collective flags)
#
# Every worker runs the same command; JAX's Cloud TPU detection (jax.distributed.initialize() with
# no arguments, called by vitok.core.distributed.initialize) finds the coordinator, process count and
# process id from the TPU metadata. WORKDIR must be a path on storage shared by all workers (an
# NFS/Filestore mount, or a GCS bucket mounted with gcsfuse at the same path on every worker):
# every process takes part in each checkpoint save and restore. gs:// URLs are not accepted.
# Stop a run with: gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all \
#   --command="pkill -f launch.train"
set -euo pipefail

# Leading arguments that are not flags fill TPU_NAME, ZONE, WORKDIR in that order.
for var in TPU_NAME ZONE WORKDIR; do
  if [[ $# -gt 0 && "$1" != -* ]]; then printf -v "$var" '%s' "$1"; shift; fi
done
TPU_NAME="${TPU_NAME:-}" ZONE="${ZONE:-}" WORKDIR="${WORKDIR:-}"
if [[ -z "$TPU_NAME" || -z "$ZONE" || -z "$WORKDIR" ]]; then
  sed -n '2,17p' "$0" >&2
  exit 2
fi
CONFIG="${CONFIG:-configs/vitok.py}"
REPO_DIR="${REPO_DIR:-~/vitok}"
PYTHON="${PYTHON:-python3}"
INSTALL="${INSTALL:-1}"
if [[ "$INSTALL" != 0 && "$INSTALL" != 1 ]]; then
  echo "INSTALL=$INSTALL: expected 1 (install, the default) or 0 (skip the install)" >&2
  exit 2
fi

# Quote the pass-through flags so they survive the remote shell.
EXTRA=""
for arg in "$@"; do EXTRA+=" $(printf '%q' "$arg")"; done

CHECKOUT="true"
if [[ -n "${GIT_REF:-}" ]]; then
  CHECKOUT="git fetch --all --quiet && git checkout --quiet $(printf '%q' "$GIT_REF")"
fi

# The config is the CONFIG variable (a --config among the extra flags would be a second one).
for arg in "$@"; do
  if [[ "$arg" == --config=* ]]; then
    echo "pass the config as CONFIG=${arg#--config=}, not as an extra --config flag" >&2
    exit 2
  fi
done

# The tpu extra (jax[tpu]) brings the libtpu built for the installed jax: a plain `-e .` would
# leave a CPU-only jaxlib, and the run would stop at start-up naming the TPU chips it cannot use.
INSTALL_STEP="true"
if [[ "$INSTALL" == 1 ]]; then
  INSTALL_STEP="$PYTHON -m pip install --quiet -e '.[tpu]'"  # quoted: [tpu] is a glob remotely
fi

# The TPU compiler reads its flags from the environment of each worker's process.
TPU_FLAGS=""
if [[ -n "${LIBTPU_INIT_ARGS:-}" ]]; then
  TPU_FLAGS="export LIBTPU_INIT_ARGS=$(printf '%q' "$LIBTPU_INIT_ARGS"); "
fi

REMOTE="set -e; ${TPU_FLAGS}cd $REPO_DIR && $CHECKOUT && $INSTALL_STEP \
&& $PYTHON -m launch.train --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")$EXTRA"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
  --worker=all --command="$REMOTE"
