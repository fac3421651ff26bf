"""Reference index branch: token scores, block max-pooling, exp-free top-k (spec, "Index branch")."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config import MSAConfig, Positions
from ..topk import assemble_rows
from . import chunking

_HI = jax.lax.Precision.HIGHEST


def index_scores(index_q_c, index_k, scale):
    """u [B, C, Hkv, S] in the accumulation dtype (fp32; fp64 for fp64 inputs): si * <index_q, index_k> with fp32 accumulation."""
    return scale * jnp.einsum(
        "bcnd,bsd->bcns",
        chunking.acc(index_q_c),
        chunking.acc(index_k),
        precision=_HI,
    )


def _block_max(u, vis, c: chunking.Coords, block_size: int, num_blocks: int, packed: bool):
    """M [B, C, Hkv, num_blocks]: max of u over each block's visible keys (-inf if none)."""
    u = jnp.where(vis[:, :, None, :], u, -jnp.inf)
    S = u.shape[-1]
    width = num_blocks * block_size
    if packed:
        # Document-relative grid: shift each query's row so its document starts at 0.
        x = c.doc[:, :, None] + jnp.arange(width, dtype=jnp.int32)[None, None, :]
        gathered = jnp.take_along_axis(u, jnp.minimum(x, S - 1)[:, :, None, :], axis=-1)
        u = jnp.where((x < S)[:, :, None, :], gathered, -jnp.inf)
    else:
        u = jnp.pad(u, [(0, 0)] * 3 + [(0, width - S)], constant_values=-jnp.inf)
    return jnp.max(u.reshape(*u.shape[:-1], num_blocks, block_size), axis=-1)


def select_chunk(index_q_c, index_k, c: chunking.Coords, cfg: MSAConfig, packed: bool):
    """int32 [B, C, Hkv, K] selection rows for one chunk of queries."""
    S = index_k.shape[1]
    bk, top_k = cfg.block_size, cfg.top_k
    num_blocks = -(-S // bk)
    u = index_scores(index_q_c, index_k, cfg.index_scale(index_k.shape[-1]))
    vis = chunking.visible(c, S)
    scores = _block_max(u, vis, c, bk, num_blocks, packed)

    local = chunking.local_block(c, bk)[:, :, None]  # [B, C, 1]
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)
    # Candidates are the fully visible blocks before the local one. Non-candidates sit at
    # -inf and have larger ids than every candidate, so top_k's tie rule (lower index
    # first) ranks them last even if a candidate's score is -inf.
    scores = jnp.where((blocks < local)[:, :, None, :], scores, -jnp.inf)
    width = min(top_k - 1, num_blocks)
    if width > 0:
        _, chosen = jax.lax.top_k(scores, width)
    else:
        chosen = jnp.zeros(scores.shape[:-1] + (0,), jnp.int32)
    rows_shape = chosen.shape[:3]  # [B, C, Hkv]
    return assemble_rows(chosen, jnp.broadcast_to(local, rows_shape), jnp.broadcast_to(c.valid[:, :, None], rows_shape),
                         top_k)


def select_blocks(index_q, index_k, positions: Positions, cfg: MSAConfig):
    """int32 [B, T, Hkv, K], computed query chunk by query chunk."""
    B, T, Hkv, _ = index_q.shape
    S = index_k.shape[1]
    chunk = chunking.chunk_size(T, S, Hkv)
    num_chunks = -(-T // chunk)
    coords = chunking.coords(positions, T, chunk, num_chunks)
    packed = positions.segment_ids is not None

    def body(args):
        iq_c, c = args
        return select_chunk(iq_c, index_k, c, cfg, packed)

    rows = jax.lax.map(body, (chunking.split(index_q, chunk, num_chunks), coords))
    return chunking.merge(rows, T)
