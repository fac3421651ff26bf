"""Static, hashable descriptions of one MSA call.

Everything here is a frozen dataclass so it can travel as a static argument through
`jax.jit`, `jax.custom_vjp` (nondiff_argnums) and the implementation registry, and so that
one object carries every option instead of loose keyword arguments in kernel code.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax

MODES = ("sparse", "dense")


@dataclasses.dataclass(frozen=True)
class MSAConfig:
    """Options of the MSA function (see the spec's notation table).

    Attributes:
      top_k: K, blocks selected per (query, group), the local block included.
      block_size: Bk, keys per block.
      mode: "sparse" (attention and KL over the selected blocks) or "dense" (indexer
        warm-up: attention and KL over every visible key; selection still runs).
      softmax_scale: s, or None for 1/sqrt(D).
      index_softmax_scale: si, or None for 1/sqrt(Di).
      kl_coeff: multiplier of the KL loss.
      deterministic: gradients bitwise repeatable from call to call. xla and pallas always
        are; the cuda backward then gives up its atomic adds (see msa_jax/cuda.py).
    """

    top_k: int = 16
    block_size: int = 128
    mode: str = "sparse"
    softmax_scale: float | None = None
    index_softmax_scale: float | None = None
    kl_coeff: float = 1.0
    deterministic: bool = False

    def __post_init__(self):
        # Re-checked here (not only in validation.py) because configs are also built
        # directly by implementations and tests; a bad config must never reach a kernel.
        for name in ("top_k", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be a Python int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("softmax_scale", "index_softmax_scale"):
            value = getattr(self, name)
            if value is not None and not (_is_real(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be None or a finite real number > 0, got {value!r}")
            if value is not None:  # NumPy scalars become Python floats: one hashable static form
                object.__setattr__(self, name, float(value))
        if not (_is_real(self.kl_coeff) and math.isfinite(self.kl_coeff)):
            raise ValueError(f"kl_coeff must be a finite real number, got {self.kl_coeff!r}")
        object.__setattr__(self, "kl_coeff", float(self.kl_coeff))
        if not isinstance(self.deterministic, bool):
            raise TypeError(f"deterministic must be a Python bool, got {self.deterministic!r}")

    @property
    def dense(self) -> bool:
        return self.mode == "dense"

    def scale(self, head_dim: int) -> float:
        return self.softmax_scale if self.softmax_scale is not None else head_dim**-0.5

    def index_scale(self, index_head_dim: int) -> float:
        if self.index_softmax_scale is not None:
            return self.index_softmax_scale
        return index_head_dim**-0.5


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class KVPages(NamedTuple):
    """A paged K/V cache as the paged ops pass it to implementations (validated).

    k, v: [P, page, Hkv, D] (q's dtype or float8_e4m3fn); k_scale, v_scale: float32
    [P, page, Hkv] for FP8 pages, else None; page_table: int32 [B, max_pages].
    """

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None
    v_scale: jax.Array | None
    page_table: jax.Array


class IndexPages(NamedTuple):
    """A paged index-key cache: keys [P, page, Di], scale float32 [P, page] or None,
    page_table int32 [B, max_pages]."""

    keys: jax.Array
    scale: jax.Array | None
    page_table: jax.Array


class Positions(NamedTuple):
    """Where each query and key sits (spec, "Positions"), canonicalised to arrays.

    q_offset: int32 [B]; query i of row b sits at key coordinate q_offset[b] + i.
    kv_length: int32 [B]; keys t >= kv_length[b] do not exist.
    segment_ids: int32 [B, S] for packed documents, indexed by key coordinate, or None. The
      public ops take it only for T == S (q_offset 0); context parallelism passes a chunk
      of the queries with the whole sequence's segment_ids.
    """

    q_offset: jax.Array
    kv_length: jax.Array
    segment_ids: jax.Array | None


@dataclasses.dataclass(frozen=True)
class CallInfo:
    """Static facts about one call, for `Implementation.supports` (decided before tracing)."""

    op: str
    batch: int
    q_len: int
    kv_len: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    index_head_dim: int | None
    dtype: str
    index_dtype: str | None
    has_segments: bool
    config: MSAConfig
    platform: str
    # Paged ops only: the dtypes of the K/V pages and of the index-key pages (q's and
    # index_q's dtype, or "float8_e4m3fn"); None for the contiguous ops.
    kv_cache_dtype: str | None = None
    index_cache_dtype: str | None = None
    # Known before tracing: T == S, query i at key i, every key present, no packed documents
    # (positions.is_plain_causal); dense mode may then run a library's dense causal kernel.
    plain_causal: bool = False

    @property
    def group_size(self) -> int:
        return self.num_q_heads // self.num_kv_heads
