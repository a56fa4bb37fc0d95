"""python -m ic_jax.generate: sample text from a DSA model under an IndexCache pattern.

Examples:
  python -m ic_jax.generate --prompt "def fib(n):"                      # the embedded default model
  python -m ic_jax.generate --ckpt DIR --pattern FSSS --prompt "import os"
  python -m ic_jax.generate --config configs/tiny.json --init random --pattern freq:4 --prompt hi
  echo "class Stack:" | python -m ic_jax.generate --ckpt DIR --pattern @search/pattern.json --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

from ic_jax.cli import (
    ArgumentParser,
    add_impl_argument,
    add_mesh_arguments,
    add_seed_argument,
    entry,
    fraction,
    nonneg_float,
    nonneg_int,
    positive_int,
)
from ic_jax.errors import UserError
from ic_jax.files import read_stdin, read_text
from ic_jax.model.dsa import moe_layers
from ic_jax.model.pattern import describe_layout
from ic_jax.model.run_options import RunOptions
from ic_jax.package_data import DEFAULT_CKPT
from ic_jax.runtime.engine import Engine
from ic_jax.runtime.loading import load_model
from ic_jax.runtime.memory import check_fits
from ic_jax.runtime.sampling import Sampling
from ic_jax.runtime.sharding import mesh_from_args
from ic_jax.runtime.tokenizer import load_chat_template, load_tokenizer

PATTERN_HELP = """IndexCache pattern, one of: an F/S string per layer (FSFSSS...); a shorter motif repeated
and cut to the layer count (FSSS); freq:N or freq:N,offset:M (SGLang/vLLM index_topk_freq rule);
keep:0.25 (uniform spacing); @file.json (a search result). Default: the checkpoint's pattern.json, else all F."""


def parse_args(argv):
    p = ArgumentParser(prog="python -m ic_jax.generate", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("model")
    src.add_argument("--ckpt", type=Path,
                     help="checkpoint directory (default: the embedded model shipped in ic_jax/checkpoints/default)")
    src.add_argument("--config", help="config JSON or preset name (tiny, glm47_flash_dsa, deepseek_v32, glm5); "
                                      "with --ckpt it must match the checkpoint's shapes")
    src.add_argument("--init", choices=["random"], help="random weights from --config instead of a checkpoint")
    add_seed_argument(src)
    src.add_argument("--pattern", help=PATTERN_HELP)
    add_impl_argument(src)
    add_mesh_arguments(p)
    inp = p.add_argument_group("prompt (several --prompt/--prompt-file make a batch; stdin when none)")
    inp.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    inp.add_argument("--prompt-file", action="append", default=[], type=Path, help="file whose text is one prompt")
    inp.add_argument("--chat", action="store_true", help="send each prompt as a user message through the "
                     "checkpoint's chat template (chat_template.jinja or tokenizer_config.json), with the assistant "
                     "turn opened")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=positive_int, default=128,
                     help="tokens to generate per prompt (default 128)")
    gen.add_argument("--temperature", type=nonneg_float, default=0.7,
                     help="sampling temperature; 0 = greedy (default 0.7: greedy decoding of a small model tends to "
                          "repeat one token)")
    gen.add_argument("--top-k", type=nonneg_int, default=20,
                     help="sample among the k most likely tokens (0 = off; default 20)")
    gen.add_argument("--top-p", type=fraction(low_open=True), default=1.0, help="nucleus sampling mass (1 = off)")
    gen.add_argument("--warmup", action="store_true", help="compile before timing, so TTFT excludes compilation")
    gen.add_argument("--chunk-size", type=nonneg_int, default=0,
                     help="prefill the prompt in chunks of this many tokens (0 = one shot); bounds memory for long prompts")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    out.add_argument("--layout", action="store_true", help="print the pattern layout (F layers, scanned stages) first")
    a = p.parse_args(argv)
    if a.init and a.ckpt:
        p.error("--init random builds a fresh model; drop --ckpt or --init")
    if a.init and not a.config:
        p.error("--init random needs --config (a JSON file or a preset name such as tiny)")
    if a.config and not a.init and not a.ckpt:
        p.error("--config alone has no weights; add --init random or --ckpt DIR")
    return a


