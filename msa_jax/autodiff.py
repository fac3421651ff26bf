"""The custom_vjp rules shared by every implementation, and with them the gradient detach.

Two differentiable primitives make up MSA:
  attention: (q, k, v) -> (out, lse); its cotangents reach q, k, v only.
  kl_sum:    (index_q, index_k) -> sum of KL(P || R); q, k and lse enter as the detached
             teacher and receive nothing (the spec's detach), block_indices carry nothing.
An implementation supplies the forward and backward functions; the wiring lives here once.
Residuals are tagged with `checkpoint_name` so a `jax.checkpoint` policy can keep them.
"""

from __future__ import annotations

import functools

import jax
from jax.ad_checkpoint import checkpoint_name

from .config import MSAConfig, Positions

OUT_NAME = "msa_out"
LSE_NAME = "msa_lse"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def attention(impl, cfg: MSAConfig, q, k, v, block_indices, q_offset, kv_length, segment_ids):
    """(out, lse) of the main branch over the support named by block_indices (or dense)."""
    pos = Positions(q_offset, kv_length, segment_ids)
    return impl.attention_fwd(q, k, v, block_indices, pos, cfg)


def main_branch(impl, cfg: MSAConfig, plain_causal: bool, q, k, v, block_indices, q_offset, kv_length, segment_ids):
    """`attention`, except in dense mode over plain causal positions, where the implementation
    may serve it by a dense kernel with gradients of its own (`Implementation.dense_attention`)."""
    if cfg.dense and plain_causal:
        served = impl.dense_attention(q, k, v, cfg)
        if served is not None:
            out, lse = served
            return checkpoint_name(out, OUT_NAME), checkpoint_name(lse, LSE_NAME)
    return attention(impl, cfg, q, k, v, block_indices, q_offset, kv_length, segment_ids)


def teacher_lse(impl, cfg: MSAConfig, plain_causal: bool, q, k, block_indices, positions):
    """The KL teacher's lse for `index_kl_loss` (q, k detached): as `main_branch` routes it
    (a dense kernel's, k standing in for v), else `impl.attention_lse`."""
    if cfg.dense and plain_causal:
        served = impl.dense_attention(q, k, k, cfg)
        if served is not None:
            return served[1]
    return impl.attention_lse(q, k, block_indices, positions, cfg)


def _attention_fwd(impl, cfg, q, k, v, block_indices, q_offset, kv_length, segment_ids):
    out, lse = attention(impl, cfg, q, k, v, block_indices, q_offset, kv_length, segment_ids)
    out, lse = checkpoint_name(out, OUT_NAME), checkpoint_name(lse, LSE_NAME)
    return (out, lse), (q, k, v, block_indices, q_offset, kv_length, segment_ids, out, lse)


def _attention_bwd(impl, cfg, res, cotangents):
    q, k, v, block_indices, q_offset, kv_length, segment_ids, out, lse = res
    dout, dlse = cotangents
    pos = Positions(q_offset, kv_length, segment_ids)
    dq, dk, dv = impl.attention_bwd(q, k, v, block_indices, pos, cfg, out, lse, dout, dlse)
    return dq, dk, dv, None, None, None, None


attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def kl_sum(impl, cfg: MSAConfig, plain_causal: bool, q, k, index_q, index_k, block_indices, lse, q_offset, kv_length,
           segment_ids):
    """float32 scalar sum over valid (query, group) rows of KL(P || R); grads reach index_* only.
    plain_causal (CallInfo.plain_causal): in dense mode the implementation may run a KL over
    the causal triangle without work lists (`Implementation.dense_kl_fwd`)."""
    dense = _dense_kl(impl, cfg, plain_causal, q, k, index_q, index_k, lse)
    if dense is not None:
        return dense[0]
    pos = Positions(q_offset, kv_length, segment_ids)
    return impl.kl_value(q, k, index_q, index_k, block_indices, lse, pos, cfg)


def _dense_kl(impl, cfg, plain_causal, q, k, index_q, index_k, lse):
    return impl.dense_kl_fwd(q, k, index_q, index_k, lse, cfg) if cfg.dense and plain_causal else None


def _kl_fwd(impl, cfg, plain_causal, q, k, index_q, index_k, block_indices, lse, q_offset, kv_length, segment_ids):
    value_saved = _dense_kl(impl, cfg, plain_causal, q, k, index_q, index_k, lse)
    if value_saved is None:
        pos = Positions(q_offset, kv_length, segment_ids)
        value_saved = impl.kl_fwd(q, k, index_q, index_k, block_indices, lse, pos, cfg)
    value, saved = value_saved
    return value, (q, k, index_q, index_k, block_indices, lse, q_offset, kv_length, segment_ids, saved)


def _kl_bwd(impl, cfg, plain_causal, res, dkl):
    q, k, index_q, index_k, block_indices, lse, q_offset, kv_length, segment_ids, saved = res
    pos = Positions(q_offset, kv_length, segment_ids)
    d_iq, d_ik = impl.kl_bwd(q, k, index_q, index_k, block_indices, lse, pos, cfg, dkl, saved)
    # Under shard_map over heads, index_k (one head shared by all groups) is replicated
    # while its gradient was summed over the local groups only: add up the shards.
    d_ik = _sum_over_extra_axes(d_ik, index_k)
    # The teacher (q, k, lse) is detached: it receives no gradient from the KL loss.
    return None, None, d_iq, d_ik, None, None, None, None, None


kl_sum.defvjp(_kl_fwd, _kl_bwd)


def _varying_axes(x) -> frozenset:
    """shard_map axes over which x varies (jax 0.10 names it manual_axis_type.varying)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
    return frozenset(vma)


def _sum_over_extra_axes(ct, primal):
    extra = _varying_axes(ct) - _varying_axes(primal)
    return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct
