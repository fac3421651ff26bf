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

