#!/usr/bin/env bash
# CUDA compile check for developers, no GPU needed: configure and build msa_jax/_msa_cuda with
# MSA_JAX_CUDA=ON (sm_90a unless MSA_JAX_CUDA_ARCHS says otherwise) in a build tree you may keep
# for incremental rebuilds, import it, and, where cuobjdump exists, check the module carries
# SASS for every arch. The CUTLASS headers come as in any build (.whl/, MSA_JAX_CUTLASS_WHEEL,
# or downloaded into the build tree). CI checks the installable wheel instead (wheel_check.sh).
#
#   PYTHON=/tmp/venv/bin/python .ci/cuda_compile_check.sh   # that Python needs jax + nanobind
#   MSA_JAX_BUILD_DIR=build/check ...                       # keep the build (incremental reruns)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ARCHS=${MSA_JAX_CUDA_ARCHS:-90a}

command -v nvcc >/dev/null || { echo "error: nvcc is not on PATH" >&2; exit 1; }
"$PYTHON" -c "import jax, nanobind" || {
  echo "error: $PYTHON needs jax and nanobind ('nanobind>=2.9,<4')" >&2; exit 1; }
if [ -n "${MSA_JAX_BUILD_DIR:-}" ]; then
  build=$MSA_JAX_BUILD_DIR
else
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
fi
generator=()
if command -v ninja >/dev/null; then generator=(-G Ninja); fi

start=$SECONDS
cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DMSA_JAX_CUDA=ON \
  -DMSA_JAX_CUDA_ARCHS="$ARCHS" -DPython_EXECUTABLE="$(command -v "$PYTHON")"
cmake --build "$build" --parallel "$(nproc)"
so=$(echo "$build"/_msa_cuda*.so)

# Importing needs no GPU (cudart is static and loads the driver lazily): proves it links.
PYTHONPATH="$build" "$PYTHON" -c "import _msa_cuda; print(_msa_cuda.build_info())"
if command -v cuobjdump >/dev/null; then
  elfs=$(cuobjdump --list-elf "$so")
  echo "$elfs"
  for arch in ${ARCHS//;/ }; do
    grep -q "\.sm_${arch}\.cubin" <<<"$elfs" || { echo "error: no sm_${arch} SASS in $so" >&2; exit 1; }
  done
else
  echo "note: cuobjdump not on PATH, SASS not listed"
fi
echo "cuda compile check: OK ($ARCHS) in $((SECONDS - start)) s"
