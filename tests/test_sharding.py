"""The public ops on sharded inputs (4 host CPU devices) equal the unsharded call.

Pins down: (a) explicit-sharding meshes (`jax.set_mesh`, `AxisType.Explicit`), where the ops
run shard-locally through `dispatch.shard_local`: same values and gradients as one device,
outputs and gradients keep the inputs' batch/head sharding, and the compiled program moves
no tensor between devices except the all-reduces of the KL sum and of the shared index_k
gradient (no all-gather); (b) auto-sharding jit (`in_shardings` on an `AxisType.Auto`
mesh): same numbers and nothing gathered; (c) the mechanism behind (b): every implementation
call is a custom_partitioning op (msa_jax/partitioning.py) whose partition callback splits
it over batch and heads, for `xla` and for `pallas` (interpret mode here; on a GPU its
kernels are custom calls XLA cannot split by itself).
"""

from __future__ import annotations

import os
import re

# Normally set by conftest.py; repeated so this file also runs alone. Must precede jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import msa_jax  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.device_count() < 4,
    reason=f"needs 4 devices, found {jax.device_count()}: set "
    "XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax is imported",
)

T = S = 64
HQ, HKV, D = 8, 2, 16
# Di differs from the number of blocks (S / BLOCK = 8) so that HLO shapes of index tensors
# and of block-score tensors cannot be confused in the all-gather checks below.
DI = 12
BLOCK, TOP_K = 8, 3
RTOL, ATOL = 1e-5, 1e-6

# (mesh shape, axis names, batch, spec of [B, *, H, *] tensors, spec of index_k [B, S, Di])
MESHES = {
    "data2xmodel2": ((2, 2), ("data", "model"), 2, P("data", None, "model", None), P("data", None, None)),
    "data4": ((4,), ("data",), 4, P("data", None, None, None), P("data", None, None)),
}
LSE_SPEC = {"data2xmodel2": P("data", None, "model"), "data4": P("data", None, None)}


def _inputs(batch, seed):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    return dict(
        q=normal(batch, T, HQ, D),
        k=normal(batch, S, HKV, D),
        v=normal(batch, S, HKV, D),
        index_q=normal(batch, T, HKV, DI),
        index_k=normal(batch, S, DI),
        w_out=normal(batch, T, HQ, D),
        w_lse=normal(batch, T, HQ),
    )


@pytest.fixture(scope="module")
def inputs():
    """Random inputs per batch size, shared by the module (fixed seeds: repeatable)."""
    return {2: _inputs(2, 1), 4: _inputs(4, 2)}


def _explicit_mesh(name):
    shape, axes, _, _, _ = MESHES[name]
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Explicit,) * len(axes))


