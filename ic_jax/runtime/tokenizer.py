"""Tokenizers: byte-level by default (ids 0-255 are bytes, 256 = BOS, 257 = EOS); a checkpoint may carry a
Hugging Face `tokenizer.json` instead."""

from __future__ import annotations

import codecs
import datetime
import json
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox

from ic_jax.errors import UserError
from ic_jax.files import read_json, read_text
from ic_jax.runtime.checkpoint import read_meta

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ByteTokenizer:
    vocab_size = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str, special: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def stream(self):
        """A function turning one id at a time into text as soon as it forms whole characters."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda i: dec.decode(bytes([i])) if i < 256 else ""


class HFTokenizer:

    def __init__(self, path: Path, eos_token: str | None = None):
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
        self.eos_id = next((self.tok.token_to_id(t) for t in (eos_token, "</s>", "<|endoftext|>", "<eos>")
                            if t is not None and self.tok.token_to_id(t) is not None), None)
        self.bos_id = None

    def encode(self, text: str, special: bool = True) -> list[int]:
        """`special`: add the special tokens the tokenizer's post-processor adds (False for a rendered chat, whose
        template writes them)."""
        return self.tok.encode(text, add_special_tokens=special).ids

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
    """The folder's tokenizer.json (its end token: tokenizer_config.json's eos_token, else a usual name), else
    byte-level."""
    if ckpt_dir is not None and (Path(ckpt_dir) / "tokenizer.json").is_file():
        return HFTokenizer(Path(ckpt_dir) / "tokenizer.json", special_tokens(Path(ckpt_dir)).get("eos_token"))
    return ByteTokenizer()


def special_tokens(folder: Path) -> dict[str, str]:
    """bos_token, eos_token, ... as tokenizer_config.json names them (a string or an AddedToken object); for a
    checkpoint converted from a Hugging Face folder, as its meta.json kept them."""
    config = read_json(folder / "tokenizer_config.json", f"{folder / 'tokenizer_config.json'}",
                       fix="replace it with the model's own")
    if config is None:
        config = read_meta(folder).get("special_tokens") or {}
    return {k: v.get("content") if isinstance(v, dict) else v for k, v in config.items()
            if k in SPECIAL_TOKENS and isinstance(v.get("content") if isinstance(v, dict) else v, str)}


class ChatTemplate:
    """A checkpoint's Jinja chat template, rendered as Hugging Face's `apply_chat_template` renders it (sandboxed,
    trim_blocks and lstrip_blocks, loop controls, `raise_exception`, a non-escaping `tojson`, the tokenizer's special
    tokens as variables)."""

    def __init__(self, source: str, special_tokens: dict[str, str], where: str):
        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
        self.where = where
        self.special_tokens = special_tokens
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"chat template in {where} cannot be read ({e}); fix or replace it") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation [{"role": ..., "content": ...}, ...]."""
        if not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise UserError(f"chat messages must be a non-empty list of {{\"role\": str, \"content\": str}} "
                            f"objects, got {json.dumps(messages)[:80]}")
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"the chat template in {self.where} refused these messages ({e})") from None


def load_chat_template(folder: Path | None) -> ChatTemplate:
    """The chat template of a Hugging Face folder (chat_template.jinja, else tokenizer_config.json's
    "chat_template") or of a checkpoint converted from one (its meta.json "chat_template"), for
    `ChatTemplate.render`; one-line UserError when there is none."""
    found = find_chat_template(Path(folder)) if folder is not None else None
    if found is None:
        where = folder if folder is not None else "the embedded model"
        raise UserError(f"{where} has no chat template (chat_template.jinja or tokenizer_config.json "
                        f"\"chat_template\"); drop --chat and write the prompt in the model's own format")
    source, special, where = found
    return ChatTemplate(source, special, where)


def find_chat_template(folder: Path) -> tuple[str, dict[str, str], str] | None:
    """(template source, special tokens, the file it came from), or None."""
    special = special_tokens(folder)
    if (folder / "chat_template.jinja").is_file():
        file = folder / "chat_template.jinja"
        return read_text(file, f"chat template {file}"), special, str(file)
    config = read_json(folder / "tokenizer_config.json", f"{folder / 'tokenizer_config.json'}",
                       fix="replace it with the model's own") or read_meta(folder)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if isinstance(template, str):
        where = "tokenizer_config.json" if (folder / "tokenizer_config.json").is_file() else "meta.json"
        return template, special, str(folder / where)
    return None
