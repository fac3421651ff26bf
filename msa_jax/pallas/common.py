"""Tile choices and backend settings shared by the Pallas kernels."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..paged_scan import TARGET_PROGRAMS  # the least programs of a decode launch, as the cuda scan's


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_q: int
    num_warps: int
    num_stages: int


def indexer_tiles(q_len: int, index_head_dim: int) -> Tiles:
    """64 queries x one 128-key block per step: the [64, 128] fp32 score tile plus the
    running top-k (64 x 16 entries) fit a 4-warp program's registers; small T shrinks it.
    Three stages of key tiles in flight: 430 TFLOP/s vs 390 with two (H100, config A, 32K,
    benchmarks/results/sweep-*.json)."""
    block_q = 64 if q_len >= 64 else max(16, 1 << (max(q_len, 1) - 1).bit_length())
    return Tiles(block_q=block_q, num_warps=4, num_stages=3)


def dot_precision(dtype):
    """fp32 inputs: full-precision dots (Triton would otherwise use tf32, 1e-3 error)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def compiler_params(tiles: Tiles):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


@dataclasses.dataclass(frozen=True)
class AttentionTiles:
    rows: int  # queries per step (one matrix tile)
    matrix_rows: int  # rows * G padded to a power of two (Triton tensor shapes)
    num_warps: int
    num_stages: int
    item_steps: int = 1  # steps per forward work item (the key tile is loaded once per item)


def attention_tiles(group: int, head_dim: int) -> AttentionTiles:
    """64 matrix rows (queries x heads) per step: a [64, 128] fp32 score tile and a [64, D]
    accumulator per program; G > 64 is not a GQA shape anyone uses. A forward work item
    walks up to 16 steps of one key tile, so a tile's K and V (64 KB at D = 128) are read
    once per 64 queries x G heads rather than once per 64 matrix rows."""
    rows = max(1, 64 // group)
    return AttentionTiles(rows=rows, matrix_rows=next_power_of_2(max(16, rows * group)), num_warps=4, num_stages=1,
                          item_steps=16)


def pad_keys(x, block_size: int):
    """Pads axis 1 (keys) of x [B, S, ...] so a tile of block_size keys may start at any key
    below S (packed documents lay their block grid from each document's first token)."""
    S = x.shape[1]
    pad = -(-S // block_size) * block_size + block_size - S
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# ---- paged decode kernels (paged_indexer.py, paged_attention.py) ----------------------------

# Queries per row up to which the paged ops run the decode kernels (one program per query
# and group in the attention; all T x Hkv rows in one index tile). Longer chunks (chunked
# prefill) gather the pages and run the contiguous KV-outer kernels, which reuse each key
# tile across the queries that select it.
DECODE_MAX_Q = 16

def paged_index_row_tile(rows: int) -> int:
    """Query rows (tokens x groups) per program of the paged index scan: all of them up to 64
    (decode: T x Hkv <= 16 x 4), padded to a power of two >= 16 for the matrix unit; tiles of
    64, as the contiguous indexer's, beyond (its [64, page] score tile and 64 x 16 running
    top-k fit one 4-warp program's registers)."""
    return min(64, next_power_of_2(max(16, rows)))


def paged_index_tiles(row_tile: int) -> Tiles:
    """One page of keys per step; two stages keep the next page's load in flight while the
    current page is scored (at decode sizes the scan is memory-bound)."""
    return Tiles(block_q=row_tile, num_warps=4, num_stages=2)


def paged_attention_splits(programs: int, top_k: int) -> tuple[int, int]:
    """(splits, slots per split) of the sparse decode attention: a (query, group)'s top_k
    selected pages are split until programs x splits reaches TARGET_PROGRAMS (B 1, Hkv 4:
    16 splits of one page; B 32: 2 splits of 8); the partials merge by log-sum-exp."""
    splits = max(1, min(top_k, -(-TARGET_PROGRAMS // programs)))
    per_split = -(-top_k // splits)
    return -(-top_k // per_split), per_split
