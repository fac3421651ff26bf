"""examples/flax_model/convert.py: HF Llama / Mistral / Qwen2 checkpoints -> MSA models.

The oracle is transformers itself: tiny random checkpoints are built here with torch on
CPU, converted, and the converted model's logits are compared with the HF model's. In
dense mode they must agree everywhere; in sparse mode for every position < top_k *
block_size (the spec: fewer than K visible blocks means all are selected) and not beyond.
generate.py's loading of a conversion and its cached greedy decoding are checked against
transformers' argmax continuation.
"""

import dataclasses
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("safetensors")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import msa_jax  # noqa: E402
from msa_jax.nn import RopeScaling, rope_frequencies  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from examples.flax_model import convert as conv  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "flax_model"))
import generate as gen_lib  # noqa: E402  (imports the scripts' top-level model/convert modules)

TOP_K, BLOCK = 3, 4  # exact window top_k * block_size = 12 tokens
T_SHORT, T_LONG = 12, 40
VOCAB = 100

# Llama 3.1 RoPE scaling with a pre-training context of 32 < T_LONG tokens: at head_dim 16
# and theta 1e4 the wavelengths 6.3 / 19.9 / 63+ fall in the kept / interpolated / divided
# ranges (thresholds 32/4 = 8 and 32/1 = 32), so every regime of the rule is exercised.
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)

# Five cases, covering: sharding + tied embeddings + non-default rope_theta and eps + dense
# layers (llama); Llama's attention_bias, biases on q/k/v and o_proj, in a dense and an MSA
# layer (llama-bias); llama3 RoPE scaling (llama3-rope); explicit head_dim != hidden/heads
# (mistral); q/k/v biases (qwen2).
HF_MODELS = {
    "llama": dict(
        config=lambda: transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, rope_theta=5000.0, rms_norm_eps=1e-5),
        model=lambda c: transformers.LlamaForCausalLM(c), shard="24KB", options=dict(dense_layers=1)),
    "llama-bias": dict(
        config=lambda: transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, attention_bias=True),
        model=lambda c: transformers.LlamaForCausalLM(c), shard=None, options=dict(dense_layers=1)),
    "llama3-rope": dict(
        config=lambda: transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_parameters=dict(LLAMA3_ROPE)),
        model=lambda c: transformers.LlamaForCausalLM(c), shard=None, options={}),
    "mistral": dict(
        config=lambda: transformers.MistralConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, sliding_window=None),
        model=lambda c: transformers.MistralForCausalLM(c), shard=None, options={}),
    "qwen2": dict(
        config=lambda: transformers.Qwen2Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=1000000),
        model=lambda c: transformers.Qwen2ForCausalLM(c), shard=None, options={}),
}


def _randomise(model, seed):
    """HF initialises norms to 1 and biases to 0; randomise every tensor so each mapping matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model.eval()


def _save_hf(name, path, seed=0):
    spec = HF_MODELS[name]
    cfg = spec["config"]()
    cfg._attn_implementation = "eager"
    model = _randomise(spec["model"](cfg), seed)
    kw = {} if spec["shard"] is None else dict(max_shard_size=spec["shard"])
    model.save_pretrained(path, safe_serialization=True, **kw)
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@nnx.jit(static_argnames="mode")
def _forward(model, tokens, mode):
    return model(tokens, mode=mode).logits


@nnx.jit
def _first_msa_layer_selection(model, tokens):
    """block_indices [B, T, Hkv, K] of the first MSA layer's index branch."""
    x = model.embed(tokens)
    for dense in model.layers[:model.cfg.dense_layers]:
        x = dense(x).out
    layer = model.layers[model.cfg.dense_layers]
    x = layer.input_norm(x)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    iq, ik = layer.attn._index(x, pos)
    return msa_jax.select_blocks(iq, ik, top_k=model.cfg.top_k, block_size=model.cfg.block_size)


def _logits(model, tokens, mode):
    return np.asarray(_forward(model, jnp.asarray(tokens), mode))


