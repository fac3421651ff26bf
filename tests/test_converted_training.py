"""The route after convert.py: text_data.py, train_converted.py (index warm-up, sparse training), evaluate.py.

A tiny random Llama checkpoint is written with numpy (no torch) with a byte-level tokenizer,
converted, and driven through a few steps. Oracles: a loop over the packed stream for the
packing; the backbone's parameters bit for bit and the gradient tree's paths for "stage 1
trains the index branch only"; an uninterrupted run for resume; log-softmax of the full
forward's logits for perplexity; MSA's exactness below the budget for dense vs sparse.
"""

import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")
pytest.importorskip("safetensors")
tokenizers = pytest.importorskip("tokenizers")

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "flax_model"))
import convert as conv  # noqa: E402
import evaluate as ev  # noqa: E402
import text_data  # noqa: E402
import train_converted as tc  # noqa: E402

TOP_K, BLOCK = 2, 8  # budget 16 tokens
SEQ = 48  # 3 budgets


def _byte_tokenizer():
    """Byte-level BPE over the 256 byte symbols, no merges: every byte its own token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A convert.py output of a random 2-layer Llama (G = 2) with a byte tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    hf = root / "hf"
    hf.mkdir()
    V, d, L, Hq, Hkv, D, F = 256, 32, 2, 4, 2, 8, 64
    cfg = dict(model_type="llama", vocab_size=V, hidden_size=d, intermediate_size=F, num_hidden_layers=L,
               num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=D, max_position_embeddings=512,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=10)
    (hf / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    w = lambda *s: (0.2 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    tensors = {"model.embed_tokens.weight": w(V, d), "model.norm.weight": 1 + w(d)}
    for i in range(L):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": 1 + w(d), p + "post_attention_layernorm.weight": 1 + w(d),
                        p + "self_attn.q_proj.weight": w(Hq * D, d), p + "self_attn.k_proj.weight": w(Hkv * D, d),
                        p + "self_attn.v_proj.weight": w(Hkv * D, d), p + "self_attn.o_proj.weight": w(d, Hq * D),
                        p + "mlp.gate_proj.weight": w(F, d), p + "mlp.up_proj.weight": w(F, d),
                        p + "mlp.down_proj.weight": w(d, F)})
    save_file(tensors, str(hf / "model.safetensors"))
    _byte_tokenizer().save(str(hf / "tokenizer.json"))
    out = root / "msa"
    conv.convert(str(hf), str(out), top_k=TOP_K, block_size=BLOCK)
    return str(out)


@pytest.fixture(scope="module")
def packed(converted):
    tok = text_data.load_tokenizer(converted)
    return text_data.pack(text_data.tokenize(tok, text_data.load_documents()[:20]), SEQ)


def test_pack_matches_a_loop():
    docs = [np.arange(100, 100 + n, dtype=np.int32) for n in (5, 1, 9, 3, 7)]
    p = text_data.pack(docs, 6)
    stream = [(int(t), i) for i, d in enumerate(docs) for t in d]
    assert p.tokens.shape == (len(stream) // 6, 6)
    for r in range(p.tokens.shape[0]):
        for c in range(6):
            tok, doc = stream[r * 6 + c]
            assert p.tokens[r, c] == tok
            same_next = c + 1 < 6 and stream[r * 6 + c + 1][1] == doc
            assert p.loss_mask[r, c] == same_next
            assert p.targets[r, c] == (stream[r * 6 + c + 1][0] if same_next else 0)
            first = c == 0 or stream[r * 6 + c - 1][1] != doc
            assert (p.segment_ids[r, c] == p.segment_ids[r, c - 1] + 1) if c and first else True
            assert (p.segment_ids[r, c] == p.segment_ids[r, c - 1]) if c and not first else True
    assert (p.segment_ids[:, 0] == 1).all()
    with pytest.raises(ValueError, match="seq_len"):
        text_data.pack(docs, 1)


def test_eval_text_is_held_out():
    train, held = text_data.load_documents(), text_data.load_documents(split="eval")
    assert held and train and not set(train) & set(held)


def _cfg(converted, **kw):
    return tc.WarmupConfig(model_dir=converted, steps=kw.pop("steps", 6), batch_size=2, seq_len=SEQ,
                           learning_rate=1e-2, lr_warmup_steps=1, **kw)


@pytest.fixture(scope="module")
def run4(converted, packed):
    """Four uninterrupted stage-1 steps (the learning-rate horizon 4)."""
    return tc.warm_up(_cfg(converted, steps=4), progress=False, packed=packed)


@pytest.fixture(scope="module")
def half(converted, packed, tmp_path_factory):
    """The first two of those steps, checkpointed: (ckpt_dir, result)."""
    ckpt = str(tmp_path_factory.mktemp("half"))
    return ckpt, tc.warm_up(_cfg(converted, steps=2, lr_decay_steps=4), ckpt_dir=ckpt, progress=False, packed=packed)


def test_stage1_trains_only_the_index_branch(converted, packed, run4):
    before = nnx.to_flat_state(nnx.state(conv.load_converted(converted), nnx.Param))
    probe = text_data.batch_at(packed, 10_000, batch_size=4)
    kl_of = lambda m: float(np.sum(m(probe.tokens, segment_ids=probe.segment_ids, mode="dense").kl_losses))  # noqa
    after = dict(nnx.to_flat_state(nnx.state(run4.model, nnx.Param)))
    changed = {p for p, v in before if not np.array_equal(np.asarray(v[...]), np.asarray(after[p][...]))}
    index = {p for p, v in before if tc.INDEX_PARAMS(p, v)}
    assert index and changed <= index and len(changed) >= len(index) // 2  # backbone bit for bit
    assert kl_of(run4.model) < kl_of(conv.load_converted(converted))
    assert run4.traces == 1 and all(r["mode"] == "dense" for r in run4.history)
    # The gradient is taken with respect to the index parameters only: the optimizer holds
    # moments for them alone, so no backbone gradient is part of the step.
    moments = nnx.to_flat_state(nnx.state(run4.optimizer))
    shapes = sorted(tuple(np.shape(v[...])) for p, v in moments if "mu" in [str(x) for x in p])
    assert shapes == sorted(tuple(np.shape(v[...])) for p, v in before if tc.INDEX_PARAMS(p, v))


def test_resume_matches_uninterrupted(converted, packed, run4, half):
    ckpt, _ = half
    with pytest.raises(ValueError, match="resume"):
        tc.warm_up(_cfg(converted, steps=4), ckpt_dir=ckpt, progress=False, packed=packed)
    with pytest.raises(ValueError, match="settings differ"):
        tc.warm_up(_cfg(converted, steps=5, lr_decay_steps=4, seed=1), ckpt_dir=ckpt, resume=True,
                   progress=False, packed=packed)
    rest = tc.warm_up(_cfg(converted, steps=4, lr_decay_steps=4), ckpt_dir=ckpt,
                      resume=True, progress=False, packed=packed)
    assert [r["step"] for r in rest.history] == [3, 4]
    np.testing.assert_array_equal([r["loss"] for r in rest.history], [r["loss"] for r in run4.history[2:]])


def test_stage2_from_stage1(converted, packed, half):
    stage1, _ = half
    warm, _ = tc.load_model(stage1, step=2)
    result = tc.warm_up(_cfg(converted, steps=2, stage="full", init_from=stage1), progress=False, packed=packed)
    assert all(r["mode"] == "sparse" and np.isfinite(r["lm_loss"]) for r in result.history)
    first = result.history[0]
    assert first["loss"] == pytest.approx(first["lm_loss"] + first["kl_loss"], rel=1e-5)
    w = lambda m: np.asarray(m.layers[0].mlp.up_proj.kernel[...])  # noqa: E731
    iq = lambda m: np.asarray(m.layers[0].attn.index_q_proj.kernel[...])  # noqa: E731
    assert not np.array_equal(w(result.model), w(warm))  # the backbone trains in stage 2
    # Started from stage 1's index branch, not the conversion's.
    assert not np.array_equal(iq(warm), iq(conv.load_converted(converted)))


def test_perplexity_against_logits(converted, packed):
    model = conv.load_converted(converted)
    rows = text_data.Packed(*(a[:2] for a in packed))
    got = ev.perplexity(model, rows, "dense")
    logits = np.asarray(model(rows.tokens, segment_ids=rows.segment_ids, mode="dense").logits, np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, rows.targets[..., None], -1)[..., 0]
    want = np.exp((nll * rows.loss_mask).sum() / rows.loss_mask.sum())
    assert got["ppl"] == pytest.approx(want, rel=1e-5)
    assert got["tokens"] == int(rows.loss_mask.sum()) and got["tokens_beyond_budget"] < got["tokens"]
    # Sparse mode changes only tokens beyond the budget: at context = budget both agree.
    short = text_data.Packed(*(a[:2, :TOP_K * BLOCK] for a in packed))
    assert ev.perplexity(model, short, "sparse")["ppl"] == pytest.approx(ev.perplexity(model, short, "dense")["ppl"],
                                                                          rel=1e-5)
    assert ev.perplexity(model, rows, "sparse")["ppl"] != pytest.approx(got["ppl"], rel=1e-6)


def test_passkey_prompt_and_cli(converted, tmp_path):
    tok = text_data.load_tokenizer(converted)
    ids = ev.passkey_prompt(tok, 600, 0.5, 12345)
    text = tok.decode(ids.tolist())
    assert 500 < ids.size <= 600 and text.count("12345") == 2 and text.endswith(ev.PASSKEY_QUESTION)
    assert 0.3 < text.index("12345") / len(text) < 0.7
    assert tok.decode(ev.passkey_prompt(tok, 600, 0.0, 12345).tolist()).index("12345") < 250  # after the intro
    with pytest.raises(ValueError, match="depth"):
        ev.passkey_prompt(tok, 600, 1.5, 1)
    with pytest.raises(ValueError, match="too short"):
        ev.passkey_prompt(tok, 200, 0.5, 1)
    out = tmp_path / "eval.json"
    ev.main([converted, "--context", "400", "--windows", "1", "--passkey-depths", "0.5", "--out", str(out)])
    res = json.loads(out.read_text())
    assert set(res["perplexity"]) == {"dense", "sparse"} and res["budget"] == TOP_K * BLOCK
    assert res["passkey"]["sparse"]["trials"][0]["prompt_tokens"] <= 400
    assert np.isfinite(res["sparse_vs_dense_ppl"])


def test_train_converted_cli(converted, tmp_path):
    metrics = tmp_path / "m.json"
    ckpt = str(tmp_path / "ck")
    tc.main([converted, "--steps", "2", "--seq-len", str(SEQ), "--batch-size", "1", "--ckpt-dir", ckpt,
             "--metrics-out", str(metrics)])
    m = json.loads(metrics.read_text())
    assert [r["step"] for r in m["history"]] == [1, 2] and m["config"]["stage"] == "index"
    assert m["trainable_params"] == sum(int(np.prod(np.shape(v[...]))) for p, v in
                                        nnx.to_flat_state(nnx.state(conv.load_converted(converted), nnx.Param))
                                        if tc.INDEX_PARAMS(p, v))
    model, cfg = tc.load_model(ckpt)
    assert cfg.steps == 2 and model.cfg.top_k == TOP_K
    assert jax.tree.leaves(nnx.state(model))  # loads into a usable model


def test_generate_text_prompt_and_eos(converted, capsys):
    import generate as gen

    model = conv.load_converted(converted)
    tok = text_data.load_tokenizer(converted)
    ids = np.asarray(tok.encode("The grass is").ids, np.int32)
    free = gen.generate(model, ids, 6)
    # Stopping at an id the greedy continuation produces at step 3 ends generation there.
    stopped = gen.generate(model, ids, 6, eos_id=int(free[2]))
    np.testing.assert_array_equal(stopped, free[:list(free).index(free[2]) + 1])
    gen.main(["--ckpt-dir", converted, "--prompt", "The grass is", "--max-new-tokens", "6"])
    out = capsys.readouterr().out
    assert out.startswith("The grass is") and out.rstrip("\n") == "The grass is" + tok.decode(free.tolist())


def test_oracle_blocks_against_a_loop(rng):
    B, T, Hq, Hkv, D, Bk, K = 1, 40, 4, 2, 8, 4, 3
    q, k = rng.standard_normal((B, T, Hq, D)), rng.standard_normal((B, T, Hkv, D))
    seg = np.repeat([[1, 2]], [13, 27], axis=1).astype(np.int32)
    got = np.asarray(ev.oracle_blocks(q, k, top_k=K, block_size=Bk, segment_ids=seg))
    start = np.where(np.arange(T) < 13, 0, 13)
    for i in range(T):
        keys = [t for t in range(start[i], i + 1)]
        for g in range(Hkv):
            mass = {}
            for h in range(g * Hq // Hkv, (g + 1) * Hq // Hkv):
                s = np.array([q[0, i, h] @ k[0, t, g] / np.sqrt(D) for t in keys])
                p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                for t, pt in zip(keys, p):
                    j = (t - start[i]) // Bk
                    mass[j] = mass.get(j, 0) + pt / (Hq // Hkv)
            local = (i - start[i]) // Bk
            chosen = sorted((j for j in mass if j < local), key=lambda j: (-mass[j], j))[:K - 1]
            want = chosen + [local] + [-1] * (K - 1 - len(chosen))
            assert got[0, i, g].tolist() == want, (i, g)


def test_oracle_perplexity_is_dense_within_the_budget(converted, packed):
    model = conv.load_converted(converted)
    short = text_data.Packed(*(a[:1, :TOP_K * BLOCK] for a in packed))
    assert ev.perplexity(model, short, "oracle")["ppl"] == pytest.approx(ev.perplexity(model, short, "dense")["ppl"],
                                                                          rel=1e-5)


def test_interrupt_right_after_a_periodic_save(converted, packed, tmp_path, monkeypatch):
    """Ctrl-C after the step a periodic save just wrote: the run stops with that checkpoint
    (saving the same step again used to raise StepAlreadyExistsError)."""

    class StopAfterTwoSteps(tc.train_lib._StopOnInterrupt):
        reads = 0

        @property
        def requested(self):
            StopAfterTwoSteps.reads += 1
            return StopAfterTwoSteps.reads > 2  # the loop reads it before each step

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(tc.train_lib, "_StopOnInterrupt", StopAfterTwoSteps)
    result = tc.warm_up(_cfg(converted, steps=4), ckpt_dir=str(tmp_path), ckpt_every=2, progress=False,
                        packed=packed)
    assert result.step == 2
    assert tc.train_lib.Checkpoints(str(tmp_path), config_cls=tc.WarmupConfig).latest_step() == 2
