"""Training text that every machine already has, as byte-level token windows.

The corpus is the source code of a fixed list of Python standard-library modules (found
with `inspect.getsourcefile`), so the examples run offline with no download. Tokens are
bytes 0..255 plus a few specials; a batch is a function of (seed, step) alone, which is
what lets `train.py --resume` continue a run bit for bit.
"""

from __future__ import annotations

import importlib
import inspect

import numpy as np

BOS, EOS, PAD = 256, 257, 258
NUM_SPECIAL = 3
BYTE_VOCAB = 256 + NUM_SPECIAL  # the smallest vocab_size a model for this data may have

# Large, stable, pure-Python modules present in every CPython >= 3.10 install.
CORPUS_MODULES = (
    "argparse", "ast", "collections", "configparser", "dataclasses", "difflib", "email.message",
    "enum", "functools", "inspect", "json.decoder", "json.encoder", "logging", "pathlib",
    "pickle", "pydoc", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest.case",
    "urllib.parse", "zipfile",
)


def load_corpus(max_bytes: int | None = None) -> np.ndarray:
    """The stdlib corpus as uint8 [N] (modules in CORPUS_MODULES order, at most max_bytes).

    Raises:
      RuntimeError: if no module source could be read (a Python shipped without .py files).
    """
    parts = []
    for name in CORPUS_MODULES:
        try:
            path = inspect.getsourcefile(importlib.import_module(name))
        except (ImportError, TypeError):
            continue  # a stripped install may lack a module or its .py; the rest suffice
        if path:
            with open(path, "rb") as f:
                parts.append(f.read())
    if not parts:
        raise RuntimeError(f"found the source of none of {CORPUS_MODULES} (no .py files in the stdlib?)")
    text = b"\n".join(parts)
    if max_bytes is not None:
        text = text[:max_bytes]
    return np.frombuffer(text, np.uint8)


def encode(text: str) -> np.ndarray:
    """int32 [1 + len(utf8)]: BOS, then the UTF-8 bytes (what every training window starts with)."""
    return np.concatenate([[BOS], np.frombuffer(text.encode("utf-8"), np.uint8)]).astype(np.int32)


def decode(tokens) -> str:
    """Bytes back to text; specials and ids >= 256 (padding of the vocab) are dropped."""
    data = bytes(int(t) for t in np.asarray(tokens).reshape(-1) if 0 <= int(t) < 256)
    return data.decode("utf-8", errors="replace")


def batch_at(corpus: np.ndarray, step: int, *, batch_size: int, seq_len: int, seed: int = 0):
    """The batch of training step `step`: (tokens, targets), int32 [batch_size, seq_len] each.

    Each row is BOS followed by seq_len - 1 bytes from a random offset; targets are the row
    shifted by one (the next byte). Depends on (seed, step) only, never on earlier batches.
    """
    if corpus.size < seq_len + 1:
        raise ValueError(f"corpus has {corpus.size} bytes, fewer than seq_len + 1 = {seq_len + 1}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, corpus.size - seq_len, size=batch_size)
    windows = np.stack([corpus[s: s + seq_len] for s in starts]).astype(np.int32)  # [B, seq_len]
    tokens = np.concatenate([np.full((batch_size, 1), BOS, np.int32), windows[:, :-1]], axis=1)
    return tokens, windows