class Case:
    """One converted family: the HF model, its directory, the conversion and reference logits."""

    def __init__(self, name, tmp):
        self.name = name
        self.hf_dir, self.out_dir = str(tmp / "hf"), str(tmp / "msa")
        self.hf = _save_hf(name, self.hf_dir, seed=len(name))
        self.options = dict(top_k=TOP_K, block_size=BLOCK, **HF_MODELS[name]["options"])
        self.model, self.cfg = conv.convert(self.hf_dir, self.out_dir, **self.options)
        rng = np.random.default_rng(len(name))
        self.long = rng.integers(0, VOCAB, (2, T_LONG))
        self.short = rng.integers(0, VOCAB, (2, T_SHORT))
        self.ref_long, self.ref_short = _hf_logits(self.hf, self.long), _hf_logits(self.hf, self.short)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """cases(name) -> the Case of that family, built once per module."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = Case(name, tmp_path_factory.mktemp(name))
        return made[name]

    return get


@pytest.fixture(scope="module", params=sorted(HF_MODELS))
def case(request, cases):
    return cases(request.param)


# ------------------------------------------------------------------------------ parity


def test_layout_of_a_sharded_tied_checkpoint(case):
    files = os.listdir(case.hf_dir)
    if case.name == "llama":
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 3
        assert case.cfg.tie_embeddings and case.model.lm_head is None
    assert {conv.CONFIG_FILE, conv.PARAMS_DIR, conv.INFO_FILE} <= set(os.listdir(case.out_dir))
    hf = case.hf.config
    head_dim = hf.to_dict().get("head_dim") or hf.hidden_size // hf.num_attention_heads
    assert (case.cfg.head_dim, case.cfg.norm_eps, case.cfg.rope_theta) == (
        head_dim, hf.rms_norm_eps, hf.rope_parameters["rope_theta"])
    assert case.cfg.qkv_bias == (case.name in ("qwen2", "llama-bias"))
    assert case.cfg.out_bias == (case.name == "llama-bias")
    want_scaling = None
    if case.name == "llama3-rope":
        want_scaling = RopeScaling(**{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"})
    assert case.cfg.rope_scaling == want_scaling
    # Every HF bias landed in the parameter of the same name (zero-initialised otherwise).
    for i, layer in enumerate(case.model.layers):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            hf_bias = getattr(case.hf.model.layers[i].self_attn, p).bias
            ours = getattr(layer.attn, p).bias
            assert (ours is None) == (hf_bias is None), (i, p)
            if hf_bias is not None:
                np.testing.assert_array_equal(np.asarray(ours[...]), hf_bias.detach().numpy())


def test_dense_mode_logits_equal_transformers(case):
    np.testing.assert_allclose(_logits(case.model, case.long, "dense"), case.ref_long, atol=1e-4, rtol=0)


def test_sparse_mode_equals_transformers_within_top_k_blocks(case):
    # T = 12 = top_k * block_size: every query sees <= top_k blocks, so all are selected.
    np.testing.assert_allclose(_logits(case.model, case.short, "sparse"), case.ref_short, atol=1e-4, rtol=0)


def test_sparse_mode_drops_blocks_on_long_sequences(case):
    sparse = _logits(case.model, case.long, "sparse")
    assert np.isfinite(sparse).all()
    exact = TOP_K * BLOCK
    # Positions < 12 see at most top_k blocks in every layer: still exact.
    np.testing.assert_allclose(sparse[:, :exact], case.ref_long[:, :exact], atol=1e-4, rtol=0)
    # Beyond, blocks are dropped and the logits move away from the dense model's.
    assert np.abs(sparse[:, exact:] - case.ref_long[:, exact:]).max() > 1e-2
    # ... because the index branch selects top_k of the 10 visible blocks of the last query.
    last = np.asarray(_first_msa_layer_selection(case.model, jnp.asarray(case.long)))[:, -1]  # [B, Hkv, K]
    assert (last >= 0).all() and last.shape[-1] == TOP_K < T_LONG // BLOCK
    assert (last[..., -1] == (T_LONG - 1) // BLOCK).all()  # the local block, then the others


def test_llama3_rope_scaling_is_the_published_rule_and_matters(cases):
    case = cases("llama3-rope")
    scaling, theta, D = case.cfg.rope_scaling, case.cfg.rope_theta, case.cfg.head_dim
    # The model's frequencies are transformers' (the llama3 rule, implemented independently).
    np.testing.assert_allclose(rope_frequencies(D, theta, scaling), case.hf.model.rotary_emb.inv_freq.numpy(),
                               rtol=1e-6, atol=0)
    # All three regimes occur: kept (ratio 1), interpolated (between), divided by factor 8.
    ratio = rope_frequencies(D, theta) / rope_frequencies(D, theta, scaling)
    assert ratio[0] == 1 and 1 < ratio[1] < 8 and np.allclose(ratio[2:], 8, rtol=1e-6), ratio
    # The same weights without the scaling are far from transformers at T_LONG = 40 > 32: the
    # parity tests of this case (dense mode to 1e-4 at T_LONG) really test the scaling.
    unscaled = conv.MSATransformer(dataclasses.replace(case.cfg, rope_scaling=None), rngs=nnx.Rngs(0))
    nnx.update(unscaled, nnx.state(case.model))
    assert np.abs(_logits(unscaled, case.long, "dense") - case.ref_long).max() > 1e-2


def test_index_branch_follows_the_derived_rule(case):
    cfg, G = case.cfg, case.cfg.num_q_heads // case.cfg.num_kv_heads
    for i, layer in enumerate(case.model.layers):
        hf_attn = case.hf.model.layers[i].self_attn
        if i < cfg.dense_layers:
            assert not hasattr(layer.attn, "index_q_proj")
            continue
        wq = hf_attn.q_proj.weight.detach().numpy()  # [Hq*D, d_model]
        wk = hf_attn.k_proj.weight.detach().numpy()  # [Hkv*D, d_model]
        D = cfg.head_dim
        want_q = wq.reshape(cfg.num_kv_heads, G, D, -1).mean(axis=1).reshape(cfg.num_kv_heads * D, -1).T
        want_k = wk.reshape(cfg.num_kv_heads, D, -1).mean(axis=0).T
        np.testing.assert_allclose(np.asarray(layer.attn.index_q_proj.kernel[...]), want_q, atol=1e-7)
        np.testing.assert_allclose(np.asarray(layer.attn.index_k_proj.kernel[...]), want_k, atol=1e-7)
        assert (np.asarray(layer.attn.index_q_norm.scale[...]) == 1).all()
        assert (np.asarray(layer.attn.index_k_norm.scale[...]) == 1).all()


def test_load_converted_round_trips_bitwise(case):
    loaded = conv.load_converted(case.out_dir)
    assert loaded.cfg == case.cfg
    want = dict(nnx.to_flat_state(nnx.state(case.model, nnx.Param)))
    got = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    assert want.keys() == got.keys()
    for path in want:
        a, b = np.asarray(want[path][...]), np.asarray(got[path][...])
        assert a.dtype == b.dtype and np.array_equal(a, b), path


# ------------------------------------------------------- generate.py on a conversion


def _hf_greedy(model, prompt, n):
    """transformers' argmax continuation of prompt [P] by n tokens (full forward each step, fp32)."""
    tokens, logits = list(prompt), []
    for _ in range(n):
        last = _hf_logits(model, [tokens])[0, -1]
        logits.append(last)
        tokens.append(int(np.argmax(last)))
    return np.asarray(tokens[len(prompt):]), np.stack(logits)


