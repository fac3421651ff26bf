"""Reference main branch and KL loss (spec, "Main branch" and "KL index-alignment loss").

Forward functions work on one query chunk and are mapped over chunks. The attention
backward is the autodiff of the rematerialised chunked forward (so it is exactly the
derivative of the spec's formula); the KL backward is the spec's closed form
d/du = (R - P) * cotangent, written out because it defines what kernels must match.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..config import MSAConfig, Positions
from . import chunking
from .selection import index_scores

_HI = jax.lax.Precision.HIGHEST


def support(block_indices_c, c: chunking.Coords, cfg: MSAConfig, kv_len: int, packed: bool):
    """bool [B, C, Hkv, S]: visible keys whose block is selected (all visible ones if dense)."""
    vis = chunking.visible(c, kv_len)[:, :, None, :]
    if cfg.dense:
        return vis
    num_blocks = -(-kv_len // cfg.block_size)
    # A set per row: ids outside [0, num_blocks) and duplicates fall out of the comparison.
    chosen = jnp.any(
        block_indices_c[..., None] == jnp.arange(num_blocks, dtype=jnp.int32), axis=-2
    )  # [B, C, Hkv, num_blocks]
    if packed:
        kb = chunking.key_blocks(c, kv_len, cfg.block_size)[:, :, None, :]
        per_key = jnp.take_along_axis(chosen, jnp.minimum(kb, num_blocks - 1), axis=-1)
    else:
        per_key = jnp.repeat(chosen, cfg.block_size, axis=-1)[..., :kv_len]
    return vis & per_key


def _safe_lse(scores, mask):
    """log-sum-exp over the last axis restricted to mask; -inf (with finite gradients) if empty."""
    m = jax.lax.stop_gradient(jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    total = jnp.sum(jnp.where(mask, jnp.exp(jnp.where(mask, scores - m, 0.0)), 0.0), axis=-1)
    nonempty = total > 0
    return jnp.where(nonempty, m[..., 0] + jnp.log(jnp.where(nonempty, total, 1.0)), -jnp.inf)


def _probs(scores, lse, mask):
    """exp(scores - lse) on mask, 0 elsewhere, safe where lse is -inf."""
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]
    return jnp.where(mask, jnp.exp(jnp.where(mask, scores - lse, 0.0)), 0.0)


def _head_scores(q_c, k, scale):
    """s * <q, k> as fp32 [B, C, Hkv, G, S]."""
    B, C, Hq, D = q_c.shape
    Hkv = k.shape[2]
    q_c = chunking.acc(q_c).reshape(B, C, Hkv, Hq // Hkv, D)
    return scale * jnp.einsum("bcngd,bsnd->bcngs", q_c, chunking.acc(k), precision=_HI)


def _attention_chunk(q_c, bi_c, c, k, v, cfg, packed, with_out=True):
    S, D = k.shape[1], q_c.shape[-1]
    mask = support(bi_c, c, cfg, S, packed)[:, :, :, None, :]
    scores = _head_scores(q_c, k, cfg.scale(D))
    lse = _safe_lse(scores, mask)  # [B, C, Hkv, G]
    B, C, Hq = q_c.shape[:3]
    if not with_out:
        return lse.reshape(B, C, Hq)
    p = _probs(scores, lse, mask)
    out = jnp.einsum("bcngs,bsnd->bcngd", p, chunking.acc(v), precision=_HI)
    return out.reshape(B, C, Hq, -1), lse.reshape(B, C, Hq)


def _plan(positions: Positions, q_len: int, kv_len: int, heads: int):
    chunk = chunking.chunk_size(q_len, kv_len, heads)
    num_chunks = -(-q_len // chunk)
    return chunk, num_chunks, chunking.coords(positions, q_len, chunk, num_chunks)


def attention_fwd(q, k, v, block_indices, positions: Positions, cfg: MSAConfig):
    """(out [B,T,Hq,D] in q.dtype, lse float32 [B,T,Hq])."""
    T, Hq = q.shape[1], q.shape[2]
    chunk, n, coords = _plan(positions, T, k.shape[1], Hq)
    packed = positions.segment_ids is not None
    body = jax.checkpoint(
        functools.partial(_attention_chunk, k=k, v=v, cfg=cfg, packed=packed), prevent_cse=False
    )
    out, lse = jax.lax.map(
        lambda a: body(*a),
        (chunking.split(q, chunk, n), chunking.split(block_indices, chunk, n), coords),
    )
    return chunking.merge(out, T).astype(q.dtype), chunking.merge(lse, T)


def attention_lse(q, k, block_indices, positions: Positions, cfg: MSAConfig):
    """float32 [B,T,Hq] log-sum-exp over the support (the teacher's normaliser)."""
    T, Hq = q.shape[1], q.shape[2]
    chunk, n, coords = _plan(positions, T, k.shape[1], Hq)
    packed = positions.segment_ids is not None
    lse = jax.lax.map(
        lambda a: _attention_chunk(*a, k=k, v=None, cfg=cfg, packed=packed, with_out=False),
        (chunking.split(q, chunk, n), chunking.split(block_indices, chunk, n), coords),
    )
    return chunking.merge(lse, T)


def attention_bwd(q, k, v, block_indices, positions, cfg, out, lse, dout, dlse):
    """(dq, dk, dv) in the inputs' dtypes: vjp of the rematerialised chunked forward."""
    del out, lse  # recomputed per chunk; the reference trades time for O(chunk x S) memory
    _, vjp = jax.vjp(lambda q_, k_, v_: attention_fwd(q_, k_, v_, block_indices, positions, cfg), q, k, v)
    return vjp((dout, dlse))


def _kl_chunk_terms(q_c, iq_c, bi_c, lse_c, c, k, index_k, cfg, packed):
    """Teacher P, student R and the KL sum of one chunk (spec, "KL index-alignment loss")."""
    S = k.shape[1]
    B, C, Hq, D = q_c.shape
    Hkv = k.shape[2]
    mask = support(bi_c, c, cfg, S, packed)  # [B, C, Hkv, S]
    scores = _head_scores(q_c, k, cfg.scale(D))
    lse_c = lse_c.reshape(B, C, Hkv, Hq // Hkv)
    teacher = jnp.mean(_probs(scores, lse_c, mask[:, :, :, None, :]), axis=3)
    u = index_scores(iq_c, index_k, cfg.index_scale(index_k.shape[-1]))
    ilse = _safe_lse(u, mask)
    log_r = u - jnp.where(jnp.isfinite(ilse), ilse, 0.0)[..., None]
    student = jnp.where(mask, jnp.exp(jnp.where(mask, log_r, 0.0)), 0.0)
    positive = mask & (teacher > 0)
    safe_p = jnp.where(positive, teacher, 1.0)
    kl = jnp.sum(jnp.where(positive, teacher * (jnp.log(safe_p) - log_r), 0.0))
    return teacher, student, kl


def kl_fwd(q, k, index_q, index_k, block_indices, lse, positions: Positions, cfg: MSAConfig):
    """float32 scalar: sum over valid queries and groups of KL(P || R) (not yet normalised)."""
    T = q.shape[1]
    chunk, n, coords = _plan(positions, T, k.shape[1], q.shape[2])
    packed = positions.segment_ids is not None
    sp = functools.partial(chunking.split, chunk=chunk, num_chunks=n)

    def body(a):
        return _kl_chunk_terms(*a, k=k, index_k=index_k, cfg=cfg, packed=packed)[2]

    return jnp.sum(jax.lax.map(body, (sp(q), sp(index_q), sp(block_indices), sp(lse), coords)))


def _varying_zeros(shape, dtype):
    """Zeros typed as varying over every manual (shard_map) mesh axis in scope.

    Inside shard_map a scan carry must keep its type, and the accumulated index_k gradient
    varies over every axis its inputs vary over; zeros start out invariant, so cast them.
    """
    zeros = jnp.zeros(shape, dtype)
    axes = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    return jax.lax.pcast(zeros, axes, to="varying") if axes else zeros


def kl_bwd(q, k, index_q, index_k, block_indices, lse, positions: Positions, cfg: MSAConfig, dkl):
    """(d index_q, d index_k) from du = (R - P) * dkl, chained through u = si <iq, ik>."""
    T = q.shape[1]
    chunk, n, coords = _plan(positions, T, k.shape[1], q.shape[2])
    packed = positions.segment_ids is not None
    scale = cfg.index_scale(index_k.shape[-1])
    sp = functools.partial(chunking.split, chunk=chunk, num_chunks=n)
    ik32 = chunking.acc(index_k)

    def body(dik, a):
        iq_c = a[1]
        teacher, student, _ = _kl_chunk_terms(*a, k=k, index_k=index_k, cfg=cfg, packed=packed)
        du = (student - teacher) * dkl  # zero off the support: both are masked
        diq = scale * jnp.einsum("bcns,bsd->bcnd", du, ik32, precision=_HI)
        dik = dik + scale * jnp.einsum("bcns,bcnd->bsd", du, chunking.acc(iq_c), precision=_HI)
        return dik, diq

    xs = (sp(q), sp(index_q), sp(block_indices), sp(lse), coords)
    dik, diq = jax.lax.scan(body, _varying_zeros(index_k.shape, ik32.dtype), xs)
    return chunking.merge(diq, T).astype(index_q.dtype), dik.astype(index_k.dtype)
