"""Pallas KL over every visible key, for dense mode with plain causal positions (issue #13 item 3).

The KV-outer KL kernels (kl.py here, cuda/kernels/kl_sm90.cuh) walk work lists of (query,
block) entries built by sorting, and in dense mode every query selects every earlier block.
With plain causal positions (T == S, query i at key i, no padding, one document:
`CallInfo.plain_causal`) the support is the causal triangle itself, and three passes over
query or key tiles of it need no work list and write no [T, S] tensor:

  student  per query tile of one group: ilse = log-sum-exp of the index scores u over the
           visible keys (the index head alone);
  queries  per query tile: for every key tile up to the diagonal, the teacher
           P̄ = mean over the group's G heads of exp(s q_h kᵀ - lse_h), the student
           R = exp(u - ilse) and du = R - P̄; d index_q = si du ik, and each row's KL
           as (sum P̄ log P̄ - P̄ u) + ilse sum P̄;
  keys     per key tile: the same P̄ and du for every query tile from the diagonal on;
           d index_k = si duᵀ iq, per kv head (the caller sums the heads).

The teacher's products run in both the query and the key pass: no atomics, so the gradients
are bitwise repeatable. Gradients are those of the unnormalised sum for dkl = 1, as
`Implementation.kl_fwd` saves them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ..config import MSAConfig
from . import common

_NEG_INF = float("-inf")


def _dot(a, b, precision):
    """a [m, k] x b [n, k] -> [m, n] float32 (b's rows as columns)."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                               precision=precision)


def _dot_nn(a, b, precision):
    """a [m, k] x b [k, n] -> [m, n] float32."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                               precision=precision)


def _teacher(q_of, lse_of, k, visible, *, group: int, scale: float, precision):
    """P̄ [rows, keys]: the group's heads' probabilities averaged, 0 where not visible.
    q_of(h) [rows, D] and lse_of(h) [rows] read head h of the group (h traced). A loop, not
    unrolled: with the heads unrolled Triton asked for 304-336 KB of shared memory at G 8 / 16,
    D 128 (232 KB available on an H100 / H200)."""
    def head(h, total):
        return total + jnp.exp(scale * _dot(q_of(h), k, precision) - lse_of(h)[:, None])

    total = jax.lax.fori_loop(0, group, head, jnp.zeros(visible.shape, jnp.float32))
    return jnp.where(visible, total * (1.0 / group), 0.0)


def _student_kernel(iq_ref, ik_ref, ilse_ref, *, block: int, iscale: float, precision):
    """iq [bq, Di] of one group; ik [S_pad, Di]; ilse [bq]."""
    t0 = pl.program_id(1) * block
    rows = t0 + jnp.arange(block, dtype=jnp.int32)
    iq = iq_ref[...]

    def body(j, carry):
        m, l = carry
        keys = j * block + jnp.arange(block, dtype=jnp.int32)
        u = iscale * _dot(iq, ik_ref[pl.ds(j * block, block), :], precision)
        u = jnp.where(keys[None, :] <= rows[:, None], u, _NEG_INF)
        m_new = jnp.maximum(m, jnp.max(u, axis=1))  # finite from tile 0 on: key 0 is visible to all
        l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(u - m_new[:, None]), axis=1)
        return m_new, l

    m0 = jnp.full((block,), _NEG_INF, jnp.float32)
    m, l = jax.lax.fori_loop(0, pl.program_id(1) + 1, body, (m0, jnp.zeros((block,), jnp.float32)))
    ilse_ref[...] = m + jnp.log(l)


def _query_kernel(q_ref, lse_ref, iq_ref, ilse_ref, k_ref, ik_ref, diq_ref, kl_ref, *, block: int, group: int,
                  q_len: int, scale: float, iscale: float, precision):
    """One query tile of one group: q [bq, G, D], lse [bq, G], iq [bq, Di], ilse [bq];
    k [S_pad, D], ik [S_pad, Di]; out d index_q [bq, Di] float32, each row's KL [bq]."""
    t0 = pl.program_id(1) * block
    rows = t0 + jnp.arange(block, dtype=jnp.int32)
    iq, ilse = iq_ref[...], ilse_ref[...]

    def body(j, carry):
        d_iq, cross, mass = carry
        keys = j * block + jnp.arange(block, dtype=jnp.int32)
        visible = keys[None, :] <= rows[:, None]
        k = k_ref[pl.ds(j * block, block), :]
        ik = ik_ref[pl.ds(j * block, block), :]
        pbar = _teacher(lambda h: q_ref[:, h, :], lambda h: lse_ref[:, h], k, visible, group=group, scale=scale,
                        precision=precision)
        u = iscale * _dot(iq, ik, precision)
        du = jnp.where(visible, jnp.exp(u - ilse[:, None]), 0.0) - pbar
        d_iq = d_iq + iscale * _dot_nn(du.astype(ik.dtype), ik, precision)
        plogp = jnp.where(pbar > 0, pbar * jnp.log(jnp.where(pbar > 0, pbar, 1.0)), 0.0)
        cross = cross + jnp.sum(plogp - pbar * u, axis=1)
        mass = mass + jnp.sum(pbar, axis=1)
        return d_iq, cross, mass

    zeros = jnp.zeros((block,), jnp.float32)
    d_iq, cross, mass = jax.lax.fori_loop(
        0, pl.program_id(1) + 1, body, (jnp.zeros(diq_ref.shape, jnp.float32), zeros, zeros))
    real = rows < q_len
    diq_ref[...] = jnp.where(real[:, None], d_iq, 0.0)
    kl_ref[...] = jnp.where(real, cross + ilse * mass, 0.0)


def _key_kernel(k_ref, ik_ref, q_ref, lse_ref, iq_ref, ilse_ref, dik_ref, *, block: int, group: int, q_len: int,
                num_tiles: int, scale: float, iscale: float, precision):
    """One key tile of one group: k [bk, D], ik [bk, Di]; q [T_pad, G, D], lse [T_pad, G],
    iq [T_pad, Di], ilse [T_pad]; out d index_k [bk, Di] float32 (this kv head's share)."""
    j = pl.program_id(1)
    keys = j * block + jnp.arange(block, dtype=jnp.int32)
    k, ik = k_ref[...], ik_ref[...]

    def body(i, d_ik):
        t0 = i * block
        rows = t0 + jnp.arange(block, dtype=jnp.int32)
        visible = (keys[None, :] <= rows[:, None]) & (rows[:, None] < q_len)
        iq = iq_ref[pl.ds(t0, block), :]
        pbar = _teacher(lambda h: q_ref[pl.ds(t0, block), h, :], lambda h: lse_ref[pl.ds(t0, block), h], k,
                        visible, group=group, scale=scale, precision=precision)
        u = iscale * _dot(iq, ik, precision)
        du = jnp.where(visible, jnp.exp(u - ilse_ref[pl.ds(t0, block)][:, None]), 0.0) - pbar
        # d index_k += si duᵀ iq: contract the query axis of both.
        return d_ik + iscale * jax.lax.dot_general(
            du.astype(iq.dtype), iq, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32,
            precision=precision)

    dik_ref[...] = jax.lax.fori_loop(j, num_tiles, body, jnp.zeros(dik_ref.shape, jnp.float32))


def kl_fwd(q, k, index_q, index_k, lse, cfg: MSAConfig, *, interpret: bool):
    """(sum over rows and groups of KL(P̄ || R), (d index_q [B, T, Hkv, Di], d index_k per kv
    head [B, S, Hkv, Di])), float32, the gradients for dkl = 1: dense mode, plain causal."""
    B, T, Hq, D = q.shape
    Hkv, Di = k.shape[2], index_q.shape[-1]
    G = Hq // Hkv
    block = 64  # query and key tiles alike, so the diagonal tile is one program's last
    n = pl.cdiv(T, block)
    pad = n * block - T
    pad_t = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q_, k_, iq, ik = pad_t(q), pad_t(k), pad_t(index_q), pad_t(index_k)
    lse_ = pad_t(jnp.where(jnp.isfinite(lse), lse, 0.0))
    q_ = q_.reshape(B, n * block, Hkv, G, D)
    lse_ = lse_.reshape(B, n * block, Hkv, G)
    precision = common.dot_precision(q.dtype)
    scales = dict(iscale=cfg.index_scale(Di), precision=precision)
    # H200, config A's heads at 8K: 3 stages 7.5 ms, 2 stages 9.3, 1 stage 10.5, 8 warps 9.7,
    # 32-token tiles 14.3 (benchmarks/NOTES.md, 2026-12-07).
    tiles = common.Tiles(block_q=block, num_warps=4, num_stages=3)
    params = common.compiler_params(tiles)
    T_pad = n * block

    ilse = pl.pallas_call(
        functools.partial(_student_kernel, block=block, **scales),
        grid=(B, n, Hkv),
        in_specs=[pl.BlockSpec((None, block, None, Di), lambda b, t, g: (b, t, g, 0)),
                  pl.BlockSpec((None, T_pad, Di), lambda b, t, g: (b, 0, 0))],
        out_specs=pl.BlockSpec((None, block, None), lambda b, t, g: (b, t, g)),
        out_shape=jax.ShapeDtypeStruct((B, T_pad, Hkv), jnp.float32),
        compiler_params=params, interpret=interpret, name="msa_dense_kl_student",
    )(iq, ik)

    teacher = dict(block=block, group=G, q_len=T, scale=cfg.scale(D), **scales)
    d_iq, rows_kl = pl.pallas_call(
        functools.partial(_query_kernel, **teacher),
        grid=(B, n, Hkv),
        in_specs=[pl.BlockSpec((None, block, None, G, D), lambda b, t, g: (b, t, g, 0, 0)),
                  pl.BlockSpec((None, block, None, G), lambda b, t, g: (b, t, g, 0)),
                  pl.BlockSpec((None, block, None, Di), lambda b, t, g: (b, t, g, 0)),
                  pl.BlockSpec((None, block, None), lambda b, t, g: (b, t, g)),
                  pl.BlockSpec((None, T_pad, None, D), lambda b, t, g: (b, 0, g, 0)),
                  pl.BlockSpec((None, T_pad, Di), lambda b, t, g: (b, 0, 0))],
        out_specs=[pl.BlockSpec((None, block, None, Di), lambda b, t, g: (b, t, g, 0)),
                   pl.BlockSpec((None, block, None), lambda b, t, g: (b, t, g))],
        out_shape=[jax.ShapeDtypeStruct((B, T_pad, Hkv, Di), jnp.float32),
                   jax.ShapeDtypeStruct((B, T_pad, Hkv), jnp.float32)],
        compiler_params=params, interpret=interpret, name="msa_dense_kl_queries",
    )(q_, lse_, iq, ilse, k_, ik)

    d_ik = pl.pallas_call(
        functools.partial(_key_kernel, num_tiles=n, **teacher),
        grid=(B, n, Hkv),
        in_specs=[pl.BlockSpec((None, block, None, D), lambda b, s, g: (b, s, g, 0)),
                  pl.BlockSpec((None, block, Di), lambda b, s, g: (b, s, 0)),
                  pl.BlockSpec((None, T_pad, None, G, D), lambda b, s, g: (b, 0, g, 0, 0)),
                  pl.BlockSpec((None, T_pad, None, G), lambda b, s, g: (b, 0, g, 0)),
                  pl.BlockSpec((None, T_pad, None, Di), lambda b, s, g: (b, 0, g, 0)),
                  pl.BlockSpec((None, T_pad, None), lambda b, s, g: (b, 0, g))],
        out_specs=pl.BlockSpec((None, block, None, Di), lambda b, s, g: (b, s, g, 0)),
        out_shape=jax.ShapeDtypeStruct((B, T_pad, Hkv, Di), jnp.float32),
        compiler_params=params, interpret=interpret, name="msa_dense_kl_keys",
    )(k_, ik, q_, lse_, iq, ilse)

    value = jnp.sum(rows_kl)
    return value, (d_iq[:, :T], d_ik[:, :T])
