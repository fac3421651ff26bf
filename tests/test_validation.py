"""Input validation of the public ops: every malformed argument is rejected by name.

Each rejection is pinned by exception type and by a message that names the argument and
shows the offending value (style guide, rule 1). Valid edge inputs (all-padding rows,
boundary positions, top_k above the number of blocks) are pinned to NOT raise and to give
the spec's values. `check_block_indices` is pinned both ways: it rejects each contract
violation and returns `select_blocks` output unchanged.
"""

from __future__ import annotations

import re
import zlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import msa_jax

B, T, S, HQ, HKV, D, DI = 2, 32, 32, 4, 2, 16, 8
BLOCK, TOP_K = 8, 2
NUM_BLOCKS = -(-S // BLOCK)

# Which arrays each op takes, in positional order, and which keyword options it accepts.
POSITIONAL = {
    "sparse_attention": ("q", "k", "v", "index_q", "index_k"),
    "select_blocks": ("index_q", "index_k"),
    "block_sparse_attention": ("q", "k", "v", "block_indices"),
    "index_kl_loss": ("q", "k", "index_q", "index_k", "block_indices"),
}
OPTIONS = {
    "sparse_attention": {"top_k", "mode", "softmax_scale", "index_softmax_scale", "kl_coeff"},
    "select_blocks": {"top_k", "index_softmax_scale"},
    "block_sparse_attention": {"softmax_scale", "return_lse"},
    "index_kl_loss": {"mode", "softmax_scale", "index_softmax_scale", "kl_coeff"},
}


ALL_OPS = list(POSITIONAL)


def takes(op, name):
    return name in POSITIONAL[op] or name in OPTIONS[op]


def op_arg_cases(rows, skip=()):
    """(op, *row) for every op taking row[0], minus (op, name) pairs in `skip`."""
    return [
        pytest.param(op, *row, id=f"{op}-{'-'.join(str(x)[:24] for x in row)}")
        for op in ALL_OPS
        for row in rows
        if takes(op, row[0]) and (op, row[0]) not in skip
    ]


def make_arrays(rng, *, b=B, t=T, s=S, hq=HQ, hkv=HKV, d=D, di=DI, dtype=jnp.float32, index_dtype=None):
    """Random non-zero inputs of the spec's shapes, plus a valid selection for them."""
    index_dtype = dtype if index_dtype is None else index_dtype

    def normal(*shape, dt=dtype):
        return jnp.asarray(rng.standard_normal(shape), dt)

    arrays = {
        "q": normal(b, t, hq, d),
        "k": normal(b, s, hkv, d),
        "v": normal(b, s, hkv, d),
        "index_q": normal(b, t, hkv, di, dt=index_dtype),
        "index_k": normal(b, s, di, dt=index_dtype),
    }
    arrays["block_indices"] = _select(arrays["index_q"], arrays["index_k"])
    return arrays


@jax.jit
def _select(index_q, index_k):
    return msa_jax.select_blocks(index_q, index_k, top_k=TOP_K, block_size=BLOCK)


@pytest.fixture(scope="module")
def arrays():
    """Shared read-only inputs: the error paths never reach their values (and eager
    selection per test would dominate the run time)."""
    return make_arrays(np.random.default_rng(zlib.crc32(b"test_validation")))


def call(op, arrays, **kwargs):
    """Calls `op` with the arrays it takes; `kwargs` override arrays or options."""
    args = [kwargs.pop(name, arrays[name]) for name in POSITIONAL[op]]
    kwargs.setdefault("block_size", BLOCK)
    if "top_k" in OPTIONS[op]:
        kwargs.setdefault("top_k", TOP_K)
    return getattr(msa_jax, op)(*args, **kwargs)


def jit_call(op, arrays, **kwargs):
    """`call` under jax.jit (for the paths that compute); options and positions stay static."""
    arrays = {**arrays, **{n: kwargs.pop(n) for n in POSITIONAL[op] if n in kwargs}}
    return jax.jit(lambda arrs: call(op, arrs, **kwargs))({n: arrays[n] for n in POSITIONAL[op]})


def raises(exc, *parts):
    """pytest.raises whose message starts with parts[0] (so "q" cannot match "index_q") and
    contains the other parts after it, in order."""
    return pytest.raises(exc, match="^" + ".*".join(re.escape(p) for p in parts))


# --------------------------------------------------------------------------------------
# Ranks, shapes and dtypes of the arrays
# --------------------------------------------------------------------------------------


RANKS = [
    ("q", "[B, T, Hq, D]"),
    ("k", "[B, S, Hkv, D]"),
    ("v", "[B, S, Hkv, D]"),
    ("index_q", "[B, T, Hkv, Di]"),
    ("index_k", "[B, S, Di]"),
    ("block_indices", "[B, T, Hkv, K]"),
]


@pytest.mark.parametrize("op, name, layout", op_arg_cases(RANKS))
def test_wrong_rank(op, name, layout, arrays):
    """An array of the wrong rank is rejected with its expected layout and actual shape."""
    bad = arrays[name][..., None]
    with raises(ValueError, f"{name} must have rank", layout, f"got shape {tuple(bad.shape)}"):
        call(op, arrays, **{name: bad})


def _resize(x, axis, size):
    """x with dimension `axis` cut or tiled to `size` (values stay random and non-zero)."""
    reps = -(-size // x.shape[axis])
    return jnp.take(jnp.concatenate([x] * reps, axis=axis), jnp.arange(size), axis=axis)


# (argument, axis, new size, message parts); sizes chosen so no other check fires first.
MISMATCHES = [
    ("k", 0, 3, ("k batch must equal q's (2), got 3",)),
    ("k", 3, 8, ("k head dim must equal q's (16), got 8",)),
    ("v", 0, 3, ("v shape must equal k's ((2, 32, 2, 16)), got (3, 32, 2, 16)",)),
    ("v", 1, 40, ("v shape must equal k's ((2, 32, 2, 16)), got (2, 40, 2, 16)",)),
    ("v", 2, 1, ("v shape must equal k's ((2, 32, 2, 16)), got (2, 32, 1, 16)",)),
    ("v", 3, 8, ("v shape must equal k's ((2, 32, 2, 16)), got (2, 32, 2, 8)",)),
    ("index_q", 0, 3, ("index_q shape[:3] must equal", "((2, 32, 2)), got (3, 32, 2)")),
    ("index_q", 1, 24, ("index_q shape[:3] must equal", "((2, 32, 2)), got (2, 24, 2)")),
    ("index_q", 2, 4, ("index_q shape[:3] must equal", "((2, 32, 2)), got (2, 32, 4)")),
    ("index_k", 0, 3, ("index_k shape[:2] must equal", "((2, 32)), got (3, 32)")),
    ("index_k", 1, 40, ("index_k shape[:2] must equal", "((2, 32)), got (2, 40)")),
    ("index_k", 2, 4, ("index_k index head dim must equal index_q's (8), got 4",)),
    ("block_indices", 0, 3, ("block_indices shape[:3] must equal", "((2, 32, 2)), got (3, 32, 2)")),
    ("block_indices", 1, 24, ("block_indices shape[:3] must equal", "((2, 32, 2)), got (2, 24, 2)")),
    ("block_indices", 2, 4, ("block_indices shape[:3] must equal", "((2, 32, 2)), got (2, 32, 4)")),
]


# select_blocks reads B, T, Hkv from index_q and S from index_k themselves.
_SELECT_OWN = [("index_q", 0), ("index_q", 1), ("index_q", 2), ("index_k", 1)]


@pytest.mark.parametrize(
    "op, name, axis, size, parts",
    [
        c
        for c in op_arg_cases(MISMATCHES)
        if not (c.values[0] == "select_blocks" and tuple(c.values[1:3]) in _SELECT_OWN)
    ],
)
def test_mismatched_dims(op, name, axis, size, parts, arrays):
    """B/T/S/head/head-dim disagreements between the arrays name the array and both values."""
    with raises(ValueError, *parts):
        call(op, arrays, **{name: _resize(arrays[name], axis, size)})


@pytest.mark.parametrize("op", ["sparse_attention", "block_sparse_attention", "index_kl_loss"])
def test_query_heads_not_multiple_of_kv_heads(op, rng):
    """Hq % Hkv != 0 (no whole GQA groups) is rejected with both head counts."""
    a = make_arrays(rng, hq=4, hkv=3)
    with raises(ValueError, "q heads (Hq=4) must be a multiple of k heads (Hkv=3)"):
        call(op, a)


@pytest.mark.parametrize(
    "op, name",
    # select_blocks with an integer index_q: test_select_blocks_integer_index_q_named.
    op_arg_cases([(n,) for n in ("q", "k", "v", "index_q", "index_k")], skip={("select_blocks", "index_q")}),
)
def test_integer_inputs_rejected(op, name, arrays):
    """Integer q/k/v/index arrays are rejected naming the array and its dtype."""
    bad = arrays[name].astype(jnp.int32)
    expected_exc = TypeError
    if name == "v":
        # v is compared with k's shape first, then with q's dtype.
        parts = ("v dtype must equal q's (float32), got int32",)
        expected_exc = ValueError
    elif name == "k":
        parts = ("k must be bfloat16, float16 or float32 (float64 under jax_enable_x64), got dtype int32",)
    else:
        parts = (f"{name} must be bfloat16, float16 or float32 (float64 under jax_enable_x64), got dtype int32",)
    with raises(expected_exc, *parts):
        call(op, arrays, **{name: bad})


def test_select_blocks_integer_index_q_named(arrays):
    """select_blocks' dtype error names index_q, the argument the caller passed."""
    with raises(TypeError, "index_q must be bfloat16, float16 or float32 (float64 under jax_enable_x64), got dtype int32"):
        call("select_blocks", arrays, index_q=arrays["index_q"].astype(jnp.int32))


@pytest.mark.parametrize("op", ["sparse_attention", "block_sparse_attention", "index_kl_loss"])
def test_mixed_main_dtypes(op, arrays):
    """q bf16 with k/v f32 (and v bf16 with q/k f32) is rejected: kernels would not upcast."""
    with raises(ValueError, "k dtype must equal q's (bfloat16), got float32"):
        call(op, arrays, q=arrays["q"].astype(jnp.bfloat16))
    if "v" in POSITIONAL[op]:
        with raises(ValueError, "v dtype must equal q's (float32), got bfloat16"):
            call(op, arrays, v=arrays["v"].astype(jnp.bfloat16))


@pytest.mark.parametrize("op", ["sparse_attention", "select_blocks", "index_kl_loss"])
def test_mixed_index_dtypes(op, arrays):
    """index_k must share index_q's dtype."""
    with raises(ValueError, "index_k dtype must equal index_q's (float32), got bfloat16"):
        call(op, arrays, index_k=arrays["index_k"].astype(jnp.bfloat16))


@pytest.mark.parametrize("op", ALL_OPS)
def test_non_array_input(op, arrays):
    """Something that is not an array is a TypeError naming the argument and its type."""
    name = POSITIONAL[op][0]
    with raises(TypeError, f"{name} must be an array, got str"):
        call(op, arrays, **{name: "not an array"})


@pytest.mark.parametrize("op, name", op_arg_cases([(n,) for n, _ in RANKS]))
def test_none_array_rejected_by_name(op, name, arrays):
    """None in place of a required array is a TypeError naming the argument."""
    with raises(TypeError, f"{name} must be an array, got None"):
        call(op, arrays, **{name: None})


@pytest.mark.parametrize("op", ["sparse_attention", "block_sparse_attention", "index_kl_loss"])
@pytest.mark.parametrize("axis", [1, 3])
def test_empty_dimension(op, axis, arrays):
    """A zero-length T or D is rejected, showing the shapes."""
    q = arrays["q"][:, :0] if axis == 1 else arrays["q"][..., :0]
    k = arrays["k"] if axis == 1 else arrays["k"][..., :0]
    kw = {"q": q, "k": k}
    if "v" in POSITIONAL[op]:
        kw["v"] = k if axis == 3 else arrays["v"]
    if "index_q" in POSITIONAL[op] and axis == 1:
        kw["index_q"] = arrays["index_q"][:, :0]
    if "block_indices" in POSITIONAL[op] and axis == 1:
        kw["block_indices"] = arrays["block_indices"][:, :0]
    with raises(ValueError, "empty dimension: q shape", str(tuple(q.shape))):
        call(op, arrays, **kw)


@pytest.mark.parametrize("op", ["sparse_attention", "select_blocks", "index_kl_loss"])
def test_empty_index_head_dim(op, arrays):
    """Di = 0 is rejected."""
    with raises(ValueError, "index head dim Di must be >= 1"):
        call(op, arrays, index_q=arrays["index_q"][..., :0], index_k=arrays["index_k"][..., :0])


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -3])
@pytest.mark.parametrize("op, option", op_arg_cases([("top_k",), ("block_size",)]))
def test_int_option_below_one(op, option, value, arrays):
    """top_k and block_size must be >= 1."""
    with raises(ValueError, f"{option} must be >= 1, got {value}"):
        call(op, arrays, **{option: value})


