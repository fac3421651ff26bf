# CUTLASS / CuTe headers for the CUDA build, pinned to the PyPI wheel nvidia-cutlass==4.2.0.0,
# exposed as the INTERFACE target msa::cutlass. No CUTLASS file is ever committed.
#
# The one mechanism: the cache variable MSA_JAX_CUTLASS_WHEEL names the downloaded wheel
# (default <repo>/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl, git-ignored; `pip install`
# forwards the environment variable of the same name). CMake checks its hash and unpacks the
# headers into the build tree. The wheel is deliberately NOT a pip build requirement: its
# Requires-Dist (cuda-python, scipy, networkx, pydot, treelib) has nothing to do with headers.
set(_cutlass_wheel_name "nvidia_cutlass-4.2.0.0-py3-none-any.whl")
set(_cutlass_sha256 "f9599ada45c7bcb6bf53f7d3f0a7d154183e53451c01bfa59eecd37dd4a693f6")
set(MSA_JAX_CUTLASS_WHEEL "" CACHE FILEPATH "Path to ${_cutlass_wheel_name} (empty: .whl/)")

set(_wheel "${MSA_JAX_CUTLASS_WHEEL}")
if(NOT _wheel)
  set(_wheel "${PROJECT_SOURCE_DIR}/.whl/${_cutlass_wheel_name}")
endif()
if(NOT EXISTS "${_wheel}")
  message(FATAL_ERROR
    "CUTLASS headers: no wheel at ${_wheel}. Download it (6.4 MB, headers only are used):\n"
    "  python3 -m pip download --no-deps -d ${PROJECT_SOURCE_DIR}/.whl nvidia-cutlass==4.2.0.0\n"
    "or set MSA_JAX_CUTLASS_WHEEL to the .whl file, or build without CUDA: MSA_JAX_CUDA=OFF.")
endif()
file(SHA256 "${_wheel}" _sha)
if(NOT _sha STREQUAL _cutlass_sha256)
  message(FATAL_ERROR "${_wheel} is not the pinned ${_cutlass_wheel_name} (sha256 ${_sha})")
endif()

set(_root "${CMAKE_BINARY_DIR}/cutlass-4.2.0.0/cutlass_library/source")
if(NOT EXISTS "${_root}/include/cutlass/version.h")
  file(ARCHIVE_EXTRACT INPUT "${_wheel}" DESTINATION "${CMAKE_BINARY_DIR}/cutlass-4.2.0.0"
       PATTERNS "cutlass_library/source/include" "cutlass_library/source/tools/util/include")
endif()

# The hash already pins the wheel; reading version.h also proves the unpacked tree is usable.
file(STRINGS "${_root}/include/cutlass/version.h" _ver REGEX "^#define CUTLASS_(MAJOR|MINOR|PATCH) ")
string(REGEX REPLACE "[^;]* ([0-9]+)[^;]*;[^;]* ([0-9]+)[^;]*;[^;]* ([0-9]+).*" "\\1.\\2.\\3"
       _ver "${_ver}")
if(NOT _ver STREQUAL "4.2.0")
  message(FATAL_ERROR "Expected CUTLASS 4.2.0 in ${_root}, cutlass/version.h says '${_ver}'")
endif()
message(STATUS "msa_jax: CUTLASS ${_ver} headers from ${_wheel}")

add_library(msa_cutlass INTERFACE)
add_library(msa::cutlass ALIAS msa_cutlass)
# SYSTEM: CUTLASS's own warnings are not ours to fix.
target_include_directories(msa_cutlass SYSTEM INTERFACE
  "${_root}/include" "${_root}/tools/util/include")
