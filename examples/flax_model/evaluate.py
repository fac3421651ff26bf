"""How much a converted model loses in sparse mode: perplexity and passkey retrieval, dense vs sparse.

    python examples/flax_model/evaluate.py MODEL --context 2048 --windows 4 --out eval.json
    python examples/flax_model/evaluate.py /tmp/warm --modes sparse --passkey-depths 0.1 0.5 0.9

MODEL is a convert.py output or a train_converted.py --ckpt-dir (its latest checkpoint); the
tokenizer is the tokenizer.json convert.py copied next to the model.

Why this file exists: sparse attention changes a converted model's function only where a
query has more than top_k x block_size visible tokens (the "budget"); below that MSA equals
dense attention exactly. So both measurements use contexts several budgets long.

  - Perplexity: the held-out text (text_data.EVAL_TOPICS of the Python reference, or
    `--text-files`) is packed into rows of `--context` tokens (documents as segments); the
    first `--windows` rows are scored in each mode. Reported: perplexity over every
    predicted token, and over the tokens at position >= budget within their document (the
    only ones sparse attention can change).
  - Passkey retrieval: a five-digit number stated once at a relative depth of filler text
    `--context` tokens long, then a question; the model answers greedily through the paged
    KV cache (generate.generate: one prefill, then decode steps that select blocks like
    training). Correct = the number is the first digits of the answer.

Output: one JSON object (stdout summary, `--out` file) with both, per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate as generate_lib  # noqa: E402
import text_data  # noqa: E402
import train_converted  # noqa: E402

import msa_jax  # noqa: E402

MODES = ("dense", "sparse")
ALL_MODES = MODES + ("oracle",)  # oracle: perplexity only (no cache path), see oracle_blocks
PASSKEY_INTRO = ("A secret number is hidden somewhere in the long text below. Read everything, find the number "
                 "and remember it: you will be asked for it at the end.\n\n")
PASSKEY_FILLER = "The river runs to the sea. The hills are green in spring. The town is quiet at night. "
PASSKEY_NEEDLE = "The secret number is {key}. Remember it: {key} is the secret number. "
PASSKEY_QUESTION = "\n\nWhat is the secret number? The secret number is"


def budget(cfg) -> int:
    """Tokens a query sees in full before sparse mode drops any: top_k x block_size."""
    return cfg.top_k * cfg.block_size


@nnx.jit(static_argnames="mode")
def _token_nll(model, tokens, targets, segment_ids, mode):
    logits = model(tokens, segment_ids=segment_ids, mode=mode).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def perplexity(model, rows: text_data.Packed, mode: str) -> dict:
    """Perplexity of rows (scored one row per call) in `mode`, overall and beyond the budget.

    mode: "dense", "sparse", or "oracle" (sparse attention over `oracle_blocks`: the best the
    index branch could select by the main branch's own attention mass).

    Returns {"ppl", "nll", "tokens", "ppl_beyond_budget", "nll_beyond_budget",
    "tokens_beyond_budget"}; tokens count predicted tokens (loss_mask 1).
    """
    B = budget(model.cfg)
    total = np.zeros(2)
    beyond = np.zeros(2)
    for r in range(rows.tokens.shape[0]):
        one = lambda a: jnp.asarray(a[r: r + 1])  # noqa: E731
        args = (model, one(rows.tokens), one(rows.targets), one(rows.segment_ids))
        nll = np.asarray(_oracle_token_nll(*args) if mode == "oracle" else _token_nll(*args, mode=mode))[0]
        mask = rows.loss_mask[r]
        seg = rows.segment_ids[r]
        t = np.arange(seg.size)
        start = np.maximum.accumulate(np.where(np.r_[True, seg[1:] != seg[:-1]], t, 0))
        far = mask * (t - start >= B)
        total += [np.sum(nll * mask), mask.sum()]
        beyond += [np.sum(nll * far), far.sum()]
    out = dict(nll=total[0] / total[1], tokens=int(total[1]))
    out["ppl"] = float(np.exp(out["nll"]))
    if beyond[1]:
        out.update(nll_beyond_budget=beyond[0] / beyond[1], tokens_beyond_budget=int(beyond[1]))
        out["ppl_beyond_budget"] = float(np.exp(out["nll_beyond_budget"]))
    return {k: float(v) if isinstance(v, np.floating) else v for k, v in out.items()}


def oracle_blocks(q, k, *, top_k: int, block_size: int, segment_ids) -> jax.Array:
    """block_indices [B, T, Hkv, top_k] chosen by the main branch itself: the "oracle" selection.

    Each (query, group) keeps its local block and the top_k - 1 fully visible blocks that
    hold the most dense attention probability (the group's heads averaged), by the spec's
    block grid (laid from each document's first token) and output order: chosen ids by
    descending mass, then the local block, then -1. It shows how good a selection can be
    at this budget, whatever the index branch learns. q [B, T, Hq, D], k [B, T, Hkv, D].
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    t = jnp.arange(T)
    doc = jax.vmap(lambda s: jax.lax.cummax(jnp.where(jnp.r_[True, s[1:] != s[:-1]], t, 0)))(segment_ids)
    rel = t[None] - doc  # position within the document, [B, T]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32),
                        jnp.repeat(k, Hq // Hkv, axis=2).astype(jnp.float32)) / np.sqrt(D)
    visible = (doc[:, :, None] == doc[:, None, :]) & (t[None, None, :] <= t[None, :, None])  # [B, T, S]
    probs = jax.nn.softmax(jnp.where(visible[:, None], logits, -jnp.inf), axis=-1)
    mass = probs.reshape(B, Hkv, Hq // Hkv, T, T).mean(axis=2)  # [B, Hkv, T, S]
    nb = T // block_size + 1
    onehot = jax.nn.one_hot(rel // block_size, nb, dtype=jnp.float32)  # [B, S, nb]
    scores = jnp.einsum("bgqs,bsj->bqgj", mass, onehot)  # [B, T, Hkv, nb]
    local = (rel // block_size)[:, :, None]  # [B, T, 1]
    candidate = jnp.arange(nb)[None, None, None, :] < local[..., None]
    vals, ids = jax.lax.top_k(jnp.where(candidate, scores, -jnp.inf), top_k - 1)
    ids = jnp.where(jnp.isfinite(vals), ids, -1)
    local = jnp.broadcast_to(local[..., None], (B, T, Hkv, 1))
    rows = jnp.concatenate([ids, local], axis=-1)
    # Unused slots (-1) go after the local block: move the local block to the first free slot.
    n = jnp.sum(ids >= 0, axis=-1, keepdims=True)
    slot = jnp.arange(top_k)[None, None, None, :]
    return jnp.where(slot < n, rows, jnp.where(slot == n, local, -1)).astype(jnp.int32)


@nnx.jit
def _oracle_token_nll(model, tokens, targets, segment_ids):
    """Per-token NLL with every MSA layer attending to its oracle_blocks (the model's own layers,
    the library's block_sparse_attention; the index branch is not used)."""
    cfg = model.cfg
    B, T = tokens.shape
    x = model.embed(tokens)
    for layer in model.layers:
        h = layer.input_norm(x)
        attn = layer.attn
        if hasattr(attn, "index_q_proj"):
            _, pos = attn._positions(h, segment_ids, None)
            q, k, v = attn._qkv(h, pos)
            blocks = oracle_blocks(q, k, top_k=cfg.top_k, block_size=cfg.block_size, segment_ids=segment_ids)
            out = msa_jax.block_sparse_attention(q, k, v, blocks, block_size=cfg.block_size, segment_ids=segment_ids,
                                                 implementation=cfg.implementation)
            x = x + attn.o_proj(out.reshape(B, T, -1).astype(x.dtype))
        else:
            x = x + attn(h, segment_ids=segment_ids).out
        x = x + layer.mlp(layer.post_attn_norm(x))
    x = model.final_norm(x)
    logits = model.embed.attend(x) if model.lm_head is None else model.lm_head(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def passkey_prompt(tokenizer, context: int, depth: float, key: int) -> np.ndarray:
    """int32 ids of a passkey prompt of about `context` tokens with the needle at relative `depth`.

    Raises ValueError for depth outside [0, 1] or a context too short for intro + question.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    intro, filler, question = enc(PASSKEY_INTRO), enc(PASSKEY_FILLER), enc(PASSKEY_QUESTION)
    needle = enc(PASSKEY_NEEDLE.format(key=key))
    room = context - len(intro) - len(needle) - len(question)
    if room < len(filler):
        raise ValueError(f"context {context} is too short for a passkey prompt (needs > {context - room + len(filler)})")
    n = room // len(filler)
    at = int(round(depth * n))
    ids = intro + filler * at + needle + filler * (n - at) + question
    return np.asarray(ids, np.int32)


def passkey(model, tokenizer, *, context: int, depths, mode: str, seed: int = 0, answer_tokens: int = 8) -> dict:
    """Passkey accuracy in `mode` over `depths` (one prompt each, key drawn from (seed, depth index))."""
    results = []
    for i, depth in enumerate(depths):
        key = int(np.random.default_rng([seed, i]).integers(10000, 100000))
        ids = passkey_prompt(tokenizer, context, depth, key)
        new = generate_lib.generate(model, ids, answer_tokens, mode=mode)
        answer = tokenizer.decode([int(t) for t in new], skip_special_tokens=True)
        digits = re.sub(r"\D", "", answer.split("\n")[0])
        results.append(dict(depth=float(depth), key=key, prompt_tokens=int(ids.size), answer=answer,
                            correct=digits.startswith(str(key))))
    return dict(accuracy=sum(r["correct"] for r in results) / len(results), trials=results)


def evaluate(model, tokenizer, *, context: int, windows: int, modes=MODES, depths=(0.1, 0.3, 0.5, 0.7, 0.9),
             text_files=None, progress: bool = True) -> dict:
    """Perplexity (first `windows` rows of the held-out text) and passkey accuracy per mode."""
    docs = text_data.load_documents(text_files, split="eval")
    rows = text_data.pack(text_data.tokenize(tokenizer, docs), context)
    rows = text_data.Packed(*(a[:windows] for a in rows))
    cfg = model.cfg
    out = dict(context=context, top_k=cfg.top_k, block_size=cfg.block_size, budget=budget(cfg),
               budgets_per_context=context / budget(cfg),
               text=dict(source=list(text_files) if text_files else f"pydoc_data.topics {list(text_data.EVAL_TOPICS)}",
                         rows=int(rows.tokens.shape[0])),
               perplexity={}, passkey={})
    for mode in modes:
        t0 = time.perf_counter()
        out["perplexity"][mode] = perplexity(model, rows, mode)
        if depths and mode in MODES:
            out["passkey"][mode] = passkey(model, tokenizer, context=context, depths=depths, mode=mode)
        if progress:
            print(f"{mode}: evaluated in {time.perf_counter() - t0:.0f}s (perplexity "
                  f"{out['perplexity'][mode]['ppl']:.3f})", file=sys.stderr)
    if "dense" in out["perplexity"] and "sparse" in out["perplexity"]:
        d, s = out["perplexity"]["dense"], out["perplexity"]["sparse"]
        out["sparse_vs_dense_ppl"] = s["ppl"] / d["ppl"] - 1
        if "ppl_beyond_budget" in d:
            out["sparse_vs_dense_ppl_beyond_budget"] = s["ppl_beyond_budget"] / d["ppl_beyond_budget"] - 1
    return out


def summary(results: dict) -> str:
    """The results as a few lines of text: perplexity and passkey accuracy per mode."""
    lines = [f"context {results['context']} tokens = {results['budgets_per_context']:.1f} budgets of top_k "
             f"{results['top_k']} x block {results['block_size']}; text: {results['text']['source']}, "
             f"{results['text']['rows']} rows"]
    dense = results["perplexity"].get("dense")
    for mode, p in results["perplexity"].items():
        line = f"{mode:>6}: perplexity {p['ppl']:.3f}"
        if "ppl_beyond_budget" in p:
            line += f", beyond the budget {p['ppl_beyond_budget']:.3f} ({p['tokens_beyond_budget']} tokens)"
        if mode != "dense" and dense:
            line += f"; vs dense {100 * (p['ppl'] / dense['ppl'] - 1):+.2f}%"
            if "ppl_beyond_budget" in p:
                line += f" (beyond the budget {100 * (p['ppl_beyond_budget'] / dense['ppl_beyond_budget'] - 1):+.2f}%)"
        if mode in results["passkey"]:
            line += f"; passkey {results['passkey'][mode]['accuracy']:.0%}"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a convert.py output or a train_converted.py --ckpt-dir")
    p.add_argument("--step", type=int, help="checkpoint step of a train_converted.py --ckpt-dir (default: the latest)")
    p.add_argument("--context", type=int, default=2048, help="tokens per scored row and per passkey prompt")
    p.add_argument("--windows", type=int, default=4, help="rows of held-out text to score")
    p.add_argument("--modes", nargs="+", choices=ALL_MODES, default=list(MODES),
                   help="oracle: sparse attention over the blocks the main branch's own attention ranks "
                        "first (perplexity only)")
    p.add_argument("--passkey-depths", type=float, nargs="*", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                   help="relative needle depths (none: skip passkey)")
    p.add_argument("--text-files", nargs="+", help="held-out text (default: text_data.EVAL_TOPICS)")
    p.add_argument("--out", help="write the results JSON here")
    args = p.parse_args(argv)
    model, run_cfg = train_converted.load_model(args.model, args.step)
    tokenizer = text_data.load_tokenizer(run_cfg.model_dir if run_cfg else args.model)
    results = evaluate(model, tokenizer, context=args.context, windows=args.windows, modes=args.modes,
                       depths=args.passkey_depths, text_files=args.text_files)
    results.update(model=os.path.abspath(args.model), step=args.step, backend=jax.default_backend(), jax_version=jax.__version__,
                   date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print(summary(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
