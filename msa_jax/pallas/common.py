"""Tile choices and backend settings shared by the Pallas kernels."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Tiles:
    block_q: int
    num_warps: int
    num_stages: int


def indexer_tiles(q_len: int, index_head_dim: int) -> Tiles:
    """64 queries x one 128-key block per step: the [64, 128] fp32 score tile plus the
    running top-k (64 x 16 entries) fit a 4-warp program's registers; small T shrinks it."""
    block_q = 64 if q_len >= 64 else max(16, 1 << (max(q_len, 1) - 1).bit_length())
    return Tiles(block_q=block_q, num_warps=4, num_stages=2)


def dot_precision(dtype):
    """fp32 inputs: full-precision dots (Triton would otherwise use tf32, 1e-3 error)."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def compiler_params(tiles: Tiles):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


@dataclasses.dataclass(frozen=True)
class AttentionTiles:
    rows: int  # queries per work item
    matrix_rows: int  # rows * G padded to a power of two (Triton tensor shapes)
    num_warps: int
    num_stages: int


def attention_tiles(group: int, head_dim: int) -> AttentionTiles:
    """64 matrix rows (queries x heads) per work item: a [64, 128] fp32 score tile and a
    [64, D] accumulator per program; G > 64 is not a GQA shape anyone uses."""
    rows = max(1, 64 // group)
    return AttentionTiles(rows=rows, matrix_rows=next_power_of_2(max(16, rows * group)), num_warps=4, num_stages=1)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# Bytes of fp32 slot partials one query chunk may hold (T*K*Hq*D*4 for all T would be
# tens of GB at long context).
PARTIAL_BUDGET_BYTES = 1 << 30


def query_chunk(q_len: int, bytes_per_query: int) -> int:
    return max(1, min(q_len, PARTIAL_BUDGET_BYTES // max(1, bytes_per_query)))
