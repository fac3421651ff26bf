"""The `cuda` implementation's KL glue on any machine: msa_jax/cuda.py around emulated kernels.

The KL kernels (cuda/kernels/kl_sm90.cuh) run only on a Hopper GPU (tests/test_cuda_kl.py);
what msa_jax/cuda.py does around them (work lists per query chunk, the student pass's
log-sum-exp merge, the value from the gradient pass's terms, the deterministic mode's slot
partials, the gradients saved for dkl = 1 and scaled in kl_bwd) is plain jnp. Here the two
FFI calls (`ops.kl_partials`, `ops.kl_bwd`) are replaced by jnp emulations of the contract
cuda/include/msa/params.h states for them, and the implementation's kl_value / kl_fwd /
kl_bwd are compared with the `xla` reference in float32: ragged rows with padding, packed
documents, dense mode, several query chunks, both gradient modes. A glue bug (a wrong merge,
chunk offset, reshape or scale) fails here in CI, before any GPU run.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import msa_jax
from msa_jax import cuda as cuda_impl
from msa_jax import dispatch
from msa_jax import ffi
from msa_jax.config import Positions
from msa_jax.ffi import ops
from msa_jax.kv_outer import partials as kv_partials


def _entry_tiles(work, E):
    """(tile, live) of every entry in the kernels' row layout e = query * K + slot, [B, Hkv, E]:
    an entry is live when a work item covers it, and reads that item's tile."""
    pos = jnp.arange(E)

    def per_head(start, count, tile, entry_query, entry_slot, K):
        inside = (pos[:, None] >= start[None]) & (pos[:, None] < (start + count)[None])  # [E, items]
        tile_sorted = jnp.sum(jnp.where(inside, tile[None], 0), axis=1)
        covered = jnp.any(inside, axis=1)
        row = jnp.where(covered, entry_query * K + entry_slot, E)  # uncovered entries are dropped
        return (jnp.zeros(E, jnp.int32).at[row].set(tile_sorted, mode="drop"),
                jnp.zeros(E, bool).at[row].set(True, mode="drop"))

    K = E // work.entry_ok.shape[1]
    f = jax.vmap(jax.vmap(lambda *a: per_head(*a, K)))
    return f(work.item_start, work.item_count, work.item_tile, work.entry_query, work.entry_slot)


