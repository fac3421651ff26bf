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
    kl_fwd = staticmethod(attention.kl_fwd)
    kl_bwd = staticmethod(attention.kl_bwd)
    paged_select_blocks = staticmethod(paged.paged_select_blocks)
    paged_attention_fwd = staticmethod(paged.paged_attention_fwd)
