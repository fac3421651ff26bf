"""Context parallelism (msa_jax/context_parallel.py) on 4 host CPU devices.

Pins down: the sequence split over a mesh axis in zig-zag order gives the same out, lse,
block_indices, kl_loss and gradients (q, k, v, index_q, index_k) as the unsharded
`sparse_attention` on the natural-order inputs, in both modes; what crosses devices is
exactly what the README says (all-gathers of K, V and index_k forward, reduce-scatters of
their gradients backward, scalar all-reduces) and never q or index_q; right-padded rows
(kv_length), packed documents (segment_ids) and the batch or the heads split over a second
mesh axis (batch_axis, head_axis) agree too.
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
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import msa_jax  # noqa: E402

pytestmark = pytest.mark.skipif(
    jax.device_count() < 4,
    reason=f"needs 4 devices, found {jax.device_count()}: set "
    "XLA_FLAGS=--xla_force_host_platform_device_count=4 before jax is imported",
)

N = 4  # devices on the sequence axis
B, S, HQ, HKV, D, DI = 2, 64, 4, 2, 16, 12  # Di 12 != D 16: HLO shapes tell index_k from K
BLOCK, TOP_K = 8, 3  # 8 blocks, chunks of S / (2N) = 8 tokens
RTOL, ATOL = 1e-5, 1e-6


def _natural(x):
    return np.asarray(msa_jax.unzigzag(np.asarray(x), N))


def _collectives(hlo, op):
    pattern = re.compile(rf"=\s*(\w+\[[\d,]*\])\S*\s{re.escape(op)}(?:-start)?\(")
    return [m.group(1) for m in map(pattern.search, hlo.splitlines()) if m]


def test_zigzag_layout():
    """Device d of N holds chunks d and 2N-1-d; unzigzag inverts zigzag."""
    x = np.arange(2 * N * 3)[None]  # chunks of 3 tokens
    z = np.asarray(msa_jax.zigzag(x, N))
    for d, shard in enumerate(z[0].reshape(N, 2, 3)):
        np.testing.assert_array_equal(shard[0], np.arange(3) + 3 * d)
        np.testing.assert_array_equal(shard[1], np.arange(3) + 3 * (2 * N - 1 - d))
    np.testing.assert_array_equal(_natural(z), x)


# (implementation, mode, B, Di, block): Pallas tiles want Di and the block >= 16 (powers of
# two); its chunks of 8 tokens then start mid-block, which the kernels must handle.
CASES = [("xla", "sparse", B, DI, BLOCK), ("xla", "dense", B, DI, BLOCK), ("pallas", "sparse", 1, 16, 16)]


@pytest.mark.parametrize("implementation, mode, B, DI, BLOCK", CASES)
def test_matches_one_device(implementation, mode, B, DI, BLOCK):
    """value_and_grad of context_parallel_sparse_attention (sequence over 4 devices) equals
    sparse_attention on one device (the xla reference); outputs stay sequence-sharded; only
    K, V and index_k are gathered and only their gradients reduce-scattered."""
    rng = np.random.default_rng(3)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    q, k, v = normal(B, S, HQ, D), normal(B, S, HKV, D), normal(B, S, HKV, D)
    index_q, index_k, w = normal(B, S, HKV, DI), normal(B, S, DI), normal(B, S, HQ, D)
    opts = dict(top_k=TOP_K, block_size=BLOCK, mode=mode, kl_coeff=0.5)

    def loss_one(q, k, v, index_q, index_k):
        r = msa_jax.sparse_attention(q, k, v, index_q, index_k, implementation="xla", **opts)
        return jnp.sum(r.out * w) + r.kl_loss, r

    mesh = jax.make_mesh((N,), ("seq",))
    w_zz = msa_jax.zigzag(w, N)

    def loss_cp(q, k, v, index_q, index_k):
        r = msa_jax.context_parallel_sparse_attention(q, k, v, index_q, index_k, mesh=mesh, axis="seq",
                                                      implementation=implementation, **opts)
        return jnp.sum(r.out * w_zz) + r.kl_loss, r

    (want_value, want), want_grads = jax.jit(jax.value_and_grad(loss_one, argnums=range(5), has_aux=True))(
        q, k, v, index_q, index_k)
    assert float(want.kl_loss) > 0.0 and int(jnp.max(want.block_indices)) >= TOP_K - 1

    args = [jax.device_put(msa_jax.zigzag(x, N), NamedSharding(mesh, P(None, "seq")))
            for x in (q, k, v, index_q, index_k)]
    compiled = jax.jit(jax.value_and_grad(loss_cp, argnums=range(5), has_aux=True)).lower(*args).compile()
    (value, got), grads = compiled(*args)

    tol = dict(rtol=RTOL, atol=ATOL if implementation == "xla" else 1e-5)  # Pallas sums in another order
    np.testing.assert_allclose(value, want_value, rtol=RTOL)
    np.testing.assert_allclose(got.kl_loss, want.kl_loss, rtol=RTOL)
    np.testing.assert_array_equal(_natural(got.block_indices), np.asarray(want.block_indices))
    np.testing.assert_allclose(_natural(got.out), want.out, **tol)
    np.testing.assert_allclose(_natural(got.lse), want.lse, **tol)
    for name, g, wg in zip(("q", "k", "v", "index_q", "index_k"), grads, want_grads):
        np.testing.assert_allclose(_natural(g), wg, err_msg=f"d{name}", **tol)
    assert tuple(got.out.sharding.spec)[:2] == (None, "seq"), got.out.sharding

    hlo = compiled.as_text()
    kv_full, ik_full = f"f32[{B},{S},{HKV},{D}]", f"f32[{B},{S},{DI}]"
    kv_local, ik_local = f"f32[{B},{S // N},{HKV},{D}]", f"f32[{B},{S // N},{DI}]"
    assert sorted(_collectives(hlo, "all-gather")) == sorted([kv_full, kv_full, ik_full])
    assert sorted(_collectives(hlo, "reduce-scatter")) == sorted([kv_local, kv_local, ik_local])
    assert set(_collectives(hlo, "all-reduce")) <= {"f32[]", "(f32[],f32[])"}


# Packed documents of each row (natural order): their first tokens, the rest of the row the
# last document. Row 0's documents start mid-chunk and mid-block; row 1's span chunks.
DOC_STARTS = ((0, 5, 21, 40, 41), (0, 30))

# (implementation, mode, data shards, head shards, kv_length, packed): right-padded rows, packed
# documents, and the batch or the heads split over a second mesh axis beside the sequence.
RAGGED_CASES = [
    ("xla", "sparse", 1, 1, (64, 37), False),
    ("xla", "dense", 2, 1, (50, 64), False),
    ("xla", "sparse", 2, 1, None, False),
    ("xla", "sparse", 1, 2, (64, 45), False),
    ("xla", "dense", 1, 2, None, False),
    ("pallas", "sparse", 2, 1, (64, 29), False),
    ("pallas", "sparse", 1, 2, None, False),
    ("xla", "sparse", 1, 1, None, True),
    ("xla", "dense", 2, 1, (64, 50), True),
    ("pallas", "sparse", 1, 1, (58, 64), True),
]


def _two_row_case(implementation, mode, kv_length, packed, seed):
    """Random inputs of two rows (natural order), the op's options, kv_length, segment_ids
    (documents from DOC_STARTS when packed) and the one-device call's position arguments."""
    Di, block = (16, 16) if implementation == "pallas" else (DI, BLOCK)  # Pallas tiles: >= 16
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)  # noqa: E731
    xs = (normal(2, S, HQ, D), normal(2, S, HKV, D), normal(2, S, HKV, D), normal(2, S, HKV, Di), normal(2, S, Di))
    w = normal(2, S, HQ, D)
    opts = dict(top_k=TOP_K, block_size=block, mode=mode, kl_coeff=0.5)
    kvl = None if kv_length is None else np.asarray(kv_length, np.int32)
    one_kw = {} if kvl is None else dict(kv_length=kvl) if packed else dict(q_offset=0, kv_length=kvl)
    seg = None
    if packed:
        seg = np.zeros((2, S), np.int32)
        for row, starts in enumerate(DOC_STARTS):
            for start in starts:
                seg[row, start:] += 1
        one_kw["segment_ids"] = seg
    return xs, w, opts, kvl, seg, one_kw


