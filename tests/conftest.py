"""Test-wide setup: 4 host devices (sharding tests) must be requested before jax loads."""

import os
import zlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

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
