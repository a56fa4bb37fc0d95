"""Training-aware IndexCache: multi-layer distillation of each F layer's indexer, resumable.

  python -m ic_jax.distill --ckpt runs/m --pattern keep:0.25 --out runs/m-distill-0.25 --steps 300

Each F layer l serving layers l..l+m (itself and its S layers) trains its indexer on
    L_multi = sum_j 1/(m+1) * KL(p^(l+j) || softmax(I^(l)))
(`ic_jax.calibration.losses.multi_layer_kl`), whose gradient equals that of KL to the served layers' average
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

from ic_jax.calibration.data import DEFAULT_DATA, load_split, training_batch
from ic_jax.calibration.training import check_seq_len, graphdef_for, make_step, run_steps
from ic_jax.cli import ArgumentParser, add_seed_argument, entry, fraction, nonneg_int, positive_float, positive_int
from ic_jax.files import claim_output_dir
from ic_jax.model.dsa import build_model, layer_params, top_params
from ic_jax.model.pattern import parse_pattern
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.checkpoint import StateStore, load_checkpoint, read_config, save_checkpoint, trained_seq_len


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m ic_jax.distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="trained checkpoint directory")
    p.add_argument("--pattern", required=True, help="the IndexCache pattern (any --pattern spelling, e.g. keep:0.25)")
    p.add_argument("--out", required=True, help="output checkpoint directory; state goes to OUT.state/. An existing "
                   "OUT is replaced only if it is this run's own checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace whatever is at --out and start OUT.state/ afresh")
    p.add_argument("--data", default=DEFAULT_DATA, help="glob of training files (quote it); default: stdlib")
    p.add_argument("--steps", type=nonneg_int, default=200, help="warm-up steps, F indexers only (default 200)")
    p.add_argument("--sparse-steps", type=nonneg_int, default=0,
                   help="sparse-stage steps after the warm-up (default 0)")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=positive_int, help="context length (default: the training context)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="warm-up learning rate (default 1e-3)")
    p.add_argument("--sparse-lr", type=positive_float, default=1e-4, help="sparse-stage learning rate (default 1e-4)")
    p.add_argument("--retrieval-frac", type=fraction(), default=0.25,
                   help="retrieval rows in the batches (default 0.25)")
    p.add_argument("--save-every", type=positive_int, default=100, help="save state every N steps (default 100)")
    add_seed_argument(p, default=1, what="the data")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    if a.steps + a.sparse_steps < 1:
        p.error("argument --steps: --steps and --sparse-steps are both 0; give at least one step")
    cfg = read_config(a.ckpt)
    n = cfg.num_hidden_layers
    pattern = parse_pattern(a.pattern, n)
    seq_len = a.seq_len or trained_seq_len(a.ckpt)
    check_seq_len(seq_len, cfg, a.retrieval_frac)
    settings = {k: v for k, v in vars(a).items() if k not in ("json", "save_every", "overwrite")}
    claim_output_dir(a.out, "--out", settings=settings, overwrite=a.overwrite)
    train = load_split(a.data, 0.05)[0]
    batches = lambda i: training_batch(np.random.default_rng([a.seed, i]), train, a.batch, seq_len,  # noqa: E731
                                       a.retrieval_frac)
    opts = RunOptions(mode="train", index_block=seq_len)
    all_f = "F" * n

    graphdef, params = nnx.split(load_checkpoint(a.ckpt, all_f))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(a.lr))
    warm = make_step(graphdef_for(cfg.replace(index_topk=max(cfg.index_topk, seq_len)), all_f), tx, opts, pattern, 0.0)
    state = Path(a.out + ".state")
    (params, _), history, _ = run_steps(StateStore(state / "warmup", settings, overwrite=a.overwrite), [warm] * a.steps,
                                        (params, tx.init(params)), a.steps, batches, (a.batch, seq_len), a.save_every,
                                        10, "distill warm-up")
    warmed = nnx.merge(graphdef, params)
    model = build_model(cfg, pattern, layer_params(warmed), top_params(warmed))
    if a.sparse_steps:
        graphdef_p, params_p = nnx.split(model)
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(a.sparse_lr, weight_decay=0.01))
        sparse = make_step(graphdef_p, tx, opts, pattern, 1.0)
        (params_p, _), more, _ = run_steps(
            StateStore(state / "sparse", settings, overwrite=a.overwrite), [sparse] * a.sparse_steps,
            (params_p, tx.init(params_p)), a.sparse_steps, lambda i: batches(a.steps + i), (a.batch, seq_len),
            a.save_every, 10, "distill sparse")
        history += more
        model = nnx.merge(graphdef_p, params_p)
    layers = layer_params(model)
    for i, lp in enumerate(layer_params(warmed)):  # S layers keep an indexer, so the checkpoint stays all-F-able
        layers[i] = {**lp, **layers[i]}
    full = build_model(cfg, all_f, layers, top_params(model))
    report = {"out": a.out, "pattern": pattern, "steps": a.steps, "sparse_steps": a.sparse_steps,
              "final": history[-1] if history else None}
    save_checkpoint(a.out, full, pattern=pattern, overwrite=a.overwrite,
                    meta={**report, "seq_len": seq_len, "settings": settings, "history": history})
    if a.json:
        print(json.dumps(report))
    else:
        print(f"distilled {pattern.count('F')} F indexers of {n} ({a.steps} warm-up, {a.sparse_steps} sparse steps); "
              f"checkpoint {a.out}")
    return 0


main = entry(main)

if __name__ == "__main__":
    raise SystemExit(main())