@pytest.mark.parametrize("implementation, mode, n_data, n_heads, kv_length, packed", RAGGED_CASES)
def test_ragged_rows_batch_and_head_axes(implementation, mode, n_data, n_heads, kv_length, packed):
    """kv_length (right padding), segment_ids (packed documents), batch_axis and head_axis
    (the batch or the heads over a second mesh axis) give what sparse_attention(q_offset=0,
    kv_length=..., segment_ids=...) gives on one device, d index_k included (summed over the
    head shards); the all-gathers hold only the device's rows and kv heads, plus the whole
    one-headed index_k (and, packed, the rows' segment ids)."""
    n = N // (n_data * n_heads)  # devices on the sequence axis
    (q, k, v, index_q, index_k), w, opts, kvl, seg, one_kw = _two_row_case(implementation, mode, kv_length, packed, 5)
    Di = index_k.shape[-1]

    def loss_one(q, k, v, index_q, index_k):
        r = msa_jax.sparse_attention(q, k, v, index_q, index_k, implementation="xla", **opts, **one_kw)
        return jnp.sum(jnp.where(jnp.isfinite(r.lse), r.lse, 0.0)) + jnp.sum(r.out * w) + r.kl_loss, r

    mesh = jax.make_mesh((n_data, n_heads, n), ("data", "heads", "seq"))
    batch_axis = "data" if n_data > 1 else None
    head_axis = "heads" if n_heads > 1 else None
    w_zz = msa_jax.zigzag(w, n)

    def loss_cp(q, k, v, index_q, index_k):
        r = msa_jax.context_parallel_sparse_attention(
            q, k, v, index_q, index_k, mesh=mesh, axis="seq", batch_axis=batch_axis, head_axis=head_axis, kv_length=kvl,
            segment_ids=None if seg is None else msa_jax.zigzag(seg, n), implementation=implementation, **opts)
        return jnp.sum(jnp.where(jnp.isfinite(r.lse), r.lse, 0.0)) + jnp.sum(r.out * w_zz) + r.kl_loss, r

    (want_value, want), want_grads = jax.jit(jax.value_and_grad(loss_one, argnums=range(5), has_aux=True))(
        q, k, v, index_q, index_k)
    if kvl is not None:  # the padding is there: padding queries select nothing
        assert (np.asarray(want.block_indices)[1, int(kvl[1]):] == -1).all()
    natural = lambda x: np.asarray(msa_jax.unzigzag(np.asarray(x), n))  # noqa: E731
    specs = [P(batch_axis, "seq", head_axis)] * 4 + [P(batch_axis, "seq")]
    args = [jax.device_put(msa_jax.zigzag(x, n), NamedSharding(mesh, spec))
            for x, spec in zip((q, k, v, index_q, index_k), specs)]
    compiled = jax.jit(jax.value_and_grad(loss_cp, argnums=range(5), has_aux=True)).lower(*args).compile()
    (value, got), grads = compiled(*args)

    tol = dict(rtol=RTOL, atol=ATOL if implementation == "xla" else 1e-5)
    np.testing.assert_allclose(value, want_value, rtol=RTOL)
    np.testing.assert_allclose(got.kl_loss, want.kl_loss, rtol=RTOL)
    np.testing.assert_array_equal(natural(got.block_indices), np.asarray(want.block_indices))
    np.testing.assert_allclose(natural(got.out), want.out, **tol)
    np.testing.assert_array_equal(np.isfinite(natural(got.lse)), np.isfinite(want.lse))
    np.testing.assert_allclose(np.nan_to_num(natural(got.lse), neginf=0.0), np.nan_to_num(want.lse, neginf=0.0), **tol)
    for name, g, wg in zip(("q", "k", "v", "index_q", "index_k"), grads, want_grads):
        np.testing.assert_allclose(natural(g), wg, err_msg=f"d{name}", **tol)
    assert tuple(got.out.sharding.spec)[:3] == (batch_axis, "seq", head_axis), got.out.sharding

    hlo = compiled.as_text()
    b, h = 2 // n_data, HKV // n_heads
    kv_full, ik_full = f"f32[{b},{S},{h},{D}]", f"f32[{b},{S},{Di}]"
    seg_full = [f"s32[{b},{S}]"] if packed else []
    assert sorted(_collectives(hlo, "all-gather")) == sorted([kv_full, kv_full, ik_full, *seg_full])


