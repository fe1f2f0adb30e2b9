#!/usr/bin/env bash
# Copies this checkout to every worker of the slice and installs it there.
#
#   TPU_NAME=effnetv2 ZONE=us-central2-b bash launch/tpu_setup.sh
#
# Run it from the repository root, again after changing the code.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_DIR="${REMOTE_DIR:-effnetv2_jax}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
tar czf /tmp/effnetv2_jax_src.tgz --exclude=.git --exclude='*.pyc' .
gcloud compute tpus tpu-vm scp /tmp/effnetv2_jax_src.tgz \
  "${TPU_NAME}:/tmp/effnetv2_jax_src.tgz" --zone="${ZONE}" --worker=all
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all \
  --command="set -e; mkdir -p ~/${REMOTE_DIR} && tar xzf /tmp/effnetv2_jax_src.tgz -C ~/${REMOTE_DIR} \
    && python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip \
    && ~/venv/bin/pip install -q -e ~/${REMOTE_DIR} 'jax[tpu]==${JAX_VERSION}'"
