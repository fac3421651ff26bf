"""The `pallas` implementation: Pallas kernels, Triton on GPU, interpret mode on CPU.

select_blocks: fused indexer with exp-free running top-k (indexer.py).
attention: KV-outer forward with slot partials merged by log-sum-exp (attention_fwd.py);
  KV-outer deterministic backward (attention_bwd.py).
KL: two KV-outer passes, student log-sum-exp then loss and gradients (kl.py); in dense mode
  with plain causal positions, three passes over the causal triangle's query and key tiles
  with no work list (dense_kl.py).
Dense mode's attention with plain causal positions goes through cuDNN on a GPU
  (msa_jax/dense_cudnn.py).
Paged caches: an index scan over the pages with fused top-k, split over the sequence, and
  a merge of the partial lists (paged_indexer.py, any T); up to common.DECODE_MAX_Q queries
  per row (decode, multi-token prediction), sparse decode attention with the G heads of a
  group in one tile, split over the selected pages and merged by log-sum-exp
  (paged_attention.py). Longer chunks (chunked prefill) gather K and V into the contiguous
  layout (FP8 dequantised into q's dtype) and run the KV-outer forward above.
On a machine without a GPU the same kernels run with `interpret=True`, so CPU users and
CI exercise exactly the code a GPU runs.
"""

from __future__ import annotations

import functools

from ..config import CallInfo
from .. import dense_cudnn, dispatch
from ..dispatch import Implementation
from ..kv_outer.worklist import dense_indices
from .. import paged_cache
from . import attention_bwd, attention_fwd, common, dense_kl, indexer, kl, paged_attention, paged_indexer

_POW2 = (16, 32, 64, 128, 256)


@functools.cache
def _min_compute_capability() -> tuple[int, ...]:
    import jax

    kinds = [getattr(d, "compute_capability", "0.0") for d in jax.devices()]
    return min(tuple(int(x) for x in str(kind).split(".")) for kind in kinds)


class PallasImplementation(Implementation):
    name = "pallas"

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def supports(self, call: CallInfo) -> str | None:
        # Triton tiles need power-of-two matrix dimensions of at least 16.
        # The selection ops have no main branch.
        if call.op not in ("select_blocks", "paged_select_blocks") and call.head_dim not in _POW2:
            return f"head_dim D={call.head_dim} not in {_POW2}"
        if call.index_head_dim is not None and call.index_head_dim not in _POW2:
            return f"index head dim Di={call.index_head_dim} not in {_POW2}"
        if call.config.block_size not in _POW2[:-1]:
            return f"block_size={call.config.block_size} not in {_POW2[:-1]}"
        if call.group_size > 64:
            return f"G={call.group_size} > 64 query heads per kv head"
        if call.config.top_k > 64:
            return f"top_k={call.config.top_k} > 64 (the running top-k lives in registers)"
        for dtype in (call.dtype, call.index_dtype):
            if dtype not in (None, "bfloat16", "float16", "float32"):
                return f"dtype {dtype} (bf16, fp16, fp32 only)"
        if "float8_e4m3fn" in (call.kv_cache_dtype, call.index_cache_dtype) and call.platform in ("gpu", "cuda"):
            capability = _min_compute_capability()
            if capability < (8, 9):  # Triton converts float8_e4m3fn (fp8e4nv) on sm_89 and later only
                return f"FP8 pages need compute capability >= 8.9 (Ada, Hopper); the GPU has {capability}"
        return None

    def select_blocks(self, index_q, index_k, positions, cfg):
        return indexer.select_blocks(index_q, index_k, positions, cfg, interpret=self.interpret)

    def _indices(self, block_indices, k, cfg):
        return dense_indices(block_indices, k.shape[1], cfg.block_size) if cfg.dense else block_indices

    def attention_fwd(self, q, k, v, block_indices, positions, cfg):
        bi = self._indices(block_indices, k, cfg)
        return attention_fwd.attention_fwd(q, k, v, bi, positions, cfg, interpret=self.interpret)

    def dense_attention(self, q, k, v, cfg):
        # On a GPU (not in interpret mode) dense mode's attention goes through cuDNN, as cuda's.
        return None if self.interpret else dense_cudnn.serve(q, k, v, cfg.scale(q.shape[-1]))

    def attention_lse(self, q, k, block_indices, positions, cfg):
        bi = self._indices(block_indices, k, cfg)
        return attention_fwd.attention_fwd(q, k, None, bi, positions, cfg, interpret=self.interpret)[1]

    def attention_bwd(self, q, k, v, block_indices, positions, cfg, out, lse, dout, dlse):
        bi = self._indices(block_indices, k, cfg)
        return attention_bwd.attention_bwd(q, k, v, bi, positions, cfg, out, lse, dout, dlse, interpret=self.interpret)

    def kl_saved_layouts(self, q, k, index_q):
        return ("BTHD", "BSHD")  # kl_fwd saves d index_q [B, T, Hkv, Di], d index_k [B, S, Hkv, Di]

    def kl_value(self, q, k, index_q, index_k, block_indices, lse, positions, cfg):
        return kl.kl_value(q, k, index_q, index_k, block_indices, lse, positions, cfg, interpret=self.interpret)

    def kl_fwd(self, q, k, index_q, index_k, block_indices, lse, positions, cfg):
        return kl.kl_fwd(q, k, index_q, index_k, block_indices, lse, positions, cfg, interpret=self.interpret)

    def dense_kl_fwd(self, q, k, index_q, index_k, lse, cfg):
        return dense_kl.kl_fwd(q, k, index_q, index_k, lse, cfg, interpret=self.interpret)

    def kl_bwd(self, q, k, index_q, index_k, block_indices, lse, positions, cfg, dkl, saved):
        return dispatch.scale_saved_kl_gradients(index_q, index_k, dkl, saved)

    # ---- paged caches (inference) -------------------------------------------------------

    def paged_select_blocks(self, index_q, pages, positions, cfg):
        return paged_indexer.paged_select_blocks(index_q, pages, positions, cfg, interpret=self.interpret)

    def paged_attention_fwd(self, q, pages, block_indices, positions, cfg):
        if q.shape[1] > common.DECODE_MAX_Q:
            gather = lambda x, s: paged_cache.gather(x, s, pages.page_table, positions.kv_length, q.dtype)  # noqa: E731
            k, v = gather(pages.k, pages.k_scale), gather(pages.v, pages.v_scale)
            return attention_fwd.attention_fwd(q, k, v, block_indices, positions, cfg, interpret=self.interpret)
        return paged_attention.paged_attention_fwd(q, pages, block_indices, positions, cfg, interpret=self.interpret)