def test_rejects_bad_layouts():
    mesh = jax.make_mesh((N,), ("seq",))
    x = jnp.zeros((1, 20, 2, 16))  # 20 is not a multiple of 2 * 4
    ik = jnp.zeros((1, 20, 16))
    with pytest.raises(ValueError, match="multiple of 2 \\* num_shards"):
        msa_jax.context_parallel_sparse_attention(x, x, x, x, ik, mesh=mesh, axis="seq", block_size=8)
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        msa_jax.context_parallel_sparse_attention(x, x, x, x, ik, mesh=mesh, axis="data", block_size=8)
    mesh2 = jax.make_mesh((2, 2), ("data", "seq"))
    x, ik = jnp.zeros((3, 16, 2, 16)), jnp.zeros((3, 16, 16))
    with pytest.raises(ValueError, match="multiple of mesh.shape\\['data'\\]"):
        msa_jax.context_parallel_sparse_attention(x, x, x, x, ik, mesh=mesh2, axis="seq", batch_axis="data",
                                                  block_size=8)
    with pytest.raises(ValueError, match="multiple of mesh.shape\\['data'\\] = 2 \\(a device holds whole GQA"):
        msa_jax.context_parallel_sparse_attention(jnp.zeros((2, 16, 2, 16)), jnp.zeros((2, 16, 1, 16)),
                                                  jnp.zeros((2, 16, 1, 16)), jnp.zeros((2, 16, 1, 16)),
                                                  jnp.zeros((2, 16, 16)), mesh=mesh2, axis="seq", head_axis="data",
                                                  block_size=8)
    with pytest.raises(ValueError, match="batch_axis / head_axis other ones"):
        msa_jax.context_parallel_sparse_attention(x, x, x, x, ik, mesh=mesh2, axis="seq", batch_axis="seq",
                                                  block_size=8)
    with pytest.raises(ValueError, match="kv_length"):
        msa_jax.context_parallel_sparse_attention(x, x, x, x, ik, mesh=mesh2, axis="seq", block_size=8,
                                                  kv_length=np.array([17, 3, 3], np.int32))


