"""Query/key coordinates shared by every implementation (spec, "Positions").

The validator turns the user's `q_offset`, `kv_length` and `segment_ids` into a
`config.Positions` of int32 arrays; this module derives what kernels need from it. One
formulation covers plain causal attention, chunked prefill and packed documents:

  query (b, i) sits at key coordinate  qpos = q_offset[b] + i  (i itself with segments);
  its document starts at key coordinate doc = 0 (or the first token of the segment run
  holding key qpos: segment_ids are indexed by key coordinate);
  key t is visible iff  doc <= t <= qpos  and  t < kv_length[b]  and the query is valid;
  block ids are document-relative: key t lies in block (t - doc) // block_size.
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from . import validation
from .config import Positions


def canonicalize(q_offset, kv_length, segment_ids, *, batch: int, q_len: int, kv_len: int) -> Positions:
    """Broadcasts validated position arguments to int32 arrays (defaults from the spec)."""
    if kv_length is None:
        kv_length = kv_len
    kv_length = jnp.broadcast_to(jnp.asarray(kv_length, jnp.int32), (batch,))
    if q_offset is None:
        # Packed documents are self-attention (T == S): queries start at key 0.
        q_offset = 0 if segment_ids is not None else kv_length - q_len
    q_offset = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (batch,))
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
    return Positions(q_offset, kv_length, segment_ids)


def is_plain_causal(q_offset, kv_length, segment_ids, *, q_len: int, kv_len: int) -> bool:
    """Whether validated position arguments are, before tracing, plain causal self-attention:
    T == S, query i at key i (q_offset 0), every key present (kv_length S), one document."""

    def known(x, want: int) -> bool:
        if x is None:
            return True
        value = x if isinstance(x, int) else validation.concrete(x)
        return value is not None and bool(np.all(np.asarray(value) == want))

    return q_len == kv_len and segment_ids is None and known(q_offset, 0) and known(kv_length, kv_len)


def doc_starts(segment_ids: jax.Array) -> jax.Array:
    """int32 [B, T]: index of the first token of the contiguous segment run holding each token."""
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    is_start = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return jax.lax.cummax(jnp.where(is_start, t, 0), axis=1)


def query_coords(positions: Positions, q_len: int):
    """(qpos, doc, valid), each [B, T]: key coordinate, document start, non-padding flag."""
    i = jnp.arange(q_len, dtype=jnp.int32)
    qpos = positions.q_offset[:, None] + i[None, :]
    if positions.segment_ids is None:
        doc = jnp.zeros_like(qpos)
    else:
        # segment_ids run over the keys; the public ops take T == S with q_offset 0, where
        # this is doc_starts itself; context parallelism asks for a slice of the queries.
        starts = doc_starts(positions.segment_ids)
        at = jnp.clip(qpos, 0, starts.shape[1] - 1)
        doc = jnp.take_along_axis(starts, at, axis=1)
    valid = (qpos >= 0) & (qpos < positions.kv_length[:, None])
    return qpos, doc, valid


def num_valid_queries(positions: Positions, q_len: int) -> jax.Array:
    """int32 scalar N of the spec: non-padding queries over the whole batch."""
    _, _, valid = query_coords(positions, q_len)
    return jnp.sum(valid, dtype=jnp.int32)


def last_visible_key(positions: Positions, qpos, valid) -> jax.Array:
    """int32 [B, T]: the last key each query sees, min(qpos, kv_length - 1); -1 for padding."""
    return jnp.where(valid, jnp.minimum(qpos, positions.kv_length[:, None] - 1), -1)
