"""Tests of msa_jax.ffi, the loader of the optional CUDA extension.

The CPU tests run anywhere (with or without the extension built); the fake-extension tests pin
down the registration logic that otherwise only a GPU machine would exercise.
"""

import sys
import types

import pytest

import msa_jax.ffi as ffi


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


def _fake_extension(targets):
    module = types.ModuleType(ffi._EXTENSION)
    module.registrations = lambda: dict(targets)
    module.build_info = lambda: {"cuda_archs": "90a"}
    return module


def test_load_is_cached(fresh_loader):
    first = fresh_loader.load()
    assert first is None or isinstance(first, types.ModuleType)
    assert fresh_loader.load() is first


def test_missing_extension_is_reported_as_not_built(fresh_loader, monkeypatch):
    # None in sys.modules makes the import raise ModuleNotFoundError, as for an OFF build.
    monkeypatch.setitem(sys.modules, ffi._EXTENSION, None)
    assert fresh_loader.load() is None
    assert fresh_loader.build_info() is None
    assert "installed without the CUDA extension" in fresh_loader.unavailable_reason()


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
