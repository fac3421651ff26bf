"""Test-wide setup: 4 host devices (sharding tests) must be requested before jax loads."""

import os
import shutil
import zlib

# On a machine without a GPU, XLA's CPU backend compiles the suite's thousands of small
# programs (eager ops, interpret-mode Pallas kernels) with LLVM's cheap pipeline: ~30% less
# wall time for the compile-bound tests (tests/test_pallas.py's padding-rows case 53 -> 38 s).
# These flags choose LLVM's optimisation effort only; XLA's HLO passes, and so what is
# computed, are those of the default. The GPU machine keeps XLA's defaults.
_CPU_FAST_COMPILE = "" if shutil.which("nvidia-smi") else (
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4" + _CPU_FAST_COMPILE)

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id, so each case draws fresh but repeatable data."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def pytest_generate_tests(metafunc):
    """Conformance tests take their cases from the implementation's class (conformance.py)."""
    for name, attr in (("case", "CASES"), ("grad_case", "GRAD_CASES"), ("dense_case", "DENSE_CASES"),
                       ("paged_case", "PAGED_CASES")):
        if name in metafunc.fixturenames and metafunc.cls is not None and hasattr(metafunc.cls, attr):
            cases = getattr(metafunc.cls, attr)
            if cases is None and attr == "DENSE_CASES":
                cases = metafunc.cls.CASES
            metafunc.parametrize(name, cases, ids=str)
