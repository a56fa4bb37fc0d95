"""One call each of the indexer (bf16 and FP8) and sparse MLA (prefill and batch-64 decode) GPU kernels on the
inputs of `ic_jax.bench.kernels`, for Nsight Compute on the GPU machine:

    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS=--xla_gpu_autotune_level=0 PYTHONPATH=. ncu --clock-control none \\
      --kernel-name regex:"_block_kernel|^_kernel$" --launch-count 4 --section SpeedOfLight --section Occupancy \\
      --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \\
      --section ComputeWorkloadAnalysis --section InstructionStats python3 scripts/profile_kernels.py [--tk 32768]

(The top-k kernels cannot be profiled this way: XLA runs their overflow branch in a CUDA graph with conditional
nodes, which ncu refuses.)
"""

import argparse
import functools

import jax

from ic_jax.bench.kernels import SCALE, indexer_inputs, mla_inputs
from ic_jax.ops.indexer_logits import gpu as indexer_gpu
from ic_jax.ops.sparse_mla import gpu as mla_gpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tk", type=int, default=32768, help="context length (default 32768)")
    p.add_argument("--rows", type=int, default=2048, help="prefill queries (default 2048)")
    a = p.parse_args()
    args = jax.block_until_ready(indexer_inputs(1, a.rows, a.tk))
    for fn in (indexer_gpu.indexer_logits, indexer_gpu.indexer_logits_fp8):
        jax.block_until_ready(jax.jit(fn)(*args))
    del args
    mla = jax.jit(functools.partial(mla_gpu.sparse_mla, scale=SCALE))
    for batch, queries in ((1, a.rows), (64, 1)):
        jax.block_until_ready(mla(*mla_inputs(batch, queries, a.tk)))


if __name__ == "__main__":
    main()
