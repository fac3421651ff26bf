"""Python side of the cuda implementation: loads the optional extension, registers its targets.

Why this module exists: the compiled extension ``msa_jax._msa_cuda`` is optional. A wheel built
with ``MSA_JAX_CUDA=OFF`` or without nvcc lacks it, and a machine without a GPU cannot use it,
so nothing else in msa_jax imports it directly. This is the one place that tries, remembers why
it could not, and registers its XLA FFI handlers exactly once. It holds no policy: whether the
cuda implementation is used is the dispatcher's choice (it asks ``unavailable_reason()``).
Importing this module never fails and never imports the extension.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Any

import jax

__all__ = ["build_info", "load", "register_targets", "unavailable_reason"]

_EXTENSION = "msa_jax._msa_cuda"
_NOT_BUILT = (
    "msa_jax was installed without the CUDA extension "
    "(MSA_JAX_CUDA=OFF or no nvcc at build time)"
)

# RLock: register_targets() holds it while calling load().
_lock = threading.RLock()
_tried = False  # load() has run once; its outcome below is final for the process
_module: ModuleType | None = None
_import_error: str | None = None
_registered = False


def load() -> ModuleType | None:
    """Imports the CUDA extension once.

    Returns:
      The ``msa_jax._msa_cuda`` module, or None if it cannot be imported (the reason is kept
      for ``unavailable_reason()``). The outcome is cached for the life of the process.
    """
    global _tried, _module, _import_error
    with _lock:
        if not _tried:
            try:
                _module = importlib.import_module(_EXTENSION)
            except ImportError as e:
                # Not built at all vs. built but broken (wrong Python, missing symbol, ...).
                missing = isinstance(e, ModuleNotFoundError) and e.name == _EXTENSION
                _import_error = _NOT_BUILT if missing else f"the CUDA extension failed to import: {e}"
            _tried = True
        return _module


def _cuda_device_visible() -> bool:
    """True iff JAX has a CUDA backend with at least one device."""
    try:
        return len(jax.devices("cuda")) > 0
    except RuntimeError:  # JAX raises this when no CUDA backend/plugin is present.
        return False


def unavailable_reason() -> str | None:
    """Says why the cuda implementation cannot run here.

    Returns:
      None if the extension is importable and JAX sees a CUDA device, else a sentence naming
      the cause, suitable for a ``NotImplementedError`` or ``supports()`` message.
    """
    if load() is None:
        return _import_error
    if not _cuda_device_visible():
        return "no CUDA device visible to JAX (jax.devices('cuda') is empty or unavailable)"
    return None


def build_info() -> dict[str, Any] | None:
    """What the extension was built with, or None if it is not importable.

    Returns:
      A dict with ``cuda_runtime_version`` (int, CUDART_VERSION, e.g. 13000),
      ``xla_ffi_api_version`` ((major, minor) of the XLA FFI headers compiled against),
      ``cuda_archs`` (str, comma-separated, e.g. "90a") and ``cutlass_version`` (str, "4.2.0").
    """
    module = load()
    return None if module is None else dict(module.build_info())


def register_targets() -> bool:
    """Registers every handler of the extension with XLA for the CUDA platform, once.

    Idempotent and safe to call from several threads; does nothing (and registers nothing)
    when ``unavailable_reason()`` is not None.

    Returns:
      True if the targets are registered (by this call or an earlier one), else False.
    """
    global _registered
    with _lock:
        if _registered:
            return True
        if unavailable_reason() is not None:
            return False
        for name, capsule in _module.registrations().items():
            jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
        _registered = True
        return True
