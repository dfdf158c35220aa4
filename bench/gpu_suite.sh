#!/usr/bin/env bash
# The CUDA suite: every test marked `gpu` (parity of the Triton and torch paths at fp32, bf16 and
# fp16, SONAR-scale shapes), then the CUDA benchmarks at the "ci" and "full" sizes, printed as one
# table (time, ratio to the fastest provider, peak memory). Runs on the machine's preinstalled
# torch/triton (no install, no network). Liger-Kernel / cut-cross-entropy take part when importable;
# wheels placed in .whl/ are installed into /tmp/site first. Budget: under 8 minutes on an H200.
#
#   bash bench/gpu_suite.sh            # results and logs in ${OUT:-/tmp/sonarllm-gpu}
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/sonarllm-gpu}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 - <<'PY'
import torch
assert torch.cuda.is_available(), "bench/gpu_suite.sh needs a CUDA device"
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, end=" | ")
import triton; print("triton", triton.__version__)
PY
status=0
timeout 240 python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -n 25 || status=1
for size in ci full; do
  timeout 100 python3 -m pytest -q bench --benchmark --bench-size "$size" -p no:cacheprovider \
    --benchmark-json="$out/bench-$size.json" >"$out/bench-$size.log" 2>&1 || status=1
  tail -n 3 "$out/bench-$size.log"
done
python3 -m bench.report "$out"/bench-*.json | tee "$out/table.md"
exit $status
