"""FP8 against bf16 indexer logits on the GPU: the FP8 kernel's error against the XLA FP8 reference, both kernels'
times (2,048 queries at the end of a Tk-token prompt, the inputs of `ic_jax.bench.kernels`; FP8 includes the
quantization of q and k, and again with k quantized beforehand, as the model's FP8 key cache holds it), and the MMA
instructions in the FP8 block kernel's SASS (compiled from its Triton IR by the installed `triton`, when there is
one).

    PYTHONPATH=. python3 scripts/fp8_indexer_check.py [--tk 32768,204800]
"""

import argparse
import collections
import os
import subprocess
import sys
import tempfile

import jax

from ic_jax.bench.kernels import fp8_cache_args, indexer_inputs, rel_err
from ic_jax.bench.timing import median_time
from ic_jax.ops.indexer_logits import gpu, reference


def mma_opcodes(workdir: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    scripts = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(scripts), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, os.path.join(scripts, "dump_triton_ir.py"), "indexer_fp8", "--rows", "2048",
                    "--tk", "65536"], check=True, cwd=workdir, env=env)
    compiled = triton.compile(os.path.join(workdir, "indexer_fp8.ttir"), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": gpu.BLOCK_TUNING[1], "num_stages": gpu.BLOCK_TUNING[2]})
    ops = collections.Counter(line.split("\t", 1)[1].split()[0] for line in compiled.asm["sass"].splitlines()
                              if "\t" in line)
    return {op: n for op, n in ops.items() if "MMA" in op or op.startswith("F2FP")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tk", default="32768,204800", help="context lengths (default 32768,204800)")
    a = p.parse_args()
    print(jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    for tk in map(int, a.tk.split(",")):
        args = indexer_inputs(1, 2048, tk)
        ref = jax.jit(reference.indexer_logits_fp8)(*args)
        fp8, bf16 = jax.jit(gpu.indexer_logits_fp8), jax.jit(gpu.indexer_logits)
        err, err_bf16 = rel_err(fp8(*args), ref), rel_err(bf16(*args), ref)
        t8, t16 = median_time(fp8, *args), median_time(bf16, *args)
        cached = fp8_cache_args(*args)  # keys quantized beforehand, as the model's FP8 key cache holds them
        t8c = median_time(fp8, *cached)
        print(f"Tk={tk}: fp8 {t8 * 1e3:.3f} ms (keys from an FP8 cache: {t8c * 1e3:.3f} ms), bf16 {t16 * 1e3:.3f} ms, "
              f"bf16/fp8 {t16 / t8:.2f} ({t16 / t8c:.2f}); relative error against the FP8 reference: fp8 kernel "
              f"{err:.2e}, bf16 kernel {err_bf16:.2e}", flush=True)
        del args, ref
    try:
        with tempfile.TemporaryDirectory() as workdir:
            print("FP8 block kernel, SASS MMA and conversion opcodes:", mma_opcodes(workdir))
    except ImportError:
        print("no `triton` package here: SASS not inspected")


if __name__ == "__main__":
    main()
