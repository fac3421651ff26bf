"""Pallas block-sparse attention forward, KV-outer (the authors' scheme).

For each (batch row, kv head, work item) one program loads one key tile (block_size keys
of K and V) and gathers the rows of the queries that selected it: `rows` queries x G heads,
so the matrix unit sees rows * G rows however small G is. It writes, per (query, slot,
head), an unnormalised partial output with its row max and row sum; `combine` merges a
query's partials by log-sum-exp. Queries are processed in chunks so the partial buffer
stays bounded (partial_budget_bytes), whatever T is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import positions as pos_lib
from ..config import MSAConfig, Positions
from . import common, worklist

_NEG_INF = float("-inf")


def _fwd_kernel(start_ref, count_ref, tile_ref, eq_ref, es_ref, q_ref, k_ref, v_ref, hi_ref,
                o_ref, m_ref, l_ref, *, rows: int, matrix_rows: int, group: int, num_q_heads: int, top_k: int,
                block_size: int, scale: float, precision, dummy_row: int):
    """One work item: key tile [tile, tile + block_size) against `count` gathered queries.

    eq/es: the sorted (query, slot) entries; q [T*Hq, D]; k, v [S_pad, D]; hi [T] last
    visible key per query. o [rows_out + 1, D], m, l [rows_out + 1] with row
    (query * top_k + slot) * Hq + head; the extra last row absorbs writes of unused rows.
    """
    g = pl.program_id(1)
    count = count_ref[0]

    @pl.when(count > 0)
    def _():
        start, tile = start_ref[0], tile_ref[0]
        m_idx = jnp.arange(matrix_rows, dtype=jnp.int32)  # rows * G, padded to a power of two
        r, h = m_idx // group, m_idx % group
        live = (r < rows) & (r < count)
        entry = start + jnp.where(live, r, 0)
        query, slot = eq_ref[entry], es_ref[entry]
        head = g * group + h
        q = q_ref[query * num_q_heads + head, :]  # [rows*G, D] gathered
        k = k_ref[pl.ds(tile, block_size), :]
        v = v_ref[pl.ds(tile, block_size), :]
        s = scale * jax.lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        )
        t = tile + jnp.arange(block_size, dtype=jnp.int32)[None, :]
        # The worklist only pairs a query with tiles starting in its document at or before it,
        # so the tile's first key is visible; later keys may not be (causal, kv_length).
        s = jnp.where(t <= hi_ref[query][:, None], s, _NEG_INF)
        m = jnp.max(s, axis=1)
        p = jnp.exp(s - m[:, None])
        l = jnp.sum(p, axis=1)
        o = jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        )
        out_row = jnp.where(live, (query * top_k + slot) * num_q_heads + head, dummy_row)
        o_ref[out_row, :] = o.astype(o_ref.dtype)
        m_ref[out_row] = m
        l_ref[out_row] = l


def _partials(q, k, v, block_indices, qpos, doc, valid, hi, cfg: MSAConfig, *, packed: bool, interpret: bool):
    """Partials for one query chunk: o [B, Tc, K, Hq, D] f32, m, l [B, Tc, K, Hq], ok [B, Tc, Hkv, K]."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G, K, bk = Hq // Hkv, block_indices.shape[3], cfg.block_size
    tiles = common.attention_tiles(G, D)
    wl = worklist.build(block_indices, qpos, doc, valid, kv_len=S, block_size=bk, rows=tiles.rows, packed=packed)
    n_items = wl.item_count.shape[-1]
    s_pad = pl.cdiv(S, bk) * bk + bk  # tiles of packed documents start anywhere below S
    kp = jnp.pad(k, [(0, 0), (0, s_pad - S), (0, 0), (0, 0)])
    vp = jnp.pad(v, [(0, 0), (0, s_pad - S), (0, 0), (0, 0)])
    n_out = T * K * Hq
    kernel = functools.partial(
        _fwd_kernel, rows=tiles.rows, matrix_rows=tiles.matrix_rows, group=G, num_q_heads=Hq, top_k=K, block_size=bk,
        scale=cfg.scale(D), precision=common.dot_precision(q.dtype), dummy_row=n_out,
    )
    item_spec = pl.BlockSpec((None, None, 1), lambda b, g, i: (b, g, i))
    entry_spec = pl.BlockSpec((None, None, T * K), lambda b, g, i: (b, g, 0))
    kv_spec = pl.BlockSpec((None, s_pad, None, D), lambda b, g, i: (b, 0, g, 0))
    o, m, l = pl.pallas_call(
        kernel,
        grid=(B, Hkv, n_items),
        in_specs=[
            item_spec, item_spec, item_spec, entry_spec, entry_spec,
            pl.BlockSpec((None, T * Hq, D), lambda b, g, i: (b, 0, 0)),
            kv_spec, kv_spec,
            pl.BlockSpec((None, T), lambda b, g, i: (b, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, n_out + 1, D), lambda b, g, i: (b, 0, 0)),
            pl.BlockSpec((None, n_out + 1), lambda b, g, i: (b, 0)),
            pl.BlockSpec((None, n_out + 1), lambda b, g, i: (b, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, n_out + 1, D), jnp.float32),
            jax.ShapeDtypeStruct((B, n_out + 1), jnp.float32),
            jax.ShapeDtypeStruct((B, n_out + 1), jnp.float32),
        ],
        compiler_params=common.compiler_params(tiles),
        interpret=interpret,
        name="msa_sparse_attention_fwd",
    )(wl.item_start, wl.item_count, wl.item_tile, wl.entry_query, wl.entry_slot,
      q.reshape(B, T * Hq, D), kp, vp, hi)
    shape = (B, T, K, Hq)
    return o[:, :n_out].reshape(*shape, D), m[:, :n_out].reshape(shape), l[:, :n_out].reshape(shape), wl.entry_ok


