#!/usr/bin/env bash
# Starts (or resumes) training on every worker of the slice.
#
#   TPU_NAME=effnetv2 ZONE=us-central2-b bash launch/tpu_run.sh \
#     --config=configs/imagenet.py:s,paper \
#     --workdir=gs://BUCKET/effnetv2/s_paper \
#     --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
#     --config.compilation_cache_dir=gs://BUCKET/jax_cache
#
# Every host runs the same command (one JAX process per host, joined by
# --distributed); the workdir must be on storage all hosts see (GCS).
# Output goes to ~/train.log on each worker (`tail -f` it over ssh); running
# the same command again after a preemption resumes from the workdir.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REMOTE_DIR="${REMOTE_DIR:-effnetv2_jax}"
args=""
for a in "$@"; do args+=" $(printf '%q' "$a")"; done
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all \
  --command="cd ~/${REMOTE_DIR} && nohup ~/venv/bin/python -m effnetv2_jax.main --distributed ${args} > ~/train.log 2>&1 &"
