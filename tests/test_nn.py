"""msa_jax.nn: the Flax layer is a thin, exact shell over sparse_attention."""

import dataclasses
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

import msa_jax
from msa_jax.nn import (GQAAttention, KVCache, MSAAttention, MSAAttentionConfig, RopeScaling, init_paged_kv_cache, rope,
                        rope_frequencies)

CFG = MSAAttentionConfig(d_model=32, num_q_heads=4, num_kv_heads=2, head_dim=8, index_head_dim=8, top_k=2, block_size=4)


def _x(rng, B=2, T=30):
    return jnp.asarray(rng.standard_normal((B, T, CFG.d_model)), jnp.float32)


@pytest.mark.parametrize("cls", [GQAAttention, MSAAttention])
def test_cached_prefill_and_decode_equal_full_forward(rng, cls):
    """T=30 > top_k*block_size=8, so the sparse layer really drops blocks."""
    layer = cls(CFG, rngs=nnx.Rngs(0))
    x = _x(rng)
    full = layer(x, mode="sparse")
    r = layer(x[:, :17], cache=KVCache.init(CFG, 2, 40, jnp.float32))
    outs, cache = [r.out], r.cache
    for t in range(17, 30):
        r = layer(x[:, t:t + 1], cache=cache)
        outs.append(r.out)
        cache = r.cache
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full.out), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.length), [30, 30])