@pytest.mark.parametrize("value", [2.0, True, "2", np.int32(2)], ids=repr)
@pytest.mark.parametrize("op, option", op_arg_cases([("top_k",), ("block_size",)]))
def test_int_option_not_python_int(op, option, value, arrays):
    """top_k and block_size must be Python ints (they are static: hashed into the config)."""
    with raises(TypeError, f"{option} must be a Python int, got {value!r}"):
        call(op, arrays, **{option: value})


@pytest.mark.parametrize("op", ["sparse_attention", "index_kl_loss"])
@pytest.mark.parametrize("mode", ["topk", "Sparse", None])
def test_bad_mode(op, mode, arrays):
    """mode must be "sparse" or "dense"."""
    with raises(ValueError, "mode must be one of ('sparse', 'dense'), got", repr(mode)):
        call(op, arrays, mode=mode)


@pytest.mark.parametrize("value", [-1.0, 0.0, float("inf"), float("nan"), "0.5"], ids=repr)
@pytest.mark.parametrize("op, option", op_arg_cases([("softmax_scale",), ("index_softmax_scale",)]))
def test_bad_softmax_scale(op, option, value, arrays):
    """Softmax scales must be None or finite and > 0."""
    with raises(ValueError, f"{option} must be None or a finite real number > 0, got {value!r}"):
        call(op, arrays, **{option: value})


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan"), None])
@pytest.mark.parametrize("op", ["sparse_attention", "index_kl_loss"])
def test_bad_kl_coeff(op, value, arrays):
    """kl_coeff must be a finite real."""
    with raises(ValueError, f"kl_coeff must be a finite real number, got {value!r}"):
        call(op, arrays, kl_coeff=value)


