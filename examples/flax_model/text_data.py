"""English text every machine has, tokenised with a converted model's own tokenizer and packed.

Why this file exists: a converted model (`convert.py`) speaks its source tokenizer's ids, not
the byte tokens of `data.py`, and its index warm-up and evaluation need real prose that is
available offline. The default text is the Python language reference shipped with CPython
itself (`pydoc_data.topics`: 79 topics, ~465K characters, ~113K SmolLM2 tokens); any local
text files can be used instead (`--text-files`).

Topics are split once into a training part and a held-out evaluation part (`EVAL_TOPICS`,
the longest topics, ~27K tokens), so perplexity is never measured on text the index branch
was warmed up on.

Packing: the documents' ids are concatenated into one stream and cut into rows of seq_len
tokens; `segment_ids` number the document pieces in each row (1, 2, ...), so no token
attends across a document boundary (msa_jax restarts positions and the block grid at each
document), and the last token of each piece has no next-token target (`loss_mask` 0).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

# Held out of training: the two longest topics (~113K characters), used by evaluate.py.
EVAL_TOPICS = ("specialnames", "compound")


def reference_topics() -> dict[str, str]:
    """{topic: text} of the Python language reference bundled with CPython (pydoc_data)."""
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def load_documents(paths: list[str] | None = None, *, split: str = "train") -> list[str]:
    """The documents of a split: the given text files (all of them, split ignored), or the
    reference topics outside EVAL_TOPICS ("train") / the EVAL_TOPICS ("eval").

    Raises:
      ValueError: an unknown split, or an empty result.
      FileNotFoundError: a path that does not exist.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if paths:
        docs = []
        for path in paths:
            with open(path, encoding="utf-8", errors="replace") as f:
                docs.append(f.read())
    else:
        topics = reference_topics()
        names = [n for n in topics if (n in EVAL_TOPICS) == (split == "eval")]
        docs = [topics[n] for n in names]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"no text in {paths or 'pydoc_data.topics'} ({split})")
    return docs


def load_tokenizer(path: str):
    """A `tokenizers.Tokenizer` from a tokenizer.json, or from the directory holding one.

    Raises:
      FileNotFoundError: no tokenizer.json there (fetch_model.py writes one, convert.py
        copies it into its output).
    """
    from tokenizers import Tokenizer

    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json (fetch_model.py writes one; convert.py copies it)")
    return Tokenizer.from_file(path)


def tokenize(tokenizer, docs: list[str]) -> list[np.ndarray]:
    """Each document's ids, int32 [n_i] (no special tokens added)."""
    return [np.asarray(e.ids, np.int32) for e in tokenizer.encode_batch(docs, add_special_tokens=False)]


class Packed(NamedTuple):
    tokens: np.ndarray  # int32 [N, seq_len]
    targets: np.ndarray  # int32 [N, seq_len]: the next token of the same document (0 where none)
    segment_ids: np.ndarray  # int32 [N, seq_len]: 1, 2, ... per document piece in the row
    loss_mask: np.ndarray  # float32 [N, seq_len]: 1 where targets is a real next token


def pack(doc_ids: list[np.ndarray], seq_len: int) -> Packed:
    """Packs documents' ids into rows of seq_len tokens (module docstring); the incomplete
    last row is dropped.

    Raises:
      ValueError: seq_len < 2, or fewer than seq_len tokens in all.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stream = np.concatenate(doc_ids).astype(np.int32)
    doc = np.concatenate([np.full(len(d), i, np.int32) for i, d in enumerate(doc_ids)])
    rows = stream.size // seq_len
    if rows == 0:
        raise ValueError(f"{stream.size} tokens in all, fewer than seq_len {seq_len}")
    tokens = stream[:rows * seq_len].reshape(rows, seq_len)
    doc = doc[:rows * seq_len].reshape(rows, seq_len)
    starts = np.concatenate([np.ones((rows, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)
    segment_ids = np.cumsum(starts, axis=1).astype(np.int32)
    same_next = np.concatenate([doc[:, 1:] == doc[:, :-1], np.zeros((rows, 1), bool)], axis=1)
    targets = np.where(same_next, np.concatenate([tokens[:, 1:], np.zeros((rows, 1), np.int32)], axis=1), 0)
    return Packed(tokens, targets.astype(np.int32), segment_ids, same_next.astype(np.float32))


def batch_at(packed: Packed, step: int, *, batch_size: int, seed: int = 0) -> Packed:
    """The rows of training step `step`: a function of (seed, step) only, so a resumed run
    sees exactly the batches an uninterrupted one would."""
    rows = np.random.default_rng([seed, step]).integers(0, packed.tokens.shape[0], size=batch_size)
    return Packed(*(a[rows] for a in packed))
