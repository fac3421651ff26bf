"""Inverting the selection (key block -> queries) for the KV-outer kernels, in plain jnp.

Every valid (query, slot) entry of block_indices names a block; with packed documents the
block's absolute first key is doc(query) + id * block_size, so entries are grouped by that
absolute start: all queries of one group read the same key tile. The groups are cut into
work items of at most `rows` queries; one program handles one work item. The number of
work items depends on the data, so the grid is sized by a static upper bound and programs
past the real count exit at once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp



class WorkList(NamedTuple):
    """Per (batch row, kv head): entries sorted by key tile, and the work items over them.

    entry_query, entry_slot: int32 [B, Hkv, T*K], sorted by tile start (invalid entries last).
    entry_ok: bool [B, T, Hkv, K], which (query, slot) entries take part (unsorted layout).
    item_start, item_count, item_tile: int32 [B, Hkv, max_items]: first entry, number of
      entries (0 for unused items), and absolute first key of the item's tile.
    """

    entry_query: jax.Array
    entry_slot: jax.Array
    entry_ok: jax.Array
    item_start: jax.Array
    item_count: jax.Array
    item_tile: jax.Array


def max_items(q_len: int, kv_len: int, top_k: int, block_size: int, rows: int, packed: bool) -> int:
    """Static bound: sum over tiles of ceil(count / rows) <= entries / rows + distinct tiles."""
    entries = q_len * top_k
    tiles = kv_len if packed else -(-kv_len // block_size)
    return -(-entries // rows) + min(tiles, entries)


def dense_indices(block_indices, kv_len: int, block_size: int):
    """Dense warm-up: every block of the sequence (causality still applies per key). The
    KV-outer forwards of pallas and cuda both serve mode="dense" with these rows."""
    B, T, Hkv, _ = block_indices.shape
    n = -(-kv_len // block_size)
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (B, T, Hkv, n))


# Up to this many slots a row's repeats are found by comparing every pair of slots (K^2
# compares, fused by XLA); above it, by sorting the row (K log K). Dense mode's rows hold every
# block (K = 256 at 32K, 1024 at 128K): T K^2 compares, likely the 4.8 ms reduction in the
# dense op's profile at 32K on an H100 (config A), and 64x that at 128K.
PAIRWISE_MAX_SLOTS = 32


def repeats_an_earlier_slot(block_indices):
    """bool [..., K]: whether slot j holds the same id as some slot i < j of its row."""
    K = block_indices.shape[-1]
    if K <= PAIRWISE_MAX_SLOTS:
        earlier = jnp.arange(K)[:, None] > jnp.arange(K)[None, :]
        return jnp.any((block_indices[..., :, None] == block_indices[..., None, :]) & earlier, axis=-1)
    # A stable sort keeps equal ids in slot order: all but the first of a run are repeats.
    order = jnp.argsort(block_indices, axis=-1, stable=True)
    ids = jnp.take_along_axis(block_indices, order, axis=-1)
    repeat = jnp.concatenate([jnp.zeros_like(ids[..., :1], bool), ids[..., 1:] == ids[..., :-1]], axis=-1)
    return jnp.put_along_axis(jnp.zeros_like(repeat), order, repeat, axis=-1, inplace=False)


# Composite (row, tile) keys are uint32 and entry numbers int32; past either range each row is
# sorted alone.
KEY_LIMIT, ENTRY_LIMIT = 2**32, 2**31


def sort_rows(key, kv_len: int):
    """(order, sorted key) of each row of key [B, Hkv, N] (tile starts in [0, kv_len), int32
    max where the entry takes no part), a stable ascending sort per row.

    All rows go through one sort of uint32 (row, tile) composite keys: XLA's GPU sort rewriter
    hands one long row of unsigned 32-bit keys with 32-bit values to CUB's radix sort, but a
    batch of a few rows (B * Hkv = 4 for config A) to its own bitonic sort
    (xla/service/gpu/transforms/sort_rewriter.cc, the Hopper heuristic); those bitonic sorts
    took 6.2 of msa_fwd_bwd_kl's 198 ms at 128K (config A, H100,
    results/profiles/h100-20261207-profile-A-msa_fwd_bwd_kl-cuda-131072-750dec3.json)."""
    B, Hkv, N = key.shape
    big = jnp.iinfo(jnp.int32).max
    span = kv_len + 2  # tiles 0 .. kv_len - 1, kv_len (a clamp that never applies), "no part"
    if B * Hkv * span > KEY_LIMIT or B * Hkv * N > ENTRY_LIMIT:
        order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
        return order, jnp.take_along_axis(key, order, axis=-1)
    row = jnp.arange(B * Hkv, dtype=jnp.uint32).reshape(B, Hkv, 1)
    local = jnp.where(key == big, span - 1, jnp.minimum(key, kv_len)).astype(jnp.uint32)
    flat_key, flat_at = jax.lax.sort(
        ((row * span + local).reshape(-1), jnp.arange(B * Hkv * N, dtype=jnp.int32)), num_keys=1, is_stable=True
    )
    local = (flat_key.reshape(B, Hkv, N) - row * span).astype(jnp.int32)
    order = flat_at.reshape(B, Hkv, N) - row.astype(jnp.int32) * N
    return order, jnp.where(local == span - 1, big, local)


def build(block_indices, qpos, doc, valid, *, kv_len: int, block_size: int, rows: int, packed: bool) -> WorkList:
    """block_indices [B, T, Hkv, K] and query coordinates (qpos, doc, valid) [B, T]."""
    B, T, Hkv, K = block_indices.shape
    num_blocks = -(-kv_len // block_size)
    bi = block_indices
    # A row is a set: drop -1, out-of-range ids and repeats of an earlier slot.
    ok = (bi >= 0) & (bi < num_blocks) & ~repeats_an_earlier_slot(bi) & valid[:, :, None, None]
    tile = doc[:, :, None, None] + jnp.clip(bi, 0, num_blocks) * block_size
    # Causality: a tile that starts after the query holds nothing it may see.
    ok &= tile <= qpos[:, :, None, None]
    big = jnp.iinfo(jnp.int32).max
    key = jnp.where(ok, tile, big)  # [B, T, Hkv, K]
    key = jnp.moveaxis(key, 2, 1).reshape(B, Hkv, T * K)
    order, sorted_key = sort_rows(key, kv_len)
    entry_query, entry_slot = order // K, order % K

    n_items = max_items(T, kv_len, K, block_size, rows, packed)
    # Segment boundaries: first entry of each distinct tile; each segment is cut every `rows`.
    idx = jnp.arange(T * K, dtype=jnp.int32)
    is_new = jnp.concatenate([jnp.ones((B, Hkv, 1), bool), sorted_key[..., 1:] != sorted_key[..., :-1]], -1)
    seg_start = jax.lax.cummax(jnp.where(is_new, idx, 0), axis=2)
    starts_item = (sorted_key != big) & ((idx - seg_start) % rows == 0)
    item_rank = jnp.cumsum(starts_item, axis=-1) - 1  # item id of each item-starting entry
    target = jnp.where(starts_item, item_rank, n_items)  # out of range -> dropped by scatter
    scatter = lambda vals, fill: jnp.full((B, Hkv, n_items), fill, jnp.int32).at[
        jnp.arange(B)[:, None, None], jnp.arange(Hkv)[None, :, None], target
    ].set(vals, mode="drop")
    item_start = scatter(jnp.broadcast_to(idx, (B, Hkv, T * K)), 0)
    item_tile = scatter(sorted_key, 0)
    # Count = entries of the same tile from this start, at most rows.
    seg_len_end = _segment_ends(sorted_key, big)  # index one past the last entry of each tile
    item_end = scatter(seg_len_end, 0)
    item_count = jnp.where(
        jnp.arange(n_items)[None, None, :] < jnp.sum(starts_item, -1, keepdims=True),
        jnp.minimum(item_end - item_start, rows), 0,
    )
    return WorkList(entry_query, entry_slot, ok, item_start, item_count.astype(jnp.int32), item_tile)


def _segment_ends(sorted_key, big):
    """For each entry, one past the last index holding the same key (keys sorted)."""
    n = sorted_key.shape[-1]
    idx = jnp.arange(n, dtype=jnp.int32)
    is_last = jnp.concatenate([sorted_key[..., 1:] != sorted_key[..., :-1], jnp.ones_like(sorted_key[..., :1], bool)], -1)
    ends = jnp.where(is_last, idx + 1, n)
    # Reverse cummin gives, for each entry, the end of its segment.
    return jnp.flip(jax.lax.cummin(jnp.flip(ends, -1), axis=2), -1)
