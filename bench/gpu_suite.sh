#!/usr/bin/env bash
# The CUDA suite on one GPU machine (e.g. the offline H200), in at most 6 minutes from a cold
# Triton cache: parity tests (smoke matrix), every benchmark at --bench-size full beside its
# peers, the embedded example trained with DeepSpeed in bf16, per-stage wall and compile time,
# one report. Runs on the machine's own torch/triton; the wheels it lacks come from .whl/
# (bash bench/fetch_wheels.sh on a networked CPU machine). See bench/gpu_suite.py.
#
#   bash bench/gpu_suite.sh [--only STAGE,...] [--full] [--work DIR] [--dry-run]
#   results: DIR (default /tmp/sonarllm-gpu); with $OUT set also $OUT/report.md + $OUT/suite.tar.gz
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 -m bench.gpu_suite "$@"