def _emulate(q, k, lse, index_q, index_k, last_visible, work, q_base, top_k, block_size, softmax_scale,
             index_softmax_scale):
    """Per entry and key half of its tile: P̄ (the group-mean teacher), u, visibility, shapes
    [B, Tc, Hkv, K, 2, Bk / 2]; which entries an item covers [B, Tc, Hkv, K]; the entries'
    keys (clipped) [B, Tc, Hkv, K, Bk]; the chunk's rows t = q_base + query."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    E = work.entry_query.shape[-1]
    K = top_k
    Tc = E // K
    tile, live = _entry_tiles(work, E)
    tile = jnp.moveaxis(tile.reshape(B, Hkv, Tc, K), 1, 2)  # [B, Tc, Hkv, K]
    live = jnp.moveaxis(live.reshape(B, Hkv, Tc, K), 1, 2)
    t = q_base + jnp.arange(Tc)
    keys = tile[..., None] + jnp.arange(block_size)  # [B, Tc, Hkv, K, Bk]
    hi = last_visible[:, t]  # [B, Tc]
    vis = live[..., None] & (keys <= hi[:, :, None, None, None]) & (keys < S)
    kc = jnp.clip(keys, 0, S - 1)
    b = jnp.arange(B)[:, None, None, None, None]
    g = jnp.arange(Hkv)[None, None, :, None, None]
    k_rows = k.astype(jnp.float32)[b, kc, g]  # [B, Tc, Hkv, K, Bk, D]
    ik_rows = index_k.astype(jnp.float32)[b, kc]  # [B, Tc, Hkv, K, Bk, Di]
    q_rows = q.astype(jnp.float32)[:, t].reshape(B, Tc, Hkv, G, D)
    s = jnp.einsum("bthgd,bthknd->bthkgn", q_rows, k_rows, precision="highest")
    lse_rows = lse[:, t].reshape(B, Tc, Hkv, 1, G, 1)
    p = jnp.where(vis[:, :, :, :, None], jnp.exp(softmax_scale * s - lse_rows), 0.0)
    p_bar = jnp.mean(p, axis=4)  # [B, Tc, Hkv, K, Bk]
    iq_rows = index_q.astype(jnp.float32)[:, t]  # [B, Tc, Hkv, Di]
    u = index_softmax_scale * jnp.einsum("bthd,bthknd->bthkn", iq_rows, ik_rows, precision="highest")
    halves = lambda x: x.reshape(*x.shape[:-1], 2, block_size // 2)  # noqa: E731
    return halves(p_bar), halves(u), halves(vis), live, kc, t


def _teacher_terms(p_bar, u, vis):
    """(sum P̄ log P̄ - P̄ u, sum P̄) over the visible keys of each half."""
    a = jnp.where(vis, jnp.where(p_bar > 0, p_bar * jnp.log(jnp.where(p_bar > 0, p_bar, 1.0)), 0.0) - p_bar * u, 0.0)
    return jnp.sum(a, -1), jnp.sum(jnp.where(vis, p_bar, 0.0), -1)


def fake_kl_partials(q, k, lse, index_q, index_k, last_visible, work, *, q_base, top_k, block_size, softmax_scale,
                     index_softmax_scale, student=False):
    """ops.kl_partials's contract: [B, E, Hkv, 2, 4] per (entry, half), zero where no item
    covers the entry; (max u, sum exp(u - max), teacher terms) with the teacher terms 0 in
    the student pass."""
    p_bar, u, vis, live, _, _ = _emulate(q, k, lse, index_q, index_k, last_visible, work, q_base, top_k, block_size,
                                   softmax_scale, index_softmax_scale)
    m = jnp.max(jnp.where(vis, u, -jnp.inf), axis=-1)
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    l = jnp.sum(jnp.where(vis, jnp.exp(u - safe[..., None]), 0.0), axis=-1)
    a, psum = _teacher_terms(p_bar, u, vis)
    if student:
        a, psum = jnp.zeros_like(a), jnp.zeros_like(psum)
    part = jnp.stack([m, l, a, psum], axis=-1)  # [B, Tc, Hkv, K, 2, 4]
    part = jnp.where(live[..., None, None], part, 0.0)  # the handler zeroes what no item covers
    B, Tc, Hkv = part.shape[:3]
    return jnp.moveaxis(part, 2, 3).reshape(B, Tc * top_k, Hkv, 2, 4)


def fake_kl_bwd(q, k, lse, index_q, index_k, ilse, last_visible, work, *, q_base, top_k, block_size, softmax_scale,
                index_softmax_scale, deterministic):
    """ops.kl_bwd's contract for dkl = 1: (d_index_q, d_index_k per kv head, value_terms)."""
    B, T, Hkv, Di = index_q.shape
    S = k.shape[1]
    p_bar, u, vis, _, kc, t = _emulate(q, k, lse, index_q, index_k, last_visible, work, q_base, top_k, block_size,
                                    softmax_scale, index_softmax_scale)
    Tc = t.shape[0]
    ilse_rows = ilse[:, t][:, :, :, None, None, None]  # [B, Tc, Hkv, 1, 1, 1]
    du = jnp.where(vis, jnp.exp(u - ilse_rows) - p_bar, 0.0)  # [B, Tc, Hkv, K, 2, Bk/2]
    du = du.reshape(*du.shape[:4], block_size)
    ik_rows = index_k.astype(jnp.float32)[jnp.arange(B)[:, None, None, None, None], kc]
    d_iq = index_softmax_scale * jnp.einsum("bthkn,bthknd->bthkd", du, ik_rows, precision="highest")
    a, psum = _teacher_terms(p_bar, u, vis)
    terms = jnp.stack([jnp.sum(a, -1), jnp.sum(psum, -1)], axis=-1)  # [B, Tc, Hkv, K, 2]
    iq_rows = index_q.astype(jnp.float32)[:, t]
    contrib = index_softmax_scale * du[..., None] * iq_rows[:, :, :, None, None, :]  # [B, Tc, Hkv, K, Bk, Di]
    g = jnp.broadcast_to(jnp.arange(Hkv)[None, None, :, None, None], kc.shape)
    b = jnp.broadcast_to(jnp.arange(B)[:, None, None, None, None], kc.shape)
    d_ik = jnp.zeros((B, S, Hkv, Di), jnp.float32).at[b, kc, g].add(contrib)
    if deterministic:  # slot partials, rows e = query * K + slot of the chunk
        rows = lambda x: jnp.moveaxis(x, 2, 3).reshape(B, Tc * top_k, Hkv, x.shape[-1])  # noqa: E731
        return rows(d_iq), d_ik, rows(terms)
    full = lambda x: jnp.zeros((B, T, Hkv, x.shape[-1]), jnp.float32).at[:, t].set(jnp.sum(x, axis=3))  # noqa: E731
    return full(d_iq), d_ik, full(terms)


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(ops, "kl_partials", fake_kl_partials)
    monkeypatch.setattr(ops, "kl_bwd", fake_kl_bwd)
    monkeypatch.setattr(ffi, "register_targets", lambda: None)
    return cuda_impl.CudaImplementation()


