"""Pallas indexer: index scores, block max-pooling and an exp-free running top-k, fused.

One program owns `block_q` queries of one (batch row, group). It walks the key axis one
block-sized tile at a time, computes the tile's index scores on the matrix unit, max-pools
them into per-block scores and keeps, per query, the best `top_k - 1` fully visible blocks
seen so far in registers. Scores never leave the chip: no [T, S / block] tensor is written.

Document-relative block grids (packed documents) need not align with the key tiles: a
row's block A = (t0 - doc) // Bk ends inside the tile starting at t0, and the keys after
its end open block A + 1, whose partial max is carried to the next tile.

Ties: blocks arrive in increasing id order (running_topk.py says why that gives the spec's
order).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ..config import MSAConfig, Positions
from .. import positions as pos_lib
from . import common, running_topk

_NEG_INF = float("-inf")


def _indexer_kernel(iq_ref, ik_ref, lo_ref, hi_ref, doc_ref, local_ref, out_ref, *,
                    block_size: int, slots: int, keep: int, out_width: int, scale: float, precision,
                    aligned: bool):
    """iq [bq, Di]; ik [S_pad, Di]; lo/hi/doc/local [bq] int32; out [bq, out_width] int32.

    Row i sees keys lo[i]..hi[i] (hi < lo: none); its local block is local[i] (-1: padding).
    `slots` (a power of two) >= keep = top_k - 1 running entries; slots >= keep are locked.
    aligned: every row's document starts at key 0 (no packed documents), so block j is
    exactly key tile j.
    """
    bq = iq_ref.shape[0]
    bk = block_size
    iq = iq_ref[...]
    lo, hi, doc, local = lo_ref[...], hi_ref[...], doc_ref[...], local_ref[...]
    slot = jnp.arange(slots, dtype=jnp.int32)[None, :]
    locked = slot >= keep
    scores0, ids0 = running_topk.empty(bq, slots, keep)
    pend0 = jnp.full((bq,), _NEG_INF, jnp.float32)

    active = local >= 0
    first = jnp.min(jnp.where(active, lo, jnp.iinfo(jnp.int32).max)) // bk
    # Only blocks before the local one are ranked; the last such key is doc + local*bk - 1.
    last_key = jnp.where(active & (local > 0), doc + local * bk - 1, -1)
    stop = jnp.max(last_key) // bk + 1
    first = jnp.minimum(first, stop)

    def update(score_a, a, scores, ids):
        """Offers each row's block `a` with score `score_a` to its running top-(top_k - 1)."""
        return running_topk.offer(scores, ids, score_a, a, active & (a >= 0) & (a < local))

    def scores_of(tile):
        ik = ik_ref[pl.ds(tile * bk, bk), :]
        return scale * jax.lax.dot_general(
            iq, ik, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32, precision=precision
        )  # [bq, bk]

    def interior_body(tile, carry):
        # Block grid aligned with the tiles and the tile before every active row's local
        # block: all its keys are visible to every active row, so no masks are needed.
        scores, ids = carry
        return update(jnp.max(scores_of(tile), axis=1), jnp.full((bq,), tile, jnp.int32), scores, ids)

    def body(tile, carry):
        scores, ids, pend = carry
        s = scores_of(tile)
        t0 = tile * bk
        t = t0 + jnp.arange(bk, dtype=jnp.int32)[None, :]
        visible = (t >= lo[:, None]) & (t <= hi[:, None])
        s = jnp.where(visible, s, _NEG_INF)
        a = jnp.floor_divide(t0 - doc, bk)  # the block (per row) that ends inside this tile
        in_a = (t - doc[:, None]) < (a[:, None] + 1) * bk
        score_a = jnp.maximum(pend, jnp.max(jnp.where(in_a, s, _NEG_INF), axis=1))
        pend = jnp.max(jnp.where(in_a, _NEG_INF, s), axis=1)
        return *update(score_a, a, scores, ids), pend

    scores, ids = scores0, ids0
    if aligned:
        interior_stop = jnp.maximum(first, jnp.min(jnp.where(active, local, jnp.iinfo(jnp.int32).max)))
        interior_stop = jnp.minimum(interior_stop, stop)
        scores, ids = jax.lax.fori_loop(first, interior_stop, interior_body, (scores, ids))
        first = interior_stop
    scores, ids, _ = jax.lax.fori_loop(first, stop, body, (scores, ids, pend0))

    # Order: rank = number of entries that beat this one (higher score, or equal and smaller id).
    s_p, s_q = scores[:, :, None], scores[:, None, :]
    i_p, i_q = ids[:, :, None], ids[:, None, :]
    real_q = ~locked[:, None, :]
    beats = real_q & ((s_q > s_p) | ((s_q == s_p) & (i_q < i_p)))
    rank = jnp.sum(beats.astype(jnp.int32), axis=2)  # [bq, slots]
    rank = jnp.where(locked, slots + out_width, rank)
    n = jnp.minimum(keep, jnp.maximum(local, 0))  # chosen non-local blocks
    r = jnp.arange(out_width, dtype=jnp.int32)[None, None, :]
    chosen = jnp.sum(jnp.where(rank[:, :, None] == r, ids[:, :, None], 0), axis=1)  # [bq, out_width]
    r2 = r[:, 0, :]
    row = jnp.where(r2 < n[:, None], chosen, jnp.where(r2 == n[:, None], local[:, None], -1))
    out_ref[...] = jnp.where(active[:, None], row, -1).astype(jnp.int32)


