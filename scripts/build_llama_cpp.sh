#!/usr/bin/env bash
# Builds llama.cpp's own command-line tools (llama-completion, llama-cvector-generator) from the
# llama.cpp source vendored in the llama-cpp-python sdist on PyPI, so that the llama.cpp the
# tools are built from is the one localsteer runs through llama-cpp-python.
#
#   scripts/build_llama_cpp.sh [--force]
#
# Environment:
#   LLAMA_CPP_PYTHON_VERSION  llama-cpp-python sdist to take llama.cpp from (default 0.3.36)
#   LOCALSTEER_HOME           cache root (default ~/.cache/localsteer, ~/Library/Caches/localsteer on macOS)
#   PYTHON                    python used for `pip download` (default python3)
#   LOCALSTEER_BACKEND / CMAKE_ARGS   passed through scripts/cmake_args.sh (cpu, cuda or metal)
#   JOBS                      parallel build jobs (default: number of CPUs)
#
# The binaries end up in ${LOCALSTEER_HOME}/llama.cpp-<version>/bin/. When both are already there
# and run, nothing is rebuilt unless --force is given. PyPI (through pip) is the only network
# source: the configure options below keep llama.cpp from fetching anything itself.
set -euo pipefail

say() { echo "build_llama_cpp: $*"; }
die() { echo "build_llama_cpp: error: $*" >&2; exit 1; }

force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $arg (usage: $0 [--force])" ;;
  esac
done

script_dir="$(cd "$(dirname "$0")" && pwd)"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
python="${PYTHON:-python3}"
if [ -n "${LOCALSTEER_HOME:-}" ]; then
  home="$LOCALSTEER_HOME"
elif [ "$(uname -s)" = "Darwin" ]; then
  home="$HOME/Library/Caches/localsteer"
else
  home="$HOME/.cache/localsteer"
fi
prefix="$home/llama.cpp-$version"
bindir="$prefix/bin"
targets=(llama-completion llama-cvector-generator)

tools_work() {
  local t
  for t in "${targets[@]}"; do
    [ -x "$bindir/$t" ] || return 1
    "$bindir/$t" --version >/dev/null 2>&1 || return 1
  done
}

if [ "$force" = 0 ] && tools_work; then
  say "llama.cpp tools from llama-cpp-python $version already built in $bindir"
  for t in "${targets[@]}"; do say "  $bindir/$t"; done
  exit 0
fi

command -v cmake >/dev/null 2>&1 || die "cmake not found"
"$python" -m pip --version >/dev/null 2>&1 || die "$python has no pip (set PYTHON)"

if command -v nproc >/dev/null 2>&1; then ncpu="$(nproc)"
else ncpu="$(sysctl -n hw.ncpu 2>/dev/null || echo 2)"; fi
jobs="${JOBS:-$ncpu}"

# Backend / CPU-feature flags (on AMX CPUs a native ggml build crashes at the first decode).
backend_args_str="$("$script_dir/cmake_args.sh")"
read -r -a backend_args <<< "$backend_args_str" || true

mkdir -p "$home"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/build_llama_cpp.XXXXXX")"
staged=()
cleanup() {
  rm -rf "$tmp"
  local f
  for f in "${staged[@]+"${staged[@]}"}"; do rm -f "$f"; done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "downloading llama-cpp-python==$version sdist from PyPI"
"$python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp/dl" \
  || die "pip download of llama-cpp-python==$version failed"
tarball=""
for f in "$tmp"/dl/*.tar.gz; do [ -e "$f" ] && tarball="$f"; done
[ -n "$tarball" ] || die "pip download produced no .tar.gz in $tmp/dl"

say "extracting vendor/llama.cpp from $(basename "$tarball")"
top="$(basename "$tarball" .tar.gz)"
mkdir -p "$tmp/src"
if ! tar -xzf "$tarball" -C "$tmp/src" "$top/vendor/llama.cpp" 2>/dev/null; then
  # top-level directory named differently from the file: extract everything and look
  tar -xzf "$tarball" -C "$tmp/src"
fi
src=""
for d in "$tmp"/src/*/vendor/llama.cpp; do [ -f "$d/CMakeLists.txt" ] && src="$d"; done
[ -n "$src" ] || die "no vendor/llama.cpp/CMakeLists.txt in $(basename "$tarball")"

# Option names as in the vendored llama.cpp: LLAMA_CURL is gone (deprecated, ignored);
# LLAMA_OPENSSL=OFF keeps libssl out (the tools need no HTTPS); LLAMA_BUILD_TOOLS=ON is what
# adds tools/ (completion, cvector-generator); LLAMA_BUILD_APP=OFF drops the unified `llama`
# binary, which links the server. BoringSSL/LibreSSL/llguidance/KleidiAI fetches stay off.
cmake_args=(
  -DCMAKE_BUILD_TYPE=Release
  -DBUILD_SHARED_LIBS=OFF
  -DLLAMA_BUILD_COMMON=ON
  -DLLAMA_BUILD_TOOLS=ON
  -DLLAMA_BUILD_TESTS=OFF
  -DLLAMA_BUILD_EXAMPLES=OFF
  -DLLAMA_BUILD_SERVER=OFF
  -DLLAMA_BUILD_APP=OFF
  -DLLAMA_BUILD_UI=OFF
  -DLLAMA_OPENSSL=OFF
  -DLLAMA_BUILD_BORINGSSL=OFF
  -DLLAMA_BUILD_LIBRESSL=OFF
  -DLLAMA_LLGUIDANCE=OFF
  # the sdist has no .git: name the source in `--version` instead of "commit unknown" (or the
  # hash of whatever repository TMPDIR happens to sit in)
  "-DLLAMA_BUILD_COMMIT=llama-cpp-python-$version"
)
say "configuring (backend flags: ${backend_args_str:-none})"
cmake -S "$src" -B "$tmp/build" "${cmake_args[@]}" "${backend_args[@]+"${backend_args[@]}"}" \
  > "$tmp/configure.log" 2>&1 || { tail -n 40 "$tmp/configure.log" >&2; die "cmake configure failed"; }

say "building ${targets[*]} with $jobs jobs (this takes a few minutes)"
start=$(date +%s)
cmake --build "$tmp/build" --config Release --target "${targets[@]}" -j "$jobs" \
  > "$tmp/build.log" 2>&1 || { tail -n 60 "$tmp/build.log" >&2; die "build failed"; }
say "built in $(( $(date +%s) - start ))s"

mkdir -p "$bindir"
for t in "${targets[@]}"; do
  built="$tmp/build/bin/$t"
  [ -x "$built" ] || built="$tmp/build/bin/Release/$t"
  [ -x "$built" ] || die "built binary $t not found"
  "$built" --version >/dev/null 2>&1 || die "freshly built $t does not run"
  # stage next to the destination, then rename: the swap is atomic on one filesystem
  stage="$bindir/.$t.tmp.$$"
  staged+=("$stage")
  cp "$built" "$stage"
  chmod 755 "$stage"
done
for t in "${targets[@]}"; do
  mv -f "$bindir/.$t.tmp.$$" "$bindir/$t"
done
staged=()
printf '%s\n' "llama-cpp-python $version" "cmake: ${cmake_args[*]} $backend_args_str" \
  "$("$bindir/llama-completion" --version 2>&1 | head -n 2 | tr '\n' ' ')" > "$prefix/BUILD_INFO"

say "installed into $bindir"
for t in "${targets[@]}"; do say "  $bindir/$t"; done
