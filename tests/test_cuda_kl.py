"""The CUDA KL passes (issue #13 item 2), on a Hopper GPU (every test marked `gpu`).

`index_kl_loss` with implementation="cuda" (teacher lse from the CUDA forward, KL value and
gradient from cuda/kernels/kl_sm90.cuh) against the `xla` reference on the same inputs
upcast to float32, for the same block_indices: the value within 2e-3 relative, and
d index_q, d index_k with cosine >= 0.999 and relative norm error <= 2e-2, at D 64 and 128,
Di 64 and 128, G 1, 2, 3, 4, 5, 7, 8, 16 and 32 (the last through Pallas's KL), bf16 and
fp16, ragged rows with padding and multi-token decode, in both the atomic and the
deterministic mode. Under differentiation the value comes from the student-only pass and the
gradient pass (kl_fwd); the value alone, from the value pass, is checked on the same cases.
Also: dense mode (the work-list passes for ragged positions, cuda/kernels/dense_kl_sm90.cuh over
the causal triangle for plain causal ones), bitwise repeatable deterministic gradients, sparse_attention's training step
runs the student and gradient passes once each (no value pass, none of Pallas's kernels), and
no KL kernel runs when nothing asks for the loss.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import msa_jax
from conformance import assert_bitwise_equal, cosine, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a Hopper GPU")]

MIN_COSINE = 0.999
MAX_REL_ERR = 2e-2
MAX_VALUE_REL_ERR = 2e-3

# (B, T, S, Hq, Hkv, D, Di, dtype, q_offset, kv_length); None = the spec's defaults.
CASES = (
    (1, 2048, 2048, 2, 2, 128, 128, "bfloat16", None, None),  # G = 1
    (1, 2048, 2048, 4, 2, 64, 128, "bfloat16", None, None),  # G = 2
    (1, 2048, 2048, 6, 2, 64, 64, "bfloat16", None, None),  # G = 3, D and Di 64
    (1, 2048, 2048, 6, 2, 128, 64, "float16", None, None),  # G = 3, fp16, Di 64
    (1, 2048, 2048, 8, 2, 128, 64, "float16", None, None),  # G = 4, fp16
    (1, 2048, 2048, 10, 2, 128, 128, "bfloat16", None, None),  # G = 5 (3 padding rows a token)
    (1, 2048, 2048, 7, 1, 64, 128, "bfloat16", None, None),  # G = 7
    (1, 4096, 4096, 16, 2, 128, 128, "bfloat16", None, None),  # G = 8
    (1, 2048, 2048, 32, 2, 64, 128, "float16", None, None),  # G = 16, D 64
    (1, 4096, 4096, 64, 4, 128, 128, "bfloat16", None, None),  # config A's heads
    (1, 2048, 2048, 64, 2, 64, 64, "bfloat16", None, None),  # G = 32: Pallas's KL (G > 16)
    (3, 1000, 3000, 16, 2, 128, 128, "bfloat16", (2000, 500, -300), (3000, 2100, 1500)),  # ragged + padding
    (2, 16, 20000, 16, 2, 64, 64, "bfloat16", None, (20000, 7777)),  # multi-token decode
)


def _case_id(c):
    return "B{}T{}S{}Hq{}Hkv{}D{}Di{}-{}".format(*c[:8]) + ("-ragged" if c[8] is not None or c[9] is not None else "")


def _inputs(rng, case, top_k=16, index_dtype=None):
    B, T, S, Hq, Hkv, D, Di, dtype, q_offset, kv_length = case
    dt = jnp.dtype(dtype)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dt)
    q, k = normal(B, T, Hq, D), normal(B, S, Hkv, D)
    index_dt = dt if index_dtype is None else jnp.dtype(index_dtype)  # the KL kernel reads q's dtype
    index_q = jnp.asarray(rng.standard_normal((B, T, Hkv, Di), np.float32), index_dt)
    index_k = jnp.asarray(rng.standard_normal((B, S, Di), np.float32), index_dt)
    kw = dict(block_size=128)
    if q_offset is not None:
        kw["q_offset"] = np.asarray(q_offset, np.int32)
    if kv_length is not None:
        kw["kv_length"] = np.asarray(kv_length, np.int32)
    bi = msa_jax.select_blocks(index_q, index_k, top_k=top_k, implementation="cuda", **kw)
    return q, k, index_q, index_k, bi, kw


def _value_and_grads(impl, q, k, index_q, index_k, bi, kw, **options):
    # q, k and the selection are arguments, not constants of the jitted function: as constants
    # XLA constant-folded the reference's products at compile time (> 1 s a dot, ~30 s a case).
    def loss(index_q, index_k, q, k, bi):
        return msa_jax.index_kl_loss(q, k, index_q, index_k, bi, implementation=impl, **kw, **options)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(index_q, index_k, q, k, bi)


def _reference(q, k, index_q, index_k, bi, kw, **options):
    up = lambda x: x.astype(jnp.float32)
    return _value_and_grads("xla", up(q), up(k), up(index_q), up(index_k), bi, kw, **options)


def _check(got, want):
    (value, grads), (want_value, want_grads) = got, want
    assert np.isfinite(float(value)), "KL value is not finite"
    assert abs(float(value) - float(want_value)) <= MAX_VALUE_REL_ERR * abs(float(want_value)), (
        f"KL value {float(value)} vs reference {float(want_value)}")
    for name, a, b in zip(("d index_q", "d index_k"), grads, want_grads):
        assert a.shape == b.shape
        assert np.isfinite(np.asarray(a, np.float32)).all(), f"{name} has NaN or inf"
        cos, err = cosine(a, b), rel_err(a, b)
        assert cos >= MIN_COSINE and err <= MAX_REL_ERR, f"{name}: cosine {cos:.5f}, relative error {err:.3g}"


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kl_matches_reference(rng, case, deterministic):
    q, k, index_q, index_k, bi, kw = _inputs(rng, case)
    got = _value_and_grads("cuda", q, k, index_q, index_k, bi, kw, deterministic=deterministic)
    assert got[1][0].dtype == index_q.dtype and got[1][1].dtype == index_k.dtype
    _check(got, _reference(q, k, index_q, index_k, bi, kw))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kl_value_alone_matches_reference(rng, case):
    """The primal alone (no gradient asked) runs the value pass."""
    q, k, index_q, index_k, bi, kw = _inputs(rng, case)
    value = jax.jit(lambda q, k, iq, ik, bi: msa_jax.index_kl_loss(q, k, iq, ik, bi, implementation="cuda", **kw))(
        q, k, index_q, index_k, bi)
    up = lambda x: x.astype(jnp.float32)
    want = msa_jax.index_kl_loss(up(q), up(k), up(index_q), up(index_k), bi, implementation="xla", **kw)
    assert np.isfinite(float(value)), "KL value is not finite"
    assert abs(float(value) - float(want)) <= MAX_VALUE_REL_ERR * abs(float(want)), (
        f"KL value {float(value)} vs reference {float(want)}")


def _kl_calls(lowered_text):
    """(value passes, student passes, gradient passes) among a lowered program's custom calls."""
    calls = [line for line in lowered_text.splitlines() if "stablehlo.custom_call" in line]
    partials = [line for line in calls if "@msa_kl_partials" in line]
    student = [line for line in partials if re.search(r"student = true", line)]
    return len(partials) - len(student), len(student), sum("@msa_kl_bwd" in line for line in calls)


