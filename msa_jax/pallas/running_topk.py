"""The exp-free running top-k a kernel keeps in registers, shared by the contiguous indexer
(indexer.py) and the paged index scan (paged_indexer.py).

Each row keeps `slots` (a power of two) entries, of which the first `keep` = top_k - 1 are
live; slots >= keep are locked (+inf, never evicted). Blocks must be offered in increasing
id order: then a newcomer that only equals the current minimum loses (the smaller id wins),
and among equal minima the largest id is evicted, so a row holds exactly the best `keep`
blocks seen so far by (score descending, id ascending), the spec's order.
"""

from __future__ import annotations

import jax.numpy as jnp

_NEG_INF = float("-inf")


def empty(rows: int, slots: int, keep: int):
    """(scores float32 [rows, slots], ids int32 [rows, slots]) of a row that has seen nothing.
    Empty slots: score -inf and a distinct negative id, so "the evicted id" is unique."""
    slot = jnp.arange(slots, dtype=jnp.int32)[None, :]
    scores = jnp.where(slot >= keep, jnp.inf, _NEG_INF) + jnp.zeros((rows, slots), jnp.float32)
    ids = jnp.broadcast_to(-1 - slot, (rows, slots)).astype(jnp.int32)
    return scores, ids


def offer(scores, ids, score_a, a, eligible):
    """Offers block a (int32 [rows]) with score_a (float32 [rows]) to the rows where
    `eligible` (bool [rows]); returns the updated (scores, ids)."""
    lowest = jnp.min(scores, axis=1)
    evict = jnp.max(jnp.where(scores == lowest[:, None], ids, jnp.iinfo(jnp.int32).min), axis=1)
    take = eligible & (score_a > lowest)
    hit = take[:, None] & (ids == evict[:, None])
    return jnp.where(hit, score_a[:, None], scores), jnp.where(hit, a[:, None], ids)
