"""Generate text with the example MSA decoder and its KV cache.

    python examples/flax_model/generate.py --ckpt-dir /tmp/msa_ckpt --prompt "def main(" --max-new-tokens 200
    python examples/flax_model/generate.py --ckpt-dir /tmp/msa_ckpt --prompt "import " --temperature 0.8 --top-k 40
    python examples/flax_model/generate.py --ckpt-dir /tmp/llama_msa --prompt-ids "128000 791 6864" --max-new-tokens 20
    python examples/flax_model/generate.py --ckpt-dir /tmp/msa_ckpt --prompt "def " --prompt "import os" --kv-dtype fp8

--ckpt-dir is any directory the example writes (see `load`): a train.py --ckpt-dir, whose
byte-level model takes text (--prompt) or ids, or a convert.py OUT_DIR (or a
train_converted.py --ckpt-dir), whose model speaks its HuggingFace tokenizer's ids: --prompt
text is encoded with the tokenizer.json convert.py kept (generation stops at the model's
eos id), or pass --prompt-ids, and the new ids are printed, space-separated.

The prompts are prefilled in one call (their k/v/index_k written into the caches), then one
token per call of a jitted decode step: sparse MSA selects top_k blocks per new token exactly
as in training. The caches are paged (msa_jax.PagedCache): each sequence has its own pages
of block_size tokens, so prompts of different lengths (--prompt given several times) share
one batch, each row decoding at its own position; --kv-dtype bf16 or fp8 (E4M3 with a
scale per token and head) sets the pages' format (default: the model's compute dtype). Both calls are jitted; the decode step
compiles once per (model structure, batch, pages, top_k); the temperature is traced.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import functools
import json
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

import msa_jax  # noqa: E402

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


# --kv-dtype: the paged caches' storage.
KV_DTYPES = {"bf16": jnp.bfloat16, "fp8": jnp.float8_e4m3fn}


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "top_k"))
def _prefill(graphdef, state, tokens, lengths, caches, rng, temperature, *, mode, top_k):
    """Writes the right-padded prompts [B, P] (row b: its first lengths[b] tokens) into the
    caches; returns (first new token [B], its logits [B, V], caches)."""
    TRACES["prefill"] += 1
    paged = isinstance(caches[0], msa_jax.PagedCache)
    out = nnx.merge(graphdef, state)(tokens, caches=caches, mode=mode, num_new=lengths if paged else None)
    last = out.logits[jnp.arange(tokens.shape[0]), lengths - 1]  # each row's last prompt token
    return sample(last, rng, temperature, top_k), last, out.caches


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "top_k"), donate_argnames="caches")
def _decode(graphdef, state, token, caches, rng, temperature, *, mode, top_k):
    """Feeds token [B] at each row's cache length; returns (next token [B], its logits [B, V], caches)."""
    TRACES["decode"] += 1
    out = nnx.merge(graphdef, state)(token[:, None], caches=caches, mode=mode)
    return sample(out.logits[:, -1], rng, temperature, top_k), out.logits[:, -1], out.caches


