"""Pretrain a DSA model from scratch on text or code, with DeepSeek's two-stage indexer recipe.

  python -m ic_jax.train --config configs/code_small.json --out runs/small --steps 2000 --dense-steps 500

Stage 1 (dense, the first --dense-steps steps): attention over every visible key (top-k set to the context
length); the LM loss trains the model, and each indexer learns by KL to its layer's head-averaged,
L1-normalised attention. The indexer's inputs are detached, so the two losses train disjoint parameters.
Stage 2 (sparse): real top-k; the indexer's KL is taken over the selected keys, the LM loss trains the rest.

Training data: random byte windows of the train files, with --retrieval-frac of the rows replaced by
key-value lookups (see `ic_jax.calibration.data`) so that the model learns to use far context.
State (params, optimizer, loss history) is saved with orbax every --save-every steps under OUT.state/;
a killed run, started again with the same arguments, resumes there: batches are a function of
(seed, step), so the resumed run ends exactly where an uninterrupted one would. The finished model is
written to OUT as an ic_jax checkpoint (all layers keep their indexer; no pattern), with the loss curves
in OUT/train_curve.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from ic_jax.calibration.data import DEFAULT_DATA, load_split, training_batch
from ic_jax.calibration.plots import curves
from ic_jax.calibration.reuse import ReuseEvaluator
from ic_jax.calibration.training import check_seq_len, graphdef_for, make_step, run_steps
from ic_jax.cli import (
    ArgumentParser,
    add_seed_argument,
    entry,
    fraction,
    nonneg_int,
    positive_float,
    positive_int,
)
from ic_jax.files import claim_output_dir
from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.checkpoint import StateStore, save_checkpoint


def heldout_report(model: DSAModel, held, n: int, length: int, pattern: str | None = None) -> dict:
    """Held-out LM loss of the all-F `model` under `pattern` (default all F)."""
    tokens = held.windows(np.random.default_rng(0), n, length)
    own = [c == "F" for c in pattern or "F" * model.cfg.num_hidden_layers]
    loss = float(np.mean(ReuseEvaluator(model).token_losses(own, tokens)))
    return {"heldout_loss": round(loss, 4), "heldout_ppl": round(float(np.exp(loss)), 3)}


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m ic_jax.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="model config: a preset name or a JSON path (default tiny)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="glob of text/code files (quote it; ** recurses); default: the Python standard library")
    p.add_argument("--heldout-frac", type=fraction(low_open=True, high_open=True), default=0.05,
                   help="fraction of files held out (default 0.05)")
    p.add_argument("--out", required=True, help="output checkpoint directory; training state goes to OUT.state/. "
                   "An existing OUT is replaced only if it is this run's own checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace whatever is at --out and start OUT.state/ afresh")
    p.add_argument("--steps", type=positive_int, default=1000, help="total optimizer steps (default 1000)")
    p.add_argument("--dense-steps", type=nonneg_int, default=200,
                   help="steps of the dense stage, first (default 200)")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=positive_int, default=256,
                   help="training context in tokens (bytes) (default 256)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate, cosine decay (default 1e-3)")
    p.add_argument("--warmup", type=nonneg_int, default=100, help="learning-rate warm-up steps (default 100)")
    p.add_argument("--retrieval-frac", type=fraction(), default=0.25,
                   help="fraction of rows that are key-value retrieval samples (default 0.25)")
    p.add_argument("--save-every", type=positive_int, default=200,
                   help="save the training state every N steps (default 200)")
    p.add_argument("--log-every", type=positive_int, default=10, help="record the losses every N steps (default 10)")
    p.add_argument("--remat", action="store_true", help="rematerialise layer groups in the backward pass (less memory)")
    p.add_argument("--time-limit", type=positive_float,
                   help="stop (state saved, checkpoint written) after this many seconds")
    add_seed_argument(p, what="init and data")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    if a.dense_steps > a.steps:
        p.error(f"argument --dense-steps: must be <= --steps ({a.steps}), got {a.dense_steps}")
    cfg = load_config(a.config)
    check_seq_len(a.seq_len, cfg, a.retrieval_frac)
    settings = {k: v for k, v in vars(a).items()
                if k not in ("json", "save_every", "log_every", "remat", "time_limit", "overwrite")}
    settings["config"] = cfg.to_dict()
    claim_output_dir(a.out, "--out", settings=settings, overwrite=a.overwrite)
    train, held = load_split(a.data, a.heldout_frac)
    n = cfg.num_hidden_layers
    all_f = "F" * n
    model = DSAModel(cfg, all_f, nnx.Rngs(a.seed))
    graphdef, params = nnx.split(model)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, a.lr, min(a.warmup, a.steps - 1), a.steps, a.lr * 0.1), weight_decay=0.01))
    opts = RunOptions(mode="train", remat=a.remat, index_block=a.seq_len)
    dense = make_step(graphdef_for(cfg.replace(index_topk=max(cfg.index_topk, a.seq_len)), all_f), tx, opts, all_f, 1.0)
    sparse = make_step(graphdef, tx, opts, all_f, 1.0)
    store = StateStore(Path(a.out + ".state"), settings, overwrite=a.overwrite)
    (params, _), history, done = run_steps(
        store, [dense] * a.dense_steps + [sparse] * (a.steps - a.dense_steps), (params, tx.init(params)), a.steps,
        lambda i: training_batch(np.random.default_rng([a.seed, i]), train, a.batch, a.seq_len, a.retrieval_frac),
        (a.batch, a.seq_len), a.save_every, a.log_every, "train", a.time_limit)
    model = nnx.merge(graphdef, params)
    report = {"out": a.out, "steps": done, "planned_steps": a.steps, "dense_steps": a.dense_steps, "layers": n,
              "seq_len": a.seq_len, "index_topk": cfg.index_topk, "train_files": train.num_files,
              "heldout_files": held.num_files, "params": sum(x.size for x in jax.tree.leaves(params)),
              **heldout_report(model, held, 8, a.seq_len), "final": history[-1]}
    save_checkpoint(a.out, model, meta={**report, "settings": settings, "history": history}, overwrite=a.overwrite)
    steps = [h["step"] for h in history]
    curves({"LM loss": (steps, [h["lm"] for h in history]), "indexer KL": (steps, [h["kl"] for h in history])},
           Path(a.out) / "train_curve.png", f"training {Path(a.out).name}: {a.dense_steps} dense steps, then top-"
           f"{cfg.index_topk} of {a.seq_len}", "step", "nats (log scale)", logy=True)
    if a.json:
        print(json.dumps(report))
    else:
        print(f"trained {n} layers for {done} of {a.steps} steps ({a.dense_steps} dense): final LM loss {history[-1]['lm']}, "
              f"indexer KL {history[-1]['kl']}; held-out loss {report['heldout_loss']} "
              f"(ppl {report['heldout_ppl']}); checkpoint {a.out}")
    return 0


main = entry(main)

if __name__ == "__main__":
    raise SystemExit(main())