def _paged_decode(layer, x, lengths, steps, rng, **dtypes):
    """Right-padded prompts of `lengths` prefilled in one call through a paged cache (pages
    in a scrambled order), then `steps` decode calls; returns each row's outputs [len + steps, d]."""
    B = x.shape[0]
    caps = np.asarray(lengths) + steps
    n_pages = int(np.sum(-(-caps // CFG.block_size)))
    table, P = msa_jax.make_page_table(caps, CFG.block_size, permutation=rng.permutation(n_pages))
    cache = init_paged_kv_cache(CFG, table, num_pages=P, **dtypes)
    prompt = np.zeros((B, max(lengths), x.shape[2]), np.float32)
    for b, n in enumerate(lengths):
        prompt[b, :n] = x[b, :n]
    graphdef, state = nnx.split(layer)
    call = jax.jit(lambda state, x, cache, num_new: nnx.merge(graphdef, state)(x, cache=cache, num_new=num_new))
    r = call(state, jnp.asarray(prompt), cache, jnp.asarray(lengths, jnp.int32))
    outs = [[r.out[b, :n]] for b, n in enumerate(lengths)]
    cache = r.cache
    for i in range(steps):
        r = call(state, jnp.stack([x[b, n + i] for b, n in enumerate(lengths)])[:, None], cache, None)
        cache = r.cache
        for b in range(B):
            outs[b].append(r.out[b])
    np.testing.assert_array_equal(np.asarray(cache.kv_length), caps)
    return [np.asarray(jnp.concatenate(o, 0)) for o in outs]


@pytest.mark.parametrize("cls", [GQAAttention, MSAAttention])
def test_paged_ragged_prefill_and_decode_equal_full_forward(rng, cls):
    """Prompts of 21 and 9 tokens in one padded prefill, then 9 decode steps: every row
    equals the full forward of its own sequence (30 > top_k*block_size = 8 tokens)."""
    layer = cls(CFG, rngs=nnx.Rngs(7))
    x = _x(rng)
    got = _paged_decode(layer, x, (21, 9), 9, rng, kv_dtype=jnp.float32)
    for b, n in enumerate((30, 18)):
        want = np.asarray(layer(x[b:b + 1, :n], mode="sparse").out[0])
        np.testing.assert_allclose(got[b], want, rtol=1e-5, atol=1e-5)


def test_paged_fp8_cache_is_close(rng):
    """FP8 K/V pages give the fp32 pages' outputs to within FP8 rounding (same selection:
    the index pages stay fp32; FP8 selection is approximate, test_paged.py measures it).
    Measured: 2.1-2.6% relative error (rows of 30 and 18 tokens, D 8, three seeds)."""
    layer = MSAAttention(CFG, rngs=nnx.Rngs(8))
    x = _x(rng)
    exact = _paged_decode(layer, x, (21, 9), 9, np.random.default_rng(0), kv_dtype=jnp.float32)
    fp8 = _paged_decode(layer, x, (21, 9), 9, np.random.default_rng(0), kv_dtype=jnp.float8_e4m3fn,
                        index_dtype=jnp.float32)
    for a, b in zip(exact, fp8):
        rel = np.linalg.norm(a - b) / np.linalg.norm(a)
        assert 1e-3 < rel < 0.06, rel


def test_paged_decode_loop_in_one_jit(rng):
    """The layer's decode step through a paged cache runs inside lax.fori_loop in one jit."""
    layer = MSAAttention(CFG, rngs=nnx.Rngs(9))
    x = _x(rng)
    table, P = msa_jax.make_page_table([30, 30], CFG.block_size)
    cache = init_paged_kv_cache(CFG, table, num_pages=P, kv_dtype=jnp.float32)
    cache = layer(x[:, :20], cache=cache).cache
    graphdef, state = nnx.split(layer)

    @jax.jit
    def decode(state, cache, xs):
        def body(i, carry):
            cache, outs = carry
            r = nnx.merge(graphdef, state)(jax.lax.dynamic_slice_in_dim(xs, i, 1, axis=1), cache=cache)
            return r.cache, jax.lax.dynamic_update_slice_in_dim(outs, r.out, i, axis=1)

        return jax.lax.fori_loop(0, xs.shape[1], body, (cache, jnp.zeros_like(xs)))

    cache, outs = decode(state, cache, x[:, 20:])
    np.testing.assert_array_equal(np.asarray(cache.kv_length), [30, 30])
    np.testing.assert_allclose(np.asarray(outs), np.asarray(layer(x, mode="sparse").out[:, 20:]), rtol=1e-5, atol=1e-5)


def test_paged_cache_errors(rng):
    layer = MSAAttention(CFG, rngs=nnx.Rngs(10))
    table, P = msa_jax.make_page_table([16, 16], 8)
    wrong = msa_jax.init_paged_cache(table, num_pages=P, page_size=8, num_kv_heads=2, head_dim=8, index_head_dim=8)
    with pytest.raises(ValueError, match="PagedCache page size 8 must equal block_size 4"):
        layer(_x(rng, T=3), cache=wrong)
    with pytest.raises(ValueError, match="num_new .* needs a PagedCache"):
        layer(_x(rng, T=3), cache=KVCache.init(CFG, 2, 16, jnp.float32), num_new=jnp.array([1, 2], jnp.int32))


def test_layer_matches_op_on_its_own_projections(rng):
    """The layer's output is o_proj(sparse_attention(...)) of its projections: nothing else."""
    layer = MSAAttention(CFG, rngs=nnx.Rngs(1))
    x = _x(rng, B=1, T=20)
    pos = jnp.arange(20)[None]
    q, k, v = layer._qkv(x, pos)
    iq, ik = layer._index(x, pos)
    res = msa_jax.sparse_attention(q, k, v, iq, ik, top_k=2, block_size=4)
    np.testing.assert_allclose(
        np.asarray(layer(x).out), np.asarray(layer.o_proj(res.out.reshape(1, 20, -1))), rtol=1e-6, atol=1e-6
    )


def test_kl_trains_only_index_projections(rng):
    layer = MSAAttention(CFG, rngs=nnx.Rngs(2))
    x = _x(rng)
    w = jnp.asarray(rng.standard_normal((2, 30, CFG.d_model)), jnp.float32)

    def grads(fn):
        return nnx.grad(lambda m, x: fn(m(x, mode="sparse")), argnums=(0, 1))(layer, x)

    g_kl, gx_kl = grads(lambda r: r.kl_loss)
    g_out, gx_out = grads(lambda r: jnp.sum(r.out * w))
    assert np.all(np.asarray(gx_kl) == 0)  # stop_gradient(x): no gradient into the residual stream
    for path, value in nnx.to_flat_state(g_kl):
        index_param = "index" in str(path[0])
        norm = float(jnp.linalg.norm(value[...]))
        assert (norm > 0) == index_param, path
    for path, value in nnx.to_flat_state(g_out):
        if "index" in str(path[0]):
            assert float(jnp.linalg.norm(value[...])) == 0, path
    assert float(jnp.linalg.norm(gx_out)) > 0


def test_packed_documents_equal_separate_sequences(rng):
    layer = MSAAttention(CFG, rngs=nnx.Rngs(3))
    x = _x(rng, B=1, T=30)
    seg = jnp.asarray(np.repeat([0, 1], [13, 17])[None], jnp.int32)
    packed = layer(x, segment_ids=seg)
    a, b = layer(x[:, :13]), layer(x[:, 13:])
    np.testing.assert_allclose(np.asarray(packed.out), np.asarray(jnp.concatenate([a.out, b.out], 1)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(packed.kl_loss), (13 * float(a.kl_loss) + 17 * float(b.kl_loss)) / 30, rtol=1e-5)


def test_partial_index_rope_leaves_second_half():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 2, 8)), jnp.float32)
    y = rope(x, jnp.arange(5)[None] + 3, 10000.0, rotary_dim=4)
    np.testing.assert_array_equal(np.asarray(y[..., 4:]), np.asarray(x[..., 4:]))
    assert not np.allclose(np.asarray(y[..., :4]), np.asarray(x[..., :4]))
    # A rotation keeps norms of each rotated pair.
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y[..., :4]), axis=-1), np.linalg.norm(np.asarray(x[..., :4]), axis=-1), rtol=1e-5)