def generate(model, prompt_tokens, max_new_tokens: int, temperature: float = 0.0, rng=None, *,
             top_k: int | None = None, mode: str = "sparse", cache_dtype=None, callback=None,
             return_logits: bool = False, cache: str = "paged", kv_dtype: str | None = None,
             eos_id: int | None = None):
    """Continues the prompts by max_new_tokens tokens with the model's KV caches.

    Args:
      model: an `MSATransformer`.
      prompt_tokens: int [P] or [B, P], or a list of B int sequences of different lengths
        (>= 1 each; paged caches only), each continued from its own end.
      max_new_tokens: tokens to generate (>= 1).
      temperature: 0 for greedy (argmax), else the sampling temperature.
      rng: a jax PRNG key; needed when temperature > 0.
      top_k: sample only among the top_k most likely tokens (None: all).
      mode: attention mode of the MSA layers ("sparse", or "dense" to compare).
      cache_dtype: dtype of the caches when kv_dtype is None; default the model's compute dtype.
      callback: called with each new token batch, int32 numpy [B], as it is produced.
      return_logits: also return the logits each new token was drawn from.
      cache: "paged" (msa_jax.PagedCache, each sequence its own pages) or "contiguous"
        (one [B, max_len] buffer per layer, equal prompt lengths only).
      kv_dtype: None (cache_dtype), "bf16" or "fp8" (FP8 E4M3 K/V and index-key pages; paged only).
      eos_id: stop once every row has produced this id (it is included); None: never stop early.

    Returns:
      int32 numpy [B, N] (or [N] for a 1-D prompt), N = max_new_tokens, or fewer when every
      row reached eos_id (rows that reached it earlier continue past it); with
      return_logits, a pair (tokens, float32 logits [B, max_new_tokens, vocab] or
      [max_new_tokens, vocab]).

    Raises:
      ValueError: for an empty prompt, max_new_tokens < 1, a negative temperature, top_k
        out of [1, vocab_size], temperature > 0 without rng, an unknown cache or kv_dtype,
        or ragged prompts / fp8 with the contiguous cache.
    """
    if cache not in ("paged", "contiguous"):
        raise ValueError(f"cache must be 'paged' or 'contiguous', got {cache!r}")
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be None or one of {sorted(KV_DTYPES)}, got {kv_dtype!r}")
    prompt, lengths, squeeze = _batch_prompts(prompt_tokens)
    if cache == "contiguous" and (len(set(lengths.tolist())) > 1 or kv_dtype == "fp8"):
        raise ValueError(f"the contiguous cache needs prompts of one length and no fp8, got lengths "
                         f"{lengths.tolist()} and kv_dtype {kv_dtype!r}: use cache='paged'")
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
    dtype = KV_DTYPES[kv_dtype] if kv_dtype is not None else cache_dtype or model.embed.dtype
    if cache == "paged":
        # Each sequence gets its own pages for its prompt and the new tokens.
        table, num_pages = msa_jax.make_page_table(lengths + max_new_tokens, model.cfg.block_size)
        caches = model.init_paged_caches(table, num_pages, kv_dtype=dtype)
    else:
        caches = model.init_caches(B, P + max_new_tokens, dtype)
    graphdef, state = nnx.split(model)
    common = dict(graphdef=graphdef, mode=mode, top_k=top_k, temperature=temperature)

    out, logits = [], []
    done = np.zeros(B, bool)
    for i in range(max_new_tokens):
        if i == 0:
            token, last, caches = _prefill(state=state, tokens=jnp.asarray(prompt), lengths=jnp.asarray(lengths),
                                           caches=caches, rng=keys[0], **common)
        else:
            token, last, caches = _decode(state=state, token=token, caches=caches, rng=keys[i], **common)
        out.append(np.asarray(token))
        if return_logits:
            logits.append(np.asarray(last))
        if callback:
            callback(out[-1])
        if eos_id is not None:
            done |= out[-1] == eos_id
            if done.all():
                break
    tokens = np.stack(out, axis=1)
    if not return_logits:
        return tokens[0] if squeeze else tokens
    logits = np.stack(logits, axis=1)
    return (tokens[0], logits[0]) if squeeze else (tokens, logits)


def _batch_prompts(prompt_tokens) -> tuple[np.ndarray, np.ndarray, bool]:
    """(right-padded int32 [B, P], lengths int32 [B], whether the input was one 1-D prompt)."""
    if isinstance(prompt_tokens, (list, tuple)) and prompt_tokens and all(np.ndim(p) == 1 for p in prompt_tokens):
        rows = [np.asarray(p, np.int32) for p in prompt_tokens]
        squeeze = False
    else:
        prompt = np.asarray(prompt_tokens, np.int32)
        squeeze = prompt.ndim == 1
        rows = list(prompt[None] if squeeze else prompt) if prompt.ndim in (1, 2) else None
    if not rows or any(r.size < 1 for r in rows):
        raise ValueError(f"prompt_tokens must be int [P] or [B, P] with P >= 1, or a list of non-empty "
                         f"int sequences, got shape {np.shape(prompt_tokens)}")
    lengths = np.array([r.size for r in rows], np.int32)
    prompt = np.zeros((len(rows), lengths.max()), np.int32)
    for b, r in enumerate(rows):
        prompt[b, :r.size] = r
    return prompt, lengths, squeeze


