"""The CUDA attention backward (issue #13 item 1), on a Hopper GPU (every test marked `gpu`).

dq, dk, dv of block_sparse_attention with implementation="cuda" against the `xla`
reference on the same inputs upcast to float32, for a random cotangent of both out and lse
(lse's reaches the kernel through delta): cosine >= 0.999 and relative norm error <= 2e-2
for each gradient, at D 64 and 128, G 1, 3, 7, 8 and 16, bf16 and fp16, ragged rows with
padding and multi-token decode, in both the default (atomic) and the deterministic mode.
Also: keys of blocks no query selected get exactly zero dk and dv, the deterministic mode is
bitwise repeatable, the dense warm-up mode's gradients (its main branch through cuDNN for
plain causal positions, else through these kernels), and the jitted gradient really runs the
CUDA backward.
"""

from __future__ import annotations

import functools

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

# (B, T, S, Hq, Hkv, D, dtype, q_offset, kv_length); None = the spec's defaults.
CASES = (
    (1, 2048, 2048, 2, 2, 128, "bfloat16", None, None),  # G = 1
    (1, 2048, 2048, 6, 2, 64, "bfloat16", None, None),  # G = 3, D 64 (63 of 64 rows per step)
    (1, 2048, 2048, 6, 2, 128, "float16", None, None),  # G = 3, fp16
    (1, 2048, 2048, 7, 1, 128, "bfloat16", None, None),  # G = 7
    (1, 4096, 4096, 16, 2, 128, "bfloat16", None, None),  # G = 8
    (1, 2048, 2048, 32, 2, 64, "float16", None, None),  # G = 16, D 64
    (1, 4096, 4096, 64, 4, 128, "bfloat16", None, None),  # config A's heads
    (3, 1000, 3000, 16, 2, 128, "bfloat16", (2000, 500, -300), (3000, 2100, 1500)),  # ragged + padding
    (2, 16, 20000, 16, 2, 64, "bfloat16", None, (20000, 7777)),  # multi-token decode
)


def _case_id(c):
    return "B{}T{}S{}Hq{}Hkv{}D{}-{}".format(*c[:7]) + ("-ragged" if c[7] is not None or c[8] is not None else "")


def _inputs(rng, case, top_k=16):
    B, T, S, Hq, Hkv, D, dtype, q_offset, kv_length = case
    dt = jnp.dtype(dtype)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dt)
    q, k, v = normal(B, T, Hq, D), normal(B, S, Hkv, D), normal(B, S, Hkv, D)
    index_q = jnp.asarray(rng.standard_normal((B, T, Hkv, 128), np.float32), jnp.bfloat16)
    index_k = jnp.asarray(rng.standard_normal((B, S, 128), np.float32), jnp.bfloat16)
    kw = dict(block_size=128)
    if q_offset is not None:
        kw["q_offset"] = np.asarray(q_offset, np.int32)
    if kv_length is not None:
        kw["kv_length"] = np.asarray(kv_length, np.int32)
    bi = msa_jax.select_blocks(index_q, index_k, top_k=top_k, implementation="cuda", **kw)
    return q, k, v, index_q, index_k, bi, kw


def _grads(impl, q, k, v, bi, kw, w_out, w_lse, deterministic=False):
    def loss(q, k, v):
        out, lse = msa_jax.block_sparse_attention(q, k, v, bi, return_lse=True, deterministic=deterministic,
                                                  implementation=impl, **kw)
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)  # padding rows: -inf, no gradient
        return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(lse * w_lse)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _check(got, want):
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape
        assert np.isfinite(np.asarray(a, np.float32)).all(), f"d{name} has NaN or inf"
        cos, err = cosine(a, b), rel_err(a, b)
        assert cos >= MIN_COSINE and err <= MAX_REL_ERR, f"d{name}: cosine {cos:.5f}, relative error {err:.3g}"


def _cotangents(rng, q):
    return (jnp.asarray(rng.standard_normal(q.shape, np.float32)),
            jnp.asarray(rng.standard_normal(q.shape[:3], np.float32)))


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backward_matches_reference(rng, case, deterministic):
    q, k, v, _, _, bi, kw = _inputs(rng, case)
    w_out, w_lse = _cotangents(rng, q)
    up = lambda x: x.astype(jnp.float32)
    got = _grads("cuda", q, k, v, bi, kw, w_out, w_lse, deterministic)
    for g, x in zip(got, (q, k, v)):
        assert g.dtype == x.dtype
    _check(got, _grads("xla", up(q), up(k), up(v), bi, kw, w_out, w_lse))


def test_backward_is_the_cuda_kernel(rng):
    q, k, v, _, _, bi, kw = _inputs(rng, (1, 512, 512, 8, 2, 128, "bfloat16", None, None))
    loss = lambda q, k, v: jnp.sum(msa_jax.block_sparse_attention(q, k, v, bi, implementation="cuda", **kw)
                                   .astype(jnp.float32))
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
    assert "msa_sparse_attention_bwd" in text