def test_generate_loads_a_conversion_and_continues_like_transformers(cases, capsys):
    case = cases("llama")  # sharded, tied embeddings, a dense first layer
    model, model_cfg, train_cfg = gen_lib.load(case.out_dir)
    assert train_cfg is None and model_cfg.to_json() == case.cfg.to_json()
    prompt = np.random.default_rng(5).integers(0, VOCAB, 6)
    # Sparse mode while every query sees <= top_k blocks (6 + 5 inputs <= 12 = top_k x block_size),
    # then dense mode far beyond that: both must be transformers' greedy continuation.
    for mode, n in (("sparse", 6), ("dense", 20)):
        want, want_logits = _hf_greedy(case.hf, prompt, n)
        got, got_logits = gen_lib.generate(model, prompt, n, temperature=0.0, mode=mode, return_logits=True)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got_logits, want_logits, atol=1e-4, rtol=0)
    # The tokens alone are weak (this random model soon repeats one token); the logits of
    # every step, to 1e-4, are what pins the cache down.
    assert len(set(want.tolist())) > 1

    # The command line: ids in, the new ids out.
    capsys.readouterr()
    gen_lib.main(["--ckpt-dir", case.out_dir, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "6",
                  "--mode", "dense"])
    assert [int(t) for t in capsys.readouterr().out.split()] == want[:6].tolist()
    with pytest.raises(ValueError, match="--prompt-ids"):  # a converted model's vocabulary is not bytes
        gen_lib.main(["--ckpt-dir", case.out_dir, "--prompt", "def "])
    with pytest.raises(ValueError, match=re.escape(f"[0, vocab_size={VOCAB})")):
        gen_lib.main(["--ckpt-dir", case.out_dir, "--prompt-ids", f"1 {VOCAB}"])
    with pytest.raises(ValueError, match="step"):
        gen_lib.load(case.out_dir, step=3)