@pytest.mark.parametrize("dtype", [np.int64, np.float32, np.uint32, np.int16])
@pytest.mark.parametrize("op", ["block_sparse_attention", "index_kl_loss"])
def test_block_indices_dtype(op, dtype, arrays):
    """block_indices must be int32 (kernels index with it); NumPy int64 is not converted."""
    bad = np.asarray(arrays["block_indices"]).astype(dtype)
    with raises(TypeError, "block_indices must be int32, got", np.dtype(dtype).name):
        call(op, arrays, block_indices=bad)


@pytest.mark.parametrize("op", ["block_sparse_attention", "index_kl_loss"])
def test_block_indices_no_slot(op, arrays):
    """K = 0 is rejected."""
    with raises(ValueError, "block_indices must have at least one slot (K >= 1)"):
        call(op, arrays, block_indices=arrays["block_indices"][..., :0])


# --------------------------------------------------------------------------------------
# Positions
# --------------------------------------------------------------------------------------

POSITION_RANGE = [
    ("kv_length", S + 1, f"kv_length must lie in [0, {S}]", f"got {S + 1}"),
    ("kv_length", -1, f"kv_length must lie in [0, {S}]", "got -1"),
    ("kv_length", np.array([S, S + 5], np.int32), f"kv_length must lie in [0, {S}]", f"got {S + 5}"),
    ("kv_length", np.array([-2, S], np.int32), f"kv_length must lie in [0, {S}]", "got -2"),
    ("q_offset", -T - 1, f"q_offset must lie in [-{T}, {S}]", f"got {-T - 1}"),
    ("q_offset", S + 1, f"q_offset must lie in [-{T}, {S}]", f"got {S + 1}"),
    ("q_offset", np.int64(-100), f"q_offset must lie in [-{T}, {S}]", "got -100"),
    ("q_offset", np.array([0, S + 3], np.int32), f"q_offset must lie in [-{T}, {S}]", f"got {S + 3}"),
    ("q_offset", jnp.array([-T - 7, 0], jnp.int32), f"q_offset must lie in [-{T}, {S}]", f"got {-T - 7}"),
]


