"""The `cuda` implementation (issue #5): the SM90 indexer and the KV-outer attention forward.

Everywhere (CPU included): the implementation is registered, `supports` gives a reason for
every call it cannot serve (no extension, no GPU, an op without a CUDA kernel, an
unsupported shape), and the dispatcher falls through to the next implementation.

On a Hopper GPU (marked `gpu`): the SM90 indexer against the `xla` reference on the same
bf16 inputs, at T = S up to 64K and chunked prefill (T = 8K against S = 128K), with ragged
kv_length, padding rows, decode, Di 64/128, top_k 16/32, and fp16 index heads once per
(Di, top_k) instantiation. Rows must equal the reference's
except at near-ties (selection_check: every chosen block scores within 1e-3 of the row's
top-(K-1) threshold; the spec's layout, order up to near-ties), and at least 99% of rows must be
identical. Also: the tie rule on constant scores (exact), bitwise repeatability, vmap, and
that the default implementation on the GPU really is the CUDA kernel.

The attention forward (marked `gpu`): block_sparse_attention with implementation="cuda"
against the `xla` reference on the same inputs upcast to float32, over the CUDA indexer's
selections: T = S up to 64K, chunked prefill 8K against 128K, G 1, 2, 3, 4, 7, 8, 16, D 64
and 128, bf16 and fp16, ragged rows with padding, decode; out within 1e-2 (relative norm),
lse within 1e-3 * max(1, |lse|) with -inf where the reference has it. Then gradients
and sparse_attention end to end (the CUDA backward; its own tests: test_cuda_bwd.py),
cosine >= 0.999, and a bitwise-repeatable forward.

The conformance suite (marked `gpu`, TestCudaGPU): every test of tests/conformance.py with
implementation="cuda" against the float64 oracle, on cases cuda serves (block 128, bf16, one
of them packed documents that start inside blocks) and the fixed-shape tests at block 128 /
bf16 / D = Di = 64. index_kl_loss alone runs the CUDA forward for its teacher's lse and the
CUDA KL passes (their own tests: test_cuda_kl.py); packed documents have their own GPU tests
too (test_cuda_packed.py).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import msa_jax
from msa_jax import cuda as cuda_impl
from msa_jax import dispatch
from conformance import Case, ConformanceSuite, assert_bitwise_equal, assert_lse_close_scaled, cosine, rel_err
from selection_check import block_scores, check_selection, query_blocks

TIE_TOL = 1e-3  # selection: slack on the max-pooled index score (issue #4's tolerance)
MIN_EXACT_ROWS = 0.99  # selection: fraction of rows identical to the reference

requires_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a Hopper GPU")


def _call(op="select_blocks", **overrides):
    cfg = msa_jax.MSAConfig(**overrides.pop("config", {}))
    fields = dict(op=op, batch=1, q_len=256, kv_len=256, num_q_heads=8, num_kv_heads=2, head_dim=128,
                  index_head_dim=128, dtype="bfloat16", index_dtype="bfloat16", has_segments=False,
                  config=cfg, platform=jax.default_backend())
    fields.update(overrides)
    return msa_jax.config.CallInfo(**fields)


# ---- everywhere ------------------------------------------------------------------------


def test_cuda_is_registered_and_explains_itself():
    impl = dispatch._REGISTRY["cuda"]
    assert isinstance(impl, cuda_impl.CudaImplementation)
    assert "no CUDA kernel for paged" in impl.supports(_call("paged_block_sparse_attention"))
    for op in ("select_blocks", "sparse_attention", "block_sparse_attention", "index_kl_loss", "paged_select_blocks",
               "paged_sparse_attention"):
        assert "no CUDA kernel" not in (impl.supports(_call(op)) or "")
    assert "needs a CUDA GPU" in impl.supports(_call(platform="cpu"))


def test_default_order_puts_cuda_first_on_gpu():
    assert dispatch.default_order("gpu") == ("cuda", "pallas", "xla")
    assert dispatch.default_order("cpu") == ("xla",)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU fall-through")
def test_cuda_falls_through_on_cpu(rng):
    index_q = jnp.asarray(rng.standard_normal((1, 64, 2, 16)), jnp.float32)
    index_k = jnp.asarray(rng.standard_normal((1, 64, 16)), jnp.float32)
    kw = dict(top_k=2, block_size=16)
    with pytest.raises(NotImplementedError, match="cuda: needs a CUDA GPU, the platform is cpu"):
        msa_jax.select_blocks(index_q, index_k, implementation="cuda", **kw)
    got = msa_jax.select_blocks(index_q, index_k, implementation=("cuda", "xla"), **kw)
    want = msa_jax.select_blocks(index_q, index_k, implementation="xla", **kw)
    np.testing.assert_array_equal(got, want)


def test_unsupported_shapes_have_reasons(monkeypatch):
    impl = cuda_impl.CudaImplementation()
    # Pretend the extension and a Hopper GPU are there: the shape checks come next.
    monkeypatch.setattr(cuda_impl.ffi, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cuda_impl, "_device_reason", lambda: None)
    gpu_call = dict(platform="gpu")
    assert impl.supports(_call(**gpu_call)) is None
    assert impl.supports(_call(index_dtype="float16", **gpu_call)) is None
    assert "index dtype float32" in impl.supports(_call(index_dtype="float32", **gpu_call))
    assert "Di=96" in impl.supports(_call(index_head_dim=96, **gpu_call))
    assert "block_size=64" in impl.supports(_call(config=dict(block_size=64), **gpu_call))
    assert "top_k=33" in impl.supports(_call(config=dict(top_k=33), **gpu_call))
    for op in ("select_blocks", "block_sparse_attention", "sparse_attention", "index_kl_loss"):
        assert impl.supports(_call(op, has_segments=True, **gpu_call)) is None  # packed documents
    # The attention and KL kernels' own limits.
    for op in ("block_sparse_attention", "sparse_attention", "index_kl_loss"):
        assert impl.supports(_call(op, **gpu_call)) is None
        assert impl.supports(_call(op, head_dim=64, dtype="float16", **gpu_call)) is None
        assert "dtype float32" in impl.supports(_call(op, dtype="float32", **gpu_call))
        assert "D=96" in impl.supports(_call(op, head_dim=96, **gpu_call))
        assert "G=128" in impl.supports(_call(op, num_q_heads=256, **gpu_call))
    # block_sparse_attention has no index branch: the indexer's limits do not apply.
    assert impl.supports(_call("block_sparse_attention", config=dict(top_k=48), index_head_dim=None,
                               index_dtype=None, **gpu_call)) is None


# ---- on the GPU --------------------------------------------------------------------------

# (B, T, S, Hkv, Di, top_k, q_offset, kv_length); None = the spec's defaults.
SELECT_CASES = (
    (2, 4096, 4096, 4, 128, 16, None, None),
    (1, 32768, 32768, 4, 128, 16, None, None),
    (1, 65536, 65536, 2, 128, 16, None, None),
    (1, 8192, 131072, 4, 128, 16, None, None),  # chunked prefill, q_offset = S - T
    (1, 8192, 8192, 8, 64, 32, None, None),  # config B's groups, Di 64, top_k 32
    (3, 1000, 3000, 2, 128, 16, (2000, 500, -300), (3000, 2100, 1500)),  # ragged, padding rows
    (2, 16, 100000, 4, 128, 16, None, (100000, 77777)),  # multi-token decode
    (2, 1, 5000, 4, 64, 16, None, (5000, 130)),  # decode, T = 1
)


def _case_id(c):
    return "B{}T{}S{}Hkv{}Di{}K{}".format(*c[:6]) + ("-ragged" if c[6] is not None else "")


def _inputs(rng, B, T, S, Hkv, Di, dtype=jnp.bfloat16):
    index_q = jnp.asarray(rng.standard_normal((B, T, Hkv, Di), np.float32), dtype)
    index_k = jnp.asarray(rng.standard_normal((B, S, Di), np.float32), dtype)
    return index_q, index_k


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("case", SELECT_CASES, ids=_case_id)
def test_select_blocks_matches_reference(rng, case):
    _check_select_blocks(rng, case, jnp.bfloat16)


# fp16 index heads: every (Di, top_k <= 16 or <= 32) instantiation, ragged rows, decode.
FP16_SELECT_CASES = (SELECT_CASES[0], SELECT_CASES[4], SELECT_CASES[5], SELECT_CASES[7],
                     (1, 4096, 4096, 2, 128, 32, None, None))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("case", FP16_SELECT_CASES, ids=_case_id)
def test_select_blocks_fp16_index_heads(rng, case):
    _check_select_blocks(rng, case, jnp.float16)


def _check_select_blocks(rng, case, dtype):
    B, T, S, Hkv, Di, K, q_offset, kv_length = case
    index_q, index_k = _inputs(rng, B, T, S, Hkv, Di, dtype)
    kw = dict(top_k=K, block_size=128)
    if q_offset is not None:
        kw["q_offset"] = np.asarray(q_offset, np.int32)
    if kv_length is not None:
        kw["kv_length"] = np.asarray(kv_length, np.int32)
    got = jax.block_until_ready(msa_jax.select_blocks(index_q, index_k, implementation="cuda", **kw))
    want = msa_jax.select_blocks(index_q, index_k, implementation="xla", **kw)
    assert got.dtype == jnp.int32 and got.shape == (B, T, Hkv, K)

    kv = np.full(B, S) if kv_length is None else np.asarray(kv_length)
    qo = kv - T if q_offset is None else np.asarray(q_offset)
    local, valid = query_blocks(qo, kv, T, 128)
    scores = block_scores(index_q, index_k, block_size=128)
    check_selection(want, scores, local, K, 1e-5, "reference", valid=valid)  # the checker can fail
    check_selection(got, scores, local, K, TIE_TOL, "cuda", valid=valid)
    exact = np.mean(np.all(np.asarray(got) == np.asarray(want), axis=-1))
    assert exact >= MIN_EXACT_ROWS, f"only {exact:.4%} of rows equal the reference's"


@pytest.mark.gpu
@requires_gpu
def test_constant_scores_follow_tie_rule(rng):
    """Every block scores the same: the smallest ids win, in ascending order (exact)."""
    B, T, S, Hkv, Di, K = 1, 3000, 3000, 2, 128, 16
    index_q, _ = _inputs(rng, B, T, S, Hkv, Di)
    index_k = jnp.broadcast_to(jnp.asarray(rng.standard_normal((1, 1, Di)), jnp.bfloat16), (B, S, Di))
    kw = dict(top_k=K, block_size=128)
    got = msa_jax.select_blocks(index_q, index_k, implementation="cuda", **kw)
    want = msa_jax.select_blocks(index_q, index_k, implementation="xla", **kw)
    np.testing.assert_array_equal(got, want)
    L = np.arange(T) // 128
    expected = [list(range(min(K - 1, l))) + [l] + [-1] * (K - 1 - min(K - 1, l)) for l in L]
    np.testing.assert_array_equal(np.asarray(got)[0, :, 0], np.asarray(expected, np.int32))


@pytest.mark.gpu
@requires_gpu
def test_select_blocks_is_repeatable_and_vmaps(rng):
    index_q, index_k = _inputs(rng, 3, 2048, 2048, 4, 128)
    f = jax.jit(lambda q, k: msa_jax.select_blocks(q, k, top_k=16, block_size=128, implementation="cuda"))
    first, second = np.asarray(f(index_q, index_k)), np.asarray(f(index_q, index_k))
    np.testing.assert_array_equal(first, second)
    # vmap over a leading axis (here: the batch split in two calls' worth) = per-element calls.
    mapped = jax.vmap(f)(index_q[:, None], index_k[:, None])[:, 0]
    np.testing.assert_array_equal(np.asarray(mapped), first)


@pytest.mark.gpu
@requires_gpu
def test_default_on_hopper_is_the_cuda_kernel(rng):
    index_q, index_k = _inputs(rng, 1, 512, 512, 2, 128)
    text = jax.jit(lambda q, k: msa_jax.select_blocks(q, k, top_k=16, block_size=128)).lower(index_q, index_k).as_text()
    assert "msa_select_blocks" in text



# ---- attention forward on the GPU ----------------------------------------------------------

OUT_TOL = 1e-2  # ||out - ref|| / ||ref|| (issue #4's tolerances)
LSE_TOL = 1e-3  # |lse - ref| / max(1, |lse|)
MIN_COSINE = 0.999  # gradients against the float32 reference

# (B, T, S, Hq, Hkv, D, dtype, q_offset, kv_length); None = the spec's defaults.
ATTENTION_CASES = (
    (1, 4096, 4096, 16, 2, 128, "bfloat16", None, None),
    (1, 32768, 32768, 64, 4, 128, "bfloat16", None, None),  # config A's heads
    (1, 65536, 65536, 16, 2, 128, "bfloat16", None, None),
    (1, 8192, 131072, 16, 2, 128, "bfloat16", None, None),  # chunked prefill
    (1, 2048, 2048, 2, 2, 128, "bfloat16", None, None),  # G = 1
    (1, 2048, 2048, 4, 2, 128, "bfloat16", None, None),  # G = 2
    (1, 2048, 2048, 6, 2, 128, "bfloat16", None, None),  # G = 3: 63 of 64 rows per step used
    (1, 2048, 2048, 8, 2, 128, "bfloat16", None, None),  # G = 4
    (1, 2048, 2048, 7, 1, 128, "bfloat16", None, None),  # G = 7
    (1, 4096, 4096, 32, 4, 64, "float16", None, None),  # D = 64, fp16, G = 8
    (1, 2048, 2048, 32, 2, 64, "bfloat16", None, None),  # D = 64, G = 16
    (3, 1000, 3000, 16, 2, 128, "bfloat16", (2000, 500, -300), (3000, 2100, 1500)),  # ragged + padding
    (2, 16, 100000, 16, 2, 128, "bfloat16", None, (100000, 77777)),  # multi-token decode
    (2, 1, 5000, 8, 2, 128, "float16", None, (5000, 130)),  # decode, T = 1
)


def _attention_case_id(c):
    return "B{}T{}S{}Hq{}Hkv{}D{}-{}".format(*c[:7]) + ("-ragged" if c[7] is not None or c[8] is not None else "")


def _attention_inputs(rng, case):
    B, T, S, Hq, Hkv, D, dtype, q_offset, kv_length = case
    dt = jnp.dtype(dtype)
    q = jnp.asarray(rng.standard_normal((B, T, Hq, D), np.float32), dt)
    k = jnp.asarray(rng.standard_normal((B, S, Hkv, D), np.float32), dt)
    v = jnp.asarray(rng.standard_normal((B, S, Hkv, D), np.float32), dt)
    index_q, index_k = _inputs(rng, B, T, S, Hkv, 128)
    kw = dict(block_size=128)
    if q_offset is not None:
        kw["q_offset"] = np.asarray(q_offset, np.int32)
    if kv_length is not None:
        kw["kv_length"] = np.asarray(kv_length, np.int32)
    bi = msa_jax.select_blocks(index_q, index_k, top_k=16, implementation="cuda", **kw)
    return q, k, v, index_q, index_k, bi, kw


def _bsa(impl, q, k, v, bi, kw):
    return msa_jax.block_sparse_attention(q, k, v, bi, return_lse=True, implementation=impl, **kw)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=_attention_case_id)
def test_attention_forward_matches_reference(rng, case):
    q, k, v, _, _, bi, kw = _attention_inputs(rng, case)
    up = lambda x: x.astype(jnp.float32)
    out, lse = jax.block_until_ready(jax.jit(lambda *a: _bsa("cuda", *a, kw))(q, k, v, bi))
    want_out, want_lse = jax.jit(lambda *a: _bsa("xla", *a, kw))(up(q), up(k), up(v), bi)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == jnp.float32
    assert np.isfinite(np.asarray(out, np.float32)).all(), "out has NaN or inf"
    err = rel_err(out, want_out)
    assert err <= OUT_TOL, f"out relative error {err:.3g} > {OUT_TOL}"
    assert_lse_close_scaled(lse, want_lse, LSE_TOL)


@pytest.mark.gpu
@requires_gpu
def test_attention_forward_is_repeatable(rng):
    q, k, v, _, _, bi, kw = _attention_inputs(rng, (2, 4096, 4096, 32, 4, 128, "bfloat16", None, None))
    f = jax.jit(lambda *a: _bsa("cuda", *a, kw))
    assert "msa_sparse_attention_partials" in f.lower(q, k, v, bi).as_text()
    first, second = f(q, k, v, bi), f(q, k, v, bi)
    for name, a, b in zip(("out", "lse"), first, second):
        assert_bitwise_equal(a, b, name)


@pytest.mark.gpu
@requires_gpu
def test_attention_grads_and_sparse_attention_end_to_end(rng):
    """Gradients through cuda (CUDA forward and backward) and sparse_attention with the
    CUDA indexer, forward, backward and KL, against the float32 reference."""
    q, k, v, index_q, index_k, bi, kw = _attention_inputs(rng, (1, 4096, 4096, 16, 2, 128, "bfloat16", None, None))
    w = jnp.asarray(rng.standard_normal(q.shape, np.float32))
    up = lambda x: x.astype(jnp.float32)

    def loss(impl, q, k, v):
        out = msa_jax.block_sparse_attention(q, k, v, bi, implementation=impl, **kw)
        return jnp.sum(out.astype(jnp.float32) * w)

    got = jax.jit(jax.grad(functools.partial(loss, "cuda"), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2)))(up(q), up(k), up(v))
    for name, a, b in zip("qkv", got, want):
        assert cosine(a, b) >= MIN_COSINE, f"d{name} cosine {cosine(a, b):.5f}"

    def full(impl, q, k, v, iq, ik):
        r = msa_jax.sparse_attention(q, k, v, iq, ik, top_k=16, mode="sparse", implementation=impl, **kw)
        return jnp.sum(r.out.astype(jnp.float32) * w) + r.kl_loss, r

    text = jax.jit(functools.partial(full, "cuda")).lower(q, k, v, index_q, index_k).as_text()
    assert "msa_select_blocks" in text and "msa_sparse_attention_partials" in text
    (_, got_r), got_g = jax.jit(jax.value_and_grad(functools.partial(full, "cuda"), argnums=(3, 4), has_aux=True))(
        q, k, v, index_q, index_k)
    (_, want_r), want_g = jax.jit(jax.value_and_grad(functools.partial(full, "xla"), argnums=(3, 4), has_aux=True))(
        up(q), up(k), up(v), index_q, index_k)
    np.testing.assert_array_equal(np.asarray(got_r.block_indices), np.asarray(bi))
    assert rel_err(got_r.out, want_r.out) <= OUT_TOL
    np.testing.assert_allclose(float(got_r.kl_loss), float(want_r.kl_loss), rtol=1e-2)
    for name, a, b in zip(("index_q", "index_k"), got_g, want_g):
        assert cosine(a, b) >= MIN_COSINE, f"d {name} cosine {cosine(a, b):.5f}"


# ---- the conformance suite ---------------------------------------------------------------

# What cuda serves, at block 128 in bf16 (fp16 attention, index heads and KL are covered
# above and in test_cuda_kl.py). Chunked prefill with ragged rows and padding at both ends, G 16
# with Di 64, G 3 and 7 with D 64, decode with a padding row, G 1.
CUDA_CASES = (
    Case(2, 300, 700, 8, 2, 128, 128, 128, 4, "bfloat16", q_offset=(400, -50), kv_length=(700, 200)),
    Case(1, 600, 600, 16, 1, 128, 64, 128, 16, "bfloat16"),
    Case(2, 520, 520, 12, 4, 64, 128, 128, 3, "bfloat16"),
    Case(2, 1, 900, 8, 1, 128, 128, 128, 16, "bfloat16", kv_length=(900, 300)),
    Case(1, 640, 640, 7, 1, 64, 64, 128, 5, "bfloat16"),
    Case(1, 384, 384, 4, 4, 128, 128, 128, 2, "bfloat16"),
    # Packed documents whose starts (0, 300, 377, 1277) cut the key tiles anywhere.
    Case(1, 1400, 1400, 8, 2, 64, 128, 128, 3, "bfloat16", segments=(300, 77, 900, 123)),
)


@pytest.mark.gpu
@requires_gpu
class TestCudaGPU(ConformanceSuite):
    implementation = "cuda"
    CASES = CUDA_CASES
    GRAD_CASES = (CUDA_CASES[0], CUDA_CASES[2], CUDA_CASES[6])
    fixed_block = 128
    fixed_dtype = "bfloat16"
    fixed_dim = 64
