"""The Flax example (examples/flax_model): training, compilation count, cached generation, checkpoints.

Tiny configs on CPU: 8-token blocks with top_k 2 so that sequences of 64 tokens really
drop blocks in sparse mode.
"""

import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")
pytest.importorskip("orbax.checkpoint")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples", "flax_model"))
import data  # noqa: E402
import generate as gen_lib  # noqa: E402
import train as train_lib  # noqa: E402
from flax import nnx  # noqa: E402
from model import ModelConfig  # noqa: E402

import msa_jax.nn  # noqa: E402

MODEL = ModelConfig(
    vocab_size=train_lib.VOCAB_SIZE, d_model=32, num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=8,
    ffn_dim=64, index_head_dim=16, top_k=2, block_size=8, dense_layers=1,
)
TRAIN = train_lib.TrainConfig(
    steps=40, batch_size=4, seq_len=64, warmup_steps=20, learning_rate=1e-2, lr_warmup_steps=5,
    corpus_bytes=300_000,
)


@pytest.fixture(scope="module")
def corpus():
    return data.load_corpus(TRAIN.corpus_bytes)


@pytest.fixture(scope="module")
def trained(corpus):
    return train_lib.train(MODEL, TRAIN, progress=False, corpus=corpus)


def _col(history, key, steps):
    return np.array([r[key] for r in history if r["step"] in steps])