@pytest.mark.parametrize("name, value, bound, got", POSITION_RANGE, ids=lambda x: str(x)[:20])
@pytest.mark.parametrize("op", ALL_OPS)
def test_position_out_of_range(op, name, value, bound, got, arrays):
    """Concrete q_offset / kv_length values outside their range name the worst value."""
    with raises(ValueError, bound, got):
        call(op, arrays, **{name: value})


@pytest.mark.parametrize("name", ["q_offset", "kv_length"])
@pytest.mark.parametrize("op", ALL_OPS)
def test_position_wrong_shape(op, name, arrays):
    """A position array must be a scalar or [B]."""
    for bad in (np.zeros(B + 1, np.int32), np.zeros((B, 1), np.int32)):
        with raises(ValueError, f"{name} must be a scalar or have shape [B]=({B},), got {bad.shape}"):
            call(op, arrays, **{name: bad})


@pytest.mark.parametrize("value", [1.5, np.array([1.0, 2.0], np.float32)], ids=["float", "float_array"])
@pytest.mark.parametrize("name", ["q_offset", "kv_length"])
@pytest.mark.parametrize("op", ALL_OPS)
def test_position_float(op, name, value, arrays):
    """Float positions are a TypeError showing the dtype."""
    with raises(TypeError, f"{name} must have an integer dtype, got float32"):
        call(op, arrays, **{name: value})


