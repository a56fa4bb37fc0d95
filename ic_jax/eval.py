"""Evaluate patterns side by side: held-out LM loss and perplexity, and key-value retrieval accuracy at
several context lengths.

  python -m ic_jax.eval --ckpt runs/m --patterns FFFF keep:0.5 @runs/search/keep0.5.json --extra-ckpt runs/d

Each --patterns entry is evaluated on the --ckpt weights; each --extra-ckpt (a distilled checkpoint, say)
under its own pattern.json. Retrieval (see `ic_jax.calibration.data`): a table of keys and 4-digit values at the start,
real code as filler, the lookup at the end; a sample counts as right when greedy (argmax) prediction gets
every digit of the value, and answer_nll is the mean loss of those digits (chance: ln 10). All rows run
through one compiled program per sequence length (`ic_jax.calibration.reuse`); with --mesh the params are sharded
and each --batch splits over the data axis.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ic_jax.calibration.data import (
    ANSWER_DIGITS,
    DEFAULT_DATA,
    MIN_RETRIEVAL_LENGTH,
    Corpus,
    load_split,
    resolve_files,
    retrieval_set,
)
from ic_jax.calibration.reuse import ReuseEvaluator
from ic_jax.cli import (
    ArgumentParser,
    add_impl_argument,
    add_mesh_arguments,
    entry,
    positive_int,
)
from ic_jax.files import atomic_write_text, check_output_file
from ic_jax.model.config import check_context
from ic_jax.model.pattern import parse_pattern
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.checkpoint import (
    default_pattern,
    load_checkpoint,
    read_config,
    trained_seq_len,
)
from ic_jax.runtime.sharding import check_data_split, mesh_from_args


def retrieval_scores(ev: ReuseEvaluator, own, tokens: np.ndarray, starts: np.ndarray) -> tuple[float, float]:
    """(exact-match accuracy of all answer digits under teacher forcing, mean NLL of an answer digit in nats).
    The NLL still ranks patterns when no pattern gets whole answers right (chance is ln 10 = 2.30)."""
    losses, argmax = ev.run(own, tokens)
    rows = np.arange(len(tokens))[:, None]
    cols = starts[:, None] + np.arange(ANSWER_DIGITS)[None]
    exact = np.all(argmax[rows, cols - 1] == tokens[rows, cols], axis=1)
    return float(np.mean(exact)), float(np.mean(losses[rows, cols - 1]))


def evaluate(ev: ReuseEvaluator, pattern: str, heldout: np.ndarray, retrieval: dict) -> dict:
    own = [c == "F" for c in pattern]
    loss = float(np.mean(ev.token_losses(own, heldout)))
    row = {"pattern": pattern, "indexers": pattern.count("F"), "loss": round(loss, 4),
           "ppl": round(float(np.exp(loss)), 3)}
    for length, (tokens, starts) in retrieval.items():
        acc, nll = retrieval_scores(ev, own, tokens, starts)
        row[f"retrieval@{length}"], row[f"answer_nll@{length}"] = round(acc, 4), round(nll, 4)
    return row


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m ic_jax.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint directory evaluated under each --patterns entry")
    p.add_argument("--patterns", nargs="*", default=[], help="pattern specs (any --pattern spelling, e.g. @file)")
    p.add_argument("--extra-ckpt", nargs="*", default=[], help="more checkpoints, each under its own pattern.json")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="glob of held-out files (quote it); default: the held-out files of the stdlib corpus")
    p.add_argument("--seqs", type=positive_int, default=32, help="held-out sequences for the LM loss (default 32)")
    p.add_argument("--seq-len", type=positive_int, help="held-out sequence length (default: the training context)")
    p.add_argument("--lengths", type=positive_int, nargs="*",
                   help=f"retrieval lengths, each at least {MIN_RETRIEVAL_LENGTH} (default: 1/4, 1/2 and 1 x seq-len, "
                        f"those long enough)")
    p.add_argument("--retrieval-n", type=positive_int, default=64, help="retrieval samples per length (default 64)")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per forward (default 8)")
    add_impl_argument(p)
    p.add_argument("--out", help="also write the table as JSON here")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    add_mesh_arguments(p)
    a = p.parse_args(argv)
    if not a.patterns and not a.extra_ckpt:
        p.error("nothing to evaluate: give --patterns and/or --extra-ckpt")
    short = [n_ for n_ in a.lengths or [] if n_ < MIN_RETRIEVAL_LENGTH]
    if short:
        p.error(f"argument --lengths: {short[0]} is too short for a key-value lookup; use at least "
                f"{MIN_RETRIEVAL_LENGTH}")
    out = check_output_file(a.out, "--out") if a.out else None
    mesh = mesh_from_args(a)
    check_data_split(a.batch, mesh, "--batch")
    cfg = read_config(a.ckpt)
    n = cfg.num_hidden_layers
    rows = [(spec, a.ckpt, parse_pattern(spec, n)) for spec in a.patterns]
    configs = [cfg]
    for d in a.extra_ckpt:
        configs.append(read_config(d))
        rows.append((Path(d).name, d, parse_pattern(default_pattern(d), configs[-1].num_hidden_layers)))
    seq_len = a.seq_len or trained_seq_len(a.ckpt)
    lengths = a.lengths or sorted(n_ for n_ in {seq_len // 4, seq_len // 2, seq_len} if n_ >= MIN_RETRIEVAL_LENGTH)
    for c in configs:
        check_context(seq_len, c, "--seq-len")
        for length in lengths:
            check_context(length, c, "--lengths")
    held = load_split(a.data, 0.05)[1] if a.data == DEFAULT_DATA else Corpus(resolve_files(a.data))
    heldout = held.windows(np.random.default_rng(99), a.seqs, seq_len)
    retrieval = {length: retrieval_set(held, a.retrieval_n, length, seed=length) for length in lengths}
    opts = dataclasses.replace(RunOptions.for_impl(a.impl), mesh=mesh)
    evaluators = {ckpt: ReuseEvaluator(load_checkpoint(ckpt, "F" * c.num_hidden_layers, mesh=mesh), a.batch, opts)
                  for ckpt, c in zip([a.ckpt, *a.extra_ckpt], configs)}
    table = []
    for label, ckpt, pattern in tqdm(rows, desc="eval", file=sys.stderr, dynamic_ncols=True):
        table.append({"label": label, "ckpt": ckpt, **evaluate(evaluators[ckpt], pattern, heldout, retrieval)})
    result = {"seq_len": seq_len, "heldout_seqs": a.seqs, "retrieval_n": a.retrieval_n, "rows": table}
    if out:
        atomic_write_text(out, json.dumps(result, indent=1))
    if a.json:
        print(json.dumps(result))
    else:
        cols = ["loss", "ppl"] + [f"{m}@{n_}" for n_ in lengths for m in ("retrieval", "answer_nll")]
        print(f"{'label':<28} {'F':>3} " + " ".join(f"{c:>15}" for c in cols))
        for r in table:
            print(f"{r['label'][:28]:<28} {r['indexers']:>3} " + " ".join(f"{r[c]:>15}" for c in cols))
    return 0


main = entry(main)

if __name__ == "__main__":
    raise SystemExit(main())