def test_data_is_a_function_of_the_step(corpus):
    a = data.batch_at(corpus, 7, batch_size=3, seq_len=32, seed=1)
    b = data.batch_at(corpus, 7, batch_size=3, seq_len=32, seed=1)
    c = data.batch_at(corpus, 8, batch_size=3, seq_len=32, seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    tokens, targets = a
    assert (tokens[:, 0] == data.BOS).all()
    np.testing.assert_array_equal(tokens[:, 1:], targets[:, :-1])  # targets are the next token
    assert data.decode(data.encode("déf x")) == "déf x"


def test_training_lowers_lm_loss_and_warmup_lowers_kl(trained):
    h = trained.history
    assert [r["step"] for r in h] == list(range(1, TRAIN.steps + 1))
    assert [r["mode"] for r in h] == ["dense"] * TRAIN.warmup_steps + ["sparse"] * (TRAIN.steps - TRAIN.warmup_steps)
    lm_first, lm_last = _col(h, "lm_loss", range(1, 4)).mean(), _col(h, "lm_loss", range(36, 41)).mean()
    # ln(320) = 5.77 at initialisation; the drop is 3.3 to 3.5 nats for seeds 0, 1, 2.
    assert lm_last < lm_first - 2.0, (lm_first, lm_last)
    # The indexer learns in dense warm-up: the KL of its second half is 0.15 to 0.5 times that
    # of its first steps for seeds 0, 1, 2.
    kl_first, kl_late = _col(h, "kl_loss", range(1, 4)).mean(), _col(h, "kl_loss", range(11, 21)).mean()
    assert kl_late < 0.7 * kl_first, (kl_first, kl_late)
    # Only the MSA layer has a KL loss; the dense first layer reports 0.
    kl_layers = np.array([r["kl_per_layer"] for r in h])
    assert (kl_layers[:, 0] == 0).all() and (kl_layers[:, 1] > 0).all()
    assert all(np.isfinite(r["loss"]) for r in h)


@pytest.fixture(scope="module")
def forward():
    """forward(model, tokens, mode) -> (logits, kl_losses, [block_indices of each MSA layer]), jitted.

    The MSA layers' block_indices are caught by wrapping the op the layer calls while the
    forward is traced, and returned as outputs of the jitted function.
    """
    caught = None
    original = msa_jax.nn.sparse_attention

    def spy(*args, **kwargs):
        res = original(*args, **kwargs)
        if caught is not None:
            caught.append(res.block_indices)
        return res

    @functools.partial(jax.jit, static_argnames=("graphdef", "mode"))
    def fwd(graphdef, state, tokens, mode):
        nonlocal caught
        caught = []
        out = nnx.merge(graphdef, state)(tokens, mode=mode)
        blocks, caught = caught, None
        return out.logits, out.kl_losses, blocks

    def run(model, tokens, mode):
        graphdef, state = nnx.split(model)
        return jax.device_get(fwd(graphdef, state, jnp.asarray(tokens), mode=mode))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(msa_jax.nn, "sparse_attention", spy)
        yield run


def test_trained_indexer_follows_the_main_branch(trained, corpus, forward):
    """With the main branch fixed, the trained index projections give a much lower KL than
    their initial values (about half): the KL loss did train them."""
    windows = [data.batch_at(corpus, 10_000 + i, batch_size=1, seq_len=TRAIN.seq_len, seed=99)[0] for i in range(4)]
    kl = lambda model, mode: sum(float(forward(model, w, mode)[1].sum()) for w in windows)
    model = nnx.clone(trained.model)
    trained_kl = {mode: kl(model, mode) for mode in ("dense", "sparse")}
    init = train_lib.build_model(MODEL, TRAIN)
    for layer, fresh in zip(model.layers, init.layers):
        if isinstance(layer.attn, msa_jax.nn.MSAAttention):
            for name in ("index_q_proj", "index_k_proj", "index_q_norm", "index_k_norm"):
                nnx.update(getattr(layer.attn, name), nnx.state(getattr(fresh.attn, name)))
    for mode in ("dense", "sparse"):
        assert trained_kl[mode] < 0.75 * kl(model, mode), (mode, trained_kl[mode], kl(model, mode))


def test_train_step_compiles_once_per_mode(trained, corpus):
    assert trained.traces == {"dense": 1, "sparse": 1}
    # The counter does see retracing: another batch shape traces the step again.
    graphdef, state = nnx.split((trained.model, trained.optimizer))
    tokens, targets = data.batch_at(corpus, 0, batch_size=2, seq_len=32)
    trained.step_fn.jitted.trace(state, tokens, targets, mode="dense")  # traces, runs nothing
    assert trained.step_fn.traces == {"dense": 2, "sparse": 1}


P, N = 41, 24  # prompt and new tokens: P + N - 1 = 64 = TRAIN.seq_len, one forward shape for all


def _prompt(corpus):
    return np.concatenate([[data.BOS], corpus[1000:1000 + P - 1]]).astype(np.int32)


def test_cached_greedy_generation_matches_full_forward(trained, corpus, forward):
    model, cfg = trained.model, MODEL
    prompt = _prompt(corpus)
    before = gen_lib.TRACES["decode"]
    new, new_logits = gen_lib.generate(model, prompt, N, temperature=0.0, rng=None, return_logits=True)
    assert new.shape == (N,) and new.dtype == np.int32 and new_logits.shape == (N, cfg.vocab_size)
    assert gen_lib.TRACES["decode"] - before == 1  # N - 1 decode steps, one compilation

    seq = np.concatenate([prompt, new])[None, :-1]  # [1, P + N - 1]: every input the cache saw
    logits, _, (blocks,) = forward(model, seq, "sparse")  # one MSA layer
    # Greedy decoding with the cache picks, token by token, the full forward's argmax, from
    # the same logits (a weak model's argmax alone would survive a cache that never grows).
    np.testing.assert_array_equal(np.argmax(logits[0, P - 1:], axis=-1), new)
    np.testing.assert_allclose(new_logits, logits[0, P - 1:], rtol=1e-4, atol=1e-4)

    # Blocks are really dropped: each row keeps min(top_k, visible) blocks, and some rows
    # keep fewer than they can see.
    T = seq.shape[1]
    kept = (blocks[0] >= 0).sum(-1)  # [T, Hkv]
    visible = np.arange(T) // cfg.block_size + 1
    np.testing.assert_array_equal(kept, np.minimum(cfg.top_k, visible)[:, None].repeat(cfg.num_kv_heads, 1))
    assert (kept < visible[:, None]).any()
    # ... and dropping them changes the logits of late positions (so the comparison is not vacuous).
    dense_logits = forward(model, seq, "dense")[0]
    early = cfg.top_k * cfg.block_size
    np.testing.assert_allclose(dense_logits[0, :early], logits[0, :early], rtol=1e-4, atol=1e-4)
    assert np.abs(dense_logits[0, early:] - logits[0, early:]).max() > 1e-3

    # Same settings, any temperature: the compiled decode step is reused.
    again = gen_lib.generate(model, prompt, N, temperature=0.0)
    hot = [gen_lib.generate(model, prompt, N, temperature=5.0, rng=jax.random.key(s)) for s in (0, 1)]
    assert gen_lib.TRACES["decode"] - before == 1
    np.testing.assert_array_equal(again, new)
    assert not np.array_equal(hot[0], hot[1]) and not np.array_equal(hot[0], new)


def test_batched_prompts_of_different_lengths(trained, corpus, forward):
    """Three prompts of different lengths in one batch, each with its own bf16 pages: every
    row continues its own prompt with the full forward's argmax (fp32 model, so the caches'
    bf16 rounding moves the logits a little: the argmax must agree wherever the forward's
    top-2 gap exceeds twice that movement, which is almost everywhere); the contiguous bf16
    cache gives the same tokens where it applies (equal lengths); FP8 pages move the first
    new token's logits by a few percent (FP8 selection may swap near-tied blocks)."""
    model = trained.model
    prompts = [corpus[2000 + 100 * i:2000 + 100 * i + n].astype(np.int32) for i, n in enumerate((41, 17, 30))]
    new, logits = gen_lib.generate(model, prompts, 8, return_logits=True, kv_dtype="bf16")
    assert new.shape == (3, 8)
    # One forward of the three sequences, right-padded: causal, so padding changes nothing before it.
    seqs = np.zeros((3, 41 + 7), np.int32)
    for b, prompt in enumerate(prompts):
        seqs[b, :len(prompt) + 7] = np.concatenate([prompt, new[b, :-1]])
    full = forward(model, seqs, "sparse")[0]
    decided = 0
    for b, prompt in enumerate(prompts):
        want = full[b, len(prompt) - 1:len(prompt) + 7]
        err = np.abs(logits[b] - want).max()
        assert err < 0.05, err  # bf16 K/V against the fp32 forward (measured: 0.004-0.005)
        top2 = np.sort(want, axis=-1)[:, -2:]
        sure = top2[:, 1] - top2[:, 0] > 2 * err
        np.testing.assert_array_equal(np.argmax(want, -1)[sure], new[b][sure])
        decided += sure.sum()
    assert decided >= 20, decided  # of 24 tokens (measured: all 24)
    contiguous = gen_lib.generate(model, prompts[0], 8, cache="contiguous", cache_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(contiguous, new[0])
    with pytest.raises(ValueError, match="contiguous cache needs prompts of one length"):
        gen_lib.generate(model, prompts, 2, cache="contiguous")
    _, fp8 = gen_lib.generate(model, prompts, 1, return_logits=True, kv_dtype="fp8")
    rel = np.linalg.norm(fp8[:, 0] - logits[:, 0]) / np.linalg.norm(logits[:, 0])
    assert 1e-4 < rel < 0.1, rel  # measured: 0.4%


def test_sample():
    logits = jnp.log(jnp.tile(jnp.array([[0.1, 0.2, 0.3, 0.4]]), (4000, 1)))
    key = jax.random.key(0)
    np.testing.assert_array_equal(gen_lib.sample(logits, key, 0.0, None), 3)  # greedy
    counts = np.bincount(np.asarray(gen_lib.sample(logits, key, 1.0, 2)), minlength=4) / 4000
    np.testing.assert_allclose(counts, [0, 0, 3 / 7, 4 / 7], atol=0.03)  # top-2, renormalised
    counts = np.bincount(np.asarray(gen_lib.sample(logits, key, 1.0, None)), minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.1, 0.2, 0.3, 0.4], atol=0.03)
    with pytest.raises(ValueError, match="rng"):
        gen_lib.generate(None, np.zeros(3, np.int32), 2, temperature=1.0)


def _leaves_equal(a, b):
    la, lb = jax.tree.leaves(nnx.to_pure_dict(nnx.state(a))), jax.tree.leaves(nnx.to_pure_dict(nnx.state(b)))
    assert len(la) == len(lb) > 0
    return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


def test_checkpoint_round_trip_and_exact_resume(tmp_path, trained, corpus):
    # Interrupted after step 19 of the fixture's 40-step run (same schedule horizon).
    cfg = dataclasses.replace(TRAIN, lr_decay_steps=TRAIN.steps)
    ckpt = str(tmp_path / "ckpt")
    first = train_lib.train(MODEL, dataclasses.replace(cfg, steps=19), ckpt_dir=ckpt, ckpt_every=10,
                            progress=False, corpus=corpus)
    ckpts = train_lib.Checkpoints(ckpt)
    assert ckpts.latest_step() == 19
    assert ckpts.configs() == (MODEL, dataclasses.replace(cfg, steps=19))

    # Round trip: a fresh model and optimizer take exactly the saved parameters and state.
    model = train_lib.build_model(MODEL, cfg)
    optimizer = train_lib.make_optimizer(model, cfg)
    assert not _leaves_equal(model, first.model)
    assert ckpts.restore(model, optimizer) == 19
    assert _leaves_equal(model, first.model) and _leaves_equal(optimizer, first.optimizer)
    assert int(optimizer.step[...]) == 19
    ckpts.close()

    # Resume to step 22: step 20 (the last dense one), 21 and 22 (sparse) as if never interrupted.
    rest = train_lib.train(MODEL, dataclasses.replace(cfg, steps=22), ckpt_dir=ckpt, resume=True, progress=False,
                           corpus=corpus)
    assert [(r["step"], r["mode"]) for r in rest.history] == [(20, "dense"), (21, "sparse"), (22, "sparse")]
    for key in ("loss", "lm_loss", "kl_loss", "grad_norm"):
        assert _col(rest.history, key, (20, 21, 22)).tolist() == _col(trained.history, key, (20, 21, 22)).tolist(), key

    with pytest.raises(ValueError, match="seed"):  # a resumed run may not change what steps compute
        train_lib.train(MODEL, dataclasses.replace(cfg, seed=1, steps=23), ckpt_dir=ckpt, resume=True,
                        progress=False, corpus=corpus)


def test_dense_baseline_is_all_dense(corpus):
    """--attention dense-cudnn: every layer is dense GQA (cuDNN on GPU), with no index branch."""
    cfg = dataclasses.replace(TRAIN, attention="dense-cudnn")
    model = train_lib.build_model(MODEL, cfg)
    assert [type(layer.attn) for layer in model.layers] == [msa_jax.nn.GQAAttention] * MODEL.num_layers
    tokens = jnp.asarray(data.batch_at(corpus, 0, batch_size=2, seq_len=64)[0])
    assert float(jnp.sum(model(tokens).kl_losses)) == 0.0


def test_command_lines(tmp_path, capsys):
    ckpt = str(tmp_path / "cli")
    flags = ["--preset", "cpu", "--steps", "2", "--warmup-steps", "3", "--seq-len", "80", "--batch-size", "2",
             "--num-layers", "2", "--ckpt-dir", ckpt]
    train_lib.main(flags)
    train_lib.main(flags[:3] + ["3"] + flags[4:] + ["--resume"])  # one more (dense) step
    assert train_lib.Checkpoints(ckpt).latest_step() == 3
    with pytest.raises(ValueError, match="batch_size"):  # only --steps may change on resume
        train_lib.main(flags[:3] + ["5"] + flags[4:9] + ["4"] + flags[10:] + ["--resume"])
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_lib.main(flags)
    capsys.readouterr()
    gen_lib.main(["--ckpt-dir", ckpt, "--prompt", "def ", "--max-new-tokens", "5"])
    out = capsys.readouterr().out
    assert out.startswith("def ")
    gen_lib.main(["--ckpt-dir", ckpt, "--prompt", "def ", "--prompt", "import os", "--max-new-tokens", "1",
                  "--kv-dtype", "fp8"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[0] def ") and out[1].startswith("[1] import os")