@pytest.mark.parametrize("name", ["q_offset", "kv_length"])
def test_position_bool(name, arrays):
    """A bool is not an int position."""
    with raises(TypeError, f"{name} must be None, an int or an int32 [B] array, got True"):
        call("sparse_attention", arrays, **{name: True})


@pytest.mark.parametrize("op", ALL_OPS)
def test_segment_ids_need_self_attention(op, rng):
    """Packed documents with T != S are rejected with both lengths."""
    a = make_arrays(rng, t=32, s=48)
    with raises(ValueError, "segment_ids (packed documents) require T == S, got T=32, S=48"):
        call(op, a, segment_ids=np.zeros((B, 32), np.int32))


@pytest.mark.parametrize("op", ALL_OPS)
def test_segment_ids_with_q_offset(op, arrays):
    """q_offset cannot be combined with segment_ids (positions restart per document)."""
    with raises(ValueError, "q_offset must be None with segment_ids"):
        call(op, arrays, segment_ids=np.zeros((B, T), np.int32), q_offset=0)


@pytest.mark.parametrize("op", ALL_OPS)
def test_segment_ids_shape_and_dtype(op, arrays):
    """segment_ids must be an integer [B, T] array."""
    for bad in (np.zeros((B, T + 1), np.int32), np.zeros((B,), np.int32), np.zeros((1, T), np.int32)):
        with raises(ValueError, "segment_ids shape must equal", f"got {bad.shape}"):
            call(op, arrays, segment_ids=bad)
    with raises(TypeError, "segment_ids must have an integer dtype, got float32"):
        call(op, arrays, segment_ids=np.zeros((B, T), np.float32))


# --------------------------------------------------------------------------------------
# implementation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ALL_OPS)
def test_unknown_implementation(op, arrays):
    """Unknown names (alone or in a sequence), empty sequences and non-names are rejected."""
    with raises(ValueError, "implementation must be one of ('xla', 'pallas', 'cuda'), got 'triton'"):
        call(op, arrays, implementation="triton")
    with raises(ValueError, "implementation must be one of", "got 'XLA'"):
        call(op, arrays, implementation=["xla", "XLA"])
    with raises(ValueError, "implementation must not be an empty sequence"):
        call(op, arrays, implementation=[])
    with raises(TypeError, "implementation must be None, a name or a sequence of names, got 3"):
        call(op, arrays, implementation=3)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU the cuda implementation may serve the op")
@pytest.mark.parametrize("op", ALL_OPS)
def test_fallback_to_xla(op, arrays):
    """A sequence ending in "xla" falls through what cannot serve the call (cuda without a
    GPU), gives its reason when nothing else is left, and equals implementation="xla"."""
    with pytest.raises(NotImplementedError, match=f"^no implementation can serve {op}: cuda: "):
        call(op, arrays, implementation="cuda")
    got = jit_call(op, arrays, implementation=("cuda", "xla"))
    want = jit_call(op, arrays, implementation="xla")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# --------------------------------------------------------------------------------------
# Valid edge inputs do not raise and give the spec's values
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "positions",
    [
        {"q_offset": -T},
        {"q_offset": S},
        {"kv_length": 0},
        {"q_offset": np.array([-T, S], np.int32)},
        {"q_offset": np.array([-T, 0], np.int32), "kv_length": np.array([S, 0], np.int32)},
    ],
    ids=str,
)
def test_all_padding_is_valid(positions, arrays):
    """Positions at their bounds that make every query padding: out 0, lse -inf, ids -1,
    loss 0, gradients 0, in every op."""
    a = arrays

    @jax.jit
    def value_and_grads(q, k, v, iq, ik):
        def loss(q, k, v, iq, ik):
            r = msa_jax.sparse_attention(q, k, v, iq, ik, top_k=TOP_K, block_size=BLOCK, **positions)
            return jnp.sum(r.out) + r.kl_loss, r

        return jax.value_and_grad(loss, argnums=range(5), has_aux=True)(q, k, v, iq, ik)

    (value, r), grads = value_and_grads(a["q"], a["k"], a["v"], a["index_q"], a["index_k"])
    np.testing.assert_array_equal(np.asarray(r.out), 0.0)
    np.testing.assert_array_equal(np.asarray(r.lse), -np.inf)
    np.testing.assert_array_equal(np.asarray(r.block_indices), -1)
    assert float(r.kl_loss) == 0.0 and float(value) == 0.0
    for g in grads:
        np.testing.assert_array_equal(np.asarray(g), 0.0)

    bi = jit_call("select_blocks", a, **positions)
    np.testing.assert_array_equal(np.asarray(bi), -1)
    # Rows naming real blocks still contribute nothing when every query is padding.
    some = jnp.zeros_like(a["block_indices"])
    out, lse = jit_call("block_sparse_attention", a, block_indices=some, return_lse=True, **positions)
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    np.testing.assert_array_equal(np.asarray(lse), -np.inf)
    assert float(jit_call("index_kl_loss", a, block_indices=some, **positions)) == 0.0
    assert msa_jax.check_block_indices(bi, num_keys=S, block_size=BLOCK, **positions) is bi


