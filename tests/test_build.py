"""The CUDA build's configure step: where the CUTLASS headers come from, and what happens when
they cannot be had (third_party/cutlass/cutlass.cmake, CMakeLists.txt).

Each test configures (never compiles) a copy of the build's sources with CMake, so it takes a
few seconds. The compile itself, from an sdist and with the headers fetched by the build, is
CI's wheel check (.ci/wheel_check.sh).
"""

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")
NVCC = shutil.which("nvcc")
needs_cmake = pytest.mark.skipif(CMAKE is None, reason="cmake is not on PATH")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUTLASS step "
                                "runs only when CMake finds a CUDA compiler")


@pytest.fixture
def sources(tmp_path):
    """What CMake reads, without the checkout's .whl/ or build trees."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "CMakeLists.txt", src)
    for folder in ("third_party", "cuda"):
        shutil.copytree(ROOT / folder, src / folder)
    return src


def _configure(src, *defines, offline=False, env_extra=None):
    """Runs `cmake -S src -B src/build`; returns (exit status, output, build dir)."""
    env = {k: v for k, v in os.environ.items() if k != "MSA_JAX_CUTLASS_WHEEL"}
    if offline:
        # No configuration file (no find-links, no extra index) and no index: pip can find
        # nothing, as on a machine without a network.
        env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS="")
    env.update(env_extra or {})
    build = src / "build"
    proc = subprocess.run(
        [CMAKE, "-S", str(src), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
         *defines], env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr, build


def _missing_because(build):
    return runpy.run_path(str(build / "_build_config.py"))["CUDA_EXTENSION_MISSING_BECAUSE"]


@needs_cmake
def test_off_builds_pure_python_and_says_so(sources):
    rc, out, build = _configure(sources, "-DMSA_JAX_CUDA=OFF")
    assert rc == 0, out
    assert _missing_because(build) == "it was built with MSA_JAX_CUDA=OFF"
    assert not (build / "_deps").exists()  # nothing downloaded for an OFF build


@needs_cmake
@needs_nvcc
def test_auto_without_headers_falls_back_with_one_warning(sources):
    rc, out, build = _configure(sources, offline=True)
    assert rc == 0, out
    assert out.count("CMake Warning") == 1, out
    assert "building WITHOUT the CUDA extension" in out
    because = _missing_because(build)
    assert because.startswith("the CUTLASS headers could not be downloaded")
    assert "No matching distribution found for nvidia-cutlass==4.2.0.0" in because
    assert "MSA_JAX_CUTLASS_WHEEL" in because  # says how to build offline


@needs_cmake
@needs_nvcc
def test_on_without_headers_fails_with_the_reason(sources):
    rc, out, _ = _configure(sources, "-DMSA_JAX_CUDA=ON", offline=True)
    assert rc != 0
    assert "MSA_JAX_CUDA=ON but the CUTLASS headers could not be downloaded" in out


@needs_cmake
@needs_nvcc
@pytest.mark.parametrize("mode", ["AUTO", "ON"])
def test_a_named_wheel_that_is_wrong_fails_in_every_mode(sources, tmp_path, mode):
    # Someone who names a wheel wants it used: a typo or a corrupt file must not fall back.
    junk = tmp_path / "nvidia_cutlass-4.2.0.0-py3-none-any.whl"
    junk.write_bytes(b"not a wheel")
    rc, out, _ = _configure(sources, f"-DMSA_JAX_CUDA={mode}", offline=True,
                            env_extra={"MSA_JAX_CUTLASS_WHEEL": str(junk)})
    assert rc != 0
    assert "is not the pinned nvidia_cutlass-4.2.0.0-py3-none-any.whl" in out
    rc, out, _ = _configure(sources, f"-DMSA_JAX_CUDA={mode}",
                            f"-DMSA_JAX_CUTLASS_WHEEL={tmp_path / 'absent.whl'}", offline=True)
    assert rc != 0 and "no such file" in out


@needs_cmake
@needs_nvcc
def test_headers_are_downloaded_hash_checked_and_cached(sources):
    """With nothing at hand, configure fetches the pinned wheel itself (network needed)."""
    pytest.importorskip("nanobind", reason="the full configure needs nanobind")
    rc, out, build = _configure(sources)
    assert rc == 0, out
    wheel = build / "_deps" / "nvidia_cutlass-4.2.0.0-py3-none-any.whl"
    assert f"CUTLASS 4.2.0 headers from {wheel}" in out, out
    assert "--hash=sha256:" in (build / "_deps" / "cutlass-requirement.txt").read_text()
    assert _missing_because(build) is None
    # A second configure of the same tree uses the downloaded wheel, offline.
    rc, out, _ = _configure(sources, offline=True)
    assert rc == 0 and "downloading" not in out and f"headers from {wheel}" in out, out
