"""Training-free greedy layer selection (the IndexCache paper's Algorithm 1), resumable.

  python -m ic_jax.search --ckpt runs/m --keep 0.25 --out runs/search/keep0.25.json

Start from all F. Each step flips, one at a time, every remaining F layer except layer 0 to S, measures
the LM loss of each candidate pattern on the same fixed calibration set, and commits the argmin (ties:
the lowest layer). It stops when round(keep * N) layers are F. `--blocks P` is the pipeline variant: the
layers are cut into P contiguous blocks whose first layers stay F, every step evaluates every candidate
and commits the best candidate of each block (P flips per step, about P times fewer steps).

Speed: a pattern is a compiled structure (one scan per run of identical layer groups), so evaluating
hundreds of candidates through their own models costs hundreds of compilations. Instead every candidate
runs on one program (`ic_jax.calibration.reuse`): the all-F model with the pattern as a runtime boolean array, the
calibration batches mapped inside it and `--chunk` candidates stacked per call. So the search compiles
once; `--measure-compile` also times one compilation of a real pattern model for comparison (reported). With
--mesh the params are sharded and each --batch splits over the data axis.

Greedy selection is incremental: the state file (written atomically after every step) holds the whole
trajectory, so a killed search continues where it stopped, and a search for a smaller keep continues the
trajectory of a larger one with the same checkpoint, calibration set and blocks. The output JSON (which
`--pattern @file` accepts) carries the pattern and the loss trajectory; a PNG of loss against the
number of S layers is written beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from ic_jax.calibration.data import DEFAULT_DATA, calibration_windows
from ic_jax.calibration.losses import lm_loss
from ic_jax.calibration.plots import curves
from ic_jax.calibration.reuse import ReuseEvaluator
from ic_jax.cli import (
    ArgumentParser,
    add_impl_argument,
    add_mesh_arguments,
    entry,
    fraction,
    positive_int,
)
from ic_jax.errors import UserError
from ic_jax.files import atomic_write_text, check_output_file, read_json
from ic_jax.model.config import check_context
from ic_jax.model.dsa import repattern
from ic_jax.model.pattern import keep_pattern
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.checkpoint import load_checkpoint, read_config, trained_seq_len
from ic_jax.runtime.sharding import check_data_split, mesh_from_args


def flags(pattern: str) -> list[bool]:
    return [c == "F" for c in pattern]


def block_starts(n: int, blocks: int) -> list[int]:
    return sorted({(j * n) // blocks for j in range(blocks)})


def greedy_step(ev: ReuseEvaluator, tokens, pattern: str, blocks: int, budget: int, chunk: int) -> dict:
    """One step of the search from `pattern`, committing at most `budget` flips."""
    starts = block_starts(len(pattern), blocks)
    cands = [i for i, c in enumerate(pattern) if c == "F" and i not in starts]
    losses = ev.mean_losses([flags(pattern[:i] + "S" + pattern[i + 1:]) for i in cands], tokens, chunk)
    by_loss = sorted(zip(losses.tolist(), cands))  # ties: the lower layer first
    if blocks == 1:
        flipped, loss = [by_loss[0][1]], by_loss[0][0]
    else:
        winners = {}
        for _, i in by_loss:
            winners.setdefault(max(j for j, s in enumerate(starts) if s <= i), i)
        flipped = sorted(sorted(winners.values(), key=lambda i: losses[cands.index(i)])[:budget])
        loss = None
    new = "".join("S" if i in flipped else c for i, c in enumerate(pattern))
    if loss is None:
        loss = float(ev.mean_losses([flags(new)], tokens, chunk)[0])
    return {"num_s": new.count("S"), "pattern": new, "loss": round(float(loss), 6), "flipped": flipped,
            "candidates": {str(i): round(float(v), 6) for i, v in zip(cands, losses)}}


def serving_settings(pattern: str) -> list[str]:
    """One line each: the engine flags that serve `pattern` on the checkpoint as it is (vLLM reads
    use_index_cache + index_topk_pattern, SGLang's IndexCache index_topk_pattern); `python -m ic_jax.convert
    --to-hf` writes it into the checkpoint instead."""
    vllm = json.dumps({"use_index_cache": True, "index_topk_pattern": pattern})
    sglang = json.dumps({"index_topk_pattern": pattern})
    return [f"vLLM:   --hf-overrides '{vllm}'", f"SGLang: --json-model-override-args '{sglang}'"]


def measure_pattern_compile(model, tokens, pattern: str, opts: RunOptions) -> float:
    """Seconds to compile one real pattern model's loss: what a per-pattern search pays per candidate."""
    m = repattern(model, pattern)
    t = time.perf_counter()
    jax.jit(lambda x: lm_loss(m.forward(x, opts).logits, x)).lower(jnp.asarray(tokens)).compile()
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m ic_jax.search", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint directory (all layers keep their indexer)")
    p.add_argument("--calib", default=DEFAULT_DATA,
                   help="glob of calibration files (quote it); default: the held-out files of the stdlib corpus")
    p.add_argument("--calib-seqs", type=positive_int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seq-len", type=positive_int, help="calibration sequence length (default: the training context)")
    p.add_argument("--keep", type=fraction(low_open=True), default=0.25,
                   help="fraction of layers left F (default 0.25)")
    p.add_argument("--blocks", type=positive_int, default=1, help="pipeline variant with P blocks (default 1: exact)")
    p.add_argument("--batch", type=positive_int, default=8, help="sequences per forward (default 8)")
    p.add_argument("--chunk", type=positive_int, default=4, help="candidate patterns per compiled call (default 4)")
    p.add_argument("--heldout-frac", type=fraction(low_open=True, high_open=True), default=0.05,
                   help="held-out fraction of the default split")
    p.add_argument("--out", help="output pattern JSON (default search_keep<KEEP>.json); a .png is written beside")
    p.add_argument("--state", help="state file (default search.state.json beside --out)")
    add_impl_argument(p)
    p.add_argument("--measure-compile", action="store_true",
                   help="also time one compilation of a real pattern model, for comparison")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_mesh_arguments(p)
    a = p.parse_args(argv)
    cfg = read_config(a.ckpt)
    n = cfg.num_hidden_layers
    if a.blocks > n:
        p.error(f"argument --blocks: must be <= the {n} layers of the model, got {a.blocks}")
    if a.calib_seqs % a.batch:
        p.error(f"argument --calib-seqs: must be a multiple of --batch ({a.batch}), got {a.calib_seqs}")
    target = keep_pattern(n, a.keep).count("S")
    if target > n - len(block_starts(n, a.blocks)):
        raise UserError(f"--keep {a.keep} needs {target} S layers, but {a.blocks} blocks keep "
                        f"{len(block_starts(n, a.blocks))} F; use fewer blocks")
    out = check_output_file(a.out or f"search_keep{a.keep}.json", "--out")
    check_output_file(out.with_suffix(".png"), "--out")
    state_path = check_output_file(a.state or out.parent / "search.state.json", "--state")
    mesh = mesh_from_args(a)
    check_data_split(a.batch, mesh, "--batch")
    seq_len = a.seq_len or trained_seq_len(a.ckpt)
    check_context(seq_len, cfg, "--seq-len")
    tokens = calibration_windows(a.calib, a.calib_seqs, seq_len, a.heldout_frac)
    settings = {"ckpt": str(Path(a.ckpt).resolve()), "blocks": a.blocks, "calib": a.calib,
                "calib_sha1": hashlib.sha1(tokens.tobytes()).hexdigest(), "calib_shape": list(tokens.shape)}
    state = read_json(state_path, f"search state {state_path}", keys=("settings", "timing", "trajectory"),
                      fix="delete it to start the search again, or pass another --state")
    if state is not None and state["settings"] != settings:
        raise UserError(f"state file {state_path} belongs to another search ({state['settings']}); "
                        f"pass --state or delete it")
    model = load_checkpoint(a.ckpt, "F" * n, mesh=mesh)
    opts = dataclasses.replace(RunOptions.for_impl(a.impl), mesh=mesh)
    ev = ReuseEvaluator(model, a.batch, opts)
    if state is None:
        t = time.perf_counter()
        base = float(ev.mean_losses([flags("F" * n)], tokens, a.chunk)[0])
        state = {"settings": settings, "timing": {"first_call_s": round(time.perf_counter() - t, 3)},
                 "trajectory": [{"num_s": 0, "pattern": "F" * n, "loss": round(base, 6), "flipped": []}]}
        atomic_write_text(state_path, json.dumps(state, indent=1))
    traj = state["trajectory"]
    evals_s, evals = 0.0, 0
    with tqdm(total=target, initial=min(traj[-1]["num_s"], target), desc="search (S layers)",
              file=sys.stderr, dynamic_ncols=True) as bar:
        while traj[-1]["num_s"] < target:
            t = time.perf_counter()
            step = greedy_step(ev, tokens, traj[-1]["pattern"], a.blocks, target - traj[-1]["num_s"], a.chunk)
            evals_s += time.perf_counter() - t
            evals += len(step["candidates"]) + (a.blocks > 1)
            traj.append(step)
            atomic_write_text(state_path, json.dumps(state, indent=1))
            bar.update(step["num_s"] - traj[-2]["num_s"])
            bar.set_postfix(loss=step["loss"], flipped=step["flipped"])
    if evals:
        state["timing"]["eval_s_per_pattern"] = round(evals_s / evals, 4)
    if a.measure_compile:
        state["timing"]["pattern_model_compile_s"] = round(
            measure_pattern_compile(model, tokens[: a.batch], keep_pattern(n, a.keep), opts), 3)
    atomic_write_text(state_path, json.dumps(state, indent=1))
    done = next((s for s in traj if s["num_s"] == target), None)
    if done is None:
        raise UserError(f"the trajectory in {state_path} jumps past {target} S layers; use another --state")
    upto = traj[: traj.index(done) + 1]
    result = {"pattern": done["pattern"], "keep": a.keep, "num_s": target, "loss": done["loss"],
              "all_f_loss": traj[0]["loss"], "uniform_pattern": keep_pattern(n, a.keep), **settings,
              "seq_len": seq_len, "timing": state["timing"], "trajectory": upto}
    atomic_write_text(out, json.dumps(result, indent=1))
    curves({f"greedy{'' if a.blocks == 1 else f' ({a.blocks} blocks)'}":
            ([s["num_s"] for s in upto], [s["loss"] for s in upto])}, out.with_suffix(".png"),
           f"greedy search, {Path(a.ckpt).name}: calibration loss vs S layers ({n} layers)",
           "number of S layers", "calibration LM loss", hline=traj[0]["loss"])
    if a.json:
        print(json.dumps({k: v for k, v in result.items() if k != "trajectory"}))
    else:
        print(f"pattern {done['pattern']} ({n - target} F of {n}); calibration loss {done['loss']} vs all-F "
              f"{traj[0]['loss']}; wrote {out} and {out.with_suffix('.png')}")
        print("\n".join(serving_settings(done["pattern"])))
    return 0


main = entry(main)

if __name__ == "__main__":
    raise SystemExit(main())