def _assert_same(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)


def _v_of_group(v, hq):
    """v [B, S, Hkv, D] repeated to [B, S, Hq, D]: the value each query head reads."""
    return jnp.repeat(v, hq // v.shape[2], axis=2)


def test_boundary_positions_equal_defaults(arrays):
    """q_offset = 0 and kv_length = S (the largest allowed) are the defaults for T == S."""
    default = jit_call("sparse_attention", arrays)
    _assert_same(jit_call("sparse_attention", arrays, q_offset=0, kv_length=S), default)
    as_arrays = dict(q_offset=np.zeros(B, np.int32), kv_length=np.full(B, S, np.int32))
    _assert_same(jit_call("sparse_attention", arrays, **as_arrays), default)


def test_kv_length_one(arrays):
    """kv_length 1 with the default q_offset: only the last query is valid and it reads key 0."""
    r = jit_call("sparse_attention", arrays, kv_length=np.array([S, 1], np.int32))
    out = np.asarray(r.out[1])
    np.testing.assert_allclose(out[T - 1], np.asarray(_v_of_group(arrays["v"], HQ)[1, 0]), rtol=1e-6)
    np.testing.assert_array_equal(out[: T - 1], 0.0)
    np.testing.assert_array_equal(np.asarray(r.block_indices[1, T - 1]), [[0] + [-1] * (TOP_K - 1)] * HKV)


def test_top_k_one_block_size_one(arrays):
    """top_k = 1 with block_size = 1 keeps only the query's own key: out equals v there."""
    r = jit_call("sparse_attention", arrays, top_k=1, block_size=1)
    np.testing.assert_allclose(np.asarray(r.out), np.asarray(_v_of_group(arrays["v"], HQ)), rtol=1e-6)
    own_block = np.broadcast_to(np.arange(T)[None, :, None], (B, T, HKV))
    np.testing.assert_array_equal(np.asarray(r.block_indices[..., 0]), own_block)
    # One-key support: teacher and student are the same point mass (KL 0 up to rounding).
    assert abs(float(r.kl_loss)) < 1e-6


@pytest.mark.parametrize("kwargs", [{"top_k": 50}, {"block_size": 64}, {"block_size": S, "top_k": 1}], ids=str)
def test_selection_covering_everything_is_dense(kwargs, arrays):
    """top_k above the number of blocks (or one block holding all keys) is valid and equals
    mode="dense"."""
    sparse = jit_call("sparse_attention", arrays, **kwargs)
    dense = jit_call("sparse_attention", arrays, mode="dense", **kwargs)
    np.testing.assert_allclose(np.asarray(sparse.out), np.asarray(dense.out), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sparse.lse), np.asarray(dense.lse), rtol=1e-6)
    np.testing.assert_allclose(float(sparse.kl_loss), float(dense.kl_loss), rtol=1e-5)


def test_negative_kl_coeff_and_custom_scales(arrays):
    """Any finite kl_coeff (negative too) scales the loss linearly; custom scales are accepted."""
    kw = dict(softmax_scale=1e-3, index_softmax_scale=7.0)
    one = jit_call("sparse_attention", arrays, **kw)
    neg = jit_call("sparse_attention", arrays, kl_coeff=-2.5, **kw)
    assert float(one.kl_loss) > 0.0
    np.testing.assert_allclose(float(neg.kl_loss), -2.5 * float(one.kl_loss), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(neg.out), np.asarray(one.out))


def test_segments_with_kv_length(arrays):
    """segment_ids combine with kv_length: queries at or past kv_length are padding."""
    seg = np.repeat(np.arange(4, dtype=np.int32), T // 4)[None].repeat(B, 0)
    r = jit_call("sparse_attention", arrays, segment_ids=seg, kv_length=20)
    np.testing.assert_array_equal(np.asarray(r.out[:, 20:]), 0.0)
    np.testing.assert_array_equal(np.asarray(r.block_indices[:, 20:]), -1)
    assert bool(jnp.all(jnp.isfinite(r.lse[:, :20])))


def test_index_dtype_may_differ_from_main_dtype(arrays):
    """bf16 index tensors with f32 q/k/v are valid: selection equals that of the f32-cast inputs."""
    iq, ik = arrays["index_q"].astype(jnp.bfloat16), arrays["index_k"].astype(jnp.bfloat16)
    r = jit_call("sparse_attention", arrays, index_q=iq, index_k=ik)
    want = _select(iq.astype(jnp.float32), ik.astype(jnp.float32))
    assert r.out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(r.block_indices), np.asarray(want))


