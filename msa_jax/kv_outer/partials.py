"""Slot partials of the KV-outer kernels (pallas and cuda): how many queries one chunk of
them may hold, and their log-sum-exp merge into each query's result."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import positions as pos_lib
from ..config import Positions

_NEG_INF = float("-inf")

# Bytes of slot partials one query chunk may hold (T*K*Hq*D*2 for all T would be tens of
# GB at long context: 34 GB at 128K for config A).
PARTIAL_BUDGET_BYTES = 5 << 30


def query_chunk(q_len: int, bytes_per_query: int) -> int:
    """Queries per chunk: the fewest chunks within the budget, all of (nearly) equal size, so
    no small last chunk pays a whole chunk's fixed costs."""
    most = max(1, PARTIAL_BUDGET_BYTES // max(1, bytes_per_query))
    n_chunks = -(-q_len // most)
    return -(-q_len // n_chunks)


def merge_lse(m, l, ok):
    """log-sum-exp of per-slot partials (m, l) [..., K] where ok; -inf if none."""
    m = jnp.where(ok, m, _NEG_INF)
    top = jnp.max(m, axis=-1)
    safe = jnp.where(jnp.isfinite(top), top, 0.0)
    total = jnp.sum(jnp.where(ok, jnp.exp(m - safe[..., None]) * l, 0.0), axis=-1)
    return jnp.where(total > 0, safe + jnp.log(jnp.where(total > 0, total, 1.0)), _NEG_INF)


def combine(o, lse, ok, num_kv_heads: int):
    """Merges each query's normalised slot partials by log-sum-exp: (out f32 [B,T,Hq,D], lse
    [B,T,Hq]); out is None when o is."""
    Hq = lse.shape[3]
    ok = jnp.repeat(jnp.moveaxis(ok, 3, 2), Hq // num_kv_heads, axis=3)  # [B, T, K, Hq]
    lse = jnp.where(ok, lse, _NEG_INF)
    top = jnp.max(lse, axis=2)
    nonempty = jnp.isfinite(top)
    safe_top = jnp.where(nonempty, top, 0.0)
    w = jnp.where(ok, jnp.exp(lse - safe_top[:, :, None]), 0.0)  # [B, T, K, Hq], max entry 1
    total = jnp.sum(w, axis=2)
    out = None
    if o is not None:
        # Slots no program wrote hold garbage (never initialised): select, do not multiply by 0.
        out = jnp.sum(w[..., None] * jnp.where(ok[..., None], o.astype(jnp.float32), 0.0), axis=2)
        out = jnp.where(nonempty[..., None], out / jnp.where(nonempty, total, 1.0)[..., None], 0.0)
    lse = jnp.where(nonempty, safe_top + jnp.log(jnp.where(nonempty, total, 1.0)), _NEG_INF)
    return out, lse


def chunked(q, k, v, block_indices, positions: Positions, partials):
    """The KV-outer forward's driver (pallas and cuda): per query chunk
    (partial buffer within PARTIAL_BUDGET_BYTES), `partials(q, k, v, hi, c0,
    block_indices, qpos, doc, valid)` of the chunk's rows -> (o, lse, ok) as `_partials`
    returns them (o [B, Tc, K, Hq, D], lse [B, Tc, K, Hq], ok [B, Tc, Hkv, K]), merged by
    `combine`. k and v as `partials` wants them (padded or not);
    v None: lse only."""
    B, T, Hq, D = q.shape
    K = block_indices.shape[3]
    qpos, doc, valid = pos_lib.query_coords(positions, T)
    hi = pos_lib.last_visible_key(positions, qpos, valid)
    chunk = query_chunk(T, K * Hq * ((D * q.dtype.itemsize if v is not None else 0) + 4))
    out = lse = None
    for c0 in range(0, T, chunk):
        sl = slice(c0, min(T, c0 + chunk))
        o_part, lse_part, ok = partials(q, k, v, hi, c0, block_indices[:, sl], qpos[:, sl], doc[:, sl], valid[:, sl])
        out_c, lse_c = combine(o_part, lse_part, ok, k.shape[2])
        if chunk == T:
            return None if v is None else out_c.astype(q.dtype), lse_c
        # In-place updates of one buffer: a concatenation would copy every chunk once more.
        lse = _place(lse, lse_c, c0, (B, T, Hq), jnp.float32)
        if v is not None:
            out = _place(out, out_c, c0, (B, T, Hq, D), q.dtype)
    return out, lse


def _place(buffer, chunk, c0: int, shape, dtype):
    buffer = jnp.zeros(shape, dtype) if buffer is None else buffer
    return jax.lax.dynamic_update_slice_in_dim(buffer, chunk.astype(dtype), c0, axis=1)
