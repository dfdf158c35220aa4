#!/usr/bin/env bash
# The CUDA suite: every test marked `gpu` (parity of the Triton and torch paths at fp32, bf16 and
# fp16, SONAR-scale shapes), then the CUDA benchmarks at the "ci" and "full" sizes, one JSON per
# benchmark file (a file cut short by its time limit loses only its own results), printed as one
# table (time, ratio to the fastest provider, peak memory). Runs on the machine's preinstalled
# torch/triton (no install, no network). Liger-Kernel / cut-cross-entropy take part when
# importable; wheels placed in .whl/ are installed into /tmp/site first. Everything stops by a
# deadline of 7.5 minutes.
#
#   bash bench/gpu_suite.sh            # results and logs in ${OUT:-/tmp/sonarllm-gpu}
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/sonarllm-gpu}"
mkdir -p "$out"
deadline=$((SECONDS + 450))
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

# run LIMIT COMMAND...: the command with the smaller of LIMIT and the time left
run() {
  local limit=$1 left=$((deadline - SECONDS))
  shift
  if ((left < 10)); then echo "skipped (deadline): $*"; status=1; return; fi
  timeout $((limit < left ? limit : left)) "$@" || status=1
}

run 200 python3 -m pytest -q -m gpu tests -p no:cacheprovider >"$out/tests.log" 2>&1
tail -n 25 "$out/tests.log"
for size in ci full; do
  for file in bench/bench_fused_linear_cross_entropy.py bench/bench_sonar_loss.py bench/bench_train_step.py \
              bench/bench_attention.py bench/bench_fused_embedding_projection.py; do
    name="$size-$(basename "$file" .py)"
    run 90 python3 -m pytest -q "$file" --benchmark --bench-size "$size" -p no:cacheprovider \
      --benchmark-json="$out/$name.json" >"$out/$name.log" 2>&1
    tail -n 1 "$out/$name.log"
  done
done
python3 -m bench.report "$out"/*-bench_*.json | tee "$out/table.md"
exit $status