def read_prompts(a) -> list[str]:
    prompts = list(a.prompt)
    for f in a.prompt_file:
        prompts.append(read_text(f, f"--prompt-file {str(f)!r}"))
    if not prompts:
        if sys.stdin is None or sys.stdin.isatty():
            raise UserError("no prompt: pass --prompt TEXT, --prompt-file FILE, or pipe text on stdin")
        prompts.append(read_stdin())
    if any(not p for p in prompts):
        raise UserError("a prompt is empty; give at least one character")
    return prompts


def main(argv=None) -> int:
    a = parse_args(argv)
    mesh = mesh_from_args(a)
    opts = RunOptions.for_impl(a.impl)
    prompts = read_prompts(a)
    if a.chat:  # the template is found before a checkpoint is loaded
        template = load_chat_template(None if a.init else a.ckpt or DEFAULT_CKPT)
        prompts = [template.render([{"role": "user", "content": p}]) for p in prompts]
    model, ckpt = load_model(a, mesh)
    cfg = model.cfg
    tok = load_tokenizer(ckpt)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} ids but the model's vocab_size is {cfg.vocab_size}")
    ids = [tok.encode(p, special=not a.chat) for p in prompts]  # a chat template writes its special tokens
    longest = max(map(len, ids))
    if longest + a.max_new_tokens > cfg.max_position_embeddings:
        raise UserError(f"prompt of {longest} tokens + {a.max_new_tokens} new tokens exceeds max_position_embeddings "
                        f"= {cfg.max_position_embeddings}; shorten the prompt or lower --max-new-tokens")
    check_fits(model, mesh, len(ids), longest + a.max_new_tokens, a.chunk_size or longest, opts,
               "lower --chunk-size, --max-new-tokens or the number of prompts, or shard over more devices (--mesh)")
    engine = Engine(model, opts, mesh)
    n_full = model.pattern.count("F")
    if a.layout and not a.json:
        print(describe_layout(model.pattern, moe_layers(cfg)), file=sys.stderr)

    stream = tok.stream() if not a.json and len(prompts) == 1 else None
    if stream:
        print(prompts[0], end="", flush=True)

    def on_token(step_tokens: np.ndarray):
        if stream and step_tokens[0] >= 0:
            print(stream(int(step_tokens[0])), end="", flush=True)

    sampling = Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    outs, stats = engine.generate(ids, a.max_new_tokens, sampling, seed=a.seed, chunk_size=a.chunk_size or None,
                                  eos_id=tok.eos_id, on_token=on_token, warmup=a.warmup)
    texts = [tok.decode(o) for o in outs]
    summary = {"prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens, "ttft_s": round(stats.ttft_s, 4),
               "decode_tok_s": round(stats.decode_tok_s, 2), "indexer_layers": n_full,
               "num_layers": cfg.num_hidden_layers, "pattern": model.pattern, "impl": opts.implementation or "auto",
               "backend": jax.default_backend()}
    if a.json:
        print(json.dumps({"completions": texts, **summary}))
        return 0
    if stream:
        print()
    else:
        for p, t in zip(prompts, texts):
            print(f"--- prompt: {p!r}\n{p}{t}")
    ttft_note = "" if a.warmup else " incl. compile"
    print(f"[{stats.prompt_tokens} prompt tokens | TTFT {stats.ttft_s:.3f}s{ttft_note} | decode {stats.decode_tok_s:.1f} tok/s "
          f"| {n_full} of {cfg.num_hidden_layers} layers run the indexer | impl {opts.implementation or 'auto'}]", file=sys.stderr)
    return 0


main = entry(main)

if __name__ == "__main__":
    raise SystemExit(main())
