"""The paged index scan's plan and merge, shared by the pallas and cuda kernels.

Both kernels (msa_jax/pallas/paged_indexer.py, cuda/kernels/paged_indexer_sm90.cuh) read the
paged index keys once with the top-k fused, split over the sequence so that every SM has work
at batch 1, and write for each (batch row, split) one list of (score, logical page id) per
query row: the best top_k - 1 candidate pages of the split's range. This module decides the
split and turns the lists into the spec's rows: `topk.merge_partial_topk` ranks the union of a
row's lists (each is exact for its own range, so the merge is exact) and `topk.assemble_rows`
appends the local page.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from . import positions as pos_lib
from . import topk
from .config import Positions

# Programs (CTAs) one decode kernel launch should have at least: about twice the SMs of an H100 /
# H200 (132), so the memory-bound scans keep every SM busy at batch 1 with one wave to spare.
TARGET_PROGRAMS = 256


def index_splits(programs: int, max_pages: int) -> tuple[int, int]:
    """(splits, pages per split) of the paged index scan over `programs` (batch x row tiles)
    programs: the sequence is split until programs x splits reaches TARGET_PROGRAMS (B 1 at 1M
    tokens, 8192 pages of 128: 256 splits of 32 pages; B 32 at 128K: 8 splits of 128 pages).
    More splits cost only the merge, which sorts splits x (top_k - 1) candidates per row."""
    splits = max(1, min(max_pages, -(-TARGET_PROGRAMS // programs)))
    per_split = -(-max_pages // splits)
    return -(-max_pages // per_split), per_split


Scan = Callable[[jnp.ndarray, int, int], tuple[jnp.ndarray, jnp.ndarray]]


def select(index_q, positions: Positions, *, top_k: int, page_size: int, max_pages: int, row_tile: int, scan: Scan):
    """int32 [B, T, Hkv, top_k]: the spec's selection rows (logical page ids) from a paged scan.

    Args:
      index_q: [B, T, Hkv, Di]; positions: the canonical `Positions` (no segment ids).
      top_k, page_size, max_pages: the spec's K, the page (= block) size, page-table columns.
      row_tile: query rows (T x Hkv) one program of the scan takes; the split is planned for
        B x ceil(T x Hkv / row_tile) programs.
      scan: scan(local, splits, pages_per_split) -> (scores float32, ids int32), each
        [B, T * Hkv, splits, W] with W >= top_k - 1, row r = t * Hkv + g. local is int32 [B, T],
        each query's local page (-1: padding query). Split s covers logical pages
        [s * pages_per_split, (s + 1) * pages_per_split); a row's list there holds its best
        candidate pages (j < local) of that range by (score descending, id ascending), in any
        order, unused entries with score -inf. Not called when top_k is 1.
    """
    B, T, Hkv, _ = index_q.shape
    qpos, _, valid = pos_lib.query_coords(positions, T)
    local = jnp.where(valid, qpos // page_size, -1)  # [B, T]
    keep = top_k - 1
    if keep == 0:
        chosen = jnp.zeros((B, T, Hkv, 0), jnp.int32)
    else:
        row_tiles = -(-(T * Hkv) // row_tile)
        splits, per_split = index_splits(B * row_tiles, max_pages)
        scores, ids = scan(local, splits, per_split)
        chosen = topk.merge_partial_topk(scores, ids, keep).reshape(B, T, Hkv, keep)
    per_group = lambda x: jnp.repeat(x[..., None], Hkv, -1)  # noqa: E731  [B, T] -> [B, T, Hkv]
    return topk.assemble_rows(chosen, per_group(local), per_group(valid), top_k)
