"""The training loop that train and distill share: one jitted optimizer step on the LM loss and the indexer KL,
and the resumable run of those steps (state saved every few steps, compiled and checked against free memory first)."""

from __future__ import annotations

import functools
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from ic_jax.calibration.data import MIN_RETRIEVAL_LENGTH
from ic_jax.calibration.losses import indexer_loss, lm_loss
from ic_jax.errors import UserError
from ic_jax.model.config import check_context
from ic_jax.model.dsa import DSAModel
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.checkpoint import StateStore
from ic_jax.runtime.memory import compile_within_memory


def graphdef_for(cfg, pattern: str):
    return nnx.graphdef(nnx.eval_shape(lambda: DSAModel(cfg, pattern, nnx.Rngs(0))))


def make_step(graphdef, tx, opts: RunOptions, pattern: str, lm_weight: float, kl_weight: float = 1.0):
    """One jitted optimizer step on lm_weight * LM + kl_weight * indexer_loss(pattern)."""

    def loss_fn(params, tokens):
        logits, aux = nnx.merge(graphdef, params).forward(tokens, opts)
        lm, ikl = lm_loss(logits, tokens), indexer_loss(aux, pattern)
        return lm_weight * lm + kl_weight * ikl, {"lm": lm, "kl": ikl}

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


def run_steps(store: StateStore, steps: list, tree, total: int, batch_fn, batch_shape: tuple[int, int],
              save_every: int, log_every: int, desc: str, time_limit: float | None = None):
    """Runs `total` steps, steps[i] being the jitted (params, opt, tokens) -> (params, opt, metrics) function of
    step i, resuming from the store and saving to it; stops early (saved) after `time_limit` seconds. Each step
    function is compiled first and checked against the free memory. Returns (tree, history, steps done)."""
    tokens = jax.ShapeDtypeStruct(batch_shape, np.int32)
    compiled = {step: compile_within_memory(step, (*tree, tokens), f"a {desc} step of batch {batch_shape[0]} x "
                                            f"{batch_shape[1]} tokens", "lower --batch or --seq-len")
                for step in dict.fromkeys(steps)}
    steps = [compiled[step] for step in steps]
    deadline = time.monotonic() + time_limit if time_limit else None
    start, tree, history = store.restore(tree)
    params, opt_state = tree
    bar = tqdm(range(start, total), initial=start, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
    for i in bar:
        params, opt_state, metrics = steps[i](params, opt_state, batch_fn(i))
        if (i + 1) % log_every == 0 or i + 1 == total:
            history.append({"step": i + 1, **{k: round(float(v), 5) for k, v in metrics.items()}})
            bar.set_postfix({k: history[-1][k] for k in metrics})
        late = deadline is not None and time.monotonic() > deadline
        if (i + 1) % save_every == 0 or i + 1 == total or late:
            store.save(i + 1, (params, opt_state), history)
        if late:
            return (params, opt_state), history, i + 1
    return (params, opt_state), history, total


def check_seq_len(seq_len: int, cfg, retrieval_frac: float, flag: str = "--seq-len") -> None:
    """A training context the model and the retrieval rows can take."""
    check_context(seq_len, cfg, flag)
    if retrieval_frac > 0 and seq_len < MIN_RETRIEVAL_LENGTH:
        raise UserError(f"{flag} {seq_len} is too short for the key-value retrieval rows (at least "
                        f"{MIN_RETRIEVAL_LENGTH}); raise {flag} or pass --retrieval-frac 0")
