"""The `xla` implementation: pure jnp, query-chunked; the executable form of the spec."""

from __future__ import annotations

from ..config import CallInfo
from ..dispatch import Implementation
from . import attention, paged, selection


class XlaImplementation(Implementation):
    """Runs anywhere XLA runs; memory O(chunk x S); exact in fp32 (HIGHEST precision)."""

    name = "xla"

    def supports(self, call: CallInfo) -> str | None:
        return None

    select_blocks = staticmethod(selection.select_blocks)
    attention_fwd = staticmethod(attention.attention_fwd)
    attention_lse = staticmethod(attention.attention_lse)
    attention_bwd = staticmethod(attention.attention_bwd)
    paged_select_blocks = staticmethod(paged.paged_select_blocks)
    paged_attention_fwd = staticmethod(paged.paged_attention_fwd)

    def kl_fwd(self, q, k, index_q, index_k, block_indices, lse, positions, cfg):
        return attention.kl_fwd(q, k, index_q, index_k, block_indices, lse, positions, cfg), None

    def kl_bwd(self, q, k, index_q, index_k, block_indices, lse, positions, cfg, dkl, saved):
        return attention.kl_bwd(q, k, index_q, index_k, block_indices, lse, positions, cfg, dkl)