def test_unselected_blocks_get_exactly_zero_dk_dv(rng):
    """Every query names blocks 0 and 2 only: keys of every other block get exactly 0."""
    B, T, S, Hq, Hkv, D = 1, 1024, 1024, 16, 2, 128
    q, k, v, _, _, _, kw = _inputs(rng, (B, T, S, Hq, Hkv, D, "bfloat16", None, None))
    bi = jnp.asarray(np.broadcast_to(np.array([0, 2, -1], np.int32), (B, T, Hkv, 3)))
    w_out, w_lse = _cotangents(rng, q)
    up = lambda x: x.astype(jnp.float32)
    want = _grads("xla", up(q), up(k), up(v), bi, kw, w_out, w_lse)
    for deterministic in (False, True):
        got = _grads("cuda", q, k, v, bi, kw, w_out, w_lse, deterministic)
        _check(got, want)
        for name, g in (("dk", got[1]), ("dv", got[2])):
            per_block = np.abs(np.asarray(g, np.float32)).reshape(B, S // 128, -1).sum(-1)[0]
            assert (per_block[[0, 2]] > 0).all(), f"{name} of a chosen block is zero"
            assert (per_block[[1, 3, 4, 5, 6, 7]] == 0).all(), f"{name} of unchosen blocks: {per_block}"


def test_deterministic_mode_is_bitwise_repeatable(rng):
    q, k, v, _, _, bi, kw = _inputs(rng, (1, 4096, 4096, 32, 4, 128, "bfloat16", None, None))
    w_out, w_lse = _cotangents(rng, q)
    first = _grads("cuda", q, k, v, bi, kw, w_out, w_lse, deterministic=True)
    second = _grads("cuda", q, k, v, bi, kw, w_out, w_lse, deterministic=True)
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert_bitwise_equal(a, b, name)


@pytest.mark.parametrize("route", ["cudnn", "blocks"])
@pytest.mark.parametrize("case", [(1, 2048, 2048, 16, 2, 128, "bfloat16"), (2, 1536, 1536, 6, 2, 64, "float16")],
                         ids=lambda c: "B{}T{}S{}Hq{}Hkv{}D{}-{}".format(*c))
def test_dense_mode_gradients(rng, case, route):
    """mode="dense" (indexer warm-up): gradients of out, lse and the KL against the reference.
    With plain causal positions the main branch runs through cuDNN ("cudnn",
    msa_jax/dense_cudnn.py, the lse's gradient added there); a q_offset known only at run time
    (value 0) keeps it on the block-sparse kernels over every block ("blocks")."""
    B, T, S, Hq, Hkv, D, dtype = case
    q, k, v, _, _, _, kw = _inputs(rng, (*case, None, None))
    index_q = jnp.asarray(rng.standard_normal((B, T, Hkv, 128), np.float32), q.dtype)
    index_k = jnp.asarray(rng.standard_normal((B, S, 128), np.float32), q.dtype)
    w_out, w_lse = _cotangents(rng, q)
    q_offset = None if route == "cudnn" else jnp.zeros(B, jnp.int32)
    up = lambda x: x.astype(jnp.float32)

    def step(impl):
        def loss(q, k, v, index_q, index_k, q_offset):
            at = {} if q_offset is None else dict(q_offset=q_offset)
            r = msa_jax.sparse_attention(q, k, v, index_q, index_k, top_k=4, mode="dense", implementation=impl,
                                         **kw, **at)
            return jnp.sum(r.out.astype(jnp.float32) * w_out) + jnp.sum(r.lse * w_lse) + r.kl_loss
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))

    text = step("cuda").lower(q, k, v, index_q, index_k, q_offset).as_text()
    cudnn = "__cudnn$fmhaSoftmax" in text, "__cudnn$fmhaSoftmaxBackward" in text
    blocks = "msa_sparse_attention_partials" in text, "msa_sparse_attention_bwd" in text
    assert (cudnn, blocks) == (((True, True), (False, False)) if route == "cudnn" else ((False, False), (True, True)))
    # The KL: over the causal triangle without work lists where cuDNN serves, else the work-list passes.
    assert ("msa_dense_kl" in text, "msa_kl_bwd" in text) == ((True, False) if route == "cudnn" else (False, True))
    got = step("cuda")(q, k, v, index_q, index_k, q_offset)
    want = step("xla")(up(q), up(k), up(v), up(index_q), up(index_k), q_offset)
    _check(got[:3], want[:3])
    for name, a, b in zip(("d index_q", "d index_k"), got[3:], want[3:]):
        cos, err = cosine(a, b), rel_err(a, b)
        assert cos >= MIN_COSINE and err <= MAX_REL_ERR, f"{name}: cosine {cos:.5f}, relative error {err:.3g}"