# ------------------------------------------------------------------- options and CLI


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen2_base") / "hf")
    return path, _save_hf("qwen2", path, seed=7)


def test_cli_flags_random_init_and_bfloat16(qwen2_dir, tmp_path):
    hf_dir, _ = qwen2_dir
    out = str(tmp_path / "out")
    argv = [hf_dir, out, "--top-k", "2", "--block-size", "8", "--index-head-dim", "8", "--dense-layers", "1",
            "--index-init", "random", "--dtype", "bfloat16", "--seed", "3"]
    assert conv.main(argv) == 0
    with pytest.raises(ValueError, match="overwrite"):
        conv.main(argv)
    model = conv.load_converted(out)
    cfg = model.cfg
    assert (cfg.top_k, cfg.block_size, cfg.index_head_dim, cfg.dense_layers) == (2, 8, 8, 1)
    assert json.load(open(os.path.join(out, conv.INFO_FILE)))["index_init"] == "random"
    assert model.embed.embedding[...].dtype == jnp.bfloat16
    kernel = np.asarray(model.layers[1].attn.index_q_proj.kernel[...], np.float32)  # [64, Hkv * 8]
    assert kernel.shape == (64, 16)
    assert abs(kernel.std() - 1 / 8) < 0.02 and abs(kernel.mean()) < 0.02  # Normal(0, 1/sqrt(d_model))
    assert np.isfinite(_logits(model, np.zeros((1, 20), np.int64), "sparse")).all()


def test_derived_init_needs_index_head_dim_equal_head_dim(qwen2_dir):
    with pytest.raises(ValueError, match="index_head_dim"):
        conv.convert(qwen2_dir[0], None, index_head_dim=8)


def test_bfloat16_checkpoint_is_read_exactly(qwen2_dir, tmp_path):
    _, hf = qwen2_dir
    hf_bf16 = str(tmp_path / "bf16")
    hf.to(torch.bfloat16).save_pretrained(hf_bf16, safe_serialization=True)
    hf.to(torch.float32)
    for dtype in ("float32", "bfloat16"):
        model, _ = conv.convert(hf_bf16, None, dtype=dtype)
        want = hf.model.layers[1].self_attn.q_proj.weight.detach().to(torch.bfloat16).float().numpy().T
        got = model.layers[1].attn.q_proj.kernel[...]
        assert got.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_config_fields_from_older_and_newer_transformers():
    base = dict(model_type="mistral", vocab_size=10, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)
    old = conv.model_config_from_hf({**base, "rope_theta": 1e6, "sliding_window": 256})  # window covers all
    new = conv.model_config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert old.rope_theta == new.rope_theta == 1e6 and old.head_dim == 8 and old.index_head_dim == 8
    assert conv.model_config_from_hf(base).rope_theta == 10000.0
    assert old.rope_scaling is new.rope_scaling is None
    # llama3 in all three spellings; original_max_position_embeddings defaults to
    # max_position_embeddings, as in transformers.
    llama3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    spellings = [
        {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **llama3}},
        {"rope_theta": 5e5, "rope_scaling": {"type": "llama3", **llama3}},
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **llama3}},
    ]
    for fields in spellings:
        cfg = conv.model_config_from_hf({**base, **fields})
        assert cfg.rope_theta == 5e5 and cfg.rope_scaling == RopeScaling(original_max_position_embeddings=256, **llama3)


# ----------------------------------------------------------------------- error paths


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_tensors(hf_dir, edit):
    path = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(hf_dir, **fields):
    path = os.path.join(hf_dir, "config.json")
    cfg = json.load(open(path))
    cfg.update(fields)
    json.dump(cfg, open(path, "w"))


def _unknown_key(t):
    t["model.layers.0.self_attn.q_scale"] = np.ones(4, np.float32)


def _missing_key(t):
    del t["model.layers.1.mlp.up_proj.weight"]


def _wrong_shape(t):
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"].T.copy()


TENSOR_ERRORS = {
    "model.layers.0.self_attn.q_scale": _unknown_key,
    "model.layers.1.mlp.up_proj.weight": _missing_key,
    "model.layers.0.self_attn.k_proj.weight": _wrong_shape,
}


