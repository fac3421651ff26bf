"""Python side of the cuda implementation: loads the optional extension, registers its targets.

Why this module exists: the compiled extension ``msa_jax._msa_cuda`` is optional. A wheel built
with ``MSA_JAX_CUDA=OFF`` or without nvcc lacks it, and a machine without a GPU cannot use it,
so nothing else in msa_jax imports it directly. This is the one place that tries, remembers why
it could not, and registers its XLA FFI handlers exactly once. It holds no policy: whether the
cuda implementation is used is the dispatcher's choice (it asks ``unavailable_reason()``).
Importing this module never fails and never imports the extension.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import threading
from types import ModuleType
from typing import Any

import jax

__all__ = ["build_info", "ffi_version_mismatch", "load", "register_targets",
           "runtime_ffi_api_version", "unavailable_reason"]

_EXTENSION = "msa_jax._msa_cuda"
# The build's own record (CMakeLists.txt writes it into every installed copy) of why the
# extension was not built; absent only when msa_jax runs from a source tree never built.
_BUILD_CONFIG = "msa_jax._build_config"

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
                _import_error = (_not_built_reason() if missing
                                 else f"the CUDA extension failed to import: {e}")
            _tried = True
        return _module


def _not_built_reason() -> str:
    """Why there is no ``msa_jax._msa_cuda``, in the build's own words where it left them."""
    try:
        because = importlib.import_module(_BUILD_CONFIG).CUDA_EXTENSION_MISSING_BECAUSE
    except ImportError:
        return ("msa_jax runs from a source tree without the CUDA extension "
                "(install it with `pip install .`; see cuda/README.md)")
    if because is None:
        return "msa_jax was built with the CUDA extension, but msa_jax._msa_cuda is not installed"
    return f"msa_jax was installed without the CUDA extension: {because}"


def _parse_ffi_api_version(header: str) -> tuple[int, int] | None:
    """(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR) from the text of xla/ffi/api/c_api.h."""
    found = [re.search(rf"^#define XLA_FFI_API_{part} (\d+)", header, re.MULTILINE)
             for part in ("MAJOR", "MINOR")]
    return None if None in found else (int(found[0].group(1)), int(found[1].group(1)))


@functools.cache
def runtime_ffi_api_version() -> tuple[int, int] | None:
    """The XLA FFI API version this process's jaxlib implements, or None if it cannot tell.

    Read from the FFI headers jaxlib ships beside its runtime (``jax.ffi.include_dir()``),
    which are the headers that runtime was built from.
    """
    path = os.path.join(jax.ffi.include_dir(), "xla", "ffi", "api", "c_api.h")
    try:
        with open(path, encoding="utf-8") as f:
            return _parse_ffi_api_version(f.read())
    except OSError:
        return None


def ffi_version_mismatch(built: tuple[int, int],
                         runtime: tuple[int, int] | None) -> str | None:
    """Says why XLA would refuse handlers built against FFI API ``built``, or None.

    XLA accepts a handler whose API has the runtime's major version and a minor version no
    newer than the runtime's (xla/ffi/api/c_api.h, "Version"); it checks at call time, deep
    inside an executable, so the loader checks first and refuses with a sentence instead.
    """
    if runtime is None or (built[0] == runtime[0] and built[1] <= runtime[1]):
        return None
    import jaxlib  # jax depends on it; imported here only for its version

    return (f"the CUDA extension was built against XLA FFI API {built[0]}.{built[1]}, which "
            f"this jaxlib {jaxlib.__version__} (FFI API {runtime[0]}.{runtime[1]}) does not "
            "accept: rebuild msa_jax against this jaxlib or an older one (`pip install .` "
            "builds against the oldest supported, jaxlib 0.10)")


def _cuda_device_visible() -> bool:
    """True iff JAX has a CUDA backend with at least one device."""
    try:
        return len(jax.devices("cuda")) > 0
    except RuntimeError:  # JAX raises this when no CUDA backend/plugin is present.
        return False


def unavailable_reason() -> str | None:
    """Says why the cuda implementation cannot run here.

    Returns:
      None if the extension is importable, this jaxlib accepts its FFI API version and JAX
      sees a CUDA device, else a sentence naming the cause, suitable for a
      ``NotImplementedError`` or ``supports()`` message.
    """
    if load() is None:
        return _import_error
    mismatch = ffi_version_mismatch(tuple(_module.build_info()["xla_ffi_api_version"]),
                                    runtime_ffi_api_version())
    if mismatch is not None:
        return mismatch
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