# --------------------------------------------------------------------------------------
# check_block_indices
# --------------------------------------------------------------------------------------


def _corrupt(bi, b, i, g, row):
    bi = np.array(bi)
    bi[b, i, g] = row
    return jnp.asarray(bi)


def _check(bi, **positions):
    return msa_jax.check_block_indices(bi, num_keys=S, block_size=BLOCK, **positions)


def _row_message(b, i, g, row, why):
    return rf"^block_indices\[{b}, {i}, {g}\] = {re.escape(str(list(row)))}: {re.escape(why)}"


def test_check_rejects_ids_below_minus_one(arrays):
    """-2 (or any id < -1) is out of range."""
    row = [-2, 0]
    with pytest.raises(ValueError, match=_row_message(1, 20, 1, row, f"ids must lie in [-1, {NUM_BLOCKS})")):
        _check(_corrupt(arrays["block_indices"], 1, 20, 1, row))


@pytest.mark.parametrize("bad", [NUM_BLOCKS, NUM_BLOCKS + 100, np.iinfo(np.int32).max])
def test_check_rejects_ids_past_last_block(bad, arrays):
    """Ids >= ceil(S / block_size) are out of range."""
    row = [0, bad]
    with pytest.raises(ValueError, match=_row_message(0, T - 1, 0, row, f"ids must lie in [-1, {NUM_BLOCKS})")):
        _check(_corrupt(arrays["block_indices"], 0, T - 1, 0, row))


def test_check_range_uses_ceil_of_num_keys(arrays):
    """The id bound is ceil(num_keys / block_size): one key past S opens block NUM_BLOCKS."""
    # q_offset 1 puts the last query on key S, the only key of block NUM_BLOCKS.
    bi = _corrupt(arrays["block_indices"], 0, T - 1, 0, [0, NUM_BLOCKS])
    assert msa_jax.check_block_indices(bi, num_keys=S + 1, block_size=BLOCK, q_offset=1) is bi
    message = _row_message(0, T - 1, 0, [0, NUM_BLOCKS], f"ids must lie in [-1, {NUM_BLOCKS})")
    with pytest.raises(ValueError, match=message):
        msa_jax.check_block_indices(bi, num_keys=S, block_size=BLOCK, q_offset=1)


def test_check_rejects_duplicates(arrays):
    """The same block twice in one row is a contract violation; repeated -1 is not."""
    i = 2 * BLOCK + 3  # local block 2
    row = [1, 1]
    with pytest.raises(ValueError, match=_row_message(1, i, 0, row, "duplicate block id in one row")):
        _check(_corrupt(arrays["block_indices"], 1, i, 0, row))
    ok = _corrupt(arrays["block_indices"], 1, i, 0, [-1, -1])
    assert _check(ok) is ok


def test_check_rejects_block_after_local(arrays):
    """A block past the query's local block holds no visible key."""
    i = BLOCK + 2  # local block 1
    row = [2, 1]
    with pytest.raises(ValueError, match=_row_message(0, i, 1, row, "block after the query's local block")):
        _check(_corrupt(arrays["block_indices"], 0, i, 1, row))


def test_check_local_block_is_document_relative(rng):
    """With packed documents the block grid restarts per document: an absolute block id past
    the document-relative local block is rejected."""
    a = make_arrays(rng)
    seg = np.repeat(np.array([[0] * 20 + [1] * 12]), B, axis=0).astype(np.int32)
    bi = msa_jax.select_blocks(a["index_q"], a["index_k"], top_k=TOP_K, block_size=BLOCK, segment_ids=seg)
    assert _check(bi, segment_ids=seg) is bi
    # Query 21 is token 1 of document 2: its local block is 0, though 21 // BLOCK == 2.
    np.testing.assert_array_equal(np.asarray(bi[:, 21]), [[[0, -1]] * HKV] * B)
    row = [1, 0]
    with pytest.raises(ValueError, match=_row_message(0, 21, 0, row, "block after the query's local block")):
        _check(_corrupt(bi, 0, 21, 0, row), segment_ids=seg)