@pytest.mark.parametrize("key", sorted(TENSOR_ERRORS))
def test_tensor_errors_name_the_key(qwen2_dir, tmp_path, key):
    hf_dir = _copy(qwen2_dir[0], tmp_path / "hf")
    _edit_tensors(hf_dir, TENSOR_ERRORS[key])
    with pytest.raises(ValueError, match=re.escape(key)):
        conv.convert(hf_dir, None)


def test_untied_lm_head_in_a_tied_checkpoint_is_refused(qwen2_dir, tmp_path):
    hf_dir = _copy(qwen2_dir[0], tmp_path / "hf")
    _edit_config(hf_dir, tie_word_embeddings=True)  # lm_head.weight is saved and differs from the embedding
    with pytest.raises(ValueError, match=re.escape("lm_head.weight")):
        conv.convert(hf_dir, None)


def test_missing_shard_is_named(tmp_path):
    hf_dir = tmp_path / "hf"
    os.makedirs(hf_dir)
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}
    json.dump({"weight_map": weight_map}, open(hf_dir / "model.safetensors.index.json", "w"))
    with pytest.raises(ValueError, match="model-00001-of-00002.safetensors"):
        conv.checkpoint_files(str(hf_dir))


def test_pickle_only_directory_is_refused_without_loading(qwen2_dir, tmp_path):
    hf_dir = tmp_path / "hf"
    os.makedirs(hf_dir)
    shutil.copy(os.path.join(qwen2_dir[0], "config.json"), hf_dir)
    (hf_dir / "pytorch_model.bin").write_bytes(b"not a pickle; never opened")
    with pytest.raises(ValueError, match=re.escape("pytorch_model.bin")):
        conv.convert(str(hf_dir), None)


CONFIG_ERRORS = {  # the field the error must name (before any "-") -> config.json edit
    "rope_scaling": dict(rope_scaling={"type": "linear", "factor": 2.0}),  # transformers 4 spelling
    "rope_parameters": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}),
    "partial_rotary_factor": dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
    "sliding_window-qwen2": dict(use_sliding_window=True, sliding_window=16,
                                 layer_types=["full_attention", "sliding_attention"]),
    "sliding_window-mistral": dict(model_type="mistral", sliding_window=16),  # every layer
    "hidden_act": dict(hidden_act="gelu"),
    "model_type": dict(model_type="gpt2"),
}


@pytest.mark.parametrize("field", sorted(CONFIG_ERRORS))
def test_unsupported_configs_are_refused_naming_the_field(qwen2_dir, tmp_path, field):
    hf_dir = _copy(qwen2_dir[0], tmp_path / "hf")
    _edit_config(hf_dir, **CONFIG_ERRORS[field])
    with pytest.raises(ValueError, match=field.split("-")[0]):
        conv.convert(hf_dir, None)


def test_inactive_sliding_window_is_accepted(qwen2_dir, tmp_path):
    # HF applies Qwen2's window only to layers listed as "sliding_attention" in layer_types.
    hf_dir = _copy(qwen2_dir[0], tmp_path / "hf")
    _edit_config(hf_dir, use_sliding_window=True, sliding_window=16, layer_types=["full_attention"] * 2)
    conv.convert(hf_dir, None)


@pytest.mark.parametrize("edit, message", [
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling: rope_type 'dynamic' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_parameters: rope_type 'yarn' is not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}),
     "rope_parameters: rope_type 'llama3' needs low_freq_factor, high_freq_factor"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                           "original_max_position_embeddings": 64}),
     r"rope_parameters: rope_scaling low_freq_factor \(4.0\) must be < high_freq_factor \(1.0\)"),
])
def test_rope_errors_name_the_rope_type_or_field(qwen2_dir, tmp_path, edit, message):
    hf_dir = _copy(qwen2_dir[0], tmp_path / "hf")
    _edit_config(hf_dir, **edit)
    with pytest.raises(ValueError, match=message):
        conv.convert(hf_dir, None)


def test_llama_attention_bias_needs_the_o_proj_bias(qwen2_dir, tmp_path):
    # A Qwen2 checkpoint relabelled as Llama with attention_bias: q/k/v biases are there,
    # o_proj's is not, and the error names it.
    hf_dir = _copy(qwen2_dir[0], tmp_path / "hf")
    _edit_config(hf_dir, model_type="llama", attention_bias=True)
    with pytest.raises(ValueError, match=re.escape("model.layers.0.self_attn.o_proj.bias is missing")):
        conv.convert(hf_dir, None)
