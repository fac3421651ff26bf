"""Pieces of the spec's selection rule shared by implementations (plain jnp).

`assemble_rows` turns ranked non-local choices into the spec's output rows (the reference
and the paged kernels' merge use it); `merge_partial_topk` merges top-k lists that were
kept over disjoint ranges of blocks (the paged index scan splits the sequence so that every
SM has work at batch 1); `drop_repeats` reads a block_indices row as the set it is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def assemble_rows(chosen, local, valid, top_k: int):
    """int32 [..., top_k]: chosen non-local blocks, then the local block, then -1 (spec, step 3).

    chosen: int32 [..., W], W <= top_k - 1: a row's candidates ranked best first; the first
      min(top_k - 1, local) are taken (the row's fully visible blocks number `local`).
    local: int [...], the local block L(i); valid: bool [...], False for padding rows (all -1).
    """
    width = chosen.shape[-1]
    chosen = jnp.pad(chosen, [(0, 0)] * (chosen.ndim - 1) + [(0, top_k - width)], constant_values=-1)
    n = jnp.minimum(top_k - 1, local)[..., None]  # chosen non-local blocks
    slot = jnp.arange(top_k, dtype=jnp.int32)
    local_b = jnp.broadcast_to(local[..., None], chosen.shape)
    row = jnp.where(slot < n, chosen, jnp.where(slot == n, local_b, -1))
    return jnp.where(valid[..., None], row, -1).astype(jnp.int32)


def merge_partial_topk(scores, ids, keep: int):
    """int32 [..., keep]: the best `keep` of several partial top-k lists, best first.

    scores: float32 [..., L, W], ids: int32 [..., L, W]: L lists of W >= keep (score, block)
    entries, each list the top entries of its own range of blocks (unused entries: score
    -inf). Order: higher score first, ties by smaller id, the spec's; the top `keep` of the
    union of the lists' top `keep` are then the top `keep` overall.
    """
    s = scores[..., :keep].reshape(*scores.shape[:-2], -1)
    i = ids[..., :keep].reshape(*ids.shape[:-2], -1)
    _, ranked = jax.lax.sort((-s, i), dimension=s.ndim - 1, num_keys=2)
    return ranked[..., :keep]


def drop_repeats(block_indices, num_blocks: int):
    """block_indices [..., K] with -1 for ids outside [0, num_blocks) and for repeats of an
    earlier slot: a row read as the set the spec says it is."""
    bi = block_indices
    K = bi.shape[-1]
    earlier = jnp.arange(K)[:, None] > jnp.arange(K)[None, :]
    repeat = jnp.any((bi[..., :, None] == bi[..., None, :]) & earlier, axis=-1)
    return jnp.where((bi >= 0) & (bi < num_blocks) & ~repeat, bi, -1)
