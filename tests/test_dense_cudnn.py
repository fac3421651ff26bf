"""Dense mode's main branch through cuDNN (msa_jax/dense_cudnn.py), on any machine.

cuDNN runs only on an NVIDIA GPU (tests/test_cuda_bwd.py runs it there against the
reference). Here its one call site, `dense_cudnn._causal`, is replaced by a float32 jnp
emulation of what it returns (causal attention and the rows' log-sum-exp), so that what the
module adds around cuDNN is checked in CI: the lse's gradient (cuDNN's backward ignores a
cotangent on its statistics), no extra work when nothing differentiates the lse, and which
calls `autodiff.main_branch` sends to an implementation's dense kernel.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from msa_jax import autodiff, dense_cudnn, dispatch
from msa_jax import pallas as pallas_impl
from msa_jax.config import MSAConfig, Positions
from msa_jax.partitioning import AutoSharded
from msa_jax.positions import is_plain_causal

B, T, HQ, HKV, D = 2, 48, 6, 2, 16
SCALE = 0.3


def _reference(q, k, v, scale):
    """(out, lse) of causal GQA attention in float32, differentiable in all of q, k, v."""
    G = q.shape[2] // k.shape[2]
    kk, vv = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
    s = scale * jnp.einsum("bthd,bshd->bhts", q, kk)
    s = jnp.where(jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool)), s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", jnp.exp(s - lse[..., None]), vv)
    return out, jnp.swapaxes(lse, 1, 2)


@pytest.fixture
def emulated(monkeypatch):
    """Replaces cuDNN with the reference; returns the list of calls made to it."""
    calls = []

    def fake(q, k, v, scale, with_lse):
        calls.append(with_lse)
        out, lse = _reference(q, k, v, scale)
        return (out, lse) if with_lse else out

    monkeypatch.setattr(dense_cudnn, "_causal", fake)
    return calls


def _inputs(seed=0):
    r = np.random.default_rng(seed)
    n = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)
    return n(B, T, HQ, D), n(B, T, HKV, D), n(B, T, HKV, D), n(B, T, HQ, D), n(B, T, HQ)


def test_lse_gradient_matches_autodiff_of_the_reference(emulated):
    q, k, v, w_out, w_lse = _inputs()

    def loss(fn, q, k, v):
        out, lse = fn(q, k, v, SCALE)
        return jnp.sum(out * w_out) + jnp.sum(lse * w_lse)

    got = jax.grad(lambda *a: loss(dense_cudnn.attention, *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss(_reference, *a), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5, err_msg=f"d{name}")
    # the lse term must matter in this check: without it dq, dk differ from the reference
    only_out = jax.grad(lambda *a: jnp.sum(_reference(*a, SCALE)[0] * w_out), argnums=(0, 1))(q, k, v)
    assert float(jnp.max(jnp.abs(only_out[0] - want[0]))) > 1e-2
    assert float(jnp.max(jnp.abs(only_out[1] - want[1]))) > 1e-2


def test_no_lse_work_when_nothing_differentiates_the_lse(emulated):
    q, k, v, w_out, _ = _inputs(1)
    jax.grad(lambda q, k, v: jnp.sum(dense_cudnn.attention(q, k, v, SCALE)[0] * w_out), argnums=(0, 1, 2))(q, k, v)
    assert emulated == [True], emulated  # the forward alone; the lse's backward made no call
    emulated.clear()
    jax.grad(lambda q, k, v: jnp.sum(dense_cudnn.attention(q, k, v, SCALE)[1]), argnums=(0, 1))(q, k, v)
    assert emulated == [True, False, False], emulated


@pytest.mark.parametrize(
    "q_offset, kv_length, segments, T_, S_, want",
    [
        (None, None, False, 64, 64, True),
        (0, 64, False, 64, 64, True),
        (np.zeros(2, np.int32), np.full(2, 64, np.int32), False, 64, 64, True),  # concrete arrays
        (None, None, False, 16, 64, False),  # queries at the end of longer keys
        (1, None, False, 64, 64, False),
        (None, 63, False, 64, 64, False),
        (np.array([0, 1], np.int32), None, False, 64, 64, False),
        (None, None, True, 64, 64, False),  # packed documents
    ],
)
def test_is_plain_causal(q_offset, kv_length, segments, T_, S_, want):
    seg = np.zeros((2, T_), np.int32) if segments else None
    assert is_plain_causal(q_offset, kv_length, seg, q_len=T_, kv_len=S_) is want


def test_is_plain_causal_is_false_for_traced_positions():
    seen = []
    jax.jit(lambda off: seen.append(is_plain_causal(off, None, None, q_len=8, kv_len=8)) or off)(jnp.zeros(2, jnp.int32))
    assert seen == [False]


class _DenseStub(type(dispatch.implementation("xla"))):
    """The xla implementation with a dense kernel that records its calls."""

    def __init__(self, serve: bool):
        self.serve, self.calls = serve, 0

    def dense_attention(self, q, k, v, cfg):
        self.calls += 1
        return _reference(q, k, v, cfg.scale(q.shape[-1])) if self.serve else None


@pytest.mark.parametrize("mode, plain, serve, want_calls", [
    ("dense", True, True, 1), ("dense", False, True, 0), ("sparse", True, True, 0), ("dense", True, False, 1),
])
def test_main_branch_routes_dense_plain_calls_to_the_dense_kernel(mode, plain, serve, want_calls):
    q, k, v, _, _ = _inputs(2)
    cfg = MSAConfig(top_k=2, block_size=16, mode=mode)
    bi = jnp.broadcast_to(jnp.array([2, 1], jnp.int32), (B, T, HKV, 2))
    pos = (jnp.zeros(B, jnp.int32), jnp.full(B, T, jnp.int32), None)
    impl = _DenseStub(serve)
    out, lse = autodiff.main_branch(impl, cfg, plain, q, k, v, bi, *pos)
    assert impl.calls == want_calls
    # several devices: the dispatcher's partitioning wrapper passes the dense kernel through
    autodiff.main_branch(AutoSharded(impl), cfg, plain, q, k, v, bi, *pos)
    assert impl.calls == 2 * want_calls
    want = autodiff.attention(dispatch.implementation("xla"), cfg, q, k, v, bi, *pos)
    # whichever route served it, the result is the xla implementation's for that mode
    np.testing.assert_allclose(np.asarray(out), np.asarray(want[0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode, plain, serve, want_calls", [("dense", True, True, 1), ("dense", False, True, 0)])
def test_teacher_lse_routes_like_the_main_branch(mode, plain, serve, want_calls):
    q, k, _, _, _ = _inputs(3)
    cfg = MSAConfig(top_k=2, block_size=16, mode=mode)
    bi = jnp.broadcast_to(jnp.array([2, 1], jnp.int32), (B, T, HKV, 2))
    pos = Positions(jnp.zeros(B, jnp.int32), jnp.full(B, T, jnp.int32), None)
    impl = _DenseStub(serve)
    lse = autodiff.teacher_lse(impl, cfg, plain, q, k, bi, pos)
    assert impl.calls == want_calls
    want = dispatch.implementation("xla").attention_lse(q, k, bi, pos, cfg)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_no_cudnn_route_off_a_gpu():
    """On CPU (and in Pallas's interpret mode) dense mode keeps the implementation's kernels."""
    q, k, v, _, _ = _inputs(4)
    cfg = MSAConfig(mode="dense")
    assert dense_cudnn.serve(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), 0.25) is None
    for interpret in (True, False):
        assert pallas_impl.PallasImplementation(interpret).dense_attention(q, k, v, cfg) is None


def test_causal_lse_is_the_students_log_sum_exp(emulated, monkeypatch):
    """`causal_lse` (dense mode's ilse for the cuda KL kernel): one cuDNN call with the index
    heads as queries and index_k as the single key head, its lse kept, nothing else."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(dense_cudnn, "unavailable_reason", lambda dtype: None)
    r = np.random.default_rng(3)
    iq = jnp.asarray(r.standard_normal((B, T, HKV, D)), jnp.float32)
    ik = jnp.asarray(r.standard_normal((B, T, D)), jnp.float32)
    got = dense_cudnn.causal_lse(iq, ik, SCALE)
    s = SCALE * jnp.einsum("bthd,bsd->bhts", iq, ik)
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    want = jnp.swapaxes(jax.nn.logsumexp(s, axis=-1), 1, 2)
    assert got.shape == (B, T, HKV)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert emulated == [True]
