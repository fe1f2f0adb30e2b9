#!/usr/bin/env bash
# Creates a Cloud TPU VM slice for training.
#
#   TPU_NAME=effnetv2 ZONE=us-central2-b ACCELERATOR=v4-32 \
#     bash launch/tpu_create.sh [--spot]
#
# RUNTIME defaults to the base image of the TPU generation in ACCELERATOR
# (v4: tpu-ubuntu2204-base, v5litepod: v2-alpha-tpuv5-lite, v5p:
# v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e). Extra arguments go to gcloud
# (e.g. --spot, --network=...). A spot slice gets SIGTERM on preemption: the
# trainer then writes a checkpoint, and launch/tpu_run.sh resumes it.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR (e.g. v4-32)}"
case "${ACCELERATOR}" in
  v4-*) default_runtime=tpu-ubuntu2204-base ;;
  v5litepod-*) default_runtime=v2-alpha-tpuv5-lite ;;
  v5p-*) default_runtime=v2-alpha-tpuv5 ;;
  v6e-*) default_runtime=v2-alpha-tpuv6e ;;
  *) default_runtime=tpu-ubuntu2204-base ;;
esac
gcloud compute tpus tpu-vm create "${TPU_NAME}" \
  --zone="${ZONE}" \
  --accelerator-type="${ACCELERATOR}" \
  --version="${RUNTIME:-${default_runtime}}" \
  "$@"
