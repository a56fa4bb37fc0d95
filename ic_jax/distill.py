"""Training-aware IndexCache: multi-layer distillation of each F layer's indexer, resumable.

  python -m ic_jax.distill --ckpt runs/m --pattern keep:0.25 --out runs/m-distill-0.25 --steps 300

Each F layer l serving layers l..l+m (itself and its S layers) trains its indexer on
    L_multi = sum_j 1/(m+1) * KL(p^(l+j) || softmax(I^(l)))
(`ic_jax.losses.multi_layer_kl`), whose gradient equals that of KL to the served layers' average
distribution. Warm-up (--steps): dense attention, only the F layers' indexers learn (the rest gets no
gradient: targets and indexer inputs are detached). Optional sparse stage (--sparse-steps): the pattern's
own top-k, L_multi over the selected keys, plus the LM loss for the rest of the model.
The result is a checkpoint whose pattern.json is the pattern (S layers keep their old, unused indexers).
State is saved under OUT.state/ every --save-every steps; a killed run continues there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optax
from flax import nnx

from ic_jax.checkpoint import StateStore, load_checkpoint, read_config, save_checkpoint, trained_seq_len
from ic_jax.data import DEFAULT_DATA, load_split, training_batch
from ic_jax.errors import ArgumentParser, UserError, cli_entry
from ic_jax.model import build_model, layer_params, top_params
from ic_jax.pattern import parse_pattern
from ic_jax.run_options import RunOptions
from ic_jax.train import graphdef_for, make_step, run_steps


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m ic_jax.distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="trained checkpoint directory")
    p.add_argument("--pattern", required=True, help="the IndexCache pattern (any --pattern spelling, e.g. keep:0.25)")
    p.add_argument("--out", required=True, help="output checkpoint directory; state goes to OUT.state/")
    p.add_argument("--data", default=DEFAULT_DATA, help="glob of training files (quote it); default: stdlib")
    p.add_argument("--steps", type=int, default=200, help="warm-up steps, F indexers only (default 200)")
    p.add_argument("--sparse-steps", type=int, default=0, help="sparse-stage steps after the warm-up (default 0)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, help="context length (default: the training context)")
    p.add_argument("--lr", type=float, default=1e-3, help="warm-up learning rate (default 1e-3)")
    p.add_argument("--sparse-lr", type=float, default=1e-4, help="sparse-stage learning rate (default 1e-4)")
    p.add_argument("--retrieval-frac", type=float, default=0.25, help="retrieval rows in the batches (default 0.25)")
    p.add_argument("--save-every", type=int, default=100, help="save state every N steps (default 100)")
    p.add_argument("--seed", type=int, default=1, help="data seed (default 1)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    cfg = read_config(a.ckpt)
    n = cfg.num_hidden_layers
    pattern = parse_pattern(a.pattern, n)
    if a.steps < 0 or a.sparse_steps < 0 or a.steps + a.sparse_steps < 1 or a.batch < 1 or a.save_every < 1:
        raise UserError("need --steps, --sparse-steps >= 0 with a positive sum, and --batch, --save-every >= 1")
    seq_len = a.seq_len or trained_seq_len(a.ckpt)
    train = load_split(a.data, 0.05)[0]
    batches = lambda i: training_batch(np.random.default_rng([a.seed, i]), train, a.batch, seq_len,  # noqa: E731
                                       a.retrieval_frac)
    settings = {k: v for k, v in vars(a).items() if k not in ("json", "save_every")}
    opts = RunOptions(mode="train", index_block=seq_len)
    all_f = "F" * n

    graphdef, params = nnx.split(load_checkpoint(a.ckpt, all_f))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(a.lr))
    warm = make_step(graphdef_for(cfg.replace(index_topk=max(cfg.index_topk, seq_len)), all_f), tx, opts, pattern, 0.0)
    (params, _), history, _ = run_steps(StateStore(Path(a.out + ".state") / "warmup", settings), [warm] * a.steps,
                                     (params, tx.init(params)), a.steps, batches, a.save_every, 10, "distill warm-up")
    warmed = nnx.merge(graphdef, params)
    model = build_model(cfg, pattern, layer_params(warmed), top_params(warmed))
    if a.sparse_steps:
        graphdef_p, params_p = nnx.split(model)
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(a.sparse_lr, weight_decay=0.01))
        sparse = make_step(graphdef_p, tx, opts, pattern, 1.0)
        (params_p, _), more, _ = run_steps(
            StateStore(Path(a.out + ".state") / "sparse", settings), [sparse] * a.sparse_steps,
            (params_p, tx.init(params_p)), a.sparse_steps, lambda i: batches(a.steps + i), a.save_every, 10,
            "distill sparse")
        history += more
        model = nnx.merge(graphdef_p, params_p)
    layers = layer_params(model)
    for i, lp in enumerate(layer_params(warmed)):  # S layers keep an indexer, so the checkpoint stays all-F-able
        layers[i] = {**lp, **layers[i]}
    full = build_model(cfg, all_f, layers, top_params(model))
    report = {"out": a.out, "pattern": pattern, "steps": a.steps, "sparse_steps": a.sparse_steps,
              "final": history[-1] if history else None}
    save_checkpoint(a.out, full, pattern=pattern, meta={**report, "seq_len": seq_len, "settings": settings,
                                                        "history": history})
    if a.json:
        print(json.dumps(report))
    else:
        print(f"distilled {pattern.count('F')} F indexers of {n} ({a.steps} warm-up, {a.sparse_steps} sparse steps); "
              f"checkpoint {a.out}")
    return 0


main = cli_entry(main)

if __name__ == "__main__":
    raise SystemExit(main())
