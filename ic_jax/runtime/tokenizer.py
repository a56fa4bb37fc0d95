"""Tokenizers: byte-level by default (ids 0-255 are bytes, 256 = BOS, 257 = EOS); a checkpoint may carry a
Hugging Face `tokenizer.json` instead."""

from __future__ import annotations

import codecs
from pathlib import Path

from ic_jax.errors import UserError


class ByteTokenizer:
    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def stream(self):
        """A function turning one id at a time into text as soon as it forms whole characters."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: dec.decode(bytes([i])) if i < 256 else ""


class HFTokenizer:

    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError(f"{path} needs the 'tokenizers' package; pip install 'ic_jax[hf]'") from None
        self.path = Path(path)
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the tokenizers package raises a bare Exception for a bad file
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"tokenizer {path} cannot be read ({reason[:160]}); replace it with the model's own "
                            f"tokenizer.json") from None
        self.vocab_size = self.tok.get_vocab_size()
        self.eos_id = next((self.tok.token_to_id(t) for t in ("</s>", "<|endoftext|>", "<eos>")
                            if self.tok.token_to_id(t) is not None), None)
        self.bos_id = None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    def stream(self):
        ids: list[int] = []
        shown = [0]

        def push(i):
            ids.append(i)
            text = self.tok.decode(ids)
            if text.endswith("\ufffd"):
                return ""
            new, shown[0] = text[shown[0]:], len(text)
            return new

        return push


def load_tokenizer(ckpt_dir: Path | None):
    if ckpt_dir is not None and (Path(ckpt_dir) / "tokenizer.json").is_file():
        return HFTokenizer(Path(ckpt_dir) / "tokenizer.json")
    return ByteTokenizer()
