"""Pallas block-sparse attention backward, KV-outer and deterministic.

One program per (batch row, kv head, key tile) walks, in a fixed order, every query that
selected the tile, `rows` at a time: it accumulates dK and dV of the tile in registers and
writes each (query, slot, head)'s dQ contribution to a partial buffer that is summed over
slots afterwards. No atomics: the result is bitwise repeatable.

With packed documents a tile may run past its document into the next one; those keys get
no contribution here, so the program stores only keys up to the last one its queries see,
and every key no program stores keeps the zero it was initialised with.
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


def _bwd_kernel(start_ref, count_ref, tile_ref, eq_ref, es_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, hi_ref, dk_in, dv_in, dq_ref, dk_ref, dv_ref, *, rows: int, matrix_rows: int, group: int,
                num_q_heads: int, top_k: int, block_size: int, scale: float, precision, dummy_row: int,
                dummy_key: int):
    del dk_in, dv_in  # aliased to dk_ref / dv_ref: zeros where no program stores
    g = pl.program_id(1)
    count = count_ref[0]

    @pl.when(count > 0)
    def _():
        start, tile = start_ref[0], tile_ref[0]
        k = k_ref[pl.ds(tile, block_size), :]
        v = v_ref[pl.ds(tile, block_size), :]
        t = tile + jnp.arange(block_size, dtype=jnp.int32)
        m_idx = jnp.arange(matrix_rows, dtype=jnp.int32)  # rows * G, padded to a power of two
        r, h = m_idx // group, m_idx % group
        head = g * group + h
        D = k.shape[1]

        def body(c, carry):
            dk, dv, last = carry
            live = (r < rows) & (c * rows + r < count)
            entry = start + jnp.where(live, c * rows + r, 0)
            query, slot = eq_ref[entry], es_ref[entry]
            row = query * num_q_heads + head
            q, do = q_ref[row, :], do_ref[row, :]
            hi = jnp.where(live, hi_ref[query], -1)
            s = scale * jax.lax.dot_general(
                q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
            )
            seen = t[None, :] <= hi[:, None]
            p = jnp.where(seen, jnp.exp(s - lse_ref[row][:, None]), 0.0)  # exact softmax probabilities
            dp = jax.lax.dot_general(
                do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
            )
            ds = p * (dp - delta_ref[row][:, None])
            dv = dv + jax.lax.dot_general(
                p.astype(do.dtype), do, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                precision=precision,
            )
            dk = dk + scale * jax.lax.dot_general(
                ds.astype(q.dtype), q, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                precision=precision,
            )
            dq = scale * jax.lax.dot_general(
                ds.astype(k.dtype), k, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                precision=precision,
            )
            out_row = jnp.where(live, (query * top_k + slot) * num_q_heads + head, dummy_row)
            dq_ref[out_row, :] = dq
            return dk, dv, jnp.maximum(last, jnp.max(hi))

        zeros = jnp.zeros((block_size, D), jnp.float32)
        dk, dv, last = jax.lax.fori_loop(0, pl.cdiv(count, rows), body, (zeros, zeros, jnp.int32(-1)))
        keys = jnp.where(t <= last, t, dummy_key)
        dk_ref[keys, :] = dk
        dv_ref[keys, :] = dv


def attention_bwd(q, k, v, block_indices, positions: Positions, cfg: MSAConfig, out, lse, dout, dlse, *,
                  interpret: bool):
    """(dq, dk, dv) in the dtypes of q, k, v."""
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G, K, bk = Hq // Hkv, block_indices.shape[3], cfg.block_size
    qpos, doc, valid = pos_lib.query_coords(positions, T)
    hi = pos_lib.last_visible_key(positions, qpos, valid)
    # d lse(row) = sum_t ds_t with ds = p * (dp - delta): dlse enters as -dlse in delta.
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1) - dlse
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    packed = positions.segment_ids is not None
    tiles = common.attention_tiles(G, D)
    kp, vp = common.pad_keys(k, bk), common.pad_keys(v, bk)
    s_pad = kp.shape[1]

    dk = jnp.zeros((B, s_pad + 1, Hkv, D), jnp.float32)
    dv = jnp.zeros((B, s_pad + 1, Hkv, D), jnp.float32)
    chunk = kv_partials.query_chunk(T, K * Hq * D * 4)
    dqs = []
    for c0 in range(0, T, chunk):
        sl = slice(c0, min(T, c0 + chunk))
        Tc = sl.stop - sl.start
        # One work item per tile (rows = Tc * K): the program loops over all its queries.
        wl = worklist.build(block_indices[:, sl], qpos[:, sl], doc[:, sl], valid[:, sl], kv_len=S,
                            block_size=bk, rows=Tc * K, packed=packed)
        n_items = wl.item_count.shape[-1]
        n_out = Tc * K * Hq
        kernel = functools.partial(
            _bwd_kernel, rows=tiles.rows, matrix_rows=tiles.matrix_rows, group=G, num_q_heads=Hq, top_k=K, block_size=bk,
            scale=cfg.scale(D), precision=common.dot_precision(q.dtype), dummy_row=n_out, dummy_key=s_pad,
        )
        item_spec = pl.BlockSpec((None, None, 1), lambda b, g, i: (b, g, i))
        entry_spec = pl.BlockSpec((None, None, Tc * K), lambda b, g, i: (b, g, 0))
        kv_spec = pl.BlockSpec((None, s_pad, None, D), lambda b, g, i: (b, 0, g, 0))
        grad_spec = pl.BlockSpec((None, s_pad + 1, None, D), lambda b, g, i: (b, 0, g, 0))
        rows_spec = pl.BlockSpec((None, Tc * Hq, D), lambda b, g, i: (b, 0, 0))
        vec_spec = pl.BlockSpec((None, Tc * Hq), lambda b, g, i: (b, 0))
        dq_part, dk_c, dv_c = pl.pallas_call(
            kernel,
            grid=(B, Hkv, n_items),
            in_specs=[item_spec, item_spec, item_spec, entry_spec, entry_spec, rows_spec, kv_spec, kv_spec,
                      rows_spec, vec_spec, vec_spec, pl.BlockSpec((None, Tc), lambda b, g, i: (b, 0)),
                      grad_spec, grad_spec],
            out_specs=[pl.BlockSpec((None, n_out + 1, D), lambda b, g, i: (b, 0, 0)), grad_spec, grad_spec],
            out_shape=[
                jax.ShapeDtypeStruct((B, n_out + 1, D), jnp.float32),
                jax.ShapeDtypeStruct(dk.shape, jnp.float32),
                jax.ShapeDtypeStruct(dv.shape, jnp.float32),
            ],
            input_output_aliases={12: 1, 13: 2},
            compiler_params=common.compiler_params(tiles),
            interpret=interpret,
            name="msa_sparse_attention_bwd",
        )(wl.item_start, wl.item_count, wl.item_tile, wl.entry_query, wl.entry_slot,
          q[:, sl].reshape(B, Tc * Hq, D), kp, vp, dout[:, sl].reshape(B, Tc * Hq, D),
          lse_safe[:, sl].reshape(B, Tc * Hq), delta[:, sl].reshape(B, Tc * Hq), hi[:, sl],
          jnp.zeros_like(dk), jnp.zeros_like(dv))
        dk, dv = dk + dk_c, dv + dv_c
        ok = jnp.repeat(jnp.moveaxis(wl.entry_ok, 3, 2), G, axis=3)  # [B, Tc, K, Hq]
        dq_part = dq_part[:, :n_out].reshape(B, Tc, K, Hq, D)
        dqs.append(jnp.sum(jnp.where(ok[..., None], dq_part, 0.0), axis=2))
    dq = jnp.concatenate(dqs, axis=1)
    return dq.astype(q.dtype), dk[:, :S].astype(k.dtype), dv[:, :S].astype(v.dtype)
