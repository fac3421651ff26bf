"""The `pallas` implementation against the conformance suite.

On CPU the kernels run in Pallas interpret mode: exact but slow, so the CPU run uses small
shapes that still cover every feature of the sweep (G 1..16, T < S, ragged kv_length,
packed documents, decode, bf16). The `gpu`-marked class runs the full sweep on a GPU.
"""

import jax
import pytest

from conformance import Case, ConformanceSuite

SMALL_CASES = (
    Case(1, 64, 64, 2, 2, 16, 16, 16, 3, "float32"),
    Case(2, 40, 96, 4, 2, 32, 16, 16, 3, "bfloat16"),
    Case(2, 80, 80, 16, 4, 16, 16, 16, 4, "float32", q_offset=(0, 0), kv_length=(80, 50)),
    Case(1, 96, 96, 8, 1, 16, 32, 32, 2, "bfloat16"),
    Case(1, 64, 64, 16, 1, 16, 16, 16, 1, "float32"),
    Case(2, 70, 70, 4, 1, 16, 16, 16, 3, "float32", segments=(20, 30, 20)),
    Case(2, 8, 100, 8, 2, 16, 16, 16, 4, "bfloat16", q_offset=(92, 40)),
    Case(2, 1, 90, 16, 2, 16, 16, 16, 3, "float32", kv_length=(90, 50)),
)


class TestPallas(ConformanceSuite):
    implementation = "pallas"
    CASES = SMALL_CASES
    GRAD_CASES = (SMALL_CASES[5],)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton lowering)")
class TestPallasGPU(ConformanceSuite):
    implementation = "pallas"