def test_index_heads_in_another_dtype_take_pallas_kl(rng):
    """fp16 q with bf16 index heads: the KL kernel has one element type, so Pallas's KL runs
    beside the CUDA indexer and attention, and the result still matches the reference."""
    case = (1, 2048, 2048, 8, 2, 128, 128, "float16", None, None)
    q, k, index_q, index_k, bi, kw = _inputs(rng, case, index_dtype="bfloat16")
    got = _value_and_grads("cuda", q, k, index_q, index_k, bi, kw)
    assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.bfloat16
    _check(got, _reference(q, k, index_q, index_k, bi, kw))
    loss = lambda iq, ik: msa_jax.index_kl_loss(q, k, iq, ik, bi, implementation="cuda", **kw)
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(index_q, index_k).compile().as_text()
    assert "msa_kl_partials" not in text and "msa_kl_bwd" not in text


def test_dense_mode(rng):
    """mode="dense" (indexer warm-up) with a ragged q_offset / kv_length: the work-list KL
    over every visible key."""
    case = (2, 1000, 2048, 16, 2, 128, 128, "bfloat16", (1048, 300), (2048, 1300))
    q, k, index_q, index_k, bi, kw = _inputs(rng, case)
    got = _value_and_grads("cuda", q, k, index_q, index_k, bi, kw, mode="dense")
    _check(got, _reference(q, k, index_q, index_k, bi, kw, mode="dense"))