def test_cache_overflow_is_an_error(rng):
    layer = MSAAttention(CFG, rngs=nnx.Rngs(4))
    cache = KVCache.init(CFG, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="KV cache overflow: 0 cached \\+ 20 new tokens > max_len 16"):
        layer(_x(rng, T=20), cache=cache)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_q_heads=6, num_kv_heads=4), r"num_q_heads \(6\) must be a multiple of num_kv_heads \(4\)"),
        (dict(head_dim=7), "head_dim must be even for RoPE, got 7"),
        (dict(index_head_dim=6), "index_head_dim must be a multiple of 4 .* got 6"),
        (dict(top_k=0), "top_k must be a positive int, got 0"),
        (dict(mode="fast"), "mode must be one of"),
    ],
)
def test_config_errors_name_the_numbers(kw, match):
    base = dict(d_model=32, num_q_heads=4, num_kv_heads=2, head_dim=8, index_head_dim=8)
    with pytest.raises(ValueError, match=match):
        MSAAttentionConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(rope_type="yarn"), ValueError, "rope_scaling rope_type 'yarn' is not supported"),
        (dict(low_freq_factor=4.0), ValueError, r"low_freq_factor \(4.0\) must be < high_freq_factor \(4.0\)"),
        (dict(factor=0.0), ValueError, "factor must be a finite number > 0, got 0.0"),
        (dict(original_max_position_embeddings=0), ValueError, "original_max_position_embeddings must be a positive"),
    ],
)
def test_rope_scaling_errors_name_the_field(kw, error, match):
    with pytest.raises(error, match=match):
        RopeScaling(**kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(out_bias="yes"), "out_bias must be a bool, got 'yes'"),
        (dict(rope_scaling={"rope_type": "llama3"}), "rope_scaling must be None or a RopeScaling"),
    ],
)
def test_config_type_errors(kw, match):
    base = dict(d_model=32, num_q_heads=4, num_kv_heads=2, head_dim=8, index_head_dim=8)
    with pytest.raises(TypeError, match=match):
        MSAAttentionConfig(**{**base, **kw})


def test_llama3_frequencies_follow_the_piecewise_rule():
    """Against the Llama 3.1 rule written case by case (the implementation clips one formula)."""
    L, lo, hi, factor, d, theta = 64, 1.0, 4.0, 8.0, 32, 10000.0
    got = rope_frequencies(d, theta, RopeScaling(factor=factor, low_freq_factor=lo, high_freq_factor=hi,
                                                 original_max_position_embeddings=L))
    regimes = set()
    for i, w in enumerate(theta ** (-np.arange(0, d, 2) / d)):
        wavelength = 2 * math.pi / w
        if wavelength < L / hi:
            want, regime = w, "kept"
        elif wavelength > L / lo:
            want, regime = w / factor, "divided"
        else:
            smooth = (L / wavelength - lo) / (hi - lo)
            want, regime = (1 - smooth) * w / factor + smooth * w, "interpolated"
        regimes.add(regime)
        assert got[i] == pytest.approx(want, rel=1e-6), (i, regime)
    assert regimes == {"kept", "divided", "interpolated"}
    np.testing.assert_array_equal(rope_frequencies(d, theta), (theta ** (-np.arange(0, d, 2) / d)).astype(np.float32))


def test_rope_scaling_reaches_main_and_index_rope(rng):
    cfg = dataclasses.replace(CFG, rope_scaling=RopeScaling(original_max_position_embeddings=8))
    layer, plain = MSAAttention(cfg, rngs=nnx.Rngs(5)), MSAAttention(CFG, rngs=nnx.Rngs(5))  # same kernels
    x, pos = _x(rng, B=1, T=20), jnp.arange(20)[None]
    raw_q = layer.q_proj(x).reshape(1, 20, CFG.num_q_heads, CFG.head_dim)
    np.testing.assert_array_equal(np.asarray(layer._qkv(x, pos)[0]),
                                  np.asarray(rope(raw_q, pos, CFG.rope_theta, scaling=cfg.rope_scaling)))
    rotated = lambda m: m._qkv(x, pos)[:2] + m._index(x, pos)  # q, k, index_q, index_k
    for scaled, unscaled in zip(rotated(layer), rotated(plain)):
        scaled, unscaled = np.asarray(scaled), np.asarray(unscaled)
        np.testing.assert_array_equal(scaled[:, 0], unscaled[:, 0])  # position 0 is not rotated
        assert np.abs(scaled[:, 1:] - unscaled[:, 1:]).max() > 1e-2


def test_out_bias_is_added_to_the_output(rng):
    layer = GQAAttention(dataclasses.replace(CFG, out_bias=True), rngs=nnx.Rngs(6))
    assert GQAAttention(CFG, rngs=nnx.Rngs(6)).o_proj.bias is None
    x = _x(rng, B=1, T=20)
    bias = jnp.asarray(rng.standard_normal(CFG.d_model), jnp.float32)
    layer.o_proj.bias[...] = bias
    with_bias = np.asarray(layer(x).out)
    layer.o_proj.bias[...] = jnp.zeros_like(bias)
    np.testing.assert_allclose(with_bias - np.asarray(layer(x).out), np.broadcast_to(bias, with_bias.shape), atol=1e-5)
