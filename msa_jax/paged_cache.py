"""Paged K/V and index-key caches (spec, "Inference"): the format, allocation, appending, and
the contiguous view that implementations and dense layers read.

A cache holds physical pages of exactly `page_size` tokens; the page size is the MSA block
size, so a block id is a logical page id. Row b's logical page j lives in physical page
`page_table[b, j]`; `kv_length[b]` tokens are cached. Pages are bf16/fp16/fp32 or FP8 E4M3
with one float32 scale per token and kv head (`msa_jax.fp8` says why). Everything here has
static shapes and never synchronises with the host, so appending and reading run inside one
`jax.jit` decode loop; only `make_page_table` (an allocator) runs on the host.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

import jax
import jax.numpy as jnp

from . import fp8, validation


class PagedCache(NamedTuple):
    """The caches of one attention layer for a batch of B sequences (a pytree).

    k_pages, v_pages: [P, page, Hkv, D], a float dtype or float8_e4m3fn.
    index_k_pages: [P, page, Di], a float dtype or float8_e4m3fn (its own choice).
    page_table: int32 [B, max_pages]; entries past a row's last used page are never read.
    kv_length: int32 [B], tokens cached per row.
    k_scale, v_scale: float32 [P, page, Hkv] when the K/V pages are FP8, else None.
    index_k_scale: float32 [P, page] when the index pages are FP8, else None.
    """

    k_pages: jax.Array
    v_pages: jax.Array
    index_k_pages: jax.Array
    page_table: jax.Array
    kv_length: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None
    index_k_scale: jax.Array | None = None

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[1]

    @property
    def capacity(self) -> int:
        """Tokens a row can hold: max_pages * page_size."""
        return self.page_table.shape[1] * self.page_size

    def attention_args(self) -> dict:
        """The cache as keyword arguments of `msa_jax.paged_sparse_attention` (and the other
        paged ops: pick the ones they take)."""
        return dict(page_table=self.page_table, kv_length=self.kv_length, k_scale=self.k_scale,
                    v_scale=self.v_scale, index_k_scale=self.index_k_scale)


def make_page_table(capacities, page_size: int, *, permutation=None) -> tuple[np.ndarray, int]:
    """Host-side allocator: (page_table int32 [B, max_pages], num_pages P).

    Row b gets ceil(capacities[b] / page_size) pages of its own (at least one); physical ids
    are handed out row after row, then renamed through `permutation` (a permutation of
    range(P), e.g. to scatter pages as a long-running server's pool would). Unused entries
    are -1.
    """
    caps = np.asarray(capacities, np.int64).reshape(-1)
    if caps.size == 0 or (caps < 0).any():
        raise ValueError(f"capacities must be a non-empty list of token counts >= 0, got {caps.tolist()}")
    if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    pages = np.maximum(1, -(-caps // page_size))
    num_pages = int(pages.sum())
    ids = np.arange(num_pages)
    if permutation is not None:
        permutation = np.asarray(permutation)
        if sorted(permutation.tolist()) != list(range(num_pages)):
            raise ValueError(f"permutation must be a permutation of range({num_pages}), got {permutation.tolist()}")
        ids = permutation
    table = np.full((caps.size, int(pages.max())), -1, np.int32)
    start = 0
    for b, n in enumerate(pages.tolist()):
        table[b, :n] = ids[start:start + n]
        start += n
    return table, num_pages


def init_paged_cache(page_table, *, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                     index_head_dim: int, kv_dtype=jnp.bfloat16, index_dtype=None) -> PagedCache:
    """An empty cache (kv_length 0) over `num_pages` zeroed pages.

    Args:
      page_table: int [B, max_pages] (e.g. from `make_page_table`).
      kv_dtype: dtype of the K/V pages; jnp.float8_e4m3fn adds per-token scales.
      index_dtype: dtype of the index-key pages; None: kv_dtype.
    """
    page_table = jnp.asarray(page_table, jnp.int32)
    index_dtype = kv_dtype if index_dtype is None else index_dtype
    P, page, Hkv, D, Di = num_pages, page_size, num_kv_heads, head_dim, index_head_dim
    for name, value in (("num_pages", P), ("page_size", page), ("num_kv_heads", Hkv), ("head_dim", D),
                        ("index_head_dim", Di)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if page_table.ndim != 2 or page_table.shape[1] < 1:
        raise ValueError(f"page_table must have shape [B, max_pages >= 1], got {tuple(page_table.shape)}")
    kv_fp8, index_fp8 = fp8.is_fp8(kv_dtype), fp8.is_fp8(index_dtype)
    scale = lambda on, shape: jnp.ones(shape, jnp.float32) if on else None  # noqa: E731
    return PagedCache(
        k_pages=jnp.zeros((P, page, Hkv, D), kv_dtype), v_pages=jnp.zeros((P, page, Hkv, D), kv_dtype),
        index_k_pages=jnp.zeros((P, page, Di), index_dtype), page_table=page_table,
        kv_length=jnp.zeros((page_table.shape[0],), jnp.int32),
        k_scale=scale(kv_fp8, (P, page, Hkv)), v_scale=scale(kv_fp8, (P, page, Hkv)),
        index_k_scale=scale(index_fp8, (P, page)),
    )


def _store(values, pages):
    """(values in the pages' format, per-token scale or None)."""
    if fp8.is_fp8(pages.dtype):
        return fp8.quantize(values, axis=-1)
    return values.astype(pages.dtype), None


def paged_append(cache: PagedCache, k, v, index_k, *, num_new=None) -> PagedCache:
    """Writes new tokens at each row's end; returns the cache with kv_length advanced.

    Args:
      cache: a `PagedCache`.
      k, v: [B, T, Hkv, D]; index_k: [B, T, Di], or None to leave the index pages as they are
        (a layer without an index branch); any float dtype (quantised to FP8 with a scale per
        token and head where the pages are FP8, else cast to the pages' dtype).
      num_new: None (all T) or int / int32 [B] in [0, T]: row b writes its first num_new[b]
        tokens (right-padded prompts of different lengths) at positions kv_length[b] + i.

    Raises:
      ValueError, TypeError: malformed arguments; when the values are concrete, a write past
        a row's capacity or into a page-table entry outside [0, P). Under jit such writes are
        dropped (never out of bounds).
    """
    k, v, index_k, num_new = validation.check_append(cache, k, v, index_k, num_new)
    B, T = k.shape[:2]
    P, page = cache.k_pages.shape[:2]
    max_pages = cache.page_table.shape[1]
    i = jnp.arange(T, dtype=jnp.int32)[None, :]
    pos = cache.kv_length[:, None] + i  # [B, T]
    logical = pos // page
    phys = jnp.take_along_axis(cache.page_table, jnp.clip(logical, 0, max_pages - 1), axis=1)
    ok = (i < num_new[:, None]) & (logical < max_pages) & (phys >= 0) & (phys < P)
    # Index P is out of range: mode="drop" skips it (a negative index would wrap around).
    phys, slot = jnp.where(ok, phys, P), pos % page

    def put(pages, scale, values):
        stored, new_scale = _store(values, pages)
        pages = pages.at[phys, slot].set(stored, mode="drop")
        if scale is not None:
            scale = scale.at[phys, slot].set(new_scale, mode="drop")
        return pages, scale

    k_pages, k_scale = put(cache.k_pages, cache.k_scale, k)
    v_pages, v_scale = put(cache.v_pages, cache.v_scale, v)
    if index_k is None:
        ik_pages, ik_scale = cache.index_k_pages, cache.index_k_scale
    else:
        ik_pages, ik_scale = put(cache.index_k_pages, cache.index_k_scale, index_k)
    return PagedCache(k_pages, v_pages, ik_pages, cache.page_table, cache.kv_length + num_new,
                      k_scale, v_scale, ik_scale)


def gather(pages, scale, page_table, kv_length, dtype):
    """The contiguous view [B, max_pages * page, ...] of paged values, in `dtype`.

    FP8 pages are dequantised with their scale; keys at or past kv_length[b] read as 0 (so
    stale or uninitialised slots, even NaN, never reach a product). Page-table entries are
    clamped into [0, P): any int32 content is memory-safe, and entries past a row's used
    pages only feed positions that are zeroed here.
    """
    P, page = pages.shape[:2]
    B, max_pages = page_table.shape
    phys = jnp.clip(page_table, 0, P - 1)
    x = pages[phys]  # [B, max_pages, page, ...]
    if scale is not None:
        x = x.astype(jnp.float32) * scale[phys][..., None]
    x = x.reshape(B, max_pages * page, *pages.shape[2:]).astype(dtype)
    live = jnp.arange(max_pages * page, dtype=jnp.int32)[None, :] < kv_length[:, None]
    return jnp.where(live.reshape(live.shape + (1,) * (x.ndim - 2)), x, jnp.zeros((), dtype))


def gather_kv(cache: PagedCache, dtype):
    """(k, v) [B, max_pages * page, Hkv, D] in `dtype`, zero past kv_length (see `gather`)."""
    return (gather(cache.k_pages, cache.k_scale, cache.page_table, cache.kv_length, dtype),
            gather(cache.v_pages, cache.v_scale, cache.page_table, cache.kv_length, dtype))