@pytest.mark.parametrize(
    "positions, i",
    [
        ({"q_offset": -4}, 3),
        ({"q_offset": 0, "kv_length": 10}, 31),
        ({"q_offset": 0, "kv_length": np.array([S, 10], np.int32)}, 10),
    ],
    ids=str,
)
def test_check_rejects_entries_in_padding_rows(positions, i, rng):
    """Rows of padding queries must be all -1."""
    a = make_arrays(rng)
    bi = msa_jax.select_blocks(a["index_q"], a["index_k"], top_k=TOP_K, block_size=BLOCK, **positions)
    row = [-1, 0]
    with pytest.raises(ValueError, match=_row_message(1, i, 0, row, "padding query rows must be all -1")):
        _check(_corrupt(bi, 1, i, 0, row), **positions)


def test_check_reports_first_offending_row(arrays):
    """With several bad rows, the message names the first in (b, i, g) order."""
    bi = _corrupt(arrays["block_indices"], 1, 5, 1, [0, 9])
    bi = _corrupt(bi, 0, 30, 1, [0, 9])
    with pytest.raises(ValueError, match=re.escape("block_indices[0, 30, 1] = [0, 9]")):
        _check(bi)


def test_check_rejects_traced_array(arrays):
    """Under jit the values are unknown: TypeError telling the caller to call it outside jit."""
    with raises(TypeError, "check_block_indices needs a concrete array; call it outside jax.jit"):
        jax.jit(_check)(arrays["block_indices"])


def test_check_rejects_bad_dtype_rank_and_block_size(arrays):
    """dtype, rank and block_size are checked like in the ops."""
    bi = arrays["block_indices"]
    with raises(TypeError, "block_indices must be int32, got int64"):
        _check(np.asarray(bi).astype(np.int64))
    with raises(TypeError, "block_indices must be int32, got float32"):
        _check(bi.astype(jnp.float32))
    with raises(ValueError, "block_indices must have rank 4", f"got shape {tuple(bi.shape[:3])}"):
        _check(bi[..., 0])
    with raises(ValueError, "block_size must be >= 1, got 0"):
        msa_jax.check_block_indices(bi, num_keys=S, block_size=0)
    with raises(ValueError, f"kv_length must lie in [0, {S}]", f"got {S + 1}"):
        _check(bi, kv_length=S + 1)


@pytest.mark.parametrize("num_keys", [-1, 0, 32.5, None], ids=str)
def test_check_validates_num_keys(num_keys, arrays):
    """num_keys (= S) must be a positive int, rejected by name otherwise."""
    bi = jnp.full_like(arrays["block_indices"], -1)
    with pytest.raises((ValueError, TypeError), match="num_keys"):
        msa_jax.check_block_indices(bi, num_keys=num_keys, block_size=BLOCK)


SELECTION_CASES = [
    dict(t=32, s=32, bk=8),
    dict(t=24, s=64, bk=16),
    dict(t=8, s=64, bk=8, q_offset=40),
    dict(t=8, s=64, bk=16, q_offset=np.array([-3, 60], np.int32)),
    dict(t=32, s=40, bk=8, kv_length=np.array([40, 17], np.int32)),
    dict(t=16, s=64, bk=8, q_offset=np.array([5, 50], np.int32), kv_length=np.array([64, 33], np.int32)),
    dict(t=48, s=48, bk=8, segments=(13, 20, 15)),
    dict(t=48, s=48, bk=16, segments=(16, 32), kv_length=40),
]


@pytest.mark.parametrize("top_k", [1, 3, 9])
@pytest.mark.parametrize(
    "case", SELECTION_CASES, ids=lambda c: "-".join(f"{k}{np.asarray(v).tolist()}" for k, v in c.items())
)
def test_check_accepts_select_blocks_output(case, top_k, rng):
    """Every selection the index branch makes passes the checker unchanged, in any row order."""
    case = dict(case)
    t, s, block_size = case.pop("t"), case.pop("s"), case.pop("bk")
    if "segments" in case:
        lengths = case.pop("segments")
        case["segment_ids"] = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)[None].repeat(B, 0)
    iq = jnp.asarray(rng.standard_normal((B, t, HKV, DI)), jnp.float32)
    ik = jnp.asarray(rng.standard_normal((B, s, DI)), jnp.float32)
    bi = msa_jax.select_blocks(iq, ik, top_k=top_k, block_size=block_size, **case)
    assert int(jnp.max(bi)) >= 0  # the case selects something
    got = msa_jax.check_block_indices(bi, num_keys=s, block_size=block_size, **case)
    assert got is bi
    shuffled = jnp.asarray(rng.permuted(np.asarray(bi), axis=-1))
    np.testing.assert_array_equal(
        np.asarray(msa_jax.check_block_indices(shuffled, num_keys=s, block_size=block_size, **case)),
        np.asarray(shuffled),
    )
