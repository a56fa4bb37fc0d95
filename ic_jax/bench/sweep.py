"""python -m ic_jax.bench sweep: tuning variants of the Pallas GPU kernels at one context length, to choose
their defaults on a new GPU. Each row is one (block, num_warps, num_stages) setting of one kernel at the 30B
shapes, timed in the same process; the kernel's current default is marked. A variant that fails (shared memory,
compilation) is reported, not fatal. Each kernel is first checked against its XLA reference at the default.
"""

from __future__ import annotations

import datetime
import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from ic_jax.bench.flags import one_size, subset
from ic_jax.bench.kernels import SCALE, TOPK, attempt, fp8_cache_args, indexer_inputs, mla_inputs, rel_err, same_sets
from ic_jax.bench.timing import print_table, write_json
from ic_jax.cli import SIZE_HELP, ArgumentParser, entry, size_list
from ic_jax.errors import UserError
from ic_jax.files import check_output_file
from ic_jax.ops.indexer_logits import gpu as indexer_gpu
from ic_jax.ops.indexer_logits import reference as indexer_ref
from ic_jax.ops.indexer_logits.reference import fp8_inputs
from ic_jax.ops.sparse_mla import gpu as mla_gpu
from ic_jax.ops.sparse_mla import reference as mla_ref
from ic_jax.ops.topk import gpu as topk_gpu
from ic_jax.ops.topk import reference as topk_ref

VARIANTS = {  # op -> keyword settings tried; the first is the kernel's default (None or absent: the kernel's own)
    "indexer": [dict(block_k=bk, num_warps=w, num_stages=s) for bk, w, s in
                [(None, None, None), (256, 8, 2), (128, 4, 2), (128, 8, 3), (64, 4, 3), (256, 4, 3)]],
    # the FP8 kernel (e4m3 q and keys: half the shared memory per tile of bf16's), with query blocks too
    "indexer_fp8": [dict(block_q=bq, block_k=bk, num_warps=w, num_stages=s) for bq, bk, w, s in
                    [(64, None, None, None), (64, 128, 4, 4), (64, 128, 4, 5), (64, 256, 4, 3), (64, 256, 8, 3),
                     (128, 128, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3), (32, 128, 4, 4)]],
    "mla": [dict(block_h=bh, block_k=bk, block_c=bc, num_warps=w, num_stages=s) for bh, bk, bc, w, s in
            [(None, 64, None, None, None), (32, 64, 128, 4, 2), (32, 64, 64, 4, 3), (32, 64, 256, 4, 3),
             (32, 64, 512, 4, 3), (32, 32, 128, 4, 3), (16, 64, 128, 4, 3), (32, 64, 128, 8, 3)]],
    "topk": [{}] + [dict(cap=c, chunk=n, num_warps=w, select_warps=sw) for c, n, w, sw in
                    [(4096, 2048, 4, 4), (8192, 1024, 4, 4), (8192, 2048, 8, 4), (8192, 2048, 4, 8),
                     (16384, 2048, 4, 8)]]
            # the filter's segments per row (1: one program per row) for few rows (decode)
            + [dict(segments=1), dict(chunk=512), dict(chunk=512, segments=64)]
            # loads of the filter's stream pipelined over 2-3 chunks
            + [dict(num_stages=2), dict(num_stages=3), dict(num_stages=2, chunk=1024),
               dict(num_stages=2, num_warps=8)],
}
KERNELS = {"indexer": indexer_gpu.indexer_logits, "indexer_fp8": indexer_gpu.indexer_logits,
           "mla": functools.partial(mla_gpu.sparse_mla, scale=SCALE),
           "topk": functools.partial(topk_gpu.topk_indices, k=TOPK)}


def inputs(op: str, tq: int, tk: int):
    if op == "indexer":
        return indexer_inputs(1, tq, tk)
    if op == "indexer_fp8":  # as the model calls the kernel: q quantized, keys from the FP8 key cache
        q, k8, w, pos, kv_len, k_scale = fp8_cache_args(*indexer_inputs(1, tq, tk))
        q8, _, wq, _ = fp8_inputs(q, k8, w, k_scale)
        return q8, k8, wq, pos, kv_len, k_scale
    if op == "mla":
        return mla_inputs(1, tq, tk)
    q, k, w, pos, kv_len = indexer_inputs(1, tq, tk)
    return (indexer_gpu.indexer_logits(q, k, w, pos, kv_len),)


def check(op: str, args) -> float | bool:
    """Error of the default setting against the XLA reference: relative error, or top-k set equality."""
    got = KERNELS[op](*args)
    if op == "indexer":
        return rel_err(got, jax.jit(indexer_ref.indexer_logits)(*args))
    if op == "indexer_fp8":  # the formula on the dequantized e4m3 inputs, in XLA
        q8, k8, wq, pos, kv_len, k_scale = args
        ref = jax.jit(indexer_ref.indexer_logits)(q8.astype(jnp.float32), k8.astype(jnp.float32), wq, pos, kv_len)
        return rel_err(got, ref * k_scale[:, None, :])
    if op == "mla":
        return rel_err(got[0], jax.jit(functools.partial(mla_ref.sparse_mla, scale=SCALE))(*args)[0])
    return same_sets(got, jax.jit(functools.partial(topk_ref.topk_indices, k=TOPK))(*args))


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ic_jax.bench sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--tk", type=one_size, default="200Ki", help=f"context length ({SIZE_HELP}; default 200Ki)")
    p.add_argument("--chunks", type=size_list, default="2048,16384",
                   help="prefill queries per call (default 2048,16384)")
    p.add_argument("--ops", type=subset(tuple(VARIANTS)), default="indexer,mla,topk",
                   help=f"subset of {','.join(VARIANTS)} (default indexer,mla,topk)")
    p.add_argument("--json", type=Path, help="write the rows and the device as JSON here")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.json:
        check_output_file(a.json, "--json")
    if jax.default_backend() != "gpu":
        raise UserError("the sweep times the Pallas GPU (Triton) kernels: run it on a GPU")
    device = jax.devices()[0].device_kind
    print(f"{device}, jax {jax.__version__}, Tk {a.tk}", flush=True)
    rows = []
    for op in a.ops:
        for tq in a.chunks:
            args = inputs(op, min(tq, a.tk), a.tk)
            if tq == a.chunks[0]:
                print(f"check {op}: {check(op, args)}", flush=True)
            for n, settings in enumerate(VARIANTS[op]):
                t = attempt(jax.jit(functools.partial(KERNELS[op], **settings)), *args)
                label = " ".join(f"{k}={'default' if v is None else v}" for k, v in settings.items())
                label += " (default)" if n == 0 else ""
                ms = t * 1e3 if isinstance(t, float) else t  # or the failure's text
                rows.append({"op": op, "tq": tq, "settings": label, "ms": ms})
                print(f"{op} Tq={tq} {label}: " + (f"{ms:.3f} ms" if isinstance(ms, float) else ms), flush=True)
            del args
    print("\nall variants:")
    print_table(rows, [("op", "op"), ("tq", "Tq"), ("settings", "settings"), ("ms", "ms")])
    if a.json:
        write_json(a.json, {"device": device, "jax": jax.__version__, "date": datetime.date.today().isoformat(),
                            "tk": a.tk, "rows": rows})
    return 0


main = entry(main)
