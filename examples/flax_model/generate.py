"""Generate text with the example MSA decoder and its KV cache.

    python examples/flax_model/generate.py --ckpt-dir /tmp/msa_ckpt --prompt "def main(" --max-new-tokens 200
    python examples/flax_model/generate.py --ckpt-dir /tmp/msa_ckpt --prompt "import " --temperature 0.8 --top-k 40
    python examples/flax_model/generate.py --ckpt-dir /tmp/llama_msa --prompt-ids "128000 791 6864" --max-new-tokens 20

--ckpt-dir is either kind of directory the example writes (see `load`): a train.py
--ckpt-dir, whose byte-level model takes text (--prompt) or ids, or a convert.py OUT_DIR,
whose model speaks its HuggingFace tokenizer's ids: pass them with --prompt-ids (tokenize
with the source model's tokenizer); the new ids are printed, space-separated.

The prompt is prefilled in one call (its k/v/index_k written into the cache), then one
token per call of a jitted decode step that reads the whole cache: sparse MSA selects
top_k blocks per new token exactly as in training. Both calls are jitted; the decode step
compiles once per (model structure, batch, cache length, top_k); the temperature is traced.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import convert as convert_lib  # noqa: E402
import data  # noqa: E402
import train as train_lib  # noqa: E402

# Traces per jitted function ("prefill", "decode"): the decode step must trace once per setting.
TRACES: collections.Counter = collections.Counter()


def sample(logits, rng, temperature, top_k: int | None):
    """Next tokens int32 [B] from logits [B, V]: argmax where temperature == 0, else sampled
    from softmax(logits / temperature) restricted to the top_k largest (all when None).

    `temperature` is traced (one compilation serves greedy and every temperature); `top_k`
    is static (lax.top_k needs it).
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1], the k-th largest
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    safe_t = jnp.where(temperature > 0, temperature, 1.0)
    sampled = jax.random.categorical(rng, logits / safe_t, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "top_k"))
def _prefill(graphdef, state, tokens, caches, rng, temperature, *, mode, top_k):
    """Writes the prompt [B, P] into the caches; returns (first new token [B], its logits [B, V], caches)."""
    TRACES["prefill"] += 1
    out = nnx.merge(graphdef, state)(tokens, caches=caches, mode=mode)
    return sample(out.logits[:, -1], rng, temperature, top_k), out.logits[:, -1], out.caches


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "top_k"), donate_argnames="caches")
def _decode(graphdef, state, token, caches, rng, temperature, *, mode, top_k):
    """Feeds token [B] at each row's cache length; returns (next token [B], its logits [B, V], caches)."""
    TRACES["decode"] += 1
    out = nnx.merge(graphdef, state)(token[:, None], caches=caches, mode=mode)
    return sample(out.logits[:, -1], rng, temperature, top_k), out.logits[:, -1], out.caches


