# CUTLASS / CuTe headers for the CUDA build, pinned to the PyPI wheel nvidia-cutlass==4.2.0.0,
# exposed as the INTERFACE target msa::cutlass. No CUTLASS file is ever committed.
#
# Where the wheel comes from, first match wins:
#   1. MSA_JAX_CUTLASS_WHEEL (cache variable, or the environment variable of that name, which
#      `pip install` forwards): a path to the .whl, for offline builds. Missing or not the
#      pinned file is an error in every mode: someone asked for that file.
#   2. <repo>/.whl/nvidia_cutlass-4.2.0.0-py3-none-any.whl (git-ignored): a developer's copy.
#   3. <build>/_deps/: a wheel an earlier configure of this build tree downloaded.
#   4. Otherwise the build downloads it with `${Python_EXECUTABLE} -m pip download`, so the
#      user's pip configuration (index URL, proxy, certificates) applies, hash-checked by pip
#      (--require-hashes) and again here.
# The wheel is deliberately NOT a pip build requirement: its Requires-Dist (cuda-python, scipy,
# networkx, pydot, treelib) has nothing to do with headers, so we fetch it with --no-deps.
#
# Needs Python_EXECUTABLE. Sets MSA_JAX_CUTLASS_UNAVAILABLE to the reason when the headers
# cannot be had (the caller decides: AUTO builds without CUDA, ON fails); otherwise defines
# msa::cutlass and leaves it empty.
set(_cutlass_version "4.2.0.0")
set(_cutlass_wheel_name "nvidia_cutlass-${_cutlass_version}-py3-none-any.whl")
set(_cutlass_sha256 "f9599ada45c7bcb6bf53f7d3f0a7d154183e53451c01bfa59eecd37dd4a693f6")
set(MSA_JAX_CUTLASS_WHEEL "" CACHE FILEPATH
    "Path to ${_cutlass_wheel_name} (empty: .whl/, then download)")
set(MSA_JAX_CUTLASS_UNAVAILABLE "")

set(_explicit "${MSA_JAX_CUTLASS_WHEEL}")
if(NOT _explicit AND DEFINED ENV{MSA_JAX_CUTLASS_WHEEL})
  set(_explicit "$ENV{MSA_JAX_CUTLASS_WHEEL}")
endif()
set(_repo_wheel "${PROJECT_SOURCE_DIR}/.whl/${_cutlass_wheel_name}")
set(_deps_dir "${CMAKE_BINARY_DIR}/_deps")
set(_cached_wheel "${_deps_dir}/${_cutlass_wheel_name}")

# A file that exists but is not the pinned wheel is always an error: it is either a typo in
# MSA_JAX_CUTLASS_WHEEL or a corrupt copy that would otherwise be used silently.
function(_msa_check_cutlass_hash wheel)
  file(SHA256 "${wheel}" _sha)
  if(NOT _sha STREQUAL _cutlass_sha256)
    message(FATAL_ERROR "${wheel} is not the pinned ${_cutlass_wheel_name}: its sha256 is "
            "${_sha}, expected ${_cutlass_sha256}. Delete it or point MSA_JAX_CUTLASS_WHEEL "
            "at the right file.")
  endif()
endfunction()

if(_explicit)
  if(NOT EXISTS "${_explicit}")
    message(FATAL_ERROR "MSA_JAX_CUTLASS_WHEEL=${_explicit}: no such file")
  endif()
  set(_wheel "${_explicit}")
elseif(EXISTS "${_repo_wheel}")
  set(_wheel "${_repo_wheel}")
elseif(EXISTS "${_cached_wheel}")
  set(_wheel "${_cached_wheel}")
else()
  set(_wheel "${_cached_wheel}")
  file(MAKE_DIRECTORY "${_deps_dir}")
  # --require-hashes needs the hash in a requirements file.
  file(WRITE "${_deps_dir}/cutlass-requirement.txt"
       "nvidia-cutlass==${_cutlass_version} --hash=sha256:${_cutlass_sha256}\n")
  message(STATUS "msa_jax: downloading nvidia-cutlass==${_cutlass_version} (6.4 MB) with pip")
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -m pip download --no-deps --only-binary=:all:
            --require-hashes -r "${_deps_dir}/cutlass-requirement.txt" -d "${_deps_dir}"
            --disable-pip-version-check --quiet
    RESULT_VARIABLE _pip_rc OUTPUT_VARIABLE _pip_out ERROR_VARIABLE _pip_out TIMEOUT 600)
  if(NOT _pip_rc EQUAL 0 OR NOT EXISTS "${_wheel}")
    # pip's last ERROR line says why (no network, no such version, hash mismatch, no pip).
    string(REGEX MATCHALL "(ERROR|No module)[^\n]*" _pip_errors "${_pip_out}")
    list(LENGTH _pip_errors _n)
    if(_n GREATER 0)
      math(EXPR _last "${_n} - 1")
      list(GET _pip_errors ${_last} _pip_why)
    else()
      set(_pip_why "exit status ${_pip_rc}")
    endif()
    set(MSA_JAX_CUTLASS_UNAVAILABLE
        "the CUTLASS headers could not be downloaded (${Python_EXECUTABLE} -m pip download "
        "nvidia-cutlass==${_cutlass_version}: ${_pip_why}). For an offline build, download "
        "the wheel elsewhere (pip download --no-deps nvidia-cutlass==${_cutlass_version}) "
        "and set MSA_JAX_CUTLASS_WHEEL to it")
    string(REPLACE ";" "" MSA_JAX_CUTLASS_UNAVAILABLE "${MSA_JAX_CUTLASS_UNAVAILABLE}")
    return()
  endif()
endif()
_msa_check_cutlass_hash("${_wheel}")

set(_root "${CMAKE_BINARY_DIR}/cutlass-${_cutlass_version}/cutlass_library/source")
if(NOT EXISTS "${_root}/include/cutlass/version.h")
  file(ARCHIVE_EXTRACT INPUT "${_wheel}" DESTINATION "${CMAKE_BINARY_DIR}/cutlass-${_cutlass_version}"
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
