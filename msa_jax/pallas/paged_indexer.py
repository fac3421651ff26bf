"""Pallas paged index scan: the decode indexer, one pass over the paged index keys with the
top-k fused, split over the sequence, then a merge of the partial top-k lists.

Decode has few queries (T = 1..16) and a long cache, so the work is reading the index keys:
the scan is memory-bound and must keep every SM busy even at batch 1. One program owns one
(batch row, tile of query rows, split of the row's logical pages). All T tokens x Hkv groups
share the one index key head, so they are the rows of one matrix tile (rows = T * Hkv,
padded to >= 16; tiles of 64 rows when T is larger, as in chunked prefill) and each page's
keys are read once for all of them. It walks its pages, computes the
[rows, page] scores on the matrix unit, max-pools each page (= block) and offers it to every
row whose local block lies after it, into the running top-(top_k - 1) of running_topk.py.
Only fully visible blocks are candidates, so no key inside a scanned page is masked: a
partly written page is always some row's local page or later, and never scanned.

Each program writes its unranked (score, id) list; msa_jax/paged_scan.py (shared with the
cuda scan) plans the split, merges the lists of a row exactly (the lists cover disjoint
blocks and each is exact for its range) and appends the local block. FP8 keys: the tile is
converted to the queries' dtype (exact) and each score column multiplied by its token's scale.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import paged_scan
from ..config import IndexPages, MSAConfig, Positions
from . import common, running_topk


def _scan_kernel(iq_ref, ik_ref, *refs, page_size: int, slots: int, keep: int, pages_per_split: int,
                 scale: float, precision, fp8: bool):
    """iq [rows, Di] (one row tile); ik [P, page, Di]; (fp8: iks [P, page]); page_table
    [max_pages]; local [rows] (-1: padding row). Out: scores float32 [rows, slots], ids int32 [rows, slots]."""
    iks_ref = refs[0] if fp8 else None
    pt_ref, local_ref, scores_ref, ids_ref = refs[-4:]
    rows, Di = iq_ref.shape
    num_pages, max_pages = ik_ref.shape[0], pt_ref.shape[0]
    iq = iq_ref[...]
    local = local_ref[...]
    active = local >= 0
    # Blocks before a row's local one are its candidates: no row needs a block >= max(local).
    stop = jnp.minimum(jnp.max(local), max_pages)
    lo = pl.program_id(2) * pages_per_split
    hi = jnp.maximum(lo, jnp.minimum(lo + pages_per_split, stop))

    def body(j, carry):
        scores, ids = carry
        # Page ids as a one-element vector, gathered like the pages (the pattern Triton lowers);
        # clamped: any page-table content stays in bounds.
        phys = jnp.clip(pt_ref[pl.ds(j, 1)], 0, num_pages - 1)
        ik = ik_ref[phys].reshape(page_size, Di)
        s = scale * jax.lax.dot_general(
            iq, ik.astype(iq.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
            precision=precision,
        )  # [rows, page]
        if fp8:
            s = s * iks_ref[phys].reshape(1, page_size)
        a = jnp.full((rows,), j, jnp.int32)
        return running_topk.offer(scores, ids, jnp.max(s, axis=1), a, active & (a < local))

    scores, ids = jax.lax.fori_loop(lo, hi, body, running_topk.empty(rows, slots, keep))
    scores_ref[...] = scores
    ids_ref[...] = ids


def paged_select_blocks(index_q, pages: IndexPages, positions: Positions, cfg: MSAConfig, *, interpret: bool):
    """int32 [B, T, Hkv, top_k] selection rows (logical page ids) from the scan and the merge
    (msa_jax/paged_scan.py)."""
    B, T, Hkv, Di = index_q.shape
    P, page = pages.keys.shape[:2]
    max_pages = pages.page_table.shape[1]
    keep = cfg.top_k - 1
    fp8 = pages.scale is not None
    rows = T * Hkv  # row r = t * Hkv + g
    tile = common.paged_index_row_tile(rows)
    rows_pad = -(-rows // tile) * tile
    slots = common.next_power_of_2(keep)
    iq = jnp.pad(index_q.reshape(B, rows, Di), [(0, 0), (0, rows_pad - rows), (0, 0)])

    def scan(local, splits: int, pps: int):
        local_rows = jnp.pad(jnp.repeat(local, Hkv, axis=1), [(0, 0), (0, rows_pad - rows)], constant_values=-1)
        kernel = functools.partial(
            _scan_kernel, page_size=page, slots=slots, keep=keep, pages_per_split=pps, scale=cfg.index_scale(Di),
            precision=common.dot_precision(index_q.dtype), fp8=fp8,
        )
        out_spec = pl.BlockSpec((None, None, tile, slots), lambda b, r, s: (b, s, r, 0))
        scores, ids = pl.pallas_call(
            kernel,
            grid=(B, rows_pad // tile, splits),
            in_specs=[pl.BlockSpec((None, tile, Di), lambda b, r, s: (b, r, 0)),
                      pl.BlockSpec((P, page, Di), lambda b, r, s: (0, 0, 0))]
            + ([pl.BlockSpec((P, page), lambda b, r, s: (0, 0))] if fp8 else [])
            + [pl.BlockSpec((None, max_pages), lambda b, r, s: (b, 0)),
               pl.BlockSpec((None, tile), lambda b, r, s: (b, r))],
            out_specs=[out_spec, out_spec],
            out_shape=[jax.ShapeDtypeStruct((B, splits, rows_pad, slots), jnp.float32),
                       jax.ShapeDtypeStruct((B, splits, rows_pad, slots), jnp.int32)],
            compiler_params=common.compiler_params(common.paged_index_tiles(tile)),
            interpret=interpret,
            name="msa_paged_index_scan",
        )(iq, pages.keys, *([pages.scale] if fp8 else []), pages.page_table, local_rows)
        # [B, splits, rows, slots] -> [B, rows, splits, slots]: one row's lists side by side.
        return jnp.moveaxis(scores[:, :, :rows], 1, 2), jnp.moveaxis(ids[:, :, :rows], 1, 2)

    return paged_scan.select(index_q, positions, top_k=cfg.top_k, page_size=page, max_pages=max_pages, row_tile=tile,
                             scan=scan)
