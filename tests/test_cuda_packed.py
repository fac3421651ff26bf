"""Packed documents (`segment_ids`) in every CUDA kernel (issue #13 item 4), on a Hopper GPU
(every test marked `gpu`).

A document lays its block grid from its own first token, so its blocks start at any key: the
indexer cuts its key tiles per row, the attention and KL kernels load tiles from any key.
Documents here start inside blocks, on block boundaries, and are shorter than one block.

- select_blocks: the packed call equals one call per document exactly (the same scores,
  pooled over the same keys) and at least 99% of rows equal the `xla` reference's.
- sparse_attention end to end (indexer, forward, KL value, backward with the KL gradient)
  against the `xla` reference on the same inputs upcast to float32: at least 99% of rows
  select the same blocks, out, lse (on those rows), kl_loss and
  the gradients of q, k, v, index_q, index_k (cosine >= 0.999, relative error <= 2e-2 for
  q, k, v), D 128 / G 8 bf16 and D 64 / G 3 fp16, atomic and deterministic, and the dense
  warm-up mode; the deterministic mode is bitwise repeatable; nothing falls through to pallas.
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
OUT_TOL = 1e-2
MIN_EXACT_ROWS = 0.99

# Document lengths per batch row (each row sums to T).
DOCS_6000 = ((1000, 77, 128, 2500, 5, 2290), (3000, 3000))
DOCS_20000 = ((300, 4100, 127, 129, 9000, 6344), (20000,))


def _segment_ids(docs):
    return jnp.asarray(np.stack([np.repeat(np.arange(len(row)), row) for row in docs]), jnp.int32)


def _index_inputs(rng, B, T, Hkv, Di):
    index_q = jnp.asarray(rng.standard_normal((B, T, Hkv, Di), np.float32), jnp.bfloat16)
    index_k = jnp.asarray(rng.standard_normal((B, T, Di), np.float32), jnp.bfloat16)
    return index_q, index_k


@pytest.mark.parametrize("Di,top_k", [(128, 16), (64, 32)])
def test_select_blocks_packed_equals_per_document_calls(rng, Di, top_k):
    docs = DOCS_20000
    B, T, Hkv = len(docs), sum(docs[0]), 4
    index_q, index_k = _index_inputs(rng, B, T, Hkv, Di)
    seg = _segment_ids(docs)
    select = lambda impl, iq, ik, **kw: jax.jit(functools.partial(
        msa_jax.select_blocks, top_k=top_k, block_size=128, implementation=impl, **kw))(iq, ik)
    got = np.asarray(select("cuda", index_q, index_k, segment_ids=seg))
    assert got.shape == (B, T, Hkv, top_k)
    for b, row in enumerate(docs):
        start = 0
        for n in row:
            one = select("cuda", index_q[b:b + 1, start:start + n], index_k[b:b + 1, start:start + n])
            np.testing.assert_array_equal(got[b:b + 1, start:start + n], np.asarray(one),
                                          err_msg=f"row {b}, document at {start} (length {n})")
            start += n
    want = np.asarray(select("xla", index_q, index_k, segment_ids=seg))
    exact = np.mean(np.all(got == want, axis=-1))
    assert exact >= MIN_EXACT_ROWS, f"only {exact:.4%} of rows equal the reference's"


def _attention_inputs(rng, B, T, Hq, Hkv, D, dtype):
    dt = jnp.dtype(dtype)
    make = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32), dt)
    q, k, v = make(B, T, Hq, D), make(B, T, Hkv, D), make(B, T, Hkv, D)
    index_q, index_k = _index_inputs(rng, B, T, Hkv, 128)
    return q, k, v, index_q, index_k


def _value_and_grads(impl, xs, w, seg, mode, deterministic):
    def loss(q, k, v, iq, ik):
        r = msa_jax.sparse_attention(q, k, v, iq, ik, top_k=16, block_size=128, mode=mode, segment_ids=seg,
                                     deterministic=deterministic, implementation=impl)
        return jnp.sum(r.out.astype(jnp.float32) * w) + r.kl_loss, r

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(*xs)


# (Hq, Hkv, D, dtype, mode, deterministic)
END_TO_END = (
    (16, 2, 128, "bfloat16", "sparse", False),
    (6, 2, 64, "float16", "sparse", True),
    (16, 2, 128, "bfloat16", "dense", False),
)


@pytest.mark.parametrize("Hq,Hkv,D,dtype,mode,deterministic", END_TO_END,
                         ids=lambda x: str(x))
def test_sparse_attention_packed_matches_reference(rng, Hq, Hkv, D, dtype, mode, deterministic):
    docs = DOCS_6000
    B, T = len(docs), sum(docs[0])
    xs = _attention_inputs(rng, B, T, Hq, Hkv, D, dtype)
    w = jnp.asarray(rng.standard_normal((B, T, Hq, D), np.float32))
    seg = _segment_ids(docs)
    up = lambda x: x.astype(jnp.float32)
    (_, got), got_g = _value_and_grads("cuda", xs, w, seg, mode, deterministic)
    (_, want), want_g = _value_and_grads("xla", (*map(up, xs[:3]), *xs[3:]), w, seg, mode, False)
    # The two indexers sum bf16 products in other orders: near-ties may pick other blocks in a
    # few rows (2 of 384000 entries in one run); compare per-row values where every group agrees.
    same = np.all(np.asarray(got.block_indices) == np.asarray(want.block_indices), axis=(2, 3))  # [B, T]
    assert same.mean() >= MIN_EXACT_ROWS, f"only {same.mean():.4%} of rows select what the reference does"
    err = rel_err(got.out, want.out)
    assert err <= OUT_TOL, f"out relative error {err:.3g}"
    got_lse, want_lse = np.asarray(got.lse)[same], np.asarray(want.lse)[same]
    finite = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isfinite(got_lse), finite)
    np.testing.assert_allclose(got_lse[finite], want_lse[finite], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(float(got.kl_loss), float(want.kl_loss), rtol=1e-2)
    for name, a, b in zip(("q", "k", "v", "index_q", "index_k"), got_g, want_g):
        assert np.isfinite(np.asarray(a, np.float32)).all(), f"d {name} has NaN or inf"
        cos = cosine(a, b)
        assert cos >= MIN_COSINE, f"d {name}: cosine {cos:.5f}"
        if name in ("q", "k", "v"):
            assert rel_err(a, b) <= MAX_REL_ERR, f"d {name}: relative error {rel_err(a, b):.3g}"


def test_packed_deterministic_is_bitwise_repeatable_and_all_cuda(rng):
    docs = DOCS_6000
    B, T = len(docs), sum(docs[0])
    xs = _attention_inputs(rng, B, T, 16, 2, 128, "bfloat16")
    w = jnp.asarray(rng.standard_normal((B, T, 16, 128), np.float32))
    seg = _segment_ids(docs)
    first = _value_and_grads("cuda", xs, w, seg, "sparse", True)
    second = _value_and_grads("cuda", xs, w, seg, "sparse", True)
    for name, a, b in zip(("q", "k", "v", "index_q", "index_k"), first[1], second[1]):
        assert_bitwise_equal(a, b, f"d {name}")
    assert_bitwise_equal(first[0][1].out, second[0][1].out, "out")

    # The default implementation on the GPU runs every op through the CUDA kernels.
    def loss(q, k, v, iq, ik):
        r = msa_jax.sparse_attention(q, k, v, iq, ik, top_k=16, block_size=128, segment_ids=seg)
        return jnp.sum(r.out.astype(jnp.float32) * w) + r.kl_loss

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*xs).as_text()
    for target in ("msa_select_blocks", "msa_sparse_attention_partials", "msa_sparse_attention_bwd",
                   "msa_kl_partials", "msa_kl_bwd"):
        assert target in text, f"{target} not in the lowered gradient"
    assert not any(word in text.lower() for word in ("pallas", "triton", "mosaic")), "a Pallas kernel in the gradient"
