"""Convert a dense HuggingFace GQA checkpoint (Llama, Mistral, Qwen2) into an MSA model.

Why this file exists: MSA is meant to be reached by continued training of a dense model
(dense "indexer warm-up" first, then sparse), so the usual starting point is a published
dense checkpoint. This script turns one into `model.MSATransformer` parameters without
torch and without ever unpickling anything.

    python examples/flax_model/convert.py HF_DIR OUT_DIR [--top-k 16] [--block-size 128]
        [--index-head-dim D] [--dense-layers 0] [--index-init derived|random]
        [--dtype float32|bfloat16|float16] [--seed 0] [--overwrite]

Input: a directory with `config.json` and `*.safetensors` (one file, or shards listed by
`model.safetensors.index.json`). `*.bin` / `*.pt` files are refused: they are pickles, and
loading a pickle runs arbitrary code. Output directory:

    model_config.json   `ModelConfig.to_json()`
    params/             orbax StandardCheckpointer: `nnx.to_pure_dict(nnx.state(model))`, the
                        same tree as train.py's "params" item
    conversion.json     provenance: source directory, model_type, dtype, index_init, seed, eos_token_id
    tokenizer.json      copied from the HF directory when it has one (generate.py --prompt text,
                        train_converted.py and evaluate.py tokenise with it)

How, in three parts (the Flax gemma example's shape):
  1. `key_map(cfg)`: a pure mapping HF tensor name -> (model parameter path, value hook).
  2. `HOOKS`: value transforms. `nn.Linear` stores weight [out, in]; `nnx.Linear` stores
     kernel [in, out], so every projection is transposed; everything else is copied.
  3. `load_hf_params`: a generic loader that reads every tensor with `safetensors.numpy`
     and fails, naming the key, on an unknown HF tensor, a missing one, a shape mismatch,
     or a model parameter that nothing filled.

Exactness: in dense mode the converted model computes the HF model's function (the tests
check logits to 1e-4 in fp32), and in sparse mode too for every position < top_k *
block_size (the spec: fewer than K visible blocks means all are selected). Mapped
features: q/k/v biases (Qwen2), Llama's `attention_bias` (biases on q/k/v and o_proj:
`qkv_bias` and `out_bias`), tied embeddings, explicit head_dim, and Llama 3.1 RoPE scaling
(rope_type "llama3": `msa_jax.nn.RopeScaling`). Configurations the model cannot represent
are refused with a ValueError naming the config field: other RoPE scaling (linear,
dynamic, yarn, longrope...; the message names the rope_type), partial rotary, an active
sliding window shorter than max_position_embeddings, activations other than SiLU, MLP
biases.

`generate.py --ckpt-dir OUT_DIR` samples from the output directory as it does from a
train.py checkpoint directory (`generate.load` tells the two apart by model_config.json
and reads this one with `load_converted`); prompts are token ids (`--prompt-ids`) from
the source model's tokenizer.

Index-branch initialisation (the paper does not say how; this is our rule):
  - "derived" (default, needs index_head_dim == head_dim): in every MSA layer,
    index_q_proj's output head g (one per GQA group) is the mean of the q_proj rows of the
    G query heads of group g, and index_k_proj's single head is the mean of the k_proj
    rows over all Hkv kv heads. The q/k biases (Qwen2, Llama attention_bias) are not
    carried over: the index projections have none. So the index score starts as the score
    of the group's average query against the kv heads' average key -- a rough proxy for
    the dense attention pattern that the KL warm-up then refines, instead of noise. Only a
    proxy: the index branch also normalises (RMSNorm) and rotates only the first half of
    Di (with the same RoPE settings, llama3 scaling included).
  - "random": index_q_proj and index_k_proj kernels ~ Normal(0, 1/sqrt(d_model)), drawn
    from numpy's default_rng(seed) layer by layer.
  In both, the index RMSNorm scales are 1. Layers kept dense (`--dense-layers N`, the
  first N) have no index branch and take nothing from this rule.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from typing import Callable, Iterator, NamedTuple

import numpy as np

import jax
import jax.numpy as jnp
import ml_dtypes
import orbax.checkpoint as ocp
from flax import nnx
from safetensors import safe_open

try:  # imported as examples.flax_model.convert
    from .model import ModelConfig, MSATransformer
except ImportError:  # run as a script, or imported by generate.py: examples/flax_model is on sys.path
    from model import ModelConfig, MSATransformer
from msa_jax.nn import RopeScaling

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
INFO_FILE = "conversion.json"
TOKENIZER_FILE = "tokenizer.json"  # copied from the HF directory when it has one

MODEL_TYPES = ("llama", "mistral", "qwen2")
# What transformers assumes when config.json omits a field (their config classes' defaults;
# None = num_attention_heads). Real exports write them all; hand-written configs may not.
_FAMILY_DEFAULTS = {
    "llama": dict(num_key_value_heads=None, sliding_window=None),
    "mistral": dict(num_key_value_heads=8, sliding_window=4096),
    "qwen2": dict(num_key_value_heads=32, sliding_window=4096),
}
INDEX_INITS = ("derived", "random")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

Path = tuple  # a parameter path in nnx.state(model), e.g. ("layers", 0, "attn", "q_proj", "kernel")


# ---------------------------------------------------------------------------------------
# Config mapping


def _field(hf: dict, name: str, default=None, *, required: bool = False):
    if name in hf and hf[name] is not None:
        return hf[name]
    if required:
        raise ValueError(f"config.json: required field {name!r} is missing")
    return default


_LLAMA3_FIELDS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(hf: dict) -> tuple[float, RopeScaling | None]:
    """(rope_theta, rope_scaling) from `rope_parameters` (transformers >= 5) or `rope_scaling` / `rope_theta`.

    rope_type "default" gives no scaling, "llama3" a `RopeScaling` (its four fields; a
    missing original_max_position_embeddings falls back to max_position_embeddings, as in
    transformers). Raises ValueError, naming the config field and the rope_type, for every
    other RoPE variant (linear, dynamic, yarn, longrope, ...), partial rotary, or layer
    types with different RoPE: the model applies one rotate_half RoPE on the full head dim.
    """
    # transformers 5 reads rope_scaling in preference to rope_parameters; so do we.
    field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(field) or {}
    if not isinstance(params, dict):
        raise ValueError(f"config.json {field}: expected an object, got {params!r}")
    if params and all(isinstance(v, dict) for v in params.values()):  # one entry per layer type
        entries = {f"{field}[{k!r}]": v for k, v in params.items()}
    else:
        entries = {field: params}
    ropes = set()
    for where, p in entries.items():
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(
                f"config.json {where}: rope_type {rope_type!r} is not supported (only 'default', unscaled RoPE, "
                "and 'llama3'); converting would silently change the positional encoding"
            )
        if p.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"config.json {where}: partial_rotary_factor {p['partial_rotary_factor']} is not supported "
                "(the model rotates the whole head dim)"
            )
        scaling = None
        if rope_type == "llama3":
            values = {name: p.get(name) for name in _LLAMA3_FIELDS}
            if values["original_max_position_embeddings"] is None:
                values["original_max_position_embeddings"] = hf.get("max_position_embeddings")
            missing = [name for name, value in values.items() if value is None]
            if missing:
                raise ValueError(f"config.json {where}: rope_type 'llama3' needs {', '.join(missing)}")
            try:
                scaling = RopeScaling(rope_type="llama3", **values)
            except ValueError as e:
                raise ValueError(f"config.json {where}: {e}") from None
        ropes.add((float(p.get("rope_theta", hf.get("rope_theta") or 10000.0)), scaling))
    if hf.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ValueError(f"config.json partial_rotary_factor: {hf['partial_rotary_factor']} is not supported")
    if len(ropes) != 1:
        raise ValueError(f"config.json {field}: layer types use different RoPE settings {sorted(ropes, key=str)}")
    return ropes.pop()


def _check_sliding_window(hf: dict, model_type: str, num_layers: int):
    """Refuses a sliding window that HF would actually apply within max_position_embeddings.

    The MSA model attends causally over the whole prefix. A window at least as long as
    max_position_embeddings never masks anything at the lengths the model supports, so it
    is accepted (some configs set window == max_position_embeddings).
    """
    if model_type == "llama":  # LlamaAttention has no sliding window
        return
    window = hf.get("sliding_window", _FAMILY_DEFAULTS[model_type]["sliding_window"])  # explicit null: none
    if model_type == "qwen2":
        if not hf.get("use_sliding_window", False):
            return  # Qwen2Config drops sliding_window unless use_sliding_window is set
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
            for i in range(num_layers)
        ]
        if "sliding_attention" not in layer_types:
            return
    max_pos = hf.get("max_position_embeddings")
    if window is not None and (max_pos is None or window < max_pos):
        raise ValueError(
            f"config.json sliding_window: {window} < max_position_embeddings {max_pos}; sliding-window "
            "attention is not supported (the MSA model attends over the whole causal prefix)"
        )


def model_config_from_hf(hf: dict, *, top_k: int = 16, block_size: int = 128, index_head_dim: int | None = None,
                         dense_layers: int = 0) -> ModelConfig:
    """The `ModelConfig` of a HF Llama / Mistral / Qwen2 config.json dict plus MSA options.

    Raises:
      ValueError: an unsupported model_type or a feature the model cannot represent; the
        message names the config.json field.
    """
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"config.json model_type: expected one of {MODEL_TYPES}, got {model_type!r}")
    d_model = int(_field(hf, "hidden_size", required=True))
    num_layers = int(_field(hf, "num_hidden_layers", required=True))
    num_q_heads = int(_field(hf, "num_attention_heads", required=True))
    defaults = _FAMILY_DEFAULTS[model_type]
    num_kv_heads = int(_field(hf, "num_key_value_heads", defaults["num_key_value_heads"] or num_q_heads))
    head_dim = int(_field(hf, "head_dim", d_model // num_q_heads))
    act = _field(hf, "hidden_act", "silu")
    if act not in ("silu", "swish"):  # the same function in transformers' ACT2FN
        raise ValueError(f"config.json hidden_act: only 'silu' (SwiGLU) is supported, got {act!r}")
    if hf.get("mlp_bias"):
        raise ValueError("config.json mlp_bias: MLP biases are not supported by the model")
    if model_type == "llama":  # LlamaAttention: attention_bias puts biases on q/k/v and o_proj
        qkv_bias = out_bias = bool(hf.get("attention_bias", False))
    else:  # Qwen2Attention: q/k/v biases always, o_proj none; MistralAttention: none
        qkv_bias, out_bias = model_type == "qwen2", False
    rope_theta, rope_scaling = _rope(hf)
    _check_sliding_window(hf, model_type, num_layers)
    return ModelConfig(
        vocab_size=int(_field(hf, "vocab_size", required=True)),
        d_model=d_model,
        num_layers=num_layers,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        ffn_dim=int(_field(hf, "intermediate_size", required=True)),
        index_head_dim=head_dim if index_head_dim is None else index_head_dim,
        top_k=top_k,
        block_size=block_size,
        dense_layers=dense_layers,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        norm_eps=float(_field(hf, "rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        tie_embeddings=bool(_field(hf, "tie_word_embeddings", False)),
    )


# ---------------------------------------------------------------------------------------
# Key mapping and value hooks


class Target(NamedTuple):
    path: Path  # where the value goes in nnx.state(model, nnx.Param)
    hook: str  # a key of HOOKS
    required: bool = True  # False: may be absent (tied lm_head); if present it must agree


HOOKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda w: w.T,  # nn.Linear weight [out, in] -> nnx.Linear kernel [in, out]
    "copy": lambda w: w,
}

# Non-persistent RoPE buffers that older exports saved; derived from rope_theta, so dropped.
IGNORED_KEYS = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def key_map(cfg: ModelConfig) -> dict[str, Target]:
    """HF tensor name -> Target, for every tensor a checkpoint of this config holds."""
    m = {"model.embed_tokens.weight": Target(("embed", "embedding"), "copy"),
         "model.norm.weight": Target(("final_norm", "scale"), "copy")}
    if cfg.tie_embeddings:  # usually omitted from tied checkpoints; if saved, must equal the embedding
        m["lm_head.weight"] = Target(("embed", "embedding"), "copy", required=False)
    else:
        m["lm_head.weight"] = Target(("lm_head", "kernel"), "linear")
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        m[hf + "input_layernorm.weight"] = Target((*ours, "input_norm", "scale"), "copy")
        m[hf + "post_attention_layernorm.weight"] = Target((*ours, "post_attn_norm", "scale"), "copy")
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            m[hf + f"self_attn.{p}.weight"] = Target((*ours, "attn", p, "kernel"), "linear")
        biased = ("q_proj", "k_proj", "v_proj") if cfg.qkv_bias else ()
        for p in biased + (("o_proj",) if cfg.out_bias else ()):
            m[hf + f"self_attn.{p}.bias"] = Target((*ours, "attn", p, "bias"), "copy")
        for p in ("gate_proj", "up_proj", "down_proj"):
            m[hf + f"mlp.{p}.weight"] = Target((*ours, "mlp", p, "kernel"), "linear")
    return m


def index_params(cfg: ModelConfig, params: dict[Path, np.ndarray], index_init: str,
                 seed: int = 0) -> dict[Path, np.ndarray]:
    """The index-branch parameters of every MSA layer (float32), by the module docstring's rule.

    Args:
      params: the converted parameters by path (float32 kernels [in, out]); "derived" reads
        each layer's q_proj and k_proj kernels from it.
    """
    if index_init not in INDEX_INITS:
        raise ValueError(f"index_init must be one of {INDEX_INITS}, got {index_init!r}")
    D, Di, Hkv, G = cfg.head_dim, cfg.index_head_dim, cfg.num_kv_heads, cfg.num_q_heads // cfg.num_kv_heads
    if index_init == "derived" and Di != D:
        raise ValueError(
            f"index_head_dim ({Di}) must equal head_dim ({D}) for index_init='derived'; use index_init='random'"
        )
    rng = np.random.default_rng(seed)
    std = 1.0 / math.sqrt(cfg.d_model)
    out = {}
    for i in range(cfg.dense_layers, cfg.num_layers):
        attn = ("layers", i, "attn")
        if index_init == "derived":
            qk = params[(*attn, "q_proj", "kernel")].astype(np.float32)  # [d_model, Hq*D], head-major
            kk = params[(*attn, "k_proj", "kernel")].astype(np.float32)  # [d_model, Hkv*D]
            iq = qk.reshape(cfg.d_model, Hkv, G, D).mean(axis=2).reshape(cfg.d_model, Hkv * D)
            ik = kk.reshape(cfg.d_model, Hkv, D).mean(axis=1)
        else:
            iq = rng.normal(0.0, std, (cfg.d_model, Hkv * Di)).astype(np.float32)
            ik = rng.normal(0.0, std, (cfg.d_model, Di)).astype(np.float32)
        out[(*attn, "index_q_proj", "kernel")] = iq
        out[(*attn, "index_k_proj", "kernel")] = ik
        if cfg.index_norm:
            out[(*attn, "index_q_norm", "scale")] = np.ones((Di,), np.float32)
            out[(*attn, "index_k_norm", "scale")] = np.ones((Di,), np.float32)
    return out


# ---------------------------------------------------------------------------------------
# Generic safetensors loader

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors' numpy backend cannot build these dtypes; read their bytes ourselves.
_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16}
_NUMPY_DTYPES = ("F64", "F32", "F16")


def checkpoint_files(hf_dir: str) -> list[str]:
    """hf_dir's safetensors: the index's shards, else model.safetensors, else every *.safetensors.

    Raises:
      ValueError: a listed shard is missing, or there is no safetensors file (a pickle-only
        directory names its pickle files: they are never loaded).
    """
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: no 'weight_map'")
        files = [os.path.join(hf_dir, name) for name in sorted(set(weight_map.values()))]
        for path in files:
            if not os.path.exists(path):
                raise ValueError(f"{index} lists shard {os.path.basename(path)}, which does not exist")
        return files
    names = sorted(os.listdir(hf_dir))
    if "model.safetensors" in names:  # Mistral repos also ship consolidated.safetensors (native names)
        return [os.path.join(hf_dir, "model.safetensors")]
    files = [os.path.join(hf_dir, n) for n in names if n.endswith(".safetensors")]
    if not files:
        pickles = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
        if pickles:
            raise ValueError(
                f"{hf_dir} holds only pickle checkpoints ({', '.join(pickles)}); they are never loaded because "
                "unpickling runs arbitrary code. Re-save with save_pretrained(..., safe_serialization=True)."
            )
        raise ValueError(f"{hf_dir}: no *.safetensors file")
    return files


def _header(path: str) -> tuple[dict, int]:
    """(tensor table, byte offset of the data) of a safetensors file: u64 LE length, JSON header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_safetensors(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) for every tensor in files, each read once, with safetensors.numpy.

    BF16 tensors (which numpy cannot represent natively) are read from the file's bytes as
    ml_dtypes.bfloat16, per the safetensors format. Raises ValueError naming the tensor
    for a dtype that is neither, or a name that appears in two files.
    """
    seen = {}
    for path in files:
        header, data_start = _header(path)
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                if name in seen:
                    raise ValueError(f"tensor {name} appears in both {seen[name]} and {os.path.basename(path)}")
                seen[name] = os.path.basename(path)
                info = header[name]
                if info["dtype"] in _NUMPY_DTYPES:
                    yield name, f.get_tensor(name)
                elif info["dtype"] in _RAW_DTYPES:
                    begin, end = info["data_offsets"]
                    raw = np.fromfile(path, np.uint8, count=end - begin, offset=data_start + begin)
                    yield name, raw.view(_RAW_DTYPES[info["dtype"]]).reshape(info["shape"])
                else:
                    raise ValueError(f"tensor {name} in {os.path.basename(path)}: unsupported dtype {info['dtype']}")


def load_hf_params(hf_dir: str, cfg: ModelConfig, shapes: dict[Path, tuple]) -> dict[Path, np.ndarray]:
    """Reads hf_dir's tensors into {model path: float32 array} through key_map and HOOKS.

    Args:
      shapes: the model's parameter shapes by path (those not filled from HF, i.e. the index
        branch, are left out of the result).

    Raises:
      ValueError, naming the HF key: a tensor key_map does not know, a required tensor that
        is absent, a shape that differs from the model's, two tensors for one parameter that
        disagree (e.g. an untied lm_head.weight in a tied checkpoint).
    """
    mapping = key_map(cfg)
    out, source = {}, {}
    for name, value in read_safetensors(checkpoint_files(hf_dir)):
        if IGNORED_KEYS.match(name):
            continue
        target = mapping.get(name)
        if target is None:
            raise ValueError(
                f"unknown HF tensor {name} (shape {tuple(value.shape)}): no parameter of {_describe(cfg)} maps to it"
            )
        value = HOOKS[target.hook](np.asarray(value, np.float32))
        want = shapes[target.path]
        if value.shape != tuple(want):
            raise ValueError(
                f"HF tensor {name}: shape {tuple(value.shape)} after the {target.hook!r} hook, but model parameter "
                f"{_dotted(target.path)} has shape {tuple(want)}"
            )
        if target.path in out:
            if not np.array_equal(out[target.path], value):
                raise ValueError(f"HF tensor {name} differs from {source[target.path]}, which fills the same "
                                 f"parameter {_dotted(target.path)} (tie_word_embeddings is {cfg.tie_embeddings})")
            continue
        out[target.path], source[target.path] = value, name
    for name, target in mapping.items():
        if target.required and source.get(target.path) != name:
            raise ValueError(f"HF tensor {name} is missing from {hf_dir} (needed for {_dotted(target.path)})")
    return out


def _describe(cfg: ModelConfig) -> str:
    return (f"MSATransformer({cfg.num_layers} layers, qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}, "
            f"tie_embeddings={cfg.tie_embeddings})")


def _dotted(path: Path) -> str:
    return ".".join(str(p) for p in path)


# ---------------------------------------------------------------------------------------
# Build, save, load


def _abstract_model(cfg: ModelConfig, dtype):
    """(graphdef, abstract Param state) without allocating or initialising anything."""
    abstract = nnx.eval_shape(lambda: MSATransformer(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    graphdef, state = nnx.split(abstract, nnx.Param)
    return graphdef, state


def _flat_shapes(state) -> dict[Path, tuple]:
    return {path: tuple(v.shape) for path, v in nnx.to_flat_state(state)}


def build_model(cfg: ModelConfig, params: dict[Path, np.ndarray], dtype=jnp.float32) -> MSATransformer:
    """MSATransformer whose every parameter comes from params (ValueError names an unfilled one)."""
    graphdef, state = _abstract_model(cfg, dtype)
    flat = nnx.to_flat_state(state)
    unfilled = [_dotted(p) for p, _ in flat if p not in params]
    if unfilled:
        raise ValueError(f"model parameters not filled by the conversion: {', '.join(unfilled)}")
    extra = sorted(_dotted(p) for p in set(params) - {p for p, _ in flat})
    if extra:
        raise ValueError(f"converted values with no model parameter: {', '.join(extra)}")
    leaves = [(p, v.replace(jnp.asarray(params[p], dtype))) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def convert(hf_dir: str, out_dir: str | None = None, *, top_k: int = 16, block_size: int = 128,
            index_head_dim: int | None = None, dense_layers: int = 0, index_init: str = "derived",
            dtype: str = "float32", seed: int = 0, overwrite: bool = False) -> tuple[MSATransformer, ModelConfig]:
    """Converts the HF checkpoint in hf_dir; writes it to out_dir unless out_dir is None.

    Args:
      hf_dir: directory with config.json and *.safetensors (Llama, Mistral or Qwen2).
      out_dir: output directory (see the module docstring), or None to only build the model.
      top_k, block_size: MSA selection (K blocks of block_size keys, local block included).
      index_head_dim: Di; None for the model's head_dim (required by index_init="derived").
      dense_layers: the first dense_layers layers keep dense GQA attention, no index branch.
      index_init: "derived" or "random" (module docstring).
      dtype: "float32", "bfloat16" or "float16": parameter and compute dtype.
      seed: numpy seed of index_init="random".
      overwrite: replace an existing conversion in out_dir.

    Returns:
      (model, config).

    Raises:
      ValueError: unsupported config (names the config.json field), an unknown, missing or
        misshapen tensor (names the HF key), pickle-only checkpoints, bad options.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if index_init not in INDEX_INITS:
        raise ValueError(f"index_init must be one of {INDEX_INITS}, got {index_init!r}")
    config_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"{hf_dir}: no config.json")
    with open(config_path) as f:
        hf = json.load(f)
    cfg = model_config_from_hf(hf, top_k=top_k, block_size=block_size, index_head_dim=index_head_dim,
                               dense_layers=dense_layers)
    _, abstract = _abstract_model(cfg, DTYPES[dtype])
    params = load_hf_params(hf_dir, cfg, _flat_shapes(abstract))
    params.update(index_params(cfg, params, index_init, seed))
    model = build_model(cfg, params, DTYPES[dtype])
    if out_dir is not None:
        info = dict(source=os.path.abspath(hf_dir), model_type=hf["model_type"], dtype=dtype,
                    index_init=index_init, seed=seed, eos_token_id=hf.get("eos_token_id"))
        save(model, out_dir, info, overwrite=overwrite)
        # The model speaks this tokenizer's ids: keep it with the model for text prompts and data.
        if os.path.exists(os.path.join(hf_dir, TOKENIZER_FILE)):
            shutil.copy(os.path.join(hf_dir, TOKENIZER_FILE), os.path.join(out_dir, TOKENIZER_FILE))
    return model, cfg


