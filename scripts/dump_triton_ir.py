"""Dump the Triton IR of a Pallas GPU kernel at the 30B shapes, on any machine (no GPU needed): the kernel is
exported for CUDA, and the Triton module that Pallas builds is printed to OP.ttir with a count of its ops.

    python scripts/dump_triton_ir.py topk|mla|indexer|indexer_fp8 [--tk 204800] [--rows 16]
"""

import argparse
import collections
import functools
import re

import jax
import jax.numpy as jnp

from ic_jax.bench.kernels import SCALE, TOPK, indexer_inputs, mla_inputs
from ic_jax.ops.indexer_logits import gpu as indexer_gpu
from ic_jax.ops.sparse_mla import gpu as mla_gpu
from ic_jax.ops.topk import gpu as topk_gpu
from ic_jax.ops.triton_lowering import triton_modules


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("op", choices=["topk", "mla", "indexer", "indexer_fp8"])
    p.add_argument("--tk", type=int, default=204800, help="context length (default 204800)")
    p.add_argument("--rows", type=int, default=2048, help="queries (top-k rows) per call (default 2048)")
    a = p.parse_args()
    # the benchmark's own inputs, as shapes only (nothing is allocated)
    if a.op == "topk":
        fn = functools.partial(topk_gpu.topk_indices, k=TOPK)
        args = [jax.ShapeDtypeStruct((1, a.rows, a.tk), jnp.float32)]
    elif a.op == "mla":
        fn = functools.partial(mla_gpu.sparse_mla, scale=SCALE)
        args = jax.eval_shape(functools.partial(mla_inputs, 1, a.rows, a.tk))
    else:
        fn = indexer_gpu.indexer_logits_fp8 if a.op == "indexer_fp8" else indexer_gpu.indexer_logits
        args = jax.eval_shape(functools.partial(indexer_inputs, 1, a.rows, a.tk))
    for n, text in enumerate(triton_modules(fn, *args)):
        path = f"{a.op}{n or ''}.ttir"
        with open(path, "w") as f:
            f.write(text)
        ops = collections.Counter(re.findall(r"\b(tt\.[a-z_]+|scf\.[a-z_]+)\b", text))
        print(f"{path}: {len(text.splitlines())} lines;", ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))


if __name__ == "__main__":
    main()
