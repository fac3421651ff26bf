"""Pallas sparse decode attention over paged K/V: a group's G heads in one tile, the selected
pages split across programs, the partials merged by log-sum-exp.

One program owns one (query token, kv head, split of the token's selected pages). The G
query heads of the group read the same pages, so they form the rows of one matrix tile
(padded to >= 16 rows); the program walks its slots of the selection row, reads each
selected page of K and V once through the page table, and keeps an online softmax over
them. Decode rows have few programs (B x T x Hkv: 4 at batch 1, config A), so the top_k
slots are split (common.paged_attention_splits) and each split writes a normalised
float32 partial and its log-sum-exp; `kv_outer.partials.combine` merges them, as it merges the
KV-outer kernel's slot partials.

Masking is by key, per token: a slot is skipped (-1, a repeat, an id past the table, or a
page that starts after the query) and keys past the query's last visible one are masked, in
the scores and in V (a stale or uninitialised slot of a partly written page may hold NaN,
and 0 * NaN is NaN). FP8 pages are converted to the queries' dtype (exact) inside the
kernel; K's per-token scales multiply the score columns, V's fold into the probabilities.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import positions as pos_lib
from .. import topk
from ..config import KVPages, MSAConfig, Positions
from ..kv_outer import partials as kv_partials
from . import common

_NEG_INF = float("-inf")


def _decode_kernel(bi_ref, hi_ref, pt_ref, q_ref, k_ref, v_ref, *refs, group: int, matrix_rows: int,
                   slots_per_split: int, page_size: int, scale: float, precision, fp8: bool):
    """bi [slots] (logical page ids of this (query, group), -1 unused); hi [1] (the query's
    last visible key, -1: padding); page_table [max_pages]; q [Hq, D]; k, v [P, page, D];
    (fp8: ks, vs [P, page]). Out: o float32 [Hq + 1, D], lse [Hq + 1] (row Hq absorbs the
    padded matrix rows)."""
    ks_ref, vs_ref = refs[:2] if fp8 else (None, None)
    o_ref, lse_ref = refs[-2:]
    g, split = pl.program_id(1), pl.program_id(2)
    num_q_heads = q_ref.shape[0]
    num_pages, max_pages = k_ref.shape[0], pt_ref.shape[0]
    hi = hi_ref[...]  # [1]
    r = jnp.arange(matrix_rows, dtype=jnp.int32)
    q = q_ref[g * group + r % group, :]  # [rows, D]: the group's heads, repeated up to the tile
    D = q.shape[1]
    key = jnp.arange(page_size, dtype=jnp.int32)

    def body(i, carry):
        m, l, acc = carry
        j = bi_ref[pl.ds(split * slots_per_split + i, 1)]  # [1]
        # The page holds a visible key iff it starts at or before the query (j * page <= hi).
        ok = (j >= 0) & (j < max_pages) & (j * page_size <= hi)
        phys = jnp.clip(pt_ref[jnp.clip(j, 0, max_pages - 1)], 0, num_pages - 1)  # in bounds for any content
        vis = ok & (j * page_size + key <= hi)  # [page]
        k = k_ref[phys].reshape(page_size, D).astype(q.dtype)
        s = scale * jax.lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        )  # [rows, page]
        if fp8:
            s = s * ks_ref[phys].reshape(1, page_size)
        s = jnp.where(vis[None, :], s, _NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
        alpha = jnp.where(m == _NEG_INF, 0.0, jnp.exp(m - m_safe))
        p = jnp.exp(s - m_safe[:, None])  # 0 where masked
        l = l * alpha + jnp.sum(p, axis=1)
        v = jnp.where(vis[:, None], v_ref[phys].reshape(page_size, D).astype(q.dtype), 0)
        if fp8:
            p = p * jnp.where(vis, vs_ref[phys].reshape(page_size), 0.0)[None, :]
        pv = jax.lax.dot_general(
            p.astype(q.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        )
        return m_new, l, acc * alpha[:, None] + pv

    init = (jnp.full((matrix_rows,), _NEG_INF, jnp.float32), jnp.zeros((matrix_rows,), jnp.float32),
            jnp.zeros((matrix_rows, D), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, slots_per_split, body, init)
    nonempty = l > 0
    out_row = jnp.where(r < group, g * group + r, num_q_heads)
    o_ref[out_row, :] = jnp.where(nonempty[:, None], acc / jnp.where(nonempty, l, 1.0)[:, None], 0.0)
    lse_ref[out_row] = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), _NEG_INF)


def paged_attention_fwd(q, pages: KVPages, block_indices, positions: Positions, cfg: MSAConfig, *, interpret: bool):
    """(out [B, T, Hq, D] in q.dtype, lse float32 [B, T, Hq]) over the selected pages."""
    B, T, Hq, D = q.shape
    P, page, Hkv, _ = pages.k.shape
    max_pages = pages.page_table.shape[1]
    G, K = Hq // Hkv, block_indices.shape[3]
    fp8 = pages.k_scale is not None
    splits, sps = common.paged_attention_splits(B * T * Hkv, K)
    qpos, _, valid = pos_lib.query_coords(positions, T)
    hi = pos_lib.last_visible_key(positions, qpos, valid).reshape(B * T)
    bi = topk.drop_repeats(block_indices, max_pages)  # rows are sets
    bi = jnp.pad(bi, [(0, 0)] * 3 + [(0, splits * sps - K)], constant_values=-1).reshape(B * T, Hkv, splits * sps)
    matrix_rows = common.next_power_of_2(max(16, G))

    kernel = functools.partial(
        _decode_kernel, group=G, matrix_rows=matrix_rows, slots_per_split=sps, page_size=page, scale=cfg.scale(D),
        precision=common.dot_precision(q.dtype), fp8=fp8,
    )
    kv_spec = pl.BlockSpec((P, page, None, D), lambda bt, g, s: (0, 0, g, 0))
    scale_spec = pl.BlockSpec((P, page, None), lambda bt, g, s: (0, 0, g))
    o, lse = pl.pallas_call(
        kernel,
        grid=(B * T, Hkv, splits),
        in_specs=[pl.BlockSpec((None, None, splits * sps), lambda bt, g, s: (bt, g, 0)),
                  pl.BlockSpec((1,), lambda bt, g, s: (bt,)),
                  pl.BlockSpec((None, max_pages), lambda bt, g, s: (bt // T, 0)),
                  pl.BlockSpec((None, Hq, D), lambda bt, g, s: (bt, 0, 0)),
                  kv_spec, kv_spec] + ([scale_spec, scale_spec] if fp8 else []),
        out_specs=[pl.BlockSpec((None, None, Hq + 1, D), lambda bt, g, s: (bt, s, 0, 0)),
                   pl.BlockSpec((None, None, Hq + 1), lambda bt, g, s: (bt, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((B * T, splits, Hq + 1, D), jnp.float32),
                   jax.ShapeDtypeStruct((B * T, splits, Hq + 1), jnp.float32)],
        compiler_params=common.compiler_params(common.Tiles(block_q=matrix_rows, num_warps=4, num_stages=2)),
        interpret=interpret,
        name="msa_paged_decode_attention",
    )(bi, hi, pages.page_table, q.reshape(B * T, Hq, D), pages.k, pages.v,
      *([pages.k_scale, pages.v_scale] if fp8 else []))
    o = o[:, :, :Hq].reshape(B, T, splits, Hq, D)
    lse = lse[:, :, :Hq].reshape(B, T, splits, Hq)
    # Every program wrote its partial (0 and -inf when it saw nothing): all take part.
    out, lse = kv_partials.combine(o, lse, jnp.ones((B, T, Hkv, splits), bool), Hkv)
    return out.astype(q.dtype), lse