def save(model: MSATransformer, out_dir: str, info: dict, *, overwrite: bool = False):
    """Writes model_config.json, params/ (orbax) and conversion.json (info) into out_dir."""
    out_dir = os.path.abspath(out_dir)
    params_dir = os.path.join(out_dir, PARAMS_DIR)
    if os.path.exists(params_dir):
        if not overwrite:
            raise ValueError(f"{params_dir} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(params_dir)
    os.makedirs(out_dir, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    checkpointer.wait_until_finished()
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        f.write(model.cfg.to_json())
    with open(os.path.join(out_dir, INFO_FILE), "w") as f:
        json.dump(info, f, indent=1)


def load_converted(out_dir: str) -> MSATransformer:
    """The MSATransformer that `convert` wrote to out_dir, in the dtype it was converted to."""
    with open(os.path.join(out_dir, CONFIG_FILE)) as f:
        cfg = ModelConfig.from_json(f.read())
    dtype = "float32"
    if os.path.exists(os.path.join(out_dir, INFO_FILE)):
        with open(os.path.join(out_dir, INFO_FILE)) as f:
            dtype = json.load(f).get("dtype", dtype)
    graphdef, state = _abstract_model(cfg, DTYPES[dtype])
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
    restored = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(out_dir), PARAMS_DIR), target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", help="HF checkpoint directory (config.json + *.safetensors)")
    parser.add_argument("out_dir", help="output directory")
    parser.add_argument("--top-k", type=int, default=16, help="blocks selected per query and group (default 16)")
    parser.add_argument("--block-size", type=int, default=128, help="keys per block (default 128)")
    parser.add_argument("--index-head-dim", type=int, default=None, help="Di (default: the model's head_dim)")
    parser.add_argument("--dense-layers", type=int, default=0, help="first N layers stay dense GQA (default 0)")
    parser.add_argument("--index-init", choices=INDEX_INITS, default="derived", help="index projection init")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="parameter dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of --index-init random")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing conversion")
    args = parser.parse_args(argv)
    _, cfg = convert(args.hf_dir, args.out_dir, top_k=args.top_k, block_size=args.block_size,
                     index_head_dim=args.index_head_dim, dense_layers=args.dense_layers,
                     index_init=args.index_init, dtype=args.dtype, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.out_dir}: {cfg.num_layers} layers ({cfg.dense_layers} dense), d_model {cfg.d_model}, "
          f"{cfg.num_q_heads}q/{cfg.num_kv_heads}kv heads, top_k {cfg.top_k}, block_size {cfg.block_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
