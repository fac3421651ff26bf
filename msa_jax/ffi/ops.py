"""`jax.ffi.ffi_call` wrappers of the CUDA handlers (cuda/ffi/*.cc), one per target.

Each takes validated, canonical arrays (the dispatcher's contract) and returns what its
handler writes; the handler re-checks shapes and dtypes, so a mismatch here is an
`ffi::Error`, never an out-of-bounds access. The targets must be registered first
(`msa_jax.ffi.register_targets`). vmap runs the call once per mapped element
("sequential"): the kernels take one batch axis, which vmap's other methods would not fold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def select_blocks(index_q, index_k, q_offset, kv_length, *, top_k: int, block_size: int,
                  index_softmax_scale: float):
    """The fused indexer (target "msa_select_blocks").

    Args:
      index_q: bf16 [B, T, Hkv, Di]; index_k: bf16 [B, S, Di].
      q_offset, kv_length: int32 [B] (spec, "Positions").
      top_k, block_size, index_softmax_scale: the spec's K, Bk, si.

    Returns:
      int32 [B, T, Hkv, top_k]: the spec's selection rows.
    """
    B, T, Hkv, _ = index_q.shape
    out = jax.ShapeDtypeStruct((B, T, Hkv, top_k), jnp.int32)
    call = jax.ffi.ffi_call("msa_select_blocks", out, vmap_method="sequential")
    return call(index_q, index_k, q_offset.astype(jnp.int32), kv_length.astype(jnp.int32),
                top_k=np.int32(top_k), block_size=np.int32(block_size),
                index_softmax_scale=np.float32(index_softmax_scale))