def _put(mesh, x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


def _spec(x):
    """x's partition spec padded with None to x's rank (trailing Nones are optional in jax)."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _assert_spec(x, spec, what):
    want = tuple(spec) + (None,) * (x.ndim - len(spec))
    assert _spec(x) == want, f"{what}: sharding {_spec(x)}, expected {want}"


def _collective_lines(hlo, op):
    """Instruction lines of the compiled HLO text whose opcode is `op` (sync or async start)."""
    pattern = re.compile(rf"=.*\s{re.escape(op)}(?:-start)?\(")
    return [line.strip() for line in hlo.splitlines() if pattern.search(line)]


def _tensor_all_gathers(hlo, batch):
    """all-gathers other than of int32 [B] position vectors. Traced q_offset / kv_length
    arrive batch-sharded, and the KL normaliser (number of valid queries over the whole
    batch) reads every row's positions, so XLA gathers those B integers; anything else
    gathered would be a tensor moving between devices."""
    return [g for g in _collective_lines(hlo, "all-gather") if not re.search(rf"=\s*s32\[{batch}\]", g)]


def _assert_close(got, want, what):
    for i, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
        g, w = np.asarray(g), np.asarray(w)
        if g.dtype.kind in "iu":
            np.testing.assert_array_equal(g, w, err_msg=f"{what}[{i}]")
        else:
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=f"{what}[{i}]")


def _compile_and_run(fn, args):
    """Compiles jit(fn) once for `args`; returns (outputs, compiled HLO text)."""
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled(*args), compiled.as_text()


# --------------------------------------------------------------------------------------
# (a) Explicit sharding
# --------------------------------------------------------------------------------------

# Position arguments passed as traced jit arguments (replicated): shard_local must move
# them to the batch sharding itself.
POSITIONS = {
    "causal": {},
    "ragged": {"q_offset": np.array([0, -9], np.int32), "kv_length": np.array([S, 50], np.int32)},
    "packed": {"segment_ids": np.repeat(np.repeat(np.arange(3, dtype=np.int32), [20, 30, 14])[None], 2, axis=0)},
}


def _sparse_loss(q, k, v, index_q, index_k, w_out, positions):
    r = msa_jax.sparse_attention(q, k, v, index_q, index_k, top_k=TOP_K, block_size=BLOCK, **positions)
    return jnp.sum(r.out * w_out) + r.kl_loss, r


_sparse_value_and_grad = jax.value_and_grad(_sparse_loss, argnums=range(5), has_aux=True)


@pytest.mark.parametrize(
    "mesh_name, positions",
    [("data2xmodel2", "causal"), ("data2xmodel2", "ragged"), ("data2xmodel2", "packed"), ("data4", "causal")],
)
def test_sparse_attention_explicit(mesh_name, positions, inputs):
    """value_and_grad of sparse_attention: value, out, lse, block_indices, kl_loss and all five
    gradients equal the unsharded call; out/lse/block_indices/grads keep batch+head sharding;
    the compiled program has no all-gather (only the KL-sum and index_k-gradient all-reduces)."""
    _, _, batch, spec, ik_spec = MESHES[mesh_name]
    x = inputs[batch]
    pos = {k: v[:batch] if batch == 2 else np.concatenate([v, v]) for k, v in POSITIONS[positions].items()}
    names = ("q", "k", "v", "index_q", "index_k", "w_out")
    (want_value, want), want_grads = jax.jit(_sparse_value_and_grad)(*(x[n] for n in names), pos)
    assert float(want.kl_loss) > 0.0 and int(jnp.max(want.block_indices)) >= TOP_K  # a real selection

    mesh = _explicit_mesh(mesh_name)
    with jax.set_mesh(mesh):
        args = [_put(mesh, x[n], ik_spec if n == "index_k" else spec) for n in names]
        ((value, got), grads), hlo = _compile_and_run(_sparse_value_and_grad, (*args, pos))

    _assert_close(value, want_value, "loss value")
    _assert_close(got, want, "MSAOutput")
    _assert_close(grads, want_grads, "gradients (q, k, v, index_q, index_k)")
    _assert_spec(got.out, spec, "out")
    _assert_spec(got.block_indices, spec, "block_indices")
    _assert_spec(got.lse, LSE_SPEC[mesh_name], "lse")
    for n, g in zip(names, grads):
        _assert_spec(g, ik_spec if n == "index_k" else spec, f"d{n}")
    assert _tensor_all_gathers(hlo, batch) == []
    assert _collective_lines(hlo, "all-reduce"), "expected the KL sum's all-reduce in the HLO"


@jax.jit
def _select(index_q, index_k):
    return msa_jax.select_blocks(index_q, index_k, top_k=TOP_K, block_size=BLOCK)


def _block_sparse_loss(q, k, v, block_indices, w_out, w_lse):
    out, lse = msa_jax.block_sparse_attention(q, k, v, block_indices, block_size=BLOCK, return_lse=True)
    return jnp.sum(out * w_out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0)), (out, lse)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_block_sparse_attention_explicit(mesh_name, inputs):
    """block_sparse_attention with return_lse: out, lse and dq/dk/dv (through both outputs)
    equal the unsharded call, keep their sharding, and nothing is all-gathered."""
    _, _, batch, spec, _ = MESHES[mesh_name]
    x = inputs[batch]
    bi = _select(x["index_q"], x["index_k"])
    f = jax.value_and_grad(_block_sparse_loss, argnums=(0, 1, 2), has_aux=True)
    plain = (x["q"], x["k"], x["v"], bi, x["w_out"], x["w_lse"])
    (want_value, want), want_grads = jax.jit(f)(*plain)

    mesh = _explicit_mesh(mesh_name)
    with jax.set_mesh(mesh):
        args = [_put(mesh, a, P(*spec[:a.ndim])) for a in plain]
        ((value, (out, lse)), grads), hlo = _compile_and_run(f, args)

    _assert_close(value, want_value, "loss value")
    _assert_close((out, lse), want, "(out, lse)")
    _assert_close(grads, want_grads, "gradients (q, k, v)")
    _assert_spec(out, spec, "out")
    _assert_spec(lse, LSE_SPEC[mesh_name], "lse")
    for n, g in zip("qkv", grads):
        _assert_spec(g, spec, f"d{n}")
    assert _collective_lines(hlo, "all-gather") == []


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_select_blocks_explicit(mesh_name, inputs):
    """select_blocks on sharded index tensors gives the identical selection, sharded like index_q,
    with no collective in the compiled program."""
    _, _, batch, spec, ik_spec = MESHES[mesh_name]
    x = inputs[batch]

    def f(iq, ik):
        return msa_jax.select_blocks(iq, ik, top_k=TOP_K, block_size=BLOCK, kv_length=S - 5)

    want = jax.jit(f)(x["index_q"], x["index_k"])
    mesh = _explicit_mesh(mesh_name)
    with jax.set_mesh(mesh):
        got, hlo = _compile_and_run(f, (_put(mesh, x["index_q"], spec), _put(mesh, x["index_k"], ik_spec)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    _assert_spec(got, spec, "block_indices")
    assert _collective_lines(hlo, "all-gather") == []
    assert _collective_lines(hlo, "all-reduce") == []


@pytest.mark.parametrize("mode", ["sparse", "dense"])
@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_index_kl_loss_explicit(mesh_name, mode, inputs):
    """index_kl_loss and its gradients w.r.t. index_q and index_k equal the unsharded call;
    the gradients keep their sharding; only all-reduces cross devices."""
    _, _, batch, spec, ik_spec = MESHES[mesh_name]
    x = inputs[batch]
    bi = _select(x["index_q"], x["index_k"])

    def loss(index_q, index_k, q, k, block_indices):
        return msa_jax.index_kl_loss(
            q, k, index_q, index_k, block_indices, block_size=BLOCK, mode=mode, kl_coeff=0.7
        )

    f = jax.value_and_grad(loss, argnums=(0, 1))
    plain = (x["index_q"], x["index_k"], x["q"], x["k"], bi)
    want_value, want_grads = jax.jit(f)(*plain)
    assert float(want_value) > 0.0

    mesh = _explicit_mesh(mesh_name)
    with jax.set_mesh(mesh):
        args = [_put(mesh, a, ik_spec if i == 1 else spec) for i, a in enumerate(plain)]
        (value, grads), hlo = _compile_and_run(f, args)

    _assert_close(value, want_value, "kl_loss")
    _assert_close(grads, want_grads, "gradients (index_q, index_k)")
    _assert_spec(grads[0], spec, "d index_q")
    _assert_spec(grads[1], ik_spec, "d index_k")
    assert _collective_lines(hlo, "all-gather") == []
    assert _collective_lines(hlo, "all-reduce")


# --------------------------------------------------------------------------------------
# (b) Auto sharding: jit with in_shardings and no explicit mesh
# --------------------------------------------------------------------------------------


def _gathered_shapes(shape, sharded_dims, parts=2):
    """HLO result types ("f32[a,b,...]") of any all-gather of a tensor of `shape` sharded
    `parts` ways along `sharded_dims`: at least one of those dims restored to full size."""
    shapes = set()
    for mask in range(1, 1 << len(sharded_dims)):
        dims = list(shape)
        for bit, dim in enumerate(sharded_dims):
            if not mask >> bit & 1:
                dims[dim] //= parts
        shapes.add("f32[" + ",".join(map(str, dims)) + "]")
    return shapes


def _result_shape(line):
    return re.search(r"=\s*(\w+\[[\d,]*\])", line).group(1)


@pytest.fixture(scope="module")
def auto_run(inputs):
    """sparse_attention forward and value_and_grad jitted with in_shardings on an Auto mesh."""
    x = inputs[2]
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    s4 = NamedSharding(mesh, P("data", None, "model", None))
    s3 = NamedSharding(mesh, P("data", None, None))
    names = ("q", "k", "v", "index_q", "index_k", "w_out")
    args = [x[n] for n in names]
    shardings = [s3 if n == "index_k" else s4 for n in names]

    def forward(q, k, v, index_q, index_k, w_out):
        return msa_jax.sparse_attention(q, k, v, index_q, index_k, top_k=TOP_K, block_size=BLOCK)

    def value_and_grad(*a):
        return _sparse_value_and_grad(*a, {})

    fwd = jax.jit(forward, in_shardings=shardings).lower(*args).compile()
    vag = jax.jit(value_and_grad, in_shardings=shardings).lower(*args).compile()
    return dict(
        args=args, s4=s4,
        forward=fwd(*args), forward_hlo=fwd.as_text(), forward_want=jax.jit(forward)(*args),
        vag=vag(*args), vag_hlo=vag.as_text(), vag_want=jax.jit(value_and_grad)(*args),
    )


def test_auto_sharding_same_numbers(auto_run):
    """Auto-sharded forward and value_and_grad equal the unsharded call; out keeps q's layout."""
    _assert_close(auto_run["forward"], auto_run["forward_want"], "MSAOutput (forward)")
    _assert_close(auto_run["vag"], auto_run["vag_want"], "value_and_grad")
    out = auto_run["forward"].out
    assert out.sharding.is_equivalent_to(auto_run["s4"], out.ndim), out.sharding


@pytest.mark.parametrize("program", ["forward", "vag"])
def test_auto_sharding_never_gathers_inputs(program, auto_run):
    """The auto-sharded forward (and value_and_grad) never all-gathers q, k, v, index_q or
    index_k, or their gradients, whole or in part."""
    forbidden = set()
    for a in auto_run["args"][:5]:
        forbidden |= _gathered_shapes(a.shape, (0, 2) if a.ndim == 4 else (0,))
    gathers = _collective_lines(auto_run[f"{program}_hlo"], "all-gather")
    offending = [g for g in gathers if _result_shape(g) in forbidden]
    assert offending == [], offending


def test_auto_sharding_has_no_all_gather(auto_run):
    """Nothing is gathered at all, forward or backward: every implementation call is split
    over batch and heads by msa_jax.partitioning (the reference's lax.top_k, which XLA's own
    partitioner would gather, never reaches it unsplit)."""
    for program in ("forward", "vag"):
        gathers = _collective_lines(auto_run[f"{program}_hlo"], "all-gather")
        assert gathers == [], (program, gathers)


# --------------------------------------------------------------------------------------
# (c) Auto sharding through custom_partitioning, for every implementation that runs here
# --------------------------------------------------------------------------------------

# Pallas tiles want powers of two >= 16 for Di and the block.
AUTO_DI, AUTO_BLOCK = 16, 16


@pytest.fixture
def split_spy(monkeypatch):
    """Records what each partition callback decided: (batch axes, head axes) per call."""
    from msa_jax import partitioning

    seen = []
    real = partitioning._split_axes

    def spy(mesh, infos, layouts):
        seen.append(real(mesh, infos, layouts))
        return seen[-1]

    monkeypatch.setattr(partitioning, "_split_axes", spy)
    return seen


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_auto_sharding_custom_partitioning(implementation, split_spy):
    """value_and_grad of sparse_attention under jit with in_shardings (Auto mesh 2x2, batch
    over "data", heads over "model"): equals the unsharded xla call; the partition callback
    split every implementation call (select, attention fwd/bwd, KL fwd/bwd) over both axes;
    the compiled program gathers nothing; index_k's gradient is all-reduced over "model" alone
    at its local shape [B/2, S, Di], and the KL sum over all four devices."""
    rng = np.random.default_rng(7)
    batch = 2
    shapes = dict(q=(batch, T, HQ, D), k=(batch, S, HKV, D), v=(batch, S, HKV, D),
                  index_q=(batch, T, HKV, AUTO_DI), index_k=(batch, S, AUTO_DI), w_out=(batch, T, HQ, D))
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes.values()]

    def loss(q, k, v, index_q, index_k, w_out, impl):
        r = msa_jax.sparse_attention(q, k, v, index_q, index_k, top_k=TOP_K, block_size=AUTO_BLOCK,
                                     implementation=impl)
        return jnp.sum(r.out * w_out) + r.kl_loss, r

    f = jax.value_and_grad(loss, argnums=range(5), has_aux=True)
    (want_value, want), want_grads = jax.jit(f, static_argnums=6)(*args, "xla")
    assert int(jnp.max(want.block_indices)) >= TOP_K - 1  # blocks other than the local one chosen

    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    s4, s3 = NamedSharding(mesh, P("data", None, "model", None)), NamedSharding(mesh, P("data", None, None))
    shardings = [s3 if n == "index_k" else s4 for n in shapes]
    compiled = jax.jit(f, in_shardings=shardings, static_argnums=6).lower(*args, implementation).compile()
    (value, got), grads = compiled(*args)
    hlo = compiled.as_text()

    tol = dict(rtol=1e-5, atol=1e-5)  # Pallas sums in another order than the reference
    np.testing.assert_allclose(value, want_value, **tol)
    for name, g, w in zip(("out", "kl_loss", "block_indices", "lse"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=name, **tol)
    for name, g, w in zip(shapes, grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=f"d{name}", **tol)

    assert len(split_spy) >= 5, split_spy
    assert set(split_spy) == {(("data",), ("model",))}, split_spy
    assert _collective_lines(hlo, "all-gather") == []
    reduces = _collective_lines(hlo, "all-reduce")
    local_ik = f"f32[{batch // 2},{S},{AUTO_DI}]"
    assert any(local_ik in line for line in reduces), reduces
    assert not any(f"f32[{batch},{S},{AUTO_DI}]" in line for line in reduces), reduces


def test_explicit_mesh_pallas():
    """The explicit-mesh path (shard_map) runs the Pallas kernels too: value_and_grad equals
    the unsharded xla call and nothing is gathered. (Pallas declares its outputs without a
    varying-axes type, so the shard_map runs with check_vma=False; index_k's gradient is then
    summed over the head axis by shard_map's transpose, which this pins down.)"""
    rng = np.random.default_rng(11)
    batch = 2
    shapes = ((batch, T, HQ, D), (batch, S, HKV, D), (batch, S, HKV, D), (batch, T, HKV, AUTO_DI),
              (batch, S, AUTO_DI), (batch, T, HQ, D))
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]

    def loss(q, k, v, index_q, index_k, w_out, impl):
        r = msa_jax.sparse_attention(q, k, v, index_q, index_k, top_k=TOP_K, block_size=AUTO_BLOCK,
                                     implementation=impl)
        return jnp.sum(r.out * w_out) + r.kl_loss, r.out

    f = jax.value_and_grad(loss, argnums=range(5), has_aux=True)
    (want_value, want_out), want_grads = jax.jit(f, static_argnums=6)(*args, "xla")
    mesh = _explicit_mesh("data2xmodel2")
    _, _, _, spec, ik_spec = MESHES["data2xmodel2"]
    with jax.set_mesh(mesh):
        sharded = [_put(mesh, a, ik_spec if a.ndim == 3 else spec) for a in args]
        compiled = jax.jit(f, static_argnums=6).lower(*sharded, "pallas").compile()
        (value, out), grads = compiled(*sharded)
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value, want_value, **tol)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), **tol)
    for name, g, w in zip(("q", "k", "v", "index_q", "index_k"), grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=f"d{name}", **tol)
    assert _collective_lines(compiled.as_text(), "all-gather") == []
