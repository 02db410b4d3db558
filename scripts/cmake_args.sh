#!/usr/bin/env bash
# Prints the CMAKE_ARGS llama.cpp (and llama-cpp-python) should be built with on this machine.
#
#   LOCALSTEER_BACKEND=cuda   NVIDIA GPU (needs the CUDA toolkit)
#   LOCALSTEER_BACKEND=metal  Apple GPU (the default on macOS anyway)
#   LOCALSTEER_BACKEND=cpu    CPU only (the default elsewhere)
#
# On x86 CPUs with AMX (Intel Sapphire Rapids and newer) the default native build crashes in
# ggml_backend_amx_mul_mat at the first decode (llama.cpp issue 20824), so there we build
# without GGML_NATIVE and name the instruction sets the CPU has, AMX left out.
# CMAKE_ARGS already set in the environment wins.
set -euo pipefail
if [ -n "${CMAKE_ARGS:-}" ]; then echo "$CMAKE_ARGS"; exit 0; fi
backend="${LOCALSTEER_BACKEND:-}"
if [ -z "$backend" ]; then
  if [ "$(uname -s)" = "Darwin" ]; then backend=metal; else backend=cpu; fi
fi
case "$backend" in
  cuda)  args="-DGGML_CUDA=on" ;;
  metal) echo "-DGGML_METAL=on"; exit 0 ;;
  cpu)   args="" ;;
  *) echo "unknown LOCALSTEER_BACKEND=$backend (cpu, cuda or metal)" >&2; exit 1 ;;
esac
# The CPU backend is built with CUDA too (it runs what is not offloaded), so the AMX flags apply
# to both: the H100 hosts this was checked on have AMX.
if [ -r /proc/cpuinfo ] && grep -qw amx_tile /proc/cpuinfo; then
  flags=$(grep -m1 '^flags' /proc/cpuinfo)
  has() { case " $flags " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
  cpu="-DGGML_NATIVE=OFF -DGGML_AVX=ON"
  has avx2 && cpu="$cpu -DGGML_AVX2=ON"
  has fma && cpu="$cpu -DGGML_FMA=ON"
  has f16c && cpu="$cpu -DGGML_F16C=ON"
  has avx512f && cpu="$cpu -DGGML_AVX512=ON"
  has avx512vbmi && cpu="$cpu -DGGML_AVX512_VBMI=ON"
  has avx512_vnni && cpu="$cpu -DGGML_AVX512_VNNI=ON"
  has avx512_bf16 && cpu="$cpu -DGGML_AVX512_BF16=ON"
  args="${args:+$args }$cpu"
fi
[ -z "$args" ] || echo "$args"
