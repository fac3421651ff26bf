"""Dense causal attention through cuDNN's fused flash attention, for the main branch of dense
("indexer warm-up") mode on an NVIDIA GPU (issue #13 item 3).

In dense mode the main branch is ordinary causal attention; run through the block-sparse
kernels with every block selected it cost ~3x cuDNN's dense kernels (benchmarks/NOTES.md,
"Dense warm-up"). cuDNN gives the output and each row's log-sum-exp (the KL teacher's
normaliser) through JAX's cuDNN module, whose `return_residual` hands the float32 statistics
back (`jax.nn.dot_product_attention` casts them to the output's bf16 / fp16, too coarse for
the teacher). cuDNN's backward differentiates the output only; the lse's own gradient
(d lse / d s = p) is added here by two more cuDNN calls, and only when something
differentiates the lse: a symbolic-zero cotangent (the KL reads the lse detached) costs
nothing.

Served: T == S, query i at key i, every key present, one document per row (what
`positions.is_plain_causal` decides before tracing), bf16 / fp16, and whatever head dims and
sequence lengths cuDNN takes (it raises NotImplementedError while tracing for the rest, and
the caller falls back to the block-sparse kernels).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp

DTYPES = ("bfloat16", "float16")


@functools.cache
def _cudnn_module():
    """JAX's cuDNN attention module, or the reason it cannot serve (its entry point is private
    and has changed between JAX releases, so its signature is checked, not assumed)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa
    except ImportError as e:  # pragma: no cover - depends on the JAX build
        return None, f"JAX's cuDNN attention module is not importable ({e})"
    params = inspect.signature(fa.dot_product_attention).parameters
    missing = {"scale", "mask_type", "return_residual"} - set(params)
    if missing or not hasattr(fa, "MaskType"):
        return None, f"JAX's cuDNN attention entry point lacks {sorted(missing) or ['MaskType']}"
    return fa, None


def unavailable_reason(dtype: str) -> str | None:
    """None if this module can try the call (cuDNN may still decline its shapes while tracing)."""
    if dtype not in DTYPES:
        return f"dtype {dtype} not in {DTYPES}"
    fa, reason = _cudnn_module()
    if reason is not None:
        return reason
    try:
        fa.check_cudnn_version()
    except Exception as e:  # RuntimeError without cuDNN; its type is not part of JAX's API
        return f"cuDNN is not usable: {e}"
    return None


def _where_served(dtype: str, call):
    """call() where cuDNN can take it (a GPU, a dtype it serves, a shape its flash attention
    accepts), else None: the caller's own kernels serve it."""
    if jax.default_backend() != "gpu" or unavailable_reason(dtype) is not None:
        return None
    try:
        return call()
    except NotImplementedError:  # a shape cuDNN's flash attention does not take
        return None


def serve(q, k, v, scale: float):
    """`attention(q, k, v, scale)` where cuDNN takes the call, else None: an
    `Implementation.dense_attention` for implementations on a GPU."""
    return _where_served(str(q.dtype), lambda: attention(q, k, v, scale))


def causal_lse(q, k, scale: float):
    """float32 [B, T, H] log-sum-exp of causal scores q kᵀ (k [B, T, Di], shared by q's heads)
    from cuDNN, or None where cuDNN does not take the call: the KL student's ilse in dense mode
    (index_q, index_k), its output discarded. Not differentiated."""
    kk = k[:, :, None, :]
    return _where_served(str(q.dtype), lambda: jax.lax.stop_gradient(_causal(q, kk, kk, scale, with_lse=True)[1]))


def _causal(q, k, v, scale: float, with_lse: bool):
    """cuDNN causal attention [B, T, H, D] (GQA: k, v with fewer heads); with_lse also gives
    the float32 lse [B, T, Hq]. Raises NotImplementedError for shapes cuDNN does not take."""
    fa, _ = _cudnn_module()
    res = fa.dot_product_attention(q, k, v, scale=scale, mask_type=fa.MaskType.CAUSAL, return_residual=with_lse)
    if not with_lse:
        return res
    out, stats = res  # stats: float32 [B, Hq, T] whatever the layout of q
    return out, jnp.swapaxes(stats, 1, 2)


def attention(q, k, v, scale: float):
    """(out [B, T, Hq, D] in q's dtype, lse float32 [B, T, Hq]) of causal attention, T == S.
    Gradients: out's through cuDNN's backward, lse's through `_lse_gradient`."""
    out, lse = _causal(q, k, v, scale, with_lse=True)
    return out, _with_lse_gradient(q, k, jax.lax.stop_gradient(lse), scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _with_lse_gradient(q, k, lse, scale):
    """lse itself; its cotangent reaches q and k as d lse_i / d s_it = p_it prescribes."""
    del q, k, scale
    return lse


def _with_lse_gradient_fwd(q, k, lse, scale):
    del scale
    return lse.value, (q.value, k.value)


def _with_lse_gradient_bwd(scale, res, dlse):
    if isinstance(dlse, jax.custom_derivatives.SymbolicZero):
        return None, None, None  # nothing differentiates the lse: no work
    q, k = res
    # d/dq_i sum_i dlse_i lse_i = scale dlse_i sum_t p_it k_t: attention with k as the values.
    w = scale * dlse[..., None]
    dq = (w * _causal(q, k, k, scale, with_lse=False).astype(jnp.float32)).astype(q.dtype)
    # d/dk_t = scale sum_i dlse_i p_it q_i: the value gradient of attention(q, k, .) for the
    # output cotangent scale dlse_i q_i (cuDNN sums a group's heads into the kv head).
    _, vjp = jax.vjp(lambda vv: _causal(q, k, vv, scale, with_lse=False), k)
    (dk,) = vjp((w * q.astype(jnp.float32)).astype(q.dtype))
    return dq, dk, None


_with_lse_gradient.defvjp(_with_lse_gradient_fwd, _with_lse_gradient_bwd, symbolic_zeros=True)
