"""Tests of msa_jax.ffi, the loader of the optional CUDA extension.

The CPU tests run anywhere (with or without the extension built); the fake-extension tests pin
down the registration logic that otherwise only a GPU machine would exercise.
"""

import ctypes
import importlib
import shutil
import subprocess
import sys
import types

import pytest

import msa_jax.ffi as ffi
from msa_jax.ffi import ops as ffi_ops


@pytest.fixture
def fresh_loader(monkeypatch):
    """A loader that has not tried to import anything yet; restored after the test."""
    for name, value in [("_tried", False), ("_module", None), ("_import_error", None),
                        ("_registered", False)]:
        monkeypatch.setattr(ffi, name, value)
    return ffi


@pytest.fixture
def recorded_registrations(monkeypatch):
    """Replaces jax.ffi.register_ffi_target with a recorder (name, capsule, platform)."""
    calls = []
    monkeypatch.setattr(ffi.jax.ffi, "register_ffi_target",
                        lambda name, fn, platform: calls.append((name, fn, platform)))
    return calls


def _fake_extension(targets, ffi_api=(0, 1)):
    module = types.ModuleType(ffi._EXTENSION)
    module.registrations = lambda: dict(targets)
    module.build_info = lambda: {"cuda_archs": "90a", "xla_ffi_api_version": ffi_api}
    return module


def _fake_build_config(missing_because):
    module = types.ModuleType(ffi._BUILD_CONFIG)
    module.CUDA_EXTENSION_MISSING_BECAUSE = missing_because
    return module


def test_load_is_cached(fresh_loader):
    first = fresh_loader.load()
    assert first is None or isinstance(first, types.ModuleType)
    assert fresh_loader.load() is first


def test_missing_extension_is_reported_with_the_builds_reason(fresh_loader, monkeypatch):
    # None in sys.modules makes the import raise ModuleNotFoundError, as for an OFF build.
    monkeypatch.setitem(sys.modules, ffi._EXTENSION, None)
    because = "the CUTLASS headers could not be downloaded (pip: no network)"
    monkeypatch.setitem(sys.modules, ffi._BUILD_CONFIG, _fake_build_config(because))
    assert fresh_loader.load() is None
    assert fresh_loader.build_info() is None
    assert fresh_loader.unavailable_reason() == (
        "msa_jax was installed without the CUDA extension: " + because)


def test_missing_extension_without_a_build_record(fresh_loader, monkeypatch):
    monkeypatch.setitem(sys.modules, ffi._EXTENSION, None)
    monkeypatch.setitem(sys.modules, ffi._BUILD_CONFIG, None)
    assert fresh_loader.load() is None
    assert "source tree without the CUDA extension" in fresh_loader.unavailable_reason()


def test_installed_build_record_matches_the_extension(fresh_loader):
    """An installed msa_jax carries the build's record, and it agrees with what imported."""
    try:
        record = importlib.import_module(ffi._BUILD_CONFIG)
    except ImportError:
        pytest.skip("msa_jax runs from a source tree here (no build record installed)")
    if fresh_loader.load() is None:
        assert isinstance(record.CUDA_EXTENSION_MISSING_BECAUSE, str)
        assert record.CUDA_EXTENSION_MISSING_BECAUSE in fresh_loader.unavailable_reason()
    else:
        assert record.CUDA_EXTENSION_MISSING_BECAUSE is None


def test_ffi_api_version_is_read_from_jaxlib():
    version = ffi.runtime_ffi_api_version()
    assert version is not None and version[0] == 0 and version[1] >= 1


@pytest.mark.parametrize("built,runtime,accepted", [
    ((0, 3), (0, 3), True), ((0, 2), (0, 3), True), ((0, 4), (0, 3), False),
    ((1, 0), (0, 3), False), ((0, 3), (1, 0), False), ((0, 9), None, True)])
def test_ffi_version_rule(built, runtime, accepted):
    reason = ffi.ffi_version_mismatch(built, runtime)
    assert (reason is None) == accepted
    if not accepted:
        assert f"FFI API {built[0]}.{built[1]}" in reason and "rebuild" in reason


def test_extension_newer_than_jaxlib_is_refused(fresh_loader, monkeypatch, recorded_registrations):
    runtime = ffi.runtime_ffi_api_version()
    newer = (runtime[0], runtime[1] + 1)
    monkeypatch.setitem(sys.modules, ffi._EXTENSION, _fake_extension({"msa_a": object()}, newer))
    monkeypatch.setattr(ffi, "_cuda_device_visible", lambda: True)
    assert "does not accept" in fresh_loader.unavailable_reason()
    assert fresh_loader.register_targets() is False
    assert recorded_registrations == []


def test_built_extension_is_accepted_by_this_jaxlib():
    """Whatever extension is installed here was built against FFI headers this jaxlib takes."""
    info = ffi.build_info()
    if info is None:
        pytest.skip(f"no CUDA extension installed here: {ffi.unavailable_reason()}")
    assert ffi.ffi_version_mismatch(tuple(info["xla_ffi_api_version"]),
                                    ffi.runtime_ffi_api_version()) is None
    assert info["cutlass_version"] == "4.2.0"
    assert sorted(ffi.load().registrations()) == sorted(ffi_ops.TARGETS)


def test_reason_given_without_gpu():
    if ffi._cuda_device_visible():
        pytest.skip("a CUDA device is visible; covered by test_extension_on_gpu")
    reason = ffi.unavailable_reason()
    assert isinstance(reason, str) and reason


def test_register_targets_is_noop_without_gpu(fresh_loader, monkeypatch, recorded_registrations):
    monkeypatch.setitem(sys.modules, ffi._EXTENSION, _fake_extension({"msa_fake": object()}))
    monkeypatch.setattr(ffi, "_cuda_device_visible", lambda: False)
    assert fresh_loader.register_targets() is False
    assert fresh_loader.register_targets() is False
    assert recorded_registrations == []
    assert fresh_loader.unavailable_reason().startswith("no CUDA device")


def test_register_targets_registers_each_target_once(fresh_loader, monkeypatch,
                                                     recorded_registrations):
    capsule_a, capsule_b = object(), object()
    fake = _fake_extension({"msa_a": capsule_a, "msa_b": capsule_b})
    monkeypatch.setitem(sys.modules, ffi._EXTENSION, fake)
    monkeypatch.setattr(ffi, "_cuda_device_visible", lambda: True)
    assert fresh_loader.unavailable_reason() is None
    assert fresh_loader.register_targets() is True
    assert fresh_loader.register_targets() is True
    assert sorted(recorded_registrations, key=lambda c: c[0]) == [
        ("msa_a", capsule_a, "CUDA"), ("msa_b", capsule_b, "CUDA")]


@pytest.mark.gpu
def test_extension_on_gpu():
    assert ffi.load() is not None, ffi.unavailable_reason()
    assert ffi.unavailable_reason() is None
    assert "90" in ffi.build_info()["cuda_archs"]
    assert ffi.register_targets() is True


def test_xla_accepts_the_extensions_handlers():
    """XLA checks a handler's FFI API version when it is registered, on any platform: so the
    CPU, with no GPU, proves this jaxlib takes the installed extension (the handlers are
    registered for "cpu" under probe names and never called)."""
    module = ffi.load()
    if module is None:
        pytest.skip(f"no CUDA extension installed here: {ffi.unavailable_reason()}")
    for name, capsule in module.registrations().items():
        ffi.jax.ffi.register_ffi_target(f"{name}_version_probe", capsule, platform="cpu")


_PROBE_HANDLER = r"""
#include "xla/ffi/api/c_api.h"
#undef XLA_FFI_API_MINOR
#define XLA_FFI_API_MINOR PROBE_MINOR
#include "xla/ffi/api/ffi.h"
static xla::ffi::Error Nothing() { return xla::ffi::Error::Success(); }
XLA_FFI_DEFINE_HANDLER_SYMBOL(Probe, Nothing, xla::ffi::Ffi::Bind());
"""


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
def test_loader_rule_agrees_with_xla(tmp_path):
    """A handler compiled at this jaxlib's FFI API minor, and one minor above: XLA takes the
    first and refuses the second at registration, as ffi_version_mismatch says it would."""
    runtime = ffi.runtime_ffi_api_version()
    (tmp_path / "probe.cc").write_text(_PROBE_HANDLER)
    for minor, accepted in ((runtime[1], True), (runtime[1] + 1, False)):
        lib = tmp_path / f"probe{minor}.so"
        subprocess.run(["g++", "-std=c++17", "-shared", "-fPIC", "-O0", f"-DPROBE_MINOR={minor}",
                        f"-I{ffi.jax.ffi.include_dir()}", str(tmp_path / "probe.cc"), "-o", str(lib)],
                       check=True, capture_output=True)
        capsule = ffi.jax.ffi.pycapsule(ctypes.cdll.LoadLibrary(str(lib)).Probe)
        assert (ffi.ffi_version_mismatch((runtime[0], minor), runtime) is None) == accepted
        if accepted:
            ffi.jax.ffi.register_ffi_target(f"msa_probe_{minor}", capsule, platform="cpu")
        else:
            with pytest.raises(Exception, match="(?i)version"):
                ffi.jax.ffi.register_ffi_target(f"msa_probe_{minor}", capsule, platform="cpu")