def select_blocks(index_q, index_k, positions: Positions, cfg: MSAConfig, *, interpret: bool):
    """int32 [B, T, Hkv, top_k] selection rows (the spec's), computed by the fused kernel."""
    B, T, Hkv, Di = index_q.shape
    S = index_k.shape[1]
    bk, top_k = cfg.block_size, cfg.top_k
    tiles = common.indexer_tiles(T, Di)
    keep = top_k - 1
    slots = max(1, pl.next_power_of_2(keep)) if keep else 1
    out_width = pl.next_power_of_2(top_k)

    qpos, doc, valid = pos_lib.query_coords(positions, T)
    hi = jnp.minimum(qpos, positions.kv_length[:, None] - 1)
    local = jnp.where(valid, (qpos - doc) // bk, -1)
    lo = jnp.where(valid, doc, 1)
    hi = jnp.where(valid, hi, 0)

    t_pad = pl.cdiv(T, tiles.block_q) * tiles.block_q
    s_pad = pl.cdiv(S, bk) * bk
    pad_t = lambda x, v: jnp.pad(x, [(0, 0), (0, t_pad - T)] + [(0, 0)] * (x.ndim - 2), constant_values=v)
    iq = pad_t(index_q, 0)
    ik = jnp.pad(index_k, [(0, 0), (0, s_pad - S), (0, 0)])
    lo, hi, doc, local = pad_t(lo, 1), pad_t(hi, 0), pad_t(doc, 0), pad_t(local, -1)

    kernel = functools.partial(
        _indexer_kernel, block_size=bk, slots=slots, keep=keep, out_width=out_width,
        scale=cfg.index_scale(Di), precision=common.dot_precision(index_q.dtype),
        aligned=positions.segment_ids is None,
    )
    row_spec = pl.BlockSpec((None, tiles.block_q), lambda b, t, g: (b, t))
    out = pl.pallas_call(
        kernel,
        grid=(B, t_pad // tiles.block_q, Hkv),
        in_specs=[
            pl.BlockSpec((None, tiles.block_q, None, Di), lambda b, t, g: (b, t, g, 0)),
            pl.BlockSpec((None, s_pad, Di), lambda b, t, g: (b, 0, 0)),
            row_spec, row_spec, row_spec, row_spec,
        ],
        out_specs=pl.BlockSpec((None, tiles.block_q, None, out_width), lambda b, t, g: (b, t, g, 0)),
        out_shape=jax.ShapeDtypeStruct((B, t_pad, Hkv, out_width), jnp.int32),
        compiler_params=common.compiler_params(tiles),
        interpret=interpret,
        name="msa_indexer",
    )(iq, ik, lo, hi, doc, local)
    return out[:, :T, :, :top_k]
