"""The only checker of user input: shapes, dtypes, options, positions, index tensors.

Malformed input raises ValueError/TypeError naming the argument, what was expected and
what came. Values are checked only when they are concrete (outside jit, or Python ints);
under tracing only static facts (shapes, dtypes) can be checked, and kernels must stay
memory-safe for any int32 content anyway.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from .dispatch import KNOWN

_FLOAT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64)


def as_array(x, name: str):
    """Accepts jax/NumPy arrays and tracers; anything else is converted or rejected."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return x
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from e


def concrete(x):
    """NumPy value of x, or None when x is a tracer (value unknown at trace time)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_rank(x, name: str, rank: int, layout: str):
    if x.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} ({layout}), got shape {tuple(x.shape)}")


def check_floating(x, name: str):
    if not any(x.dtype == d for d in _FLOAT_DTYPES):
        raise TypeError(
            f"{name} must be bfloat16, float16 or float32 (float64 under jax_enable_x64), got dtype {x.dtype}"
        )


def _same(name: str, what: str, expected, actual, ref: str):
    if expected != actual:
        raise ValueError(f"{name} {what} must equal {ref}'s ({expected}), got {actual}")


def check_qkv(q, k, v=None):
    """Checks q [B,T,Hq,D], k/v [B,S,Hkv,D]; returns (B, T, S, Hq, Hkv, D)."""
    check_rank(q, "q", 4, "[B, T, Hq, D]")
    check_rank(k, "k", 4, "[B, S, Hkv, D]")
    check_floating(q, "q")
    check_floating(k, "k")
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    _same("k", "batch", B, k.shape[0], "q")
    _same("k", "head dim", D, k.shape[3], "q")
    # Mixed main-branch dtypes would silently upcast in jnp but not in kernels.
    _same("k", "dtype", q.dtype, k.dtype, "q")
    if v is not None:
        check_rank(v, "v", 4, "[B, S, Hkv, D]")
        # A mismatched v would be read out of bounds by a kernel sized from k.
        _same("v", "shape", tuple(k.shape), tuple(v.shape), "k")
        _same("v", "dtype", q.dtype, v.dtype, "q")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q heads (Hq={Hq}) must be a multiple of k heads (Hkv={Hkv})")
    if min(B, T, S, D) < 1:
        raise ValueError(f"empty dimension: q shape {tuple(q.shape)}, k shape {tuple(k.shape)}")
    return B, T, S, Hq, Hkv, D


def check_index(index_q, index_k, *, B, T, S, Hkv):
    """Checks index_q [B,T,Hkv,Di] and index_k [B,S,Di]; returns Di."""
    check_rank(index_q, "index_q", 4, "[B, T, Hkv, Di]")
    check_rank(index_k, "index_k", 3, "[B, S, Di]")
    check_floating(index_q, "index_q")
    check_floating(index_k, "index_k")
    _same("index_q", "shape[:3]", (B, T, Hkv), tuple(index_q.shape[:3]), "(B, T, Hkv) of q and k")
    _same("index_k", "shape[:2]", (B, S), tuple(index_k.shape[:2]), "(B, S) of k")
    _same("index_k", "index head dim", index_q.shape[3], index_k.shape[2], "index_q")
    _same("index_k", "dtype", index_q.dtype, index_k.dtype, "index_q")
    if index_q.shape[3] < 1:
        raise ValueError("index head dim Di must be >= 1")
    return index_q.shape[3]


def _int_arg(x, name: str, B: int, low: int, high: int, what: str):
    if x is None:
        return None
    if isinstance(x, bool):
        raise TypeError(f"{name} must be None, an int or an int32 [B] array, got {x!r}")
    if isinstance(x, (int, np.integer)):
        if not low <= int(x) <= high:
            raise ValueError(f"{name} must lie in [{low}, {high}] ({what}), got {int(x)}")
        return int(x)
    x = as_array(x, name)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
    if x.shape not in ((), (B,)):
        raise ValueError(f"{name} must be a scalar or have shape [B]=({B},), got {tuple(x.shape)}")
    value = concrete(x)
    if value is not None and value.size and (value.min() < low or value.max() > high):
        bad = value.min() if value.min() < low else value.max()
        raise ValueError(f"{name} must lie in [{low}, {high}] ({what}), got {int(bad)}")
    return x


def check_positions(q_offset, kv_length, segment_ids, *, B, T, S):
    """Checks the position arguments of the spec; returns them with arrays converted."""
    kv_length = _int_arg(kv_length, "kv_length", B, 0, S, "number of existing keys")
    # Outside [-T, S] every query of the row would be padding: certainly a caller bug, and
    # the bound keeps q_offset + i inside int32.
    q_offset = _int_arg(q_offset, "q_offset", B, -T, S, "key position of query 0")
    if segment_ids is not None:
        segment_ids = as_array(segment_ids, "segment_ids")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"segment_ids must have an integer dtype, got {segment_ids.dtype}")
        _same("segment_ids", "shape", (B, T), tuple(segment_ids.shape), "[B, T] of q")
        if T != S:
            raise ValueError(f"segment_ids (packed documents) require T == S, got T={T}, S={S}")
        if q_offset is not None:
            raise ValueError("q_offset must be None with segment_ids: positions restart per document")
    return q_offset, kv_length, segment_ids


def check_block_indices_shape(block_indices, *, B, T, Hkv):
    """Checks dtype and shape of block_indices [B, T, Hkv, K]; returns K."""
    block_indices = as_array(block_indices, "block_indices")
    if block_indices.dtype != jnp.int32:
        raise TypeError(f"block_indices must be int32, got {block_indices.dtype}")
    check_rank(block_indices, "block_indices", 4, "[B, T, Hkv, K]")
    _same("block_indices", "shape[:3]", (B, T, Hkv), tuple(block_indices.shape[:3]), "(B, T, Hkv) of q and k")
    if block_indices.shape[3] < 1:
        raise ValueError("block_indices must have at least one slot (K >= 1)")
    return block_indices


def check_implementation(implementation):
    """None, one of KNOWN, or a non-empty sequence of them."""
    names = [implementation] if isinstance(implementation, str) else implementation
    if implementation is None:
        return
    try:
        names = list(names)
    except TypeError:
        raise TypeError(f"implementation must be None, a name or a sequence of names, got {implementation!r}")
    if not names:
        raise ValueError("implementation must not be an empty sequence")
    for name in names:
        if name not in KNOWN:
            raise ValueError(f"implementation must be one of {KNOWN}, got {name!r}")


# ---- paged caches (spec, "Inference") ----------------------------------------------------

_FP8 = jnp.dtype(jnp.float8_e4m3fn)


def _check_scale(scale, name: str, pages, pages_name: str, shape: tuple):
    """FP8 pages need their float32 per-token scales; other pages take none."""
    if pages.dtype != _FP8:
        if scale is not None:
            raise ValueError(f"{name} is only for float8_e4m3fn pages; {pages_name} is {pages.dtype}")
        return None
    if scale is None:
        raise ValueError(f"{pages_name} is float8_e4m3fn: {name} (float32 {list(shape)}) is required")
    scale = as_array(scale, name)
    if scale.dtype != jnp.float32:
        raise TypeError(f"{name} must be float32, got {scale.dtype}")
    # A smaller scale array would be read out of bounds by a kernel sized from the pages.
    _same(name, "shape", tuple(shape), tuple(scale.shape), f"{pages_name} ({pages_name}.shape[:{len(shape)}])")
    return scale


def _check_page_dtype(pages, name: str, like):
    if pages.dtype != _FP8 and pages.dtype != like.dtype:
        raise TypeError(f"{name} must be float8_e4m3fn or the queries' dtype ({like.dtype}), got {pages.dtype}")


def check_kv_pages(q, k_pages, v_pages, k_scale, v_scale):
    """q [B,T,Hq,D]; k_pages, v_pages [P, page, Hkv, D] in q's dtype or float8_e4m3fn with
    float32 scales [P, page, Hkv]. Returns (k_scale, v_scale) converted, or None each."""
    check_rank(q, "q", 4, "[B, T, Hq, D]")
    check_floating(q, "q")
    check_rank(k_pages, "k_pages", 4, "[P, page, Hkv, D]")
    check_rank(v_pages, "v_pages", 4, "[P, page, Hkv, D]")
    _check_page_dtype(k_pages, "k_pages", q)
    # A mismatched v would be read out of bounds by a kernel sized from k.
    _same("v_pages", "shape", tuple(k_pages.shape), tuple(v_pages.shape), "k_pages")
    _same("v_pages", "dtype", k_pages.dtype, v_pages.dtype, "k_pages")
    _same("k_pages", "head dim", q.shape[3], k_pages.shape[3], "q")
    Hq, Hkv = q.shape[2], k_pages.shape[2]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q heads (Hq={Hq}) must be a multiple of k_pages heads (Hkv={Hkv})")
    if min(q.shape) < 1 or min(k_pages.shape) < 1:
        raise ValueError(f"empty dimension: q shape {tuple(q.shape)}, k_pages shape {tuple(k_pages.shape)}")
    shape = tuple(k_pages.shape[:3])
    return (_check_scale(k_scale, "k_scale", k_pages, "k_pages", shape),
            _check_scale(v_scale, "v_scale", v_pages, "v_pages", shape))


def check_index_pages(index_q, index_k_pages, index_k_scale, *, B: int, T: int, Hkv: int | None,
                      num_pages: int | None, page_size: int | None):
    """index_q [B,T,Hkv,Di]; index_k_pages [P, page, Di] in index_q's dtype or float8_e4m3fn
    with float32 scales [P, page]. None for Hkv / num_pages / page_size: not yet known (taken
    from these arrays). Returns index_k_scale converted, or None."""
    check_rank(index_q, "index_q", 4, "[B, T, Hkv, Di]")
    check_floating(index_q, "index_q")
    check_rank(index_k_pages, "index_k_pages", 3, "[P, page, Di]")
    _check_page_dtype(index_k_pages, "index_k_pages", index_q)
    Hkv = index_q.shape[2] if Hkv is None else Hkv
    _same("index_q", "shape[:3]", (B, T, Hkv), tuple(index_q.shape[:3]), "(B, T, Hkv) of q and k_pages")
    _same("index_k_pages", "index head dim", index_q.shape[3], index_k_pages.shape[2], "index_q")
    if num_pages is not None:
        _same("index_k_pages", "page count P", num_pages, index_k_pages.shape[0], "k_pages")
    if page_size is not None:
        _same("index_k_pages", "page size", page_size, index_k_pages.shape[1], "k_pages")
    if min(index_q.shape) < 1 or min(index_k_pages.shape) < 1:
        raise ValueError(f"empty dimension: index_q {tuple(index_q.shape)}, index_k_pages {tuple(index_k_pages.shape)}")
    return _check_scale(index_k_scale, "index_k_scale", index_k_pages, "index_k_pages",
                        tuple(index_k_pages.shape[:2]))


def check_page_table(page_table, kv_length, q_offset, *, B: int, T: int, num_pages: int, page_size: int):
    """page_table int32 [B, max_pages]; kv_length (required) and q_offset as in
    `check_positions` with S = max_pages * page_size. When page_table and kv_length are
    concrete, every page holding a cached token must name a physical page in [0, P)
    (entries past a row's used pages are never read and may hold anything, e.g. -1).
    Returns (page_table, q_offset, kv_length)."""
    page_table = as_array(page_table, "page_table")
    if page_table.dtype != jnp.int32:
        raise TypeError(f"page_table must be int32, got {page_table.dtype}")
    check_rank(page_table, "page_table", 2, "[B, max_pages]")
    _same("page_table", "batch", B, page_table.shape[0], "q")
    if page_table.shape[1] < 1:
        raise ValueError("page_table must have at least one column (max_pages >= 1)")
    if kv_length is None:
        raise TypeError("kv_length is required for paged caches: int or int32 [B], tokens cached per row")
    S = page_table.shape[1] * page_size
    q_offset, kv_length, _ = check_positions(q_offset, kv_length, None, B=B, T=T, S=S)
    table, length = concrete(page_table), concrete(kv_length)
    if table is not None and length is not None:
        used = np.arange(table.shape[1])[None, :] < -(-np.broadcast_to(length, (B,))[:, None] // page_size)
        bad = used & ((table < 0) | (table >= num_pages))
        if bad.any():
            b, j = (int(x) for x in np.argwhere(bad)[0])
            raise ValueError(f"page_table[{b}, {j}] = {int(table[b, j])} must lie in [0, P={num_pages}): "
                             f"row {b} caches {int(np.broadcast_to(length, (B,))[b])} tokens")
    return page_table, q_offset, kv_length


def check_append(cache, k, v, index_k, num_new):
    """Arguments of `paged_cache.paged_append`; returns (k, v, index_k, num_new int32 [B])."""
    k, v = as_array(k, "k"), as_array(v, "v")
    P, page, Hkv, D = cache.k_pages.shape
    B, max_pages = cache.page_table.shape
    check_rank(k, "k", 4, "[B, T, Hkv, D]")
    check_floating(k, "k")
    T = k.shape[1]
    _same("k", "shape", (B, T, Hkv, D), tuple(k.shape), "the cache ([B, T, Hkv, D])")
    _same("v", "shape", tuple(k.shape), tuple(v.shape), "k")
    check_floating(v, "v")
    if index_k is not None:  # None: the index pages stay as they are
        index_k = as_array(index_k, "index_k")
        check_rank(index_k, "index_k", 3, "[B, T, Di]")
        check_floating(index_k, "index_k")
        _same("index_k", "shape", (B, T, cache.index_k_pages.shape[2]), tuple(index_k.shape), "the cache ([B, T, Di])")
    num_new = _int_arg(num_new, "num_new", B, 0, T, "tokens of k written per row")
    num_new = jnp.broadcast_to(jnp.asarray(T if num_new is None else num_new, jnp.int32), (B,))
    start, count, table = concrete(cache.kv_length), concrete(num_new), concrete(cache.page_table)
    if start is not None and count is not None:
        end = start + count
        if (end > max_pages * page).any():
            b = int(np.argmax(end > max_pages * page))
            raise ValueError(f"paged cache overflow: row {b} holds {int(start[b])} + {int(count[b])} new tokens "
                             f"> capacity {max_pages * page} ({max_pages} pages of {page})")
        if table is not None:
            for b in range(B):
                for j in range(int(start[b]) // page, -(-int(end[b]) // page)):
                    if not 0 <= int(table[b, j]) < P:
                        raise ValueError(f"page_table[{b}, {j}] = {int(table[b, j])} must lie in [0, P={P}) "
                                         f"to receive row {b}'s tokens")
    return k, v, index_k, num_new