# ---- fetching only the selected K/V blocks (kv_fetch_blocks) ---------------------------------


def test_fetch_selected_kv_places_wanted_blocks():
    """fetch_selected_kv under shard_map: every block a device wants arrives at its natural
    position (the others are zero) when no device wants more than the capacity from one
    owner, and the whole K/V otherwise (the fallback)."""
    from msa_jax.context_parallel import fetch_selected_kv

    b, h, dim, bk, chunk_blocks = 2, 2, 4, 4, 2
    m = 2 * chunk_blocks  # blocks per device
    nb, S = N * m, N * m * bk
    rng = np.random.default_rng(11)
    k = jnp.asarray(rng.standard_normal((b, S, h, dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((b, S, h, dim)), jnp.float32)
    mesh = jax.make_mesh((N,), ("seq",))
    owner = np.asarray(msa_jax.unzigzag(np.repeat(np.arange(N), m)[None], N))[0]  # owner of natural block j

    def run(needed, capacity):
        def local(k, v, needed):
            return fetch_selected_kv(k, v, needed[0], axis="seq", num_shards=N, block_size=bk, capacity=capacity)

        specs = (P(None, "seq"), P(None, "seq"), P("seq"))
        args = [jax.device_put(x, NamedSharding(mesh, spec))
                for x, spec in zip((msa_jax.zigzag(k, N), msa_jax.zigzag(v, N), jnp.asarray(needed)), specs)]
        out = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P("seq"), P("seq")),
                                    check_vma=False))(*args)
        return [np.asarray(x) for x in out]  # [N * b, S, h, D]: device dev's result at rows dev * b...

    # Each device wants a random set with at most 2 blocks from each owner.
    needed = np.zeros((N, b, h, nb), bool)
    for dev in range(N):
        for row in range(b):
            for head in range(h):
                for o in range(N):
                    mine = np.flatnonzero(owner == o)
                    needed[dev, row, head, rng.choice(mine, size=rng.integers(0, 3), replace=False)] = True
    got_k, got_v = run(needed, capacity=2)
    for dev in range(N):
        mask = np.repeat(needed[dev], bk, axis=-1).transpose(0, 2, 1)[..., None]  # [b, S, h, 1]
        sl = slice(dev * b, (dev + 1) * b)
        np.testing.assert_array_equal(got_k[sl], np.where(mask, k, 0.0))
        np.testing.assert_array_equal(got_v[sl], np.where(mask, v, 0.0))
    # One device wants 3 blocks of one owner: capacity 2 overflows, everyone gathers it all.
    needed[1, 0, 0, np.flatnonzero(owner == 2)[:3]] = True
    got_k, got_v = run(needed, capacity=2)
    np.testing.assert_array_equal(got_k, np.tile(np.asarray(k), (N, 1, 1, 1)))
    np.testing.assert_array_equal(got_v, np.tile(np.asarray(v), (N, 1, 1, 1)))


