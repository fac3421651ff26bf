#!/usr/bin/env bash
# `pip install` of the project's sdist builds the CUDA extension with nothing downloaded by
# hand, and the wheel it makes works under the oldest and the newest jax the package accepts
# (issue #12). No GPU needed: on the CPU the loader's registration logic and refusal reasons
# are what runs; tests/test_cuda.py -m gpu runs the same wheel's kernels on a GPU
# (benchmarks/gpu_session.sh test-wheel).
#
#   .ci/wheel_check.sh                       # sm_90a only
#   PYTHON=python3.12 KEEP=dist .ci/wheel_check.sh   # that Python; keep the wheel (to carry it)
#
# The Python defaults to a 3.12 one where there is one (python3.12, or pyenv's 3.12.x): jax
# 0.11 and later need Python >= 3.12, so only there does "the newest jax" reach the top of the
# range the package accepts. Otherwise python3, and the newest jax pip finds for it.
#
# Steps: sdist (must hold no CUTLASS file) -> one isolated `pip wheel` of it with
# MSA_JAX_CUDA=ON (the build fetches the pinned CUTLASS headers itself and compiles against
# jaxlib 0.10's FFI headers) -> SASS for every arch -> for jax 0.10.0 and the newest jax pip
# can install: a fresh venv with the wheel, where the extension must import from site-packages
# and tests/test_ffi_loader.py + tests/test_cuda.py (CPU part) pass with nothing skipped that
# needs the extension.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  for candidate in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$candidate" -c "" 2>/dev/null; then PYTHON=$candidate; break; fi
  done
fi
echo "wheel check with $("$PYTHON" --version) ($PYTHON)"
ARCHS=${MSA_JAX_CUDA_ARCHS:-90a}
OLDEST_JAX=0.10.0  # pyproject.toml: jax>=0.10.0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS

"$PYTHON" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install --quiet "build==1.2.2.post1"
"$work/tools/bin/python" -m build --sdist --outdir "$work/dist" . >"$work/sdist.log"
sdist=$(echo "$work"/dist/msa_jax-*.tar.gz)
# The CMake glue is the only CUTLASS-related file a source distribution may carry.
if tar tzf "$sdist" | grep -i -e cutlass -e '\.whl' | grep -v '/third_party/cutlass/cutlass\.cmake$'; then
  echo "error: the sdist carries CUTLASS files (above)" >&2; exit 1
fi

# One build, isolated, the way `pip install msa_jax-*.tar.gz` builds; nothing named by hand.
env -u MSA_JAX_CUTLASS_WHEEL MSA_JAX_CUDA=ON MSA_JAX_CUDA_ARCHS="$ARCHS" \
  "$work/tools/bin/python" -m pip wheel --no-deps -v -w "$work/wheels" "$sdist" >"$work/wheel.log" 2>&1 \
  || { tail -n 60 "$work/wheel.log"; echo "error: pip wheel of the sdist failed" >&2; exit 1; }
grep -E "msa_jax: (downloading|CUTLASS|XLA FFI)" "$work/wheel.log"
grep -q "msa_jax: downloading nvidia-cutlass" "$work/wheel.log" \
  || { echo "error: the build did not fetch the CUTLASS headers itself" >&2; exit 1; }
wheel=$(echo "$work"/wheels/msa_jax-*.whl)
echo "built $(basename "$wheel") in $((SECONDS - start)) s"
if command -v cuobjdump >/dev/null; then
  unzip -q -o "$wheel" 'msa_jax/_msa_cuda*.so' -d "$work/so"
  elfs=$(cuobjdump --list-elf "$work"/so/msa_jax/_msa_cuda*.so)
  for arch in ${ARCHS//;/ }; do
    grep -q "\.sm_${arch}\.cubin" <<<"$elfs" || { echo "error: no sm_${arch} SASS in the wheel" >&2; exit 1; }
  done
fi

for jax_spec in "jax==$OLDEST_JAX jaxlib==$OLDEST_JAX" "jax jaxlib"; do
  venv="$work/venv-${jax_spec%% *}"
  "$PYTHON" -m venv "$venv"
  # shellcheck disable=SC2086 (jax_spec holds two requirements)
  "$venv/bin/python" -m pip install --quiet "$wheel[test]" $jax_spec
  # Run from outside the checkout so that msa_jax is the installed copy, not ./msa_jax.
  (cd "$work" && "$venv/bin/python" - <<'EOF'
import jax, jaxlib, msa_jax, msa_jax.ffi as ffi
assert "site-packages" in msa_jax.__file__, msa_jax.__file__
info = ffi.build_info()
assert info is not None, ffi.unavailable_reason()
print(f"jax {jax.__version__} / jaxlib {jaxlib.__version__} (FFI API {ffi.runtime_ffi_api_version()}):"
      f" extension {info}; unavailable here because: {ffi.unavailable_reason()}")
EOF
  )
  (cd "$work" && "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not gpu" -rs \
    "$repo/tests/test_ffi_loader.py" "$repo/tests/test_cuda.py") | tee "$work/pytest.log"
  if grep -q "no CUDA extension installed here" "$work/pytest.log"; then
    echo "error: a test found no extension in the installed wheel" >&2; exit 1
  fi
done
if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$wheel" "$KEEP/"; fi
echo "wheel check: OK ($ARCHS) in $((SECONDS - start)) s"