# (B, T, Hq, Hkv, D, Di, dtype), plain causal positions (T == S, no offsets).
DENSE_CASES = (
    (1, 2048, 2, 2, 128, 128, "bfloat16"),  # G = 1
    (1, 1000, 6, 2, 64, 128, "bfloat16"),  # G = 3, a partial last key tile and query tile
    (2, 1500, 32, 2, 128, 64, "float16"),  # G = 16, fp16, Di 64, two batch rows
    (1, 700, 14, 2, 128, 128, "bfloat16"),  # G = 7
    (1, 300, 8, 1, 64, 64, "float16"),  # G = 8, D and Di 64
    (1, 4096, 64, 4, 128, 128, "bfloat16"),  # config A's heads
)


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "B{}T{}Hq{}Hkv{}D{}Di{}-{}".format(*c))
def test_dense_kl_kernel_matches_reference(rng, case):
    """Dense mode over plain causal positions: the KL over the causal triangle without work
    lists (cuda/kernels/dense_kl_sm90.cuh, the student's lse from cuDNN), value and gradients
    against the reference; the value alone too; deterministic=True keeps the work-list passes."""
    B, T, Hq, Hkv, D, Di, dtype = case
    q, k, index_q, index_k, bi, kw = _inputs(rng, (B, T, T, Hq, Hkv, D, Di, dtype, None, None))
    loss = lambda det: lambda iq, ik, q, k, bi: msa_jax.index_kl_loss(
        q, k, iq, ik, bi, mode="dense", deterministic=det, implementation="cuda", **kw)
    text = jax.jit(jax.value_and_grad(loss(False), argnums=(0, 1))).lower(index_q, index_k, q, k, bi).as_text()
    assert "msa_dense_kl" in text and "msa_kl_bwd" not in text and "msa_kl_partials" not in text
    text = jax.jit(jax.value_and_grad(loss(True), argnums=(0, 1))).lower(index_q, index_k, q, k, bi).as_text()
    assert "msa_dense_kl" not in text and "msa_kl_bwd" in text
    want = _reference(q, k, index_q, index_k, bi, kw, mode="dense")
    _check(_value_and_grads("cuda", q, k, index_q, index_k, bi, kw, mode="dense"), want)
    value = jax.jit(loss(False))(index_q, index_k, q, k, bi)
    assert abs(float(value) - float(want[0])) <= MAX_VALUE_REL_ERR * abs(float(want[0])), (float(value), float(want[0]))


def test_deterministic_mode_is_bitwise_repeatable(rng):
    q, k, index_q, index_k, bi, kw = _inputs(rng, (1, 4096, 4096, 32, 4, 128, 128, "bfloat16", None, None))
    first = _value_and_grads("cuda", q, k, index_q, index_k, bi, kw, deterministic=True)
    second = _value_and_grads("cuda", q, k, index_q, index_k, bi, kw, deterministic=True)
    assert_bitwise_equal(first[0], second[0], "KL value")
    for name, a, b in zip(("d index_q", "d index_k"), first[1], second[1]):
        assert_bitwise_equal(a, b, name)


def _training_inputs(rng):
    q, k, index_q, index_k, _, _ = _inputs(rng, (1, 1024, 1024, 8, 2, 128, 128, "bfloat16", None, None))
    v = jnp.asarray(rng.standard_normal(k.shape, np.float32), k.dtype)
    return q, k, v, index_q, index_k


def test_sparse_attention_training_runs_the_cuda_kl(rng):
    """The training step runs the student pass and the gradient pass once each and no value
    pass nor Pallas KL kernel, and its KL value and index gradients match the xla
    implementation's."""
    q, k, v, index_q, index_k = _training_inputs(rng)
    w = jnp.asarray(rng.standard_normal(q.shape, np.float32))

    def step(impl):
        def loss(q, k, v, index_q, index_k):
            r = msa_jax.sparse_attention(q, k, v, index_q, index_k, implementation=impl)
            return jnp.sum(r.out.astype(jnp.float32) * w) + r.kl_loss, r.kl_loss
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))

    lowered = step("cuda").lower(q, k, v, index_q, index_k)
    assert _kl_calls(lowered.as_text()) == (0, 1, 1), _kl_calls(lowered.as_text())
    text = lowered.compile().as_text()
    assert "msa_kl_partials" in text and "msa_kl_bwd" in text
    assert "msa_kl_student_lse" not in text, "a Pallas KL kernel ran"
    up = lambda x: x.astype(jnp.float32)
    got, kl = step("cuda")(q, k, v, index_q, index_k)
    want, want_kl = step("xla")(*(up(x) for x in (q, k, v, index_q, index_k)))
    assert abs(float(kl) - float(want_kl)) <= MAX_VALUE_REL_ERR * abs(float(want_kl)), (float(kl), float(want_kl))
    for name, a, b in zip(("d index_q", "d index_k"), got[3:], want[3:]):
        cos, err = cosine(a, b), rel_err(a, b)
        assert cos >= MIN_COSINE and err <= MAX_REL_ERR, f"{name}: cosine {cos:.5f}, relative error {err:.3g}"


def test_no_kl_work_when_nothing_asks_for_it(rng):
    """Inference (the output alone) and training without the KL run no KL kernel."""
    q, k, v, index_q, index_k = _training_inputs(rng)
    forward = jax.jit(lambda *a: msa_jax.sparse_attention(*a, implementation="cuda").out)
    text = forward.lower(q, k, v, index_q, index_k).compile().as_text()
    assert "msa_kl" not in text
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(msa_jax.sparse_attention(*a, implementation="cuda").out
                                               .astype(jnp.float32)), argnums=(0, 1, 2)))
    text = grad.lower(q, k, v, index_q, index_k).compile().as_text()
    assert "msa_kl" not in text
    assert "msa_sparse_attention_bwd" in text
