"""Query chunking for the reference: memory O(chunk x S) instead of O(T x S).

Every reference op is written for one chunk of queries against all keys and run over the
chunks with `lax.map` (or a scan when a key-side gradient accumulates). Rows past T are
padded queries: the coordinates below mark them invalid, so they compute nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import positions as pos_lib
from ..config import Positions

# Elements of one fp32 [chunk, Hq, S] score tensor; a chunk holds a few of them at once.
_SCORE_BUDGET = 1 << 24


class Coords(NamedTuple):
    """Per-query coordinates of one chunk, each [B, C] int32/bool, plus kv_length [B]."""

    qpos: jax.Array
    doc: jax.Array
    valid: jax.Array
    kv_length: jax.Array


def acc(x):
    """x upcast to its accumulation dtype: fp32, or fp64 for fp64 inputs (x64 tests)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def chunk_size(q_len: int, kv_len: int, heads: int) -> int:
    """Largest power of two <= T whose score tensor fits the budget (at least 1)."""
    want = max(1, _SCORE_BUDGET // max(1, heads * kv_len))
    size = 1
    while size * 2 <= min(want, q_len):
        size *= 2
    return size


def split(x: jax.Array, chunk: int, num_chunks: int) -> jax.Array:
    """[B, T, ...] -> [num_chunks, B, chunk, ...], zero-padding T."""
    pad = num_chunks * chunk - x.shape[1]
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(x.shape[0], num_chunks, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def merge(x: jax.Array, q_len: int) -> jax.Array:
    """Inverse of `split`."""
    x = jnp.moveaxis(x, 0, 1)
    x = x.reshape(x.shape[0], -1, *x.shape[3:])
    return x[:, :q_len]


def coords(positions: Positions, q_len: int, chunk: int, num_chunks: int) -> Coords:
    """Chunked query coordinates, [num_chunks, B, chunk] each; padded rows are invalid."""
    qpos, doc, valid = pos_lib.query_coords(positions, q_len)
    qpos, doc = split(qpos, chunk, num_chunks), split(doc, chunk, num_chunks)
    valid = split(valid, chunk, num_chunks)  # padding with zeros = False
    kv_length = jnp.broadcast_to(positions.kv_length, (num_chunks,) + positions.kv_length.shape)
    return Coords(qpos, doc, valid, kv_length)


def visible(c: Coords, kv_len: int) -> jax.Array:
    """bool [B, C, S]: key t visible to the chunk's query (spec, "Positions")."""
    t = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
    return (
        c.valid[:, :, None]
        & (t >= c.doc[:, :, None])
        & (t <= c.qpos[:, :, None])
        & (t < c.kv_length[:, None, None])
    )


def key_blocks(c: Coords, kv_len: int, block_size: int) -> jax.Array:
    """int32 [B, C, S]: document-relative block id of key t as seen by each query."""
    t = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
    return jnp.maximum(t - c.doc[:, :, None], 0) // block_size


def local_block(c: Coords, block_size: int) -> jax.Array:
    """int32 [B, C]: L(i) = (qpos - doc) // block_size (meaningless for invalid rows)."""
    return jnp.maximum(c.qpos - c.doc, 0) // block_size
