"""Flax NNX MSA-GQA attention layer: projections, RoPE, index branch, KV caches.

A thin shell over `msa_jax.sparse_attention` (training, contiguous `KVCache`) and
`msa_jax.paged_sparse_attention` (paged `PagedCache`, bf16 or FP8): it never computes
attention itself. The index projections read `stop_gradient(x)`, so the KL loss trains
them and nothing else (the spec's detach; the authors report divergence without it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import positions as pos_lib
from .api import paged_sparse_attention, sparse_attention
from .config import MODES
from .paged_cache import PagedCache, gather_kv, init_paged_cache, paged_append


ROPE_SCALING_TYPES = ("llama3",)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling for context extension; rope_type "llama3" (Llama 3.1) only.

    The llama3 rule rescales each rotary frequency w (wavelength 2*pi/w) of unscaled RoPE
    by where its wavelength falls against the pre-training context
    L = original_max_position_embeddings:
      - wavelength < L / high_freq_factor (more than high_freq_factor turns within L): kept;
      - wavelength > L / low_freq_factor (fewer than low_freq_factor turns within L): w / factor;
      - in between, linearly in L / wavelength:
        w' = (1 - s) * w / factor + s * w, s = (L / wavelength - low_freq_factor)
        / (high_freq_factor - low_freq_factor), which meets both ends (s = 0 and s = 1).
    The cos/sin are not rescaled (no attention factor, unlike yarn).

    Fields: factor (> 0; 8 in Llama 3.1), low_freq_factor and high_freq_factor
    (0 < low < high; 1 and 4 in Llama 3.1), original_max_position_embeddings (L, a
    positive int; 8192 in Llama 3.1).
    """

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_SCALING_TYPES:
            raise ValueError(
                f"rope_scaling rope_type {self.rope_type!r} is not supported: only {ROPE_SCALING_TYPES} "
                "(or rope_scaling=None for unscaled RoPE)"
            )
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"rope_scaling {name} must be a finite number > 0, got {value!r}")
        if not self.low_freq_factor < self.high_freq_factor:
            # equal factors would divide by zero in the interpolation weight
            raise ValueError(
                f"rope_scaling low_freq_factor ({self.low_freq_factor}) must be < high_freq_factor "
                f"({self.high_freq_factor})"
            )
        L = self.original_max_position_embeddings
        if isinstance(L, bool) or not isinstance(L, int) or L < 1:
            raise ValueError(f"rope_scaling original_max_position_embeddings must be a positive int, got {L!r}")

    def apply(self, inv_freq: np.ndarray) -> np.ndarray:
        """The llama3 rule on inverse frequencies (radians per position), any shape."""
        L = self.original_max_position_embeddings
        wavelength = 2 * np.pi / inv_freq
        s = (L / wavelength - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        s = np.clip(s, 0.0, 1.0)  # 1 above the high-frequency threshold, 0 below the low one
        return (1 - s) * inv_freq / self.factor + s * inv_freq


@dataclasses.dataclass(frozen=True)
class MSAAttentionConfig:
    """Shape and options of one MSA-GQA attention layer.

    d_model, num_q_heads, num_kv_heads, head_dim: the GQA attention (Hq % Hkv == 0).
    index_head_dim: Di of the index branch.
    top_k, block_size, mode, implementation: passed to `sparse_attention`.
    rope_theta: RoPE base of the main q/k (HuggingFace "rotate_half" convention).
    rope_scaling: None (unscaled RoPE) or a `RopeScaling` ("llama3"); it applies to every
      RoPE of the layer, main q/k and index q/k alike.
    index_norm: RMSNorm on index q/k before RoPE; index_rope: RoPE on the first half of Di.
    qkv_bias: biases on the q/k/v projections (Qwen2; Llama with attention_bias).
    out_bias: a bias on the output projection o_proj (Llama with attention_bias).
    """

    d_model: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    index_head_dim: int = 128
    top_k: int = 16
    block_size: int = 128
    mode: str = "sparse"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    index_norm: bool = True
    index_rope: bool = True
    qkv_bias: bool = False
    out_bias: bool = False
    norm_eps: float = 1e-6
    implementation: str | tuple[str, ...] | None = None

    def __post_init__(self):
        for name in ("d_model", "num_q_heads", "num_kv_heads", "head_dim", "index_head_dim", "top_k", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.index_rope and self.index_head_dim % 4:
            raise ValueError(f"index_head_dim must be a multiple of 4 for RoPE on its first half, got {self.index_head_dim}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise TypeError(f"rope_scaling must be None or a RopeScaling, got {self.rope_scaling!r}")
        for name in ("index_norm", "index_rope", "qkv_bias", "out_bias"):
            if not isinstance(getattr(self, name), bool):  # a truthy string would silently switch it on
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")


class KVCache(NamedTuple):
    """Decoding cache of one layer; `length` [B] counts the tokens already written."""

    k: jax.Array  # [B, max_len, Hkv, D]
    v: jax.Array  # [B, max_len, Hkv, D]
    index_k: jax.Array  # [B, max_len, Di], the index branch's shared key head
    length: jax.Array  # int32 [B]

    @classmethod
    def init(cls, cfg: MSAAttentionConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> "KVCache":
        kv = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(
            jnp.zeros(kv, dtype), jnp.zeros(kv, dtype),
            jnp.zeros((batch, max_len, cfg.index_head_dim), dtype), jnp.zeros((batch,), jnp.int32),
        )


def init_paged_kv_cache(cfg: MSAAttentionConfig, page_table, *, num_pages: int, kv_dtype=jnp.bfloat16,
                        index_dtype=None) -> PagedCache:
    """An empty paged cache for one layer of this config: pages of cfg.block_size tokens.

    page_table: int [B, max_pages], each row's own pages (`msa_jax.make_page_table`);
    kv_dtype / index_dtype: the pages' dtypes (jnp.float8_e4m3fn: FP8 with per-token scales;
    index_dtype None: kv_dtype). A dense layer (GQAAttention) leaves its index pages unused.
    """
    return init_paged_cache(page_table, num_pages=num_pages, page_size=cfg.block_size,
                            num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                            index_head_dim=cfg.index_head_dim, kv_dtype=kv_dtype, index_dtype=index_dtype)


class AttentionOutput(NamedTuple):
    out: jax.Array  # [B, T, d_model]
    kl_loss: jax.Array  # float32 scalar, this layer's KL index-alignment loss (0 with a paged cache)
    cache: KVCache | PagedCache | None  # the updated cache, when one was given


def rope_frequencies(rotary_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """float32 [rotary_dim / 2]: radians per position of each rotated pair, scaled if asked.

    Computed in float64 from static settings (so at trace time, as constants), then rounded.
    """
    inv_freq = float(theta) ** (-np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if scaling is not None:
        inv_freq = scaling.apply(inv_freq)
    return inv_freq.astype(np.float32)


def rope(x: jax.Array, positions: jax.Array, theta: float, rotary_dim: int | None = None,
         scaling: RopeScaling | None = None) -> jax.Array:
    """Rotary embedding, "rotate_half" layout, on the first rotary_dim features of x [B,T,H,d].

    positions: int [B, T]; scaling: None or a `RopeScaling` of the frequencies.
    """
    d = x.shape[-1] if rotary_dim is None else rotary_dim
    freqs = rope_frequencies(d, theta, scaling)  # [d/2]
    angle = positions.astype(jnp.float32)[:, :, None, None] * freqs  # [B, T, 1, d/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rot, rest = x[..., :d].astype(jnp.float32), x[..., d:]
    a, b = rot[..., : d // 2], rot[..., d // 2:]
    rotated = jnp.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)
    return jnp.concatenate([rotated, rest], axis=-1) if rest.shape[-1] else rotated


def _write(buf, new, at):
    """Writes new [B, T, ...] into buf [B, max_len, ...] at row offsets at [B]."""
    put = lambda b, n, a: jax.lax.dynamic_update_slice_in_dim(b, n.astype(b.dtype), a, axis=0)
    return jax.vmap(put)(buf, new, at)


def _check_room(cache: KVCache, new_tokens: int):
    # dynamic_update_slice clamps out-of-range offsets, which would silently overwrite the
    # last cached tokens; refuse when the lengths are known (outside jit).
    try:
        longest = int(jnp.max(cache.length))
    except jax.errors.ConcretizationTypeError:
        return
    if longest + new_tokens > cache.k.shape[1]:
        raise ValueError(
            f"KV cache overflow: {longest} cached + {new_tokens} new tokens > max_len {cache.k.shape[1]}"
        )


class GQAAttention(nnx.Module):
    """Dense causal GQA attention (projections, RoPE, cache); MSAAttention adds the index branch.

    Models keep their first layers dense with this (as MiniMax-M3 does); the attention
    itself is `jax.nn.dot_product_attention` (cuDNN on GPU).
    """

    def __init__(self, cfg: MSAAttentionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.cfg = cfg
        Hq, Hkv, D = cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim
        lin = lambda n_in, n_out, bias: nnx.Linear(
            n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.q_proj = lin(cfg.d_model, Hq * D, cfg.qkv_bias)
        self.k_proj = lin(cfg.d_model, Hkv * D, cfg.qkv_bias)
        self.v_proj = lin(cfg.d_model, Hkv * D, cfg.qkv_bias)
        self.o_proj = lin(Hq * D, cfg.d_model, cfg.out_bias)

    def _positions(self, x, segment_ids, cache, num_new=None):
        B, T, _ = x.shape
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids (packed training documents) cannot be combined with a KV cache")
        if num_new is not None and not isinstance(cache, PagedCache):
            raise ValueError("num_new (tokens of x per row) needs a PagedCache; a KVCache row takes all T tokens")
        if isinstance(cache, PagedCache) and cache.page_size != self.cfg.block_size:
            # Page size = block size: the paged ops read block ids as logical page ids.
            raise ValueError(f"PagedCache page size {cache.page_size} must equal block_size {self.cfg.block_size}")
        if cache is None:
            start = jnp.zeros((B,), jnp.int32)
        else:
            start = cache.kv_length if isinstance(cache, PagedCache) else cache.length
        pos = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        if segment_ids is not None:  # RoPE positions restart at each packed document
            pos = pos - pos_lib.doc_starts(jnp.asarray(segment_ids, jnp.int32))
        return start, pos

    def _qkv(self, x, pos):
        B, T, _ = x.shape
        cfg = self.cfg
        rot = lambda t: rope(t, pos, cfg.rope_theta, scaling=cfg.rope_scaling)
        q = rot(self.q_proj(x).reshape(B, T, cfg.num_q_heads, cfg.head_dim))
        k = rot(self.k_proj(x).reshape(B, T, cfg.num_kv_heads, cfg.head_dim))
        v = self.v_proj(x).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        return q, k, v

    def __call__(self, x, *, segment_ids=None, cache: KVCache | PagedCache | None = None, mode: str | None = None,
                 kl_coeff: float = 1.0, num_new=None) -> AttentionOutput:
        del mode, kl_coeff  # always dense, no index branch
        B, T, _ = x.shape
        start, pos = self._positions(x, segment_ids, cache, num_new)
        q, k, v = self._qkv(x, pos)
        if cache is None and segment_ids is None:
            # Plain causal self-attention: no explicit mask, so on GPU cuDNN's flash kernel
            # serves it (an explicit [B, 1, T, S] mask would make XLA materialise the logits).
            on_gpu = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn" if on_gpu else None)
            return AttentionOutput(self.o_proj(out.reshape(B, T, -1)), jnp.zeros((), jnp.float32), None)
        # Causal on absolute token index; packed documents or the cache's length cut it further.
        q_abs = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        length = None
        if cache is None:
            new_cache = None
        elif isinstance(cache, PagedCache):
            new_cache = paged_append(cache, k, v, None, num_new=num_new)  # no index branch here
            (k, v), length = gather_kv(new_cache, q.dtype), new_cache.kv_length
        else:
            _check_room(cache, T)
            new_cache = cache._replace(
                k=_write(cache.k, k, start), v=_write(cache.v, v, start), length=cache.length + T
            )
            k, v, length = new_cache.k.astype(q.dtype), new_cache.v.astype(q.dtype), new_cache.length
        k_abs = jnp.arange(k.shape[1], dtype=jnp.int32)[None, None, :]
        mask = k_abs <= q_abs[:, :, None]
        if length is not None:
            mask &= k_abs < length[:, None, None]
        if segment_ids is not None:
            doc = pos_lib.doc_starts(jnp.asarray(segment_ids, jnp.int32))  # MSA's document rule
            mask &= doc[:, :, None] == doc[:, None, :]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
        return AttentionOutput(self.o_proj(out.reshape(B, T, -1)), jnp.zeros((), jnp.float32), new_cache)


class MSAAttention(GQAAttention):
    """GQA attention whose main branch runs MSA block-sparse attention.

    Call with x [B, T, d_model]; returns AttentionOutput(out, kl_loss, cache). Without a
    cache, x is the whole sequence (causal; `segment_ids` [B, T] for packed documents).
    With a cache, x holds the next T tokens of each row: their k/v/index_k are written at
    the cache's length and they attend to everything cached so far (prefill or decode).
    `mode` overrides the config's ("dense" warm-up or "sparse") for this call.

    A `PagedCache` (`init_paged_kv_cache`; pages of block_size tokens, bf16 or FP8) runs
    `paged_sparse_attention` (inference: kl_loss 0); `num_new` (int32 [B], default T) then
    says how many of x's tokens are real per row, so right-padded prompts of different
    lengths prefill in one call (queries past a row's num_new are padding: output 0).
    """

    def __init__(self, cfg: MSAAttentionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        super().__init__(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        Hkv, Di = cfg.num_kv_heads, cfg.index_head_dim
        lin = lambda n_in, n_out: nnx.Linear(n_in, n_out, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.index_q_proj = lin(cfg.d_model, Hkv * Di)
        self.index_k_proj = lin(cfg.d_model, Di)
        if cfg.index_norm:
            norm = lambda: nnx.RMSNorm(Di, epsilon=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.index_q_norm, self.index_k_norm = norm(), norm()
        else:
            self.index_q_norm = self.index_k_norm = None

    def _index(self, x, pos):
        """index_q [B, T, Hkv, Di], index_k [B, T, Di] from stop_gradient(x): the detach."""
        cfg = self.cfg
        B, T, _ = x.shape
        Di = cfg.index_head_dim
        xi = jax.lax.stop_gradient(x)
        iq = self.index_q_proj(xi).reshape(B, T, cfg.num_kv_heads, Di)
        ik = self.index_k_proj(xi).reshape(B, T, 1, Di)
        if self.index_q_norm is not None:
            iq, ik = self.index_q_norm(iq), self.index_k_norm(ik)
        if cfg.index_rope:  # MiniMax-M3: RoPE on the first half of the index head dim
            rot = lambda t: rope(t, pos, cfg.rope_theta, Di // 2, cfg.rope_scaling)
            iq, ik = rot(iq), rot(ik)
        return iq, ik[:, :, 0]

    def __call__(self, x, *, segment_ids=None, cache: KVCache | PagedCache | None = None, mode: str | None = None,
                 kl_coeff: float = 1.0, num_new=None) -> AttentionOutput:
        cfg = self.cfg
        B, T, _ = x.shape
        start, pos = self._positions(x, segment_ids, cache, num_new)
        q, k, v = self._qkv(x, pos)
        iq, ik = self._index(x, pos)
        mode = mode or cfg.mode
        if isinstance(cache, PagedCache):
            return self._paged(q, k, v, iq, ik, start, cache, mode, num_new, x.dtype)
        kw = dict(top_k=cfg.top_k, block_size=cfg.block_size, mode=mode, kl_coeff=kl_coeff,
                  implementation=cfg.implementation)
        if cache is None:
            res = sparse_attention(q, k, v, iq, ik, segment_ids=segment_ids, **kw)
            new_cache = None
        else:
            _check_room(cache, T)
            new_cache = KVCache(
                _write(cache.k, k, start), _write(cache.v, v, start), _write(cache.index_k, ik, start),
                cache.length + T,
            )
            res = sparse_attention(
                q.astype(new_cache.k.dtype), new_cache.k, new_cache.v, iq.astype(new_cache.index_k.dtype),
                new_cache.index_k, q_offset=start, kv_length=new_cache.length, **kw,
            )
        out = self.o_proj(res.out.reshape(B, T, -1).astype(x.dtype))
        return AttentionOutput(out, res.kl_loss, new_cache)

    def _paged(self, q, k, v, iq, ik, start, cache: PagedCache, mode: str, num_new, dtype):
        """Appends the new tokens (the first num_new[b] of row b) and attends from them."""
        cfg = self.cfg
        B, T = q.shape[:2]
        new = paged_append(cache, k, v, ik, num_new=num_new)
        # The queries take the pages' dtype, except with FP8 pages (converted to the queries').
        like = lambda x, pages: x if pages.dtype == jnp.float8_e4m3fn else x.astype(pages.dtype)  # noqa: E731
        # Dense mode: every page is selected, which is dense causal attention (spec).
        top_k = new.page_table.shape[1] if mode == "dense" else cfg.top_k
        res = paged_sparse_attention(
            like(q, new.k_pages), new.k_pages, new.v_pages, like(iq, new.index_k_pages), new.index_k_pages,
            top_k=top_k, q_offset=start, implementation=cfg.implementation, **new.attention_args(),
        )
        out = self.o_proj(res.out.reshape(B, T, -1).astype(dtype))
        return AttentionOutput(out, jnp.zeros((), jnp.float32), new)