def load(ckpt_dir: str, step: int | None = None):
    """(model, ModelConfig, TrainConfig or None) from a directory that train.py or convert.py wrote.

    The one loader of the example; the directory's content says which writer made it:
      - convert.py OUT_DIR, recognised by its `model_config.json`: the converted model via
        `convert.load_converted`, in the dtype it was converted to (parameters and compute);
        TrainConfig is None. It holds a single checkpoint, so `step` must be None.
      - a train_converted.py --ckpt-dir (its saved settings name a stage): that run's
        converted model with checkpoint `step`'s parameters; TrainConfig is None.
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
    if converted_source(ckpt_dir) != ckpt_dir:  # a train_converted.py run: a converted model, trained on
        import train_converted

        model, _ = train_converted.load_model(ckpt_dir, step)
        return model, model.cfg, None
    ckpts = train_lib.Checkpoints(ckpt_dir)
    try:
        model_cfg, train_cfg = ckpts.configs(step)
        model = train_lib.build_model(model_cfg, train_cfg)
        ckpts.restore(model, step=step)
    finally:
        ckpts.close()
    return model, model_cfg, train_cfg


def _prompt(args, model_cfg, byte_vocab: bool, tokenizer=None) -> tuple[list[np.ndarray], list[str] | None]:
    """(prompts, each int32 [P_b], and their texts or None for ids) from --prompt / --prompt-ids;
    a converted model's text prompts are encoded with its tokenizer (None: ids only)."""
    if args.prompt is not None and args.prompt_ids is not None:
        raise ValueError("pass --prompt (text) or --prompt-ids (token ids), not both")
    if args.prompt_ids is not None:
        prompts = []
        for text in args.prompt_ids:
            try:
                ids = np.asarray([int(t) for t in text.replace(",", " ").split()], np.int32)
            except ValueError:
                raise ValueError(f"--prompt-ids: expected integers separated by spaces or commas, "
                                 f"got {text!r}") from None
            # nnx.Embed would clamp an out-of-range id to a wrong embedding without a word.
            if ids.size and not ((ids >= 0) & (ids < model_cfg.vocab_size)).all():
                raise ValueError(f"--prompt-ids: ids must lie in [0, vocab_size={model_cfg.vocab_size}), "
                                 f"got {ids.tolist()}")
            prompts.append(ids)
        return prompts, None
    if not byte_vocab:
        if tokenizer is not None and args.prompt is not None:
            return [np.asarray(tokenizer.encode(t).ids, np.int32) for t in args.prompt], args.prompt
        # Byte tokens are valid ids of a HF vocabulary too: this would run and print noise.
        raise ValueError(f"{args.ckpt_dir} holds a converted model, whose vocabulary is its HuggingFace "
                         "tokenizer's, not bytes: pass --prompt-ids (ids from the source model's tokenizer), "
                         f"or --prompt text when the directory holds its {convert_lib.TOKENIZER_FILE}")
    texts = ["def "] if args.prompt is None else args.prompt
    return [data.encode(t) for t in texts], texts


def converted_source(ckpt_dir: str) -> str:
    """The convert.py directory a train_converted.py --ckpt-dir started from; else ckpt_dir itself."""
    if os.path.exists(os.path.join(ckpt_dir, convert_lib.CONFIG_FILE)) or not os.path.isdir(ckpt_dir):
        return ckpt_dir
    ckpts = train_lib.Checkpoints(ckpt_dir)
    try:
        train = ckpts.raw_config()["train"] if ckpts.latest_step() is not None else {}
    finally:
        ckpts.close()
    return train["model_dir"] if "stage" in train else ckpt_dir