def generate(model, prompt_tokens, max_new_tokens: int, temperature: float = 0.0, rng=None, *,
             top_k: int | None = None, mode: str = "sparse", cache_dtype=None, callback=None,
             return_logits: bool = False):
    """Continues the prompt by max_new_tokens tokens with the model's KV caches.

    Args:
      model: an `MSATransformer`.
      prompt_tokens: int [P] or [B, P] (every row the same length P >= 1).
      max_new_tokens: tokens to generate (>= 1).
      temperature: 0 for greedy (argmax), else the sampling temperature.
      rng: a jax PRNG key; needed when temperature > 0.
      top_k: sample only among the top_k most likely tokens (None: all).
      mode: attention mode of the MSA layers ("sparse", or "dense" to compare).
      cache_dtype: dtype of the caches; default the model's compute dtype.
      callback: called with each new token batch, int32 numpy [B], as it is produced.
      return_logits: also return the logits each new token was drawn from.

    Returns:
      int32 numpy [B, max_new_tokens] (or [max_new_tokens] for a 1-D prompt); with
      return_logits, a pair (tokens, float32 logits [B, max_new_tokens, vocab] or
      [max_new_tokens, vocab]).

    Raises:
      ValueError: for an empty prompt, max_new_tokens < 1, a negative temperature, top_k
        out of [1, vocab_size], or temperature > 0 without rng.
    """
    prompt = np.asarray(prompt_tokens, np.int32)
    squeeze = prompt.ndim == 1
    prompt = prompt[None] if squeeze else prompt
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt_tokens must be int [P] or [B, P] with P >= 1, got shape {np.shape(prompt_tokens)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and rng is None:
        raise ValueError("temperature > 0 samples: pass rng (a jax.random key)")
    vocab = model.cfg.vocab_size
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be None or in [1, vocab_size={vocab}], got {top_k}")
    temperature = jnp.float32(temperature)
    rng = jax.random.key(0) if rng is None else rng  # unused when greedy
    keys = jax.random.split(rng, max_new_tokens)
    B, P = prompt.shape
    caches = model.init_caches(B, P + max_new_tokens, cache_dtype or model.embed.dtype)
    graphdef, state = nnx.split(model)
    common = dict(graphdef=graphdef, mode=mode, top_k=top_k, temperature=temperature)

    out, logits = [], []
    for i in range(max_new_tokens):
        if i == 0:
            token, last, caches = _prefill(state=state, tokens=jnp.asarray(prompt), caches=caches, rng=keys[0],
                                           **common)
        else:
            token, last, caches = _decode(state=state, token=token, caches=caches, rng=keys[i], **common)
        out.append(np.asarray(token))
        if return_logits:
            logits.append(np.asarray(last))
        if callback:
            callback(out[-1])
    tokens = np.stack(out, axis=1)
    if not return_logits:
        return tokens[0] if squeeze else tokens
    logits = np.stack(logits, axis=1)
    return (tokens[0], logits[0]) if squeeze else (tokens, logits)


def load(ckpt_dir: str, step: int | None = None):
    """(model, ModelConfig, TrainConfig or None) from a directory that train.py or convert.py wrote.

    The one loader of the example; the directory's content says which writer made it:
      - convert.py OUT_DIR, recognised by its `model_config.json`: the converted model via
        `convert.load_converted`, in the dtype it was converted to (parameters and compute);
        TrainConfig is None. It holds a single checkpoint, so `step` must be None.
      - otherwise a train.py --ckpt-dir (orbax CheckpointManager): checkpoint `step`
        (default: the latest), parameters only, built as the run built it (float32
        parameters, the run's compute dtype).
    Either way the parameters are the same pure-dict tree of `nnx.state(model)`.

    Raises:
      ValueError: `step` given for a converted directory.
      FileNotFoundError: ckpt_dir holds neither (no model_config.json and no checkpoint).
    """
    if os.path.exists(os.path.join(ckpt_dir, convert_lib.CONFIG_FILE)):
        if step is not None:
            raise ValueError(f"{ckpt_dir} is a convert.py output (one checkpoint, no steps); got step={step}")
        model = convert_lib.load_converted(ckpt_dir)
        return model, model.cfg, None
    if not os.path.isdir(ckpt_dir):  # CheckpointManager would create it
        raise FileNotFoundError(f"{ckpt_dir}: no such directory")
    ckpts = train_lib.Checkpoints(ckpt_dir)
    try:
        model_cfg, train_cfg = ckpts.configs(step)
        model = train_lib.build_model(model_cfg, train_cfg)
        ckpts.restore(model, step=step)
    finally:
        ckpts.close()
    return model, model_cfg, train_cfg


def _prompt(args, model_cfg, byte_vocab: bool) -> tuple[np.ndarray, str | None]:
    """(prompt tokens int32 [P], the prompt text or None for ids) from --prompt / --prompt-ids."""
    if args.prompt is not None and args.prompt_ids is not None:
        raise ValueError("pass --prompt (text) or --prompt-ids (token ids), not both")
    if args.prompt_ids is not None:
        try:
            ids = np.asarray([int(t) for t in args.prompt_ids.replace(",", " ").split()], np.int32)
        except ValueError:
            raise ValueError(f"--prompt-ids: expected integers separated by spaces or commas, "
                             f"got {args.prompt_ids!r}") from None
        # nnx.Embed would clamp an out-of-range id to a wrong embedding without a word.
        if ids.size and not ((ids >= 0) & (ids < model_cfg.vocab_size)).all():
            raise ValueError(f"--prompt-ids: ids must lie in [0, vocab_size={model_cfg.vocab_size}), "
                             f"got {ids.tolist()}")
        return ids, None
    if not byte_vocab:
        # Byte tokens are valid ids of a HF vocabulary too: this would run and print noise.
        raise ValueError(f"{args.ckpt_dir} holds a converted model, whose vocabulary is its HuggingFace "
                         "tokenizer's, not bytes: pass --prompt-ids (ids from the source model's tokenizer)")
    text = "def " if args.prompt is None else args.prompt
    return data.encode(text), text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-dir", required=True, help="a train.py --ckpt-dir or a convert.py OUT_DIR")
    p.add_argument("--step", type=int, help="train.py checkpoint step (default: the latest)")
    p.add_argument("--prompt", help='text, as byte tokens (train.py models only; default "def ")')
    p.add_argument("--prompt-ids", help="prompt token ids, space- or comma-separated; the new ids are printed")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=("sparse", "dense"), default="sparse")
    args = p.parse_args(argv)

    model, model_cfg, train_cfg = load(args.ckpt_dir, args.step)
    prompt, text = _prompt(args, model_cfg, byte_vocab=train_cfg is not None)  # train.py models are byte-level
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(text or "")
    sys.stdout.flush()

    def show(token):
        if text is None:
            sys.stdout.write(f"{int(token[0])} ")
        else:
            sys.stdout.write(utf8.decode(bytes(int(t) for t in token if t < 256)))
        sys.stdout.flush()

    start = time.perf_counter()
    generate(model, prompt, args.max_new_tokens, args.temperature, jax.random.key(args.seed), top_k=args.top_k,
             mode=args.mode, callback=show)
    seconds = time.perf_counter() - start
    sys.stdout.write(utf8.decode(b"", final=True) + "\n")
    print(f"[{args.max_new_tokens} tokens in {seconds:.2f}s including compilation; prompt {len(prompt)} tokens; "
          f"{args.mode} attention, top_k {model_cfg.top_k} x block {model_cfg.block_size}]", file=sys.stderr)


if __name__ == "__main__":
    main()
