#!/usr/bin/env bash
# The checks to run on a GPU build (LOCALSTEER_BACKEND=cuda bash scripts/install.sh --test):
# the SmolLM2 tests that exercise llama.cpp (capture, control vectors, rejection, interop with
# llama.cpp's own tools), then how far llama.cpp's kernels are from batch invariance on this
# backend, then what each decode shape costs (which loops `auto` takes there), the rejection
# and DIRECTER benchmarks. Prints what it finds; docs/benchmarks.md's GPU sections hold the
# numbers from an H100 and an H200. Where no real model can be taken, the architecture tests
# run on the tiny models and `scripts/bench_shapes.py --model PATH` on a stand-in of a
# model's shape (`scripts/tiny_models.py like-qwen2.5-0.5b`).
#
#   bash scripts/gpu_check.sh [PYTHON]
set -uo pipefail
cd "$(dirname "$0")/.."
py="${1:-.venv/bin/python}"
"$py" -m localsteer.cli doctor
# localsteer is imported before pytest's plugins can import numpy (see localsteer/__init__.py)
"$py" -c 'import localsteer, sys, pytest; sys.exit(pytest.main(sys.argv[1:]))' -q -p no:cacheprovider \
  -k "not qwen" tests/test_runtime.py tests/test_steer.py tests/test_rejection.py tests/test_interop.py \
  tests/test_instruction.py
"$py" scripts/batch_invariance.py --models smollm2-135m-instruct
"$py" scripts/bench_rejection.py --models smollm2-135m-instruct --repeats 2
"$py" scripts/bench_shapes.py --model smollm2-135m-instruct
"$py" scripts/bench_directer.py --model smollm2-135m-instruct --tokens 64
