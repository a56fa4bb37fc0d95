"""Training and evaluation data: byte-level text/code corpora, split into train and held-out sets by file,
and a key-value retrieval task in the model's own domain (Python).

The default corpus is the Python standard library of the running interpreter (found through `sysconfig`).
A retrieval sample is a Python snippet of exactly `length` bytes:

    TABLE = {"qzk": 4821, "abd": 1093, ...}
    <real code from the corpus, as filler>
    ENTRY = {"abd": 1093}

The value digits can only be predicted by looking back at the table, at the start of the sequence; the
question spells the key as the table does, so a match-and-copy head (as for repeated identifiers in code)
answers it. In training batches a lookup spans a random length (at least MIN_SPAN) and ends the row, after a
code prefix, so the model sees lookup distances from short to the whole context. (A 24-layer model trained
1000 steps on full-length lookups asked as `assert TABLE["abd"] == ...`, a two-hop lookup, never learned them.)
"""

from __future__ import annotations

import glob
import hashlib
import sysconfig
from pathlib import Path

import numpy as np

from ic_jax.errors import UserError
from ic_jax.runtime.tokenizer import ByteTokenizer

BOS = ByteTokenizer.bos_id
DEFAULT_DATA = "stdlib"
ANSWER_DIGITS = 4
MIN_SPAN = 128  # shortest lookup (table, filler, question) in a training row
LOOKUP_PAIRS = 4
KEY_LETTERS = 3


def resolve_files(spec: str = DEFAULT_DATA) -> list[Path]:
    """Files of a glob (recursive `**` allowed), or the standard library's .py files for "stdlib"."""
    if spec == DEFAULT_DATA:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts)]
    else:
        files = [Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()]
    if not files:
        raise UserError(f"no files match {spec!r}; give a glob such as 'src/**/*.py' (quote it)")
    return sorted(files)


def is_held_out(path: Path, frac: float) -> bool:
    """A stable choice by file: the hash of the file's last two path parts."""
    key = "/".join(path.parts[-2:]).encode()
    return int.from_bytes(hashlib.sha1(key).digest()[:4], "little") < frac * 2**32


class Corpus:
    """Files joined into one byte stream (each file starts with BOS); random or fixed windows of it."""

    def __init__(self, files: list[Path]):
        if not files:
            raise UserError("the corpus is empty (the held-out split took every file?); give more files")
        parts = [np.frombuffer(b"\0" + f.read_bytes(), np.uint8).astype(np.int32) for f in files]
        for p in parts:
            p[0] = BOS
        self.tokens = np.concatenate(parts)
        self.num_files = len(files)

    def window(self, rng: np.random.Generator, length: int) -> np.ndarray:
        if len(self.tokens) <= length:
            raise UserError(f"the corpus has {len(self.tokens)} bytes, fewer than one window of {length}")
        start = rng.integers(0, len(self.tokens) - length)
        return self.tokens[start:start + length]

    def windows(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
        return np.stack([self.window(rng, length) for _ in range(batch)])


def load_split(spec: str, held_out_frac: float) -> tuple[Corpus, Corpus]:
    """(train, held-out) corpora of the files of `spec`, split by file."""
    files = resolve_files(spec)
    held = [f for f in files if is_held_out(f, held_out_frac)]
    train = [f for f in files if not is_held_out(f, held_out_frac)]
    if not held:  # too few files for the fraction: hold out the last one
        held, train = train[-1:], train[:-1]
    return Corpus(train), Corpus(held)


def lookup_text(keys: list[str], values: list[int], ask: int) -> tuple[str, str]:
    """The table that opens a lookup and the question that ends it."""
    table = "TABLE = {" + ", ".join(f'"{k}": {v}' for k, v in zip(keys, values)) + "}\n"
    return table, f'\nENTRY = {{"{keys[ask]}": {values[ask]}}}\n'


def _min_lookup_length(pairs: int = LOOKUP_PAIRS) -> int:
    table, query = lookup_text(["k" * KEY_LETTERS] * pairs, [10 ** (ANSWER_DIGITS - 1)] * pairs, 0)
    return 1 + len(table) + len(query) + 1  # BOS, table, at least one filler byte, question


def retrieval_sample(rng: np.random.Generator, corpus: Corpus, length: int, pairs: int = LOOKUP_PAIRS
                     ) -> tuple[np.ndarray, int]:
    """A key-value lookup of exactly `length` tokens; returns (tokens, index of the first answer digit)."""
    letters = list("abcdefghijklmnopqrstuvwxyz")
    keys = ["".join(rng.choice(letters, KEY_LETTERS)) for _ in range(pairs)]
    while len(set(keys)) < pairs:
        keys = ["".join(rng.choice(letters, KEY_LETTERS)) for _ in range(pairs)]
    values = [int(v) for v in rng.integers(10 ** (ANSWER_DIGITS - 1), 10**ANSWER_DIGITS, pairs)]
    table, query = lookup_text(keys, values, rng.integers(pairs))
    head = [BOS] + list(table.encode())
    tail = list(query.encode())
    fill = length - len(head) - len(tail)
    if fill < 1:
        raise UserError(f"retrieval length {length} is too short; use at least {MIN_RETRIEVAL_LENGTH}")
    tokens = np.concatenate([head, corpus.window(rng, fill), tail]).astype(np.int32)
    return tokens, length - len(tail) + query.index('": ') + 3


def lookup_row(rng: np.random.Generator, corpus: Corpus, length: int) -> np.ndarray:
    """A row of `length` tokens: code, then a retrieval sample of random span in [MIN_SPAN, length]."""
    span = int(rng.integers(min(MIN_SPAN, length), length + 1))
    sample = retrieval_sample(rng, corpus, span)[0]
    return sample if span == length else np.concatenate([corpus.window(rng, length - span), sample])


def training_batch(rng: np.random.Generator, corpus: Corpus, batch: int, length: int,
                   retrieval_frac: float) -> np.ndarray:
    """Random windows, each replaced by a lookup row with probability `retrieval_frac`."""
    rows = [lookup_row(rng, corpus, length) if rng.random() < retrieval_frac
            else corpus.window(rng, length) for _ in range(batch)]
    return np.stack(rows)


def retrieval_set(corpus: Corpus, n: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed set of n retrieval samples: tokens [n, length] and answer starts [n]."""
    rng = np.random.default_rng(seed)
    samples = [retrieval_sample(rng, corpus, length) for _ in range(n)]
    return np.stack([s[0] for s in samples]), np.array([s[1] for s in samples], np.int32)


MIN_RETRIEVAL_LENGTH = _min_lookup_length()


def calibration_windows(spec: str, n: int, length: int, heldout_frac: float) -> np.ndarray:
    """n fixed windows: of the held-out files for the default corpus, else of every file of the glob."""
    corpus = load_split(spec, heldout_frac)[1] if spec == DEFAULT_DATA else Corpus(resolve_files(spec))
    return corpus.windows(np.random.default_rng(1234), n, length)
