"""Reference paged ops: gather the pages into the contiguous layout, then the contiguous
reference. "Paged == contiguous" holds here by construction; tests check the kernels
against it and it against the float64 oracle on contiguous inputs.

FP8 pages are dequantised to float32 (exact up to float32 rounding of value x scale), so
the reference computes what the stored values mean, with no further rounding.
"""

from __future__ import annotations

import jax.numpy as jnp

from .. import paged_cache
from ..config import IndexPages, KVPages, MSAConfig, Positions
from . import attention, selection


def _dtype(pages, like):
    return jnp.float32 if pages.dtype == jnp.float8_e4m3fn else like.dtype


def contiguous_index_keys(index_q, pages: IndexPages, positions: Positions):
    """index_k [B, max_pages * page, Di]: index_q's dtype, float32 for FP8 pages."""
    return paged_cache.gather(pages.keys, pages.scale, pages.page_table, positions.kv_length,
                              _dtype(pages.keys, index_q))


def contiguous_kv(q, pages: KVPages, positions: Positions):
    """(k, v) [B, max_pages * page, Hkv, D]: q's dtype, float32 for FP8 pages."""
    dtype = _dtype(pages.k, q)
    gather = lambda x, s: paged_cache.gather(x, s, pages.page_table, positions.kv_length, dtype)  # noqa: E731
    return gather(pages.k, pages.k_scale), gather(pages.v, pages.v_scale)


def paged_select_blocks(index_q, pages: IndexPages, positions: Positions, cfg: MSAConfig):
    """int32 [B, T, Hkv, top_k], logical page ids."""
    return selection.select_blocks(index_q, contiguous_index_keys(index_q, pages, positions), positions, cfg)


def paged_attention_fwd(q, pages: KVPages, block_indices, positions: Positions, cfg: MSAConfig):
    """(out [B, T, Hq, D] in q.dtype, lse float32 [B, T, Hq])."""
    k, v = contiguous_kv(q, pages, positions)
    return attention.attention_fwd(q, k, v, block_indices, positions, cfg)