# (B, T, S, Hq, Hkv, D, Di, q_offset, kv_length, packed)
CASES = (
    (1, 256, 256, 8, 2, 32, 16, None, None, False),
    (2, 160, 400, 6, 2, 32, 32, (240, -20), (400, 120), False),  # chunked prefill, padding, ragged
    (1, 300, 300, 4, 1, 16, 16, None, None, True),  # packed documents
)


def _inputs(rng, case, block_size, top_k, mode):
    B, T, S, Hq, Hkv, D, Di, q_offset, kv_length, packed = case
    f = lambda *s: jnp.asarray(rng.standard_normal(s, np.float32))  # noqa: E731
    q, k, iq, ik = f(B, T, Hq, D), f(B, S, Hkv, D), f(B, T, Hkv, Di), f(B, S, Di)
    positions = Positions(
        q_offset=jnp.asarray(q_offset if q_offset is not None else (0,) * B, jnp.int32),
        kv_length=jnp.asarray(kv_length if kv_length is not None else (S,) * B, jnp.int32),
        segment_ids=jnp.asarray(np.repeat(np.arange(3), (70, 100, S - 170))[None], jnp.int32) if packed else None)
    cfg = msa_jax.MSAConfig(top_k=top_k, block_size=block_size, mode=mode)
    xla = dispatch.implementation("xla")
    bi = xla.select_blocks(iq, ik, positions, cfg)
    lse = xla.attention_lse(q, k, bi, positions, cfg)
    return (q, k, iq, ik, bi, lse, positions), cfg


# (case, mode, deterministic): each case in both gradient modes, dense mode twice.
RUNS = (
    (0, "sparse", False), (0, "sparse", True), (0, "dense", False),
    (1, "sparse", False), (1, "sparse", True),
    (2, "sparse", False), (2, "dense", True),
)


@pytest.mark.parametrize("case_index, mode, deterministic", RUNS,
                         ids=[f"{('plain', 'ragged', 'packed')[c]}-{m}-{'det' if d else 'atomic'}" for c, m, d in RUNS])
def test_kl_glue_matches_reference(rng, emulated, monkeypatch, case_index, mode, deterministic):
    case = CASES[case_index]
    # A partial budget this small cuts every pass into several query chunks.
    monkeypatch.setattr(kv_partials, "PARTIAL_BUDGET_BYTES", 40_000)
    args, cfg = _inputs(rng, case, block_size=32, top_k=3, mode=mode)
    cfg = dataclasses.replace(cfg, deterministic=deterministic)
    xla = dispatch.implementation("xla")
    want_value = xla.kl_fwd(*args, cfg)[0]
    want_grads = xla.kl_bwd(*args, cfg, jnp.float32(1.7), None)

    value_alone = emulated.kl_value(*args, cfg)
    value, saved = emulated.kl_fwd(*args, cfg)
    grads = emulated.kl_bwd(*args, cfg, jnp.float32(1.7), saved)
    assert float(want_value) > 0
    np.testing.assert_allclose(float(value_alone), float(want_value), rtol=1e-4)
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-4)
    for name, got, want in zip(("d index_q", "d index_k"), grads, want_grads):
        assert got.shape == want.shape, name
        scale = float(jnp.max(jnp.abs(want)))
        assert scale > 0, name
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-4 * scale, err_msg=name)
