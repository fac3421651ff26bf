"""The `cuda` implementation: CUTLASS/CuTe kernels for Hopper (SM90) behind the XLA FFI.

Served so far: `select_blocks` (the fused indexer, cuda/kernels/indexer_sm90.cuh). The
other ops have no CUDA kernel yet (issue #5): `supports` says so, and the dispatcher falls
through to the next implementation (pallas on a GPU) before tracing anything.
"""

from __future__ import annotations

import functools

import jax

from . import ffi
from .config import CallInfo
from .dispatch import Implementation
from .ffi import ops

# What the compiled kernels serve; cuda/include/msa/launch.h and the handlers say the same.
SERVED_OPS = ("select_blocks",)
_INDEX_HEAD_DIMS = (64, 128)
_BLOCK_SIZE = 128
_MAX_TOP_K = 32


@functools.cache
def _device_reason() -> str | None:
    """None on a Hopper GPU; the kernels are built for sm_90a, which runs on CC 9.0 only."""
    kinds = {getattr(d, "compute_capability", None) for d in jax.devices("cuda")}
    if kinds != {"9.0"}:
        return f"the kernels are built for sm_90a (Hopper, compute capability 9.0); devices have {sorted(map(str, kinds))}"
    return None


class CudaImplementation(Implementation):
    name = "cuda"

    def supports(self, call: CallInfo) -> str | None:
        if call.op not in SERVED_OPS:
            return f"no CUDA kernel for {call.op} yet (served: {', '.join(SERVED_OPS)})"
        if call.platform not in ("gpu", "cuda"):
            return f"needs a CUDA GPU, the platform is {call.platform}"
        reason = ffi.unavailable_reason() or _device_reason()
        if reason is not None:
            return reason
        if call.index_dtype != "bfloat16":
            return f"index dtype {call.index_dtype} (bfloat16 only)"
        if call.index_head_dim not in _INDEX_HEAD_DIMS:
            return f"index head dim Di={call.index_head_dim} not in {_INDEX_HEAD_DIMS}"
        if call.config.block_size != _BLOCK_SIZE:
            return f"block_size={call.config.block_size} (the kernels are built for {_BLOCK_SIZE})"
        if call.config.top_k > _MAX_TOP_K:
            return f"top_k={call.config.top_k} > {_MAX_TOP_K}"
        if call.has_segments:
            return "packed documents (segment_ids) are not supported by the CUDA kernels"
        return None

    def select_blocks(self, index_q, index_k, positions, cfg):
        ffi.register_targets()
        return ops.select_blocks(
            index_q, index_k, positions.q_offset, positions.kv_length, top_k=cfg.top_k,
            block_size=cfg.block_size, index_softmax_scale=cfg.index_scale(index_q.shape[-1]),
        )
