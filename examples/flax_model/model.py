"""A Llama/Qwen2-style decoder (RMSNorm, SwiGLU, RoPE, GQA) whose attention is MSA.

The first `dense_layers` layers keep dense GQA attention with no index branch, as
MiniMax-M3 does; the rest are `msa_jax.nn.MSAAttention`. Attention itself always comes
from the library (the model never re-implements it).
"""

from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from msa_jax import PagedCache
from msa_jax.nn import (AttentionOutput, GQAAttention, KVCache, MSAAttention, MSAAttentionConfig, RopeScaling,
                        init_paged_kv_cache)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The decoder's shape; the attention fields mean what they mean in `MSAAttentionConfig`.

    rope_scaling: None or `msa_jax.nn.RopeScaling` (a dict of its fields is accepted and
    converted, which is how the JSON form comes back). qkv_bias / out_bias: biases on the
    q/k/v and o projections (Qwen2: qkv only; Llama with attention_bias: both).
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    index_head_dim: int = 128
    top_k: int = 16
    block_size: int = 128
    dense_layers: int = 0
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    out_bias: bool = False
    tie_embeddings: bool = False
    index_norm: bool = True
    index_rope: bool = True
    implementation: str | None = None

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # from JSON (to_json writes the dataclass as a dict)
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        for name in ("vocab_size", "d_model", "num_layers", "ffn_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= self.dense_layers <= self.num_layers:
            raise ValueError(f"dense_layers must lie in [0, num_layers={self.num_layers}], got {self.dense_layers}")
        self.attention()  # validates the attention fields with their own messages

    def attention(self) -> MSAAttentionConfig:
        return MSAAttentionConfig(
            d_model=self.d_model, num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, index_head_dim=self.index_head_dim, top_k=self.top_k,
            block_size=self.block_size, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
            index_norm=self.index_norm, index_rope=self.index_rope, qkv_bias=self.qkv_bias, out_bias=self.out_bias,
            norm_eps=self.norm_eps, implementation=self.implementation,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls(**json.loads(text))


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, vocab] float32
    kl_losses: jax.Array  # float32 [num_layers]; 0 for dense layers
    caches: tuple[KVCache, ...] | tuple[PagedCache, ...] | None


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, ffn_dim: int, *, rngs, dtype, param_dtype):
        lin = lambda a, b: nnx.Linear(a, b, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj, self.up_proj, self.down_proj = lin(d_model, ffn_dim), lin(d_model, ffn_dim), lin(ffn_dim, d_model)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, sparse: bool, *, rngs, dtype, param_dtype):
        norm = lambda: nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        attn_cls = MSAAttention if sparse else GQAAttention
        self.input_norm = norm()
        self.attn = attn_cls(cfg.attention(), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.post_attn_norm = norm()
        self.mlp = MLP(cfg.d_model, cfg.ffn_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, **kw) -> AttentionOutput:
        a = self.attn(self.input_norm(x), **kw)
        x = x + a.out
        return AttentionOutput(x + self.mlp(self.post_attn_norm(x)), a.kl_loss, a.cache)


class MSATransformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([
            DecoderLayer(cfg, i >= cfg.dense_layers, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
            for i in range(cfg.num_layers)
        ])
        self.final_norm = nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else nnx.Linear(
            cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def init_caches(self, batch: int, max_len: int, dtype=jnp.float32) -> tuple[KVCache, ...]:
        return tuple(KVCache.init(self.cfg.attention(), batch, max_len, dtype) for _ in range(self.cfg.num_layers))

    def init_paged_caches(self, page_table, num_pages: int, kv_dtype=jnp.bfloat16, index_dtype=None) -> tuple[PagedCache, ...]:
        """One paged cache per layer over the same page table (pages of block_size tokens;
        `msa_jax.make_page_table`); kv_dtype jnp.float8_e4m3fn for FP8 pages."""
        return tuple(init_paged_kv_cache(self.cfg.attention(), page_table, num_pages=num_pages, kv_dtype=kv_dtype,
                                         index_dtype=index_dtype) for _ in range(self.cfg.num_layers))

    def __call__(self, tokens, *, segment_ids=None, caches=None, mode: str | None = None, num_new=None) -> ModelOutput:
        """tokens int [B, T]; mode "dense" (warm-up) or "sparse" overrides the MSA layers' mode;
        num_new int32 [B] (paged caches only): the real tokens of each right-padded row."""
        x = self.embed(tokens)
        kls, new_caches = [], []
        extra = {} if num_new is None else {"num_new": num_new}
        for i, layer in enumerate(self.layers):
            r = layer(x, segment_ids=segment_ids, cache=None if caches is None else caches[i], mode=mode, **extra)
            x = r.out
            kls.append(r.kl_loss)
            new_caches.append(r.cache)
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
        return ModelOutput(logits.astype(jnp.float32), jnp.stack(kls), None if caches is None else tuple(new_caches))
