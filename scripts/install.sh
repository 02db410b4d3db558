#!/usr/bin/env bash
# Install localsteer into ./.venv, building llama-cpp-python for this machine, and pull the
# default model. With --serve, also the server extra (`localsteer serve`). With --train, also the training extra (PyTorch CPU + transformers, for
# `localsteer kts train` only). With --test, also the test tools, the training extra (its test
# trains a small adapter) and llama.cpp's own CLI (used by the interop tests and benchmarks).
#
#   LOCALSTEER_BACKEND=cuda|metal|cpu   which llama.cpp backend to build (see scripts/cmake_args.sh)
#   PYTHON=python3.11                   the Python to make the venv with
#   LOCALSTEER_TORCH=torch==2.13.0      the PyTorch requirement for the training extra (the default
#                                       is a CPU build; other versions may pull a multi-GB CUDA one)
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_CPP_PYTHON_VERSION=0.3.36
with_tests=0
with_train=0
with_serve=0
for arg in "$@"; do
  case "$arg" in
    --test) with_tests=1; with_train=1; with_serve=1 ;;
    --train) with_train=1 ;;
    --serve) with_serve=1 ;;
    *) echo "install: unknown option $arg (use --test, --train or --serve)" >&2; exit 1 ;;
  esac
done

py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
vpy=.venv/bin/python
"$vpy" -m pip install -q --disable-pip-version-check --upgrade pip

cmake_args="$(bash scripts/cmake_args.sh)"
stamp=.venv/.llama-cpp-build
want="$LLAMA_CPP_PYTHON_VERSION $cmake_args"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "install: building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from source (a few minutes)"
  echo "install: CMAKE_ARGS=$cmake_args"
  # --no-cache-dir: a wheel cached from a build with other flags (e.g. a native AMX build that
  # crashes) must not be reused.
  CMAKE_ARGS="$cmake_args" "$vpy" -m pip install -q --disable-pip-version-check --no-cache-dir \
    --force-reinstall --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  echo "$want" > "$stamp"
fi
extras=()
[ "$with_tests" = 1 ] && extras+=(test)
[ "$with_train" = 1 ] && extras+=(train)
[ "$with_serve" = 1 ] && extras+=(serve)
extra=""
[ ${#extras[@]} -gt 0 ] && extra="[$(IFS=,; echo "${extras[*]}")]"
torch=()
[ "$with_train" = 1 ] && torch=("${LOCALSTEER_TORCH:-torch==2.13.0}")
"$vpy" -m pip install -q --disable-pip-version-check -e ".$extra" "${torch[@]}"
.venv/bin/localsteer models pull smollm2-135m-instruct
if [ "$with_tests" = 1 ]; then
  .venv/bin/localsteer models pull qwen2.5-coder-0.5b-instruct
  .venv/bin/localsteer models pull gemma-3-270m  # a base model of another architecture (tests/test_architectures.py)
  PYTHON="$vpy" bash scripts/build_llama_cpp.sh
fi
echo "install: done. Try: .venv/bin/localsteer doctor"