def _converted_text(ckpt_dir: str):
    """(tokenizer or None, eos id or None) of a convert.py directory: the tokenizer.json and the
    eos_token_id that convert.py keeps from the HF directory, where it had them."""
    tokenizer = eos_id = None
    if os.path.exists(os.path.join(ckpt_dir, convert_lib.TOKENIZER_FILE)):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(os.path.join(ckpt_dir, convert_lib.TOKENIZER_FILE))
    info = os.path.join(ckpt_dir, convert_lib.INFO_FILE)
    if os.path.exists(info):
        with open(info) as f:
            eos_id = json.load(f).get("eos_token_id")
    if isinstance(eos_id, list):  # HF allows several; the first is the one a chat turn ends with
        eos_id = eos_id[0] if eos_id else None
    return tokenizer, eos_id


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-dir", required=True, help="a train.py --ckpt-dir or a convert.py OUT_DIR")
    p.add_argument("--step", type=int, help="train.py checkpoint step (default: the latest)")
    p.add_argument("--prompt", action="append",
                   help='text: byte tokens for a train.py model (default "def "), the tokenizer.json\'s ids for a '
                        "convert.py directory that holds one; repeat it for a batch of prompts of different lengths")
    p.add_argument("--prompt-ids", action="append",
                   help="prompt token ids, space- or comma-separated (repeatable); the new ids are printed")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=("sparse", "dense"), default="sparse")
    p.add_argument("--kv-dtype", choices=sorted(KV_DTYPES),
                   help="paged K/V and index-key caches: bf16, or fp8 (E4M3, one scale per token and head); "
                        "default: the model's compute dtype")
    args = p.parse_args(argv)

    model, model_cfg, train_cfg = load(args.ckpt_dir, args.step)
    tokenizer, eos_id = _converted_text(converted_source(args.ckpt_dir)) if train_cfg is None else (None, None)
    # train.py models are byte-level; a converted one reads text through its tokenizer, if it has one.
    prompts, texts = _prompt(args, model_cfg, byte_vocab=train_cfg is not None, tokenizer=tokenizer)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stream = len(prompts) == 1  # one sequence streams as it is produced; a batch prints at the end
    if stream:
        sys.stdout.write(texts[0] if texts else "")
        sys.stdout.flush()
    produced = []  # a converted model's ids so far: its text is decoded from them all (multi-token characters)

    def as_text(ids):
        return tokenizer.decode([int(t) for t in ids], skip_special_tokens=False)

    def show(token):
        if texts is None:
            sys.stdout.write(f"{int(token[0])} ")
        elif tokenizer is not None:
            if eos_id is not None and eos_id in produced:
                return
            before = as_text(produced)
            produced.append(int(token[0]))
            sys.stdout.write(as_text(produced)[len(before):])
        else:
            sys.stdout.write(utf8.decode(bytes(int(t) for t in token if t < 256)))
        sys.stdout.flush()

    start = time.perf_counter()
    new = generate(model, prompts, args.max_new_tokens, args.temperature, jax.random.key(args.seed), top_k=args.top_k,
                   mode=args.mode, callback=show if stream else None, kv_dtype=args.kv_dtype, eos_id=eos_id)
    seconds = time.perf_counter() - start
    if stream:
        sys.stdout.write(utf8.decode(b"", final=True) + "\n")
    else:
        for b, row in enumerate(new):
            if texts is None:
                print(f"[{b}] " + " ".join(str(int(t)) for t in row))
            elif tokenizer is not None:
                row = list(row)
                print(f"[{b}] {texts[b]}" + as_text(row[:row.index(eos_id) + 1] if eos_id in row else row))
            else:
                print(f"[{b}] {texts[b]}" + bytes(int(t) for t in row if t < 256).decode("utf-8", errors="replace"))
    lengths = ", ".join(str(len(p)) for p in prompts)
    print(f"[{new.shape[-1]} tokens x {len(prompts)} in {seconds:.2f}s including compilation; prompt tokens "
          f"{lengths}; {args.mode} attention, top_k {model_cfg.top_k} x block {model_cfg.block_size}, paged "
          f"{args.kv_dtype or 'model-dtype'} caches]", file=sys.stderr)


if __name__ == "__main__":
    main()