def combine(o, m, l, ok, num_kv_heads: int):
    """Merges each query's slot partials by log-sum-exp: (out f32 [B,T,Hq,D], lse [B,T,Hq])."""
    B, T, K, Hq, D = o.shape
    ok = jnp.repeat(jnp.moveaxis(ok, 3, 2), Hq // num_kv_heads, axis=3)  # [B, T, K, Hq]
    m = jnp.where(ok, m, _NEG_INF)
    top = jnp.max(m, axis=2)
    safe_top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.where(ok, jnp.exp(m - safe_top[:, :, None]), 0.0)
    total = jnp.sum(w * jnp.where(ok, l, 0.0), axis=2)
    out = jnp.sum(w[..., None] * jnp.where(ok[..., None], o, 0.0), axis=2)
    nonempty = total > 0
    out = jnp.where(nonempty[..., None], out / jnp.where(nonempty, total, 1.0)[..., None], 0.0)
    lse = jnp.where(nonempty, safe_top + jnp.log(jnp.where(nonempty, total, 1.0)), _NEG_INF)
    return out, lse


def attention_fwd(q, k, v, block_indices, positions: Positions, cfg: MSAConfig, *, interpret: bool):
    """(out [B,T,Hq,D] in q.dtype, lse f32 [B,T,Hq]) over the selected blocks, chunk by chunk."""
    B, T, Hq, D = q.shape
    K = block_indices.shape[3]
    qpos, doc, valid = pos_lib.query_coords(positions, T)
    hi = pos_lib.last_visible_key(positions, qpos, valid)
    chunk = common.query_chunk(T, K * Hq * D * 4)
    outs, lses = [], []
    for c0 in range(0, T, chunk):
        sl = slice(c0, min(T, c0 + chunk))
        o, m, l, ok = _partials(
            q[:, sl], k, v, block_indices[:, sl], qpos[:, sl], doc[:, sl], valid[:, sl], hi[:, sl], cfg,
            packed=positions.segment_ids is not None, interpret=interpret,
        )
        out, lse = combine(o, m, l, ok, k.shape[2])
        outs.append(out.astype(q.dtype))
        lses.append(lse)
    return jnp.concatenate(outs, axis=1), jnp.concatenate(lses, axis=1)