# (implementation, mode, devices on the sequence axis, kv_fetch_blocks, kv_length, packed):
# capacities that always suffice (the fetch path) and that never do (the fallback).
FETCH_CASES = [
    ("xla", "sparse", 4, 2, None, False),  # 2 blocks per device: everything fits
    ("xla", "sparse", 4, 1, (64, 37), False),  # a device's own 2 blocks overflow: fallback
    ("xla", "sparse", 4, 2, (64, 50), True),  # documents start mid-block: two blocks per tile
    ("xla", "dense", 4, 2, None, False),  # dense mode gathers everything
    ("pallas", "sparse", 2, 2, None, False),  # chunks of 16 tokens = one Pallas block
]


@pytest.mark.parametrize("implementation, mode, n, capacity, kv_length, packed", FETCH_CASES)
def test_fetching_selected_blocks_matches_one_device(implementation, mode, n, capacity, kv_length, packed):
    """kv_fetch_blocks gives what sparse_attention gives on one device (values and all five
    gradients), with an all-to-all of the fetched blocks in the compiled program."""
    (q, k, v, index_q, index_k), w, opts, kvl, seg, one_kw = _two_row_case(implementation, mode, kv_length, packed, 9)

    def loss_one(q, k, v, index_q, index_k):
        r = msa_jax.sparse_attention(q, k, v, index_q, index_k, implementation="xla", **opts, **one_kw)
        return jnp.sum(r.out * w) + r.kl_loss, r

    mesh = jax.make_mesh((n,), ("seq",), devices=jax.devices()[:n])
    w_zz = msa_jax.zigzag(w, n)

    def loss_cp(q, k, v, index_q, index_k):
        r = msa_jax.context_parallel_sparse_attention(
            q, k, v, index_q, index_k, mesh=mesh, axis="seq", kv_length=kvl, kv_fetch_blocks=capacity,
            segment_ids=None if seg is None else msa_jax.zigzag(seg, n), implementation=implementation, **opts)
        return jnp.sum(r.out * w_zz) + r.kl_loss, r

    (want_value, want), want_grads = jax.jit(jax.value_and_grad(loss_one, argnums=range(5), has_aux=True))(
        q, k, v, index_q, index_k)
    natural = lambda x: np.asarray(msa_jax.unzigzag(np.asarray(x), n))  # noqa: E731
    args = [jax.device_put(msa_jax.zigzag(x, n), NamedSharding(mesh, P(None, "seq")))
            for x in (q, k, v, index_q, index_k)]
    compiled = jax.jit(jax.value_and_grad(loss_cp, argnums=range(5), has_aux=True)).lower(*args).compile()
    (value, got), grads = compiled(*args)

    tol = dict(rtol=RTOL, atol=ATOL if implementation == "xla" else 1e-5)
    np.testing.assert_allclose(value, want_value, rtol=RTOL)
    np.testing.assert_array_equal(natural(got.block_indices), np.asarray(want.block_indices))
    np.testing.assert_allclose(natural(got.out), want.out, **tol)
    for name, g, wg in zip(("q", "k", "v", "index_q", "index_k"), grads, want_grads):
        np.testing.assert_allclose(natural(g), wg, err_msg=f"d{name}", **tol)
    hlo = compiled.as_text()
    # The fetch (and its transpose) is there; dense mode never builds it. (An all-to-all may
    # show as a tuple of per-device pieces, which _collectives' pattern does not read.)
    assert (" all-to-all(" in hlo) == (mode == "sparse")


def test_rejects_bad_fetch_capacity():
    mesh = jax.make_mesh((N,), ("seq",))
    x, ik = jnp.zeros((1, 64, 2, 16)), jnp.zeros((1, 64, 16))
    with pytest.raises(ValueError, match="kv_fetch_blocks must be None or a positive int"):
        msa_jax.context_parallel_sparse_attention(x, x, x, x, ik, mesh=mesh, axis="seq", block_size=8,
                                                  kv_fetch_blocks=0)
    with pytest.raises(ValueError, match="not a multiple of block_size=16"):
        msa_jax.context_parallel_sparse_attention(x, x, x, x, ik, mesh=mesh, axis="seq", block_size=16,
                                                  kv_fetch_blocks=2)
