"""Pallas block-sparse attention forward, KV-outer (the authors' scheme).

For each (batch row, kv head, work item) one program loads one key tile (block_size keys
of K and V) and gathers the rows of the queries that selected it: `rows` queries x G heads,
so the matrix unit sees rows * G rows however small G is; a program walks up to
`item_steps` such row groups of the same tile, so K and V are loaded once per item. It
writes, per (query, slot, head), a normalised partial output in q's dtype and its
log-sum-exp in fp32; `kv_outer.partials.combine` merges a query's partials by log-sum-exp. Queries are
processed in chunks so the partial buffer stays bounded (kv_outer.partials.PARTIAL_BUDGET_BYTES),
whatever T is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import positions as pos_lib
from ..config import MSAConfig, Positions
from ..kv_outer import partials as kv_partials, worklist
from . import common

_NEG_INF = float("-inf")


def _fwd_kernel(start_ref, count_ref, tile_ref, eq_ref, es_ref, base_ref, q_ref, k_ref, *refs, rows: int, matrix_rows: int,
                group: int, num_q_heads: int, top_k: int, block_size: int, scale: float, precision,
                dummy_row: int, with_out: bool):
    """One work item: key tile [tile, tile + block_size) against `count` gathered queries.

    The tile's K and V are loaded once; the item's entries are walked `rows` queries at a
    time (rows * G matrix rows per step). eq/es: the sorted (query, slot) entries, query
    relative to the chunk's first, base[0]; q [T*Hq, D] and hi [T] (last visible key per
    query) cover all queries; k, v [S_pad, D]. o [rows_out + 1, D]
    (normalised, in q's dtype) and lse [rows_out + 1] with row (query * top_k + slot) * Hq
    + head; the extra last row absorbs writes of unused rows. refs: (v, hi, o, lse), or
    (hi, lse) without the output (with_out False: the KL teacher needs only the lse).
    """
    v_ref, hi_ref, o_ref, lse_ref = refs if with_out else (None, refs[0], None, refs[1])
    g = pl.program_id(1)
    count = count_ref[0]

    @pl.when(count > 0)
    def _():
        start, tile, base = start_ref[0], tile_ref[0], base_ref[0]
        k = k_ref[pl.ds(tile, block_size), :]
        t = tile + jnp.arange(block_size, dtype=jnp.int32)[None, :]
        m_idx = jnp.arange(matrix_rows, dtype=jnp.int32)  # rows * G, padded to a power of two
        r, h = m_idx // group, m_idx % group
        head = g * group + h

        def body(c, carry):
            live = (r < rows) & (c * rows + r < count)
            entry = start + jnp.where(live, c * rows + r, 0)
            query, slot = eq_ref[entry], es_ref[entry]
            q = q_ref[(base + query) * num_q_heads + head, :]  # [rows*G, D] gathered
            s = scale * jax.lax.dot_general(
                q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
            )
            # The worklist only pairs a query with tiles starting in its document at or before
            # it, so the tile's first key is visible (l >= 1); later keys may not be (causal,
            # kv_length).
            s = jnp.where(t <= hi_ref[base + query][:, None], s, _NEG_INF)
            m = jnp.max(s, axis=1)
            p = jnp.exp(s - m[:, None])
            l = jnp.sum(p, axis=1)
            out_row = jnp.where(live, (query * top_k + slot) * num_q_heads + head, dummy_row)
            if with_out:
                v = v_ref[pl.ds(tile, block_size), :]
                o = jax.lax.dot_general(
                    p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                    precision=precision,
                )
                o_ref[out_row, :] = (o / l[:, None]).astype(o_ref.dtype)
            lse_ref[out_row] = m + jnp.log(l)
            return carry

        jax.lax.fori_loop(0, pl.cdiv(count, rows), body, 0)


def _partials(q, kp, vp, hi, c0: int, block_indices, qpos, doc, valid, *, cfg: MSAConfig, kv_len: int,
              packed: bool, interpret: bool):
    """Partials for the query chunk starting at query c0 (block_indices, qpos, doc, valid:
    the chunk's rows; q [B, T, Hq, D] and hi [B, T]: all queries, so no slice is copied):
    o [B, Tc, K, Hq, D] (q's dtype, normalised; None when vp is None), lse [B, Tc, K, Hq]
    f32, ok [B, Tc, Hkv, K]. kp, vp: k and v padded by `common.pad_keys`."""
    B, T_all, Hq, D = q.shape
    T = block_indices.shape[1]
    S, s_pad, Hkv = kv_len, kp.shape[1], kp.shape[2]
    G, K, bk = Hq // Hkv, block_indices.shape[3], cfg.block_size
    tiles = common.attention_tiles(G, D)
    wl = worklist.build(block_indices, qpos, doc, valid, kv_len=S, block_size=bk,
                        rows=tiles.rows * tiles.item_steps, packed=packed)
    n_items = wl.item_count.shape[-1]
    n_out = T * K * Hq
    with_out = vp is not None
    kernel = functools.partial(
        _fwd_kernel, rows=tiles.rows, matrix_rows=tiles.matrix_rows, group=G, num_q_heads=Hq, top_k=K, block_size=bk,
        scale=cfg.scale(D), precision=common.dot_precision(q.dtype), dummy_row=n_out, with_out=with_out,
    )
    item_spec = pl.BlockSpec((None, None, 1), lambda b, g, i: (b, g, i))
    entry_spec = pl.BlockSpec((None, None, T * K), lambda b, g, i: (b, g, 0))
    kv_spec = pl.BlockSpec((None, s_pad, None, D), lambda b, g, i: (b, 0, g, 0))
    q_spec = pl.BlockSpec((None, T_all * Hq, D), lambda b, g, i: (b, 0, 0))
    hi_spec = pl.BlockSpec((None, T_all), lambda b, g, i: (b, 0))
    base_spec = pl.BlockSpec((1,), lambda b, g, i: (0,))
    o_spec = pl.BlockSpec((None, n_out + 1, D), lambda b, g, i: (b, 0, 0))
    lse_spec = pl.BlockSpec((None, n_out + 1), lambda b, g, i: (b, 0))
    o_shape = jax.ShapeDtypeStruct((B, n_out + 1, D), q.dtype)
    lse_shape = jax.ShapeDtypeStruct((B, n_out + 1), jnp.float32)
    results = pl.pallas_call(
        kernel,
        grid=(B, Hkv, n_items),
        in_specs=[item_spec] * 3 + [entry_spec] * 2 + [base_spec, q_spec, kv_spec] + ([kv_spec] if with_out else []) + [hi_spec],
        out_specs=[o_spec, lse_spec] if with_out else [lse_spec],
        out_shape=[o_shape, lse_shape] if with_out else [lse_shape],
        compiler_params=common.compiler_params(tiles),
        interpret=interpret,
        name="msa_sparse_attention_fwd" if with_out else "msa_sparse_attention_lse",
    )(wl.item_start, wl.item_count, wl.item_tile, wl.entry_query, wl.entry_slot, jnp.full((1,), c0, jnp.int32),
      q.reshape(B, T_all * Hq, D), kp,
      *([vp] if with_out else []), hi)
    shape = (B, T, K, Hq)
    o = results[0][:, :n_out].reshape(*shape, D) if with_out else None
    return o, results[-1][:, :n_out].reshape(shape), wl.entry_ok


def attention_fwd(q, k, v, block_indices, positions: Positions, cfg: MSAConfig, *, interpret: bool):
    """(out [B,T,Hq,D] in q.dtype, lse f32 [B,T,Hq]) over the selected blocks, chunk by chunk.
    v None: lse only (out None), with neither the P V product nor the partial outputs."""
    partials = functools.partial(_partials, cfg=cfg, kv_len=k.shape[1], packed=positions.segment_ids is not None,
                                 interpret=interpret)
    kp = common.pad_keys(k, cfg.block_size)
    vp = None if v is None else common.pad_keys(v, cfg.block_size)
    return kv_partials.chunked(q, kp, vp, block_indices, positions, partials)
