"""Pallas's work-list-free KL for dense mode (msa_jax/pallas/dense_kl.py), on any machine.

The three passes (student lse over query tiles, d index_q and the rows' KL over query tiles,
d index_k over key tiles) run in Pallas's interpret mode against the `xla` reference's KL
over every visible key: value and both gradients, G 1 / 3 / 4, sequence lengths that are not
a multiple of the 64-token tile, float32 and bf16. The public ops route plain causal dense
calls of the pallas implementation to it and keep other positions on the work-list kernels.
Its Triton lowering (what a GPU would compile) is checked here too, for the cuda platform, and
on a GPU (marked `gpu`) the compiled kernels run against the same reference.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import msa_jax
from msa_jax import autodiff, dispatch
from msa_jax.config import MSAConfig, Positions
from msa_jax.pallas import dense_kl


def _inputs(seed, B, T, Hq, Hkv, D, Di, dtype):
    r = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(r.standard_normal(s), dtype)
    return n(B, T, Hq, D), n(B, T, Hkv, D), n(B, T, Hkv, Di), n(B, T, Di)


def _reference(q, k, iq, ik, cfg):
    """(value, (d index_q, d index_k)) of the xla implementation's unnormalised KL sum."""
    B, T, Hkv = q.shape[0], q.shape[1], k.shape[2]
    xla = dispatch.implementation("xla")
    pos = Positions(jnp.zeros(B, jnp.int32), jnp.full(B, T, jnp.int32), None)
    bi = jnp.zeros((B, T, Hkv, 1), jnp.int32)  # dense mode ignores the selection
    up = lambda x: x.astype(jnp.float32)
    lse = xla.attention_fwd(up(q), up(k), up(k), bi, pos, cfg)[1]
    loss = lambda iq, ik: autodiff.kl_sum(xla, cfg, False, up(q), up(k), iq, ik, bi, lse, *pos)
    return jax.value_and_grad(loss, argnums=(0, 1))(up(iq), up(ik)), lse


@pytest.mark.parametrize("B, T, Hq, Hkv, D, Di, dtype", [
    (1, 64, 2, 2, 16, 16, "float32"),  # G = 1, one tile
    (2, 150, 6, 2, 32, 16, "float32"),  # G = 3, a partial last tile
    (1, 200, 8, 2, 16, 32, "bfloat16"),  # G = 4, bf16
])
def test_matches_the_reference(B, T, Hq, Hkv, D, Di, dtype):
    q, k, iq, ik = _inputs(0, B, T, Hq, Hkv, D, Di, jnp.dtype(dtype))
    cfg = MSAConfig(block_size=16, mode="dense")
    (want, (want_diq, want_dik)), lse = _reference(q, k, iq, ik, cfg)
    value, (d_iq, d_ik) = jax.jit(functools.partial(dense_kl.kl_fwd, cfg=cfg, interpret=True))(q, k, iq, ik, lse)
    d_ik = jnp.sum(d_ik, axis=2)
    tol = 1e-4 if dtype == "float32" else 2e-2
    assert np.isfinite(float(value)) and float(want) > 0
    np.testing.assert_allclose(float(value), float(want), rtol=tol)
    for name, got, ref in (("d index_q", d_iq, want_diq), ("d index_k", d_ik, want_dik)):
        got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err < tol, f"{name}: relative error {err:.3g}"


def test_public_ops_route_plain_dense_calls_to_it(monkeypatch):
    B, T, Hq, Hkv, D, Di = 1, 96, 4, 2, 16, 16
    q, k, iq, ik = _inputs(1, B, T, Hq, Hkv, D, Di, jnp.float32)
    v = k[..., ::-1]
    calls = []
    real = dense_kl.kl_fwd
    monkeypatch.setattr(dense_kl, "kl_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def loss(impl, iq, ik, **at):
        res = msa_jax.sparse_attention(q, k, v, iq, ik, top_k=2, block_size=16, mode="dense",
                                       implementation=impl, **at)
        return res.kl_loss

    grad = lambda impl, **at: jax.value_and_grad(functools.partial(loss, impl, **at), argnums=(0, 1))(iq, ik)
    want = grad("xla")
    got = grad("pallas")
    assert calls, "the plain dense call did not take the dense KL"
    calls.clear()
    # q_offset as an array known only at run time: the work-list kernels serve it
    traced = jax.jit(lambda off: grad("pallas", q_offset=off))(jnp.zeros(B, jnp.int32))
    assert not calls
    for g in (got, traced):
        np.testing.assert_allclose(float(g[0]), float(want[0]), rtol=1e-4)
        for a, b in zip(g[1], want[1]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("G, D, Di", [(3, 64, 128), (8, 128, 128), (16, 128, 64)])
def test_lowers_to_triton_for_a_gpu(G, D, Di):
    """Pallas's Triton lowering runs at jax's lowering, so a CPU machine can check that every
    operation the kernels use lowers; compiling that IR needs the GPU."""
    B, T, Hkv = 1, 1000, 2
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    f = functools.partial(dense_kl.kl_fwd, cfg=MSAConfig(mode="dense"), interpret=False)
    lowered = jax.jit(f).trace(s(B, T, G * Hkv, D), s(B, T, Hkv, D), s(B, T, Hkv, Di), s(B, T, Di),
                               jax.ShapeDtypeStruct((B, T, G * Hkv), jnp.float32)).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    for name in ("msa_dense_kl_student", "msa_dense_kl_queries", "msa_dense_kl_keys"):
        assert name in text


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the kernels for a GPU")
@pytest.mark.parametrize("T, G, D, Di", [(1000, 3, 64, 128), (1500, 16, 128, 64), (700, 8, 128, 128)])
def test_compiled_kernels_match_the_reference(T, G, D, Di):
    """The Triton-compiled passes (not interpret mode), bf16 inputs: G 3 / 8 / 16, both head
    dims, lengths that pad to a partial tile (1500 -> 1536 rows, not a power of two)."""
    Hkv = 2
    q, k, iq, ik = _inputs(3, 1, T, G * Hkv, Hkv, D, Di, jnp.bfloat16)
    cfg = MSAConfig(mode="dense")
    (want, (want_diq, want_dik)), lse = _reference(q, k, iq, ik, cfg)
    value, (d_iq, d_ik) = jax.jit(functools.partial(dense_kl.kl_fwd, cfg=cfg, interpret=False))(q, k, iq, ik, lse)
    d_ik = jnp.sum(d_ik, axis=2)
    np.testing.assert_allclose(float(value), float(want), rtol=2e-2)
    for name, got, ref in (("d index_q", d_iq, want_diq), ("d index_k", d_ik, want_dik)):
        got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        assert np.isfinite(got).all(), name
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert err < 2e-2, f"{name}: relative error {err:.3g}"
