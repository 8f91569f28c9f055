#!/usr/bin/env bash
# Unattended GPU check (see benchmarks/gpu_check.py): device-matrix tests, conformance, search and tokenizer
# benchmarks on one GPU, a Markdown report under OUTPUT_DIR, exit status 1 on any failure. Runs from the checkout
# (PYTHONPATH=.), offline, without pip installs; a hard limit of 470 s keeps it under 8 minutes.
#
#   bash benchmarks/gpu_check.sh OUTPUT_DIR [--device cuda] [--time-budget 400] [--quick] [--no-tests]
set -u
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUTPUT_DIR [options of benchmarks/gpu_check.py]" >&2
  exit 2
fi
out="$1"
shift
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out" || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
python="${PYTHON:-python}"
timeout -k 10 "${GPU_CHECK_TIMEOUT:-470}" "$python" benchmarks/gpu_check.py --output "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
status=${PIPESTATUS[0]}
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
  echo "FAIL gpu_check: killed at the hard time limit (${GPU_CHECK_TIMEOUT:-470}s); partial report in $out/gpu_check.md" \
    | tee -a "$out/gpu_check.log"
fi
exit "$status"
