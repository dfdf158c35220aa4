#!/usr/bin/env bash
# Put every wheel the offline GPU machine lacks into .whl/ (git-ignored), on a CPU machine with
# registry access, from the project checkout:
#
#   bash bench/fetch_wheels.sh            # needs this checkout's .venv (or PYTHON=...) for DeepSpeed's build
#
# The GPU machine (Python 3.12, torch 2.11.0+cu130, triton 3.6.0; docs/environment.md §8) already
# has numpy, safetensors, sentencepiece, tqdm, matplotlib, psutil, py-cpuinfo, msgpack, ninja,
# packaging, absl-py, click, joblib, regex, six, pytest, pytest-benchmark and pytest-xdist. It lacks:
# DeepSpeed (no wheel on the registry: built here as a pure-Python wheel, DS_BUILD_OPS=0) and its
# pure-Python needs pydantic, pydantic-core (cp312 manylinux x86_64), annotated-types,
# typing-inspection, typing-extensions >= 4.16 (pydantic 2.14 needs it; the image's is older),
# hjson; pysbd (sentence splitting of the example), nltk and rouge-score (evaluation); and the
# benchmark peers Liger-Kernel and cut-cross-entropy. bench/gpu_suite.sh installs .whl/*.whl with
# --no-index into /tmp/site there. The device tool's `carry` takes .whl (about 7 MiB; the
# working tree and carried paths together must stay under 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl
TARGET="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
"$PY" -m pip download -q --no-deps $TARGET -d .whl \
  liger-kernel==0.8.5 cut-cross-entropy==25.1.1 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
  hjson==3.1.0 pysbd==0.3.4 nltk==3.10.4
# No wheels on the registry for these two: pure-Python ones (DeepSpeed's setup.py imports torch).
ls .whl/deepspeed-*.whl >/dev/null 2>&1 || DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl deepspeed==0.19.8
ls .whl/rouge_score-*.whl >/dev/null 2>&1 || "$PY" -m pip wheel -q --no-deps -w .whl rouge-score==0.1.2
ls -1 .whl
du -sh .whl
