"""Checking a selection at scale, where near-ties make exact equality too strict.

Shared by the Pallas and CUDA scale tests. `block_scores` recomputes the spec's block scores
M independently of every implementation (chunked float32 jnp on upcast inputs);
`check_selection` accepts a row iff it is the spec's row up to near-ties.
"""

from __future__ import annotations

import functools

import numpy as np

import jax
import jax.numpy as jnp

# Queries per chunk of `block_scores`: one [chunk, Hkv, S] float32 tensor at a time
# (64 MB at S = 32768, Hkv = 2); the full [T, Hkv, S] would be 8 GB.
SCORE_CHUNK = 256


@functools.partial(jax.jit, static_argnames=("block_size", "chunk"))
def block_scores(index_q, index_k, *, block_size: int, chunk: int = SCORE_CHUNK):
    """float32 [B, T, Hkv, ceil(S / Bk)]: max over block j of si * <index_q, index_k> (spec M).

    No visibility mask: every candidate block (j < L(i)) of a valid query is fully visible,
    and only candidates are ever read. Computed in float32 (HIGHEST precision) on upcast
    inputs, chunk queries at a time.
    """
    B, T, Hkv, Di = index_q.shape
    S = index_k.shape[1]
    num_blocks = -(-S // block_size)
    num_chunks = -(-T // chunk)
    iq = jnp.pad(index_q.astype(jnp.float32), [(0, 0), (0, num_chunks * chunk - T), (0, 0), (0, 0)])
    iq = jnp.moveaxis(iq.reshape(B, num_chunks, chunk, Hkv, Di), 1, 0)
    ik = index_k.astype(jnp.float32)

    def one_chunk(iq_c):
        u = Di**-0.5 * jnp.einsum("bcgd,bsd->bcgs", iq_c, ik, precision=jax.lax.Precision.HIGHEST)
        u = jnp.pad(u, [(0, 0)] * 3 + [(0, num_blocks * block_size - S)], constant_values=-jnp.inf)
        return jnp.max(u.reshape(B, chunk, Hkv, num_blocks, block_size), axis=-1)

    m = jax.lax.map(one_chunk, iq)  # [num_chunks, B, chunk, Hkv, num_blocks]
    return jnp.moveaxis(m, 0, 1).reshape(B, num_chunks * chunk, Hkv, num_blocks)[:, :T]


def query_blocks(q_offset, kv_length, T: int, block_size: int):
    """(local [B, T], valid [B, T]) for per-row q_offset / kv_length (no packed documents)."""
    qpos = np.asarray(q_offset)[:, None] + np.arange(T)[None, :]
    valid = (qpos >= 0) & (qpos < np.asarray(kv_length)[:, None])
    return np.where(valid, qpos // block_size, 0), valid


def check_selection(rows, scores, local, top_k: int, tol: float, who: str, valid=None):
    """Asserts that `rows` [B, T, Hkv, K] is a valid top-k selection up to near-ties.

    scores: [B, T, Hkv, num_blocks] block scores; local: [B, T] local block of each query;
    valid: [B, T] non-padding queries (all, if None). Each valid row: the local block once,
    then min(K - 1, L) distinct candidates j < L with score >= (that many-th best candidate
    score) - tol, the rest -1. Padding rows: all -1.
    """
    rows = np.asarray(rows)
    scores = np.asarray(scores, np.float32)
    valid = np.ones(rows.shape[:2], bool) if valid is None else np.asarray(valid)
    num_blocks = scores.shape[-1]
    L = np.asarray(local)[:, :, None]  # [B, T, 1]
    blocks = np.arange(num_blocks)
    cand = np.where(blocks < L[..., None], scores, -np.inf)  # [B, T, Hkv, nb]
    n = np.minimum(top_k - 1, L)  # non-local blocks to choose, [B, T, 1]
    ranked = -np.sort(-cand, axis=-1)  # descending
    thr = np.take_along_axis(ranked, np.maximum(n - 1, 0)[..., None], axis=-1)[..., 0]
    thr = np.where(n > 0, thr, -np.inf)  # [B, T, Hkv]
    live = valid[:, :, None]

    def fail(mask, why):
        b, i, g = (int(x) for x in np.argwhere(mask)[0])
        row = rows[b, i, g]
        got = [float(scores[b, i, g, j]) if 0 <= j < num_blocks else None for j in row]
        raise AssertionError(
            f"{who} row (b={b}, i={i}, g={g}) = {row.tolist()}: {why}; local {int(L[b, i, 0])}, "
            f"threshold {float(thr[b, i, g]):.6g}, scores of the row {got}"
        )

    if (c := ~live & (rows != -1).any(-1)).any():
        fail(c, "padding row must be all -1")
    is_local = rows == L[..., None]
    nonlocal_ = (rows != -1) & ~is_local
    if (c := live & ((rows != -1).sum(-1) != n + 1)).any():
        fail(c, "expected min(K - 1, L) + 1 entries other than -1")
    if (c := live & (is_local.sum(-1) != 1)).any():
        fail(c, "local block missing (or twice)")
    if (c := live & (nonlocal_ & ((rows < 0) | (rows >= L[..., None]))).any(-1)).any():
        fail(c, "entry that is not a candidate block (must lie in [0, L))")
    ordered = np.sort(rows, axis=-1)
    if (c := live & ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(-1)).any():
        fail(c, "duplicate block id")
    picked = np.take_along_axis(scores, np.clip(rows, 0, num_blocks - 1), axis=-1)
    if (c := live & (nonlocal_ & (picked < thr[..., None] - tol)).any(-1)).any():
        fail(c, f"a selected block scores below the row's top-(K-1) threshold minus {tol}")
    # Order: the chosen blocks by descending score, then the local block, then -1.
    n_row = np.broadcast_to(n, rows.shape[:3])  # [B, T, Hkv]
    k = np.arange(rows.shape[-1])
    local_slot = np.take_along_axis(rows, n_row[..., None], axis=-1)[..., 0]
    if (c := live & (local_slot != L)).any():
        fail(c, "the local block must follow the chosen blocks")
    tail = k[None, None, None, :] > n_row[..., None]
    if (c := live & (tail & (rows != -1)).any(-1)).any():
        fail(c, "slots after the local block must be -1")
    head = k[None, None, None, :] < n_row[..., None]
    desc = np.where(head[..., 1:] & head[..., :-1], picked[..., 1:] <= picked[..., :-1] + tol, True)
    if (c := live & ~desc.all(-1)).any():
        fail(c, f"chosen blocks not in descending score order (slack {tol})")
