#!/usr/bin/env bash
# Install localsteer into ./.venv, building llama-cpp-python for this machine, and pull the
# default model. With --test, also install the test tools and build llama.cpp's own CLI
# (used by the interop tests and benchmarks).
#
#   LOCALSTEER_BACKEND=cuda|metal|cpu   which llama.cpp backend to build (see scripts/cmake_args.sh)
#   PYTHON=python3.11                   the Python to make the venv with
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_CPP_PYTHON_VERSION=0.3.36
with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

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
extra=""
[ "$with_tests" = 1 ] && extra="[test]"
"$vpy" -m pip install -q --disable-pip-version-check -e ".$extra"
.venv/bin/localsteer models pull smollm2-135m-instruct
if [ "$with_tests" = 1 ]; then
  .venv/bin/localsteer models pull qwen2.5-coder-0.5b-instruct
  PYTHON="$vpy" bash scripts/build_llama_cpp.sh
fi
echo "install: done. Try: .venv/bin/localsteer doctor"
