"""Pairwise top-k overlap between layers: O[i, j] = |T_i ∩ T_j| / k, averaged over tokens.

  python -m ic_jax.overlap --ckpt runs/m --pattern @runs/search/keep0.25.json --out runs/overlap

T_i is the set layer i's own indexer selects (the model runs all F). Only tokens with at least k visible
keys count (earlier tokens select everything they see, in every layer). Writes OUT.json and a heatmap
OUT.png; with --pattern, the pattern's groups (an F layer and the S layers it serves) are boxed. With --mesh the
params are sharded and each --batch splits over the data axis (the train-mode forward is dense XLA, partitioned to
follow the params).
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from ic_jax.calibration.data import DEFAULT_DATA, calibration_windows
from ic_jax.calibration.plots import overlap_heatmap
from ic_jax.cli import ArgumentParser, add_mesh_arguments, entry, positive_int
from ic_jax.errors import UserError
from ic_jax.files import atomic_write_text, check_output_file
from ic_jax.model.attention import selection_mask
from ic_jax.model.config import check_context
from ic_jax.model.pattern import parse_pattern
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.checkpoint import load_checkpoint, read_config, trained_seq_len
from ic_jax.runtime.sharding import check_data_split, mesh_from_args, put_batch


@functools.partial(jax.jit, static_argnums=(0,))
def overlap_counts(graphdef, params, tokens):
    """Sum over counted tokens of |T_i ∩ T_j| [N, N], and the number of counted tokens."""
    model = nnx.merge(graphdef, params)
    _, aux = model.forward(tokens, RunOptions(mode="train", index_block=tokens.shape[1]))
    k, T = model.cfg.index_topk, tokens.shape[1]
    masks = jnp.stack([selection_mask(a["indices"], T)[:, k - 1:] for a in aux]).astype(jnp.float32)
    return jnp.einsum("ibts,jbts->ij", masks, masks), masks.shape[1] * masks.shape[2]


def overlap_matrix(model, tokens: np.ndarray, batch: int, mesh=None) -> np.ndarray:
    """The overlap matrix over `tokens`, `batch` sequences per forward (split over "data" on `mesh`, where the
    params lie)."""
    if tokens.shape[1] < model.cfg.index_topk:
        raise UserError(f"sequences of {tokens.shape[1]} tokens never reach k = {model.cfg.index_topk} visible keys")
    graphdef, params = nnx.split(model)
    total, count = 0.0, 0
    for i in tqdm(range(0, len(tokens), batch), desc="overlap", file=sys.stderr, dynamic_ncols=True):
        s, c = overlap_counts(graphdef, params, put_batch(tokens[i:i + batch], mesh))
        total, count = total + np.asarray(s), count + int(c)
    return total / (count * model.cfg.index_topk)


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m ic_jax.overlap", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint directory (every layer needs its indexer)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="glob of text files (quote it); default: the held-out files of the stdlib corpus")
    p.add_argument("--seqs", type=positive_int, default=8, help="sequences to average over (default 8)")
    p.add_argument("--seq-len", type=positive_int, help="sequence length (default: the training context)")
    p.add_argument("--batch", type=positive_int, default=4, help="sequences per forward (default 4)")
    p.add_argument("--pattern", help="a pattern to draw on the heatmap (any --pattern spelling)")
    p.add_argument("--out", default="overlap", help="output stem: writes OUT.json and OUT.png (default overlap)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_mesh_arguments(p)
    a = p.parse_args(argv)
    out = Path(a.out)
    for suffix in (".json", ".png"):
        check_output_file(out.with_suffix(suffix), "--out")
    mesh = mesh_from_args(a)
    check_data_split(a.batch, mesh, "--batch")
    check_data_split(a.seqs, mesh, "--seqs")  # the last batch holds what is left of them
    cfg = read_config(a.ckpt)
    n = cfg.num_hidden_layers
    pattern = parse_pattern(a.pattern, n) if a.pattern else None
    seq_len = a.seq_len or trained_seq_len(a.ckpt)
    check_context(seq_len, cfg, "--seq-len")
    model = load_checkpoint(a.ckpt, "F" * n, mesh=mesh)
    tokens = calibration_windows(a.data, a.seqs, seq_len, 0.05)
    m = overlap_matrix(model, tokens, a.batch, mesh)
    adjacent = float(np.mean(np.diag(m, 1))) if n > 1 else 1.0
    result = {"ckpt": a.ckpt, "layers": n, "k": model.cfg.index_topk, "seq_len": tokens.shape[1],
              "seqs": len(tokens), "adjacent_mean": round(adjacent, 4), "pattern": pattern,
              "matrix": np.round(m, 4).tolist()}
    atomic_write_text(out.with_suffix(".json"), json.dumps(result))
    overlap_heatmap(m, out.with_suffix(".png"), f"top-k overlap, {Path(a.ckpt).name} (k={model.cfg.index_topk}, "
                    f"T={tokens.shape[1]}); adjacent layers {adjacent:.2f}", pattern)
    if a.json:
        print(json.dumps({k: v for k, v in result.items() if k != "matrix"}))
    else:
        print(f"mean overlap of adjacent layers {adjacent:.3f}, first vs last {m[0, -1]:.3f}; "
              f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


main = entry(main)

if __name__ == "__main__":
    raise SystemExit(main())
