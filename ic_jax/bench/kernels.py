"""python -m ic_jax.bench kernels: the DSA kernels at the 30B shapes, against ceilings measured in the same run.

Shapes: indexer 32 heads x 128, top-k 2048; attention 20 heads, latent 512, RoPE 64, 2048 selected keys.
For each context length Tk: a prefill chunk (the last `--chunk` queries of a Tk-token prompt, so nearly every
key is visible) and decode batches (one query per sequence at position Tk - 1). Each row gives the Pallas
time (median), its rate as TFLOP/s and GB/s with the share of the measured bf16 matmul and copy ceilings,
and the XLA reference time beside it ("OOM" where XLA runs out of memory). A correctness check of every
kernel against the XLA reference runs first (skip with --no-check).

With --indexer-fp8, an "indexer_fp8" row follows each indexer row: the same logits with q and k quantized to
e4m3 (a scale per vector), against the XLA FP8 reference. As in the model (its FP8 key cache), k comes quantized
and q is quantized in the timed call; "% mm" is still the share of the bf16 ceiling (the fp8 peak of H100/H200 is
twice that, so up to 200%).

Sparse MLA prefill gathers 2048 rows of 576 values per query and does 38 FLOP per gathered byte at 20 heads, far
below the matmul ridge, so its bound is the rate at which a kernel can gather rows. That rate is measured at
each Tk in the same run (a Pallas kernel that only gathers the same rows, `gather_rows`, at the fastest of a few
block sizes), and "% roof" is the MLA prefill rate as a share of min(bf16 ceiling, FLOP per gathered byte x gather
rate).
"""

from __future__ import annotations

import datetime
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ic_jax.bench.flags import positive_int_list, subset
from ic_jax.bench.timing import measure_ceilings, median_time, print_table, write_json
from ic_jax.cli import SIZE_HELP, ArgumentParser, entry, positive_int, size_list
from ic_jax.errors import UserError
from ic_jax.files import check_output_file
from ic_jax.ops import indexer_logits, sparse_mla, topk_indices
from ic_jax.ops.dispatch import pallas_name
from ic_jax.ops.indexer_logits.reference import quantize_fp8

H_I, D_I, TOPK = 32, 128, 2048
HEADS, LATENT, ROPE = 20, 512, 64
SCALE = (192 + 64) ** -0.5
OPS = ("indexer", "topk", "mla")  # --indexer-fp8 adds "indexer_fp8"
GATHER_BLOCKS = (16, 32, 64)  # the gather ceiling is the fastest of these row blocks
COLUMNS = [("op", "op"), ("mode", "mode"), ("tk", "Tk"), ("shape", "B x Tq"), ("ms", "ms"),
           ("tflops", "TFLOP/s"), ("pct_matmul", "% mm"), ("gbs", "GB/s"), ("pct_copy", "% copy"),
           ("pct_roof", "% roof"),
           ("xla_ms", "XLA ms"), ("speedup", "XLA/pallas")]


def rand(key, shape, dtype=jnp.bfloat16):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def indexer_inputs(b, tq, tk, seed=0):
    q_pos = jnp.broadcast_to(jnp.arange(tk - tq, tk, dtype=jnp.int32), (b, tq))
    return (rand(seed, (b, tq, H_I, D_I)), rand(seed + 1, (b, tk, D_I)), rand(seed + 2, (b, tq, H_I), jnp.float32),
            q_pos, jnp.full((b,), tk, jnp.int32))


def mla_inputs(b, tq, tk, k=TOPK, seed=0):
    idx = jax.random.randint(jax.random.key(seed + 4), (b, tq, k), 0, tk, jnp.int32)
    return (rand(seed, (b, tq, HEADS, LATENT)), rand(seed + 1, (b, tq, HEADS, ROPE)), rand(seed + 2, (b, tk, LATENT)),
            rand(seed + 3, (b, tk, ROPE)), jnp.sort(idx, axis=-1))


def _gather_rows_kernel(kv_ref, kr_ref, idx_ref, kv_sum_ref, kr_sum_ref, *, block_k):
    ones = jnp.ones((16, block_k), kv_ref.dtype)  # a small dot consumes the rows, so they load as MLA's do

    def body(j, sums):
        rows = idx_ref[pl.ds(j * block_k, block_k)]
        return tuple(acc + jnp.dot(ones, ref[rows, :], preferred_element_type=jnp.float32)
                     for acc, ref in zip(sums, (kv_ref, kr_ref)))

    init = tuple(jnp.zeros((16, ref.shape[1]), jnp.float32) for ref in (kv_ref, kr_ref))
    kv_sum_ref[...], kr_sum_ref[...] = jax.lax.fori_loop(0, idx_ref.shape[0] // block_k, body, init)


@functools.partial(jax.jit, static_argnames=("block_k", "interpret"))
def gather_rows(kv, k_rope, indices, block_k: int = 32, interpret: bool = False):
    """Sums of the latent and RoPE rows that `indices` [B, Tq, K] (no -1, K a multiple of block_k) select, per
    query, as [B, Tq, 16, C] and [B, Tq, 16, R] (16 equal rows): sparse MLA's gathers without its math. Its rate
    bounds sparse MLA prefill. 4 warps / 4 stages, fed to a dot, beat summing the rows in registers
    (BENCHMARKS.md); the best block_k depends on Tk (16 to 64), so the benchmark takes the fastest of those."""
    B, Tq, K = indices.shape
    (Tk, C), R = kv.shape[1:], k_rope.shape[-1]
    return pl.pallas_call(
        functools.partial(_gather_rows_kernel, block_k=block_k), grid=(B, Tq),
        in_specs=[pl.BlockSpec((None, Tk, C), lambda b, t: (b, 0, 0)),
                  pl.BlockSpec((None, Tk, R), lambda b, t: (b, 0, 0)),
                  pl.BlockSpec((None, None, K), lambda b, t: (b, t, 0))],
        out_specs=[pl.BlockSpec((None, None, 16, C), lambda b, t: (b, t, 0, 0)),
                   pl.BlockSpec((None, None, 16, R), lambda b, t: (b, t, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, Tq, 16, C), jnp.float32),
                   jax.ShapeDtypeStruct((B, Tq, 16, R), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=4), interpret=interpret,
    )(kv, k_rope, indices)


def fp8_cache_args(q, k, w, q_pos, kv_len):
    """The FP8 indexer's inputs as the model holds them: k quantized once, as its FP8 key cache stores it."""
    k8, k_scale = quantize_fp8(k)
    return q, k8, w, q_pos, kv_len, k_scale


def fns(op: str, impl: str, k: int = TOPK):
    if op == "indexer":
        return jax.jit(functools.partial(indexer_logits, implementation=impl))
    if op == "indexer_fp8":  # on the arguments of `fp8_cache_args`
        return jax.jit(lambda q, k8, w, q_pos, kv_len, k_scale: indexer_logits(
            q, k8, w, q_pos, kv_len, fp8=True, k_scale=k_scale, implementation=impl))
    if op == "topk":
        return jax.jit(functools.partial(topk_indices, k=k, implementation=impl))
    return jax.jit(functools.partial(sparse_mla, scale=SCALE, implementation=impl))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(b)
    if not np.array_equal(fin, np.isfinite(a)):
        return float("inf")
    return float(np.linalg.norm(a[fin] - b[fin]) / max(np.linalg.norm(b[fin]), 1e-30))


def same_sets(a, b) -> bool:
    return bool(np.array_equal(np.sort(np.asarray(a), -1), np.sort(np.asarray(b), -1)))


def check(impl: str, fp8: bool = False) -> list[str]:
    """Pallas vs XLA on small ragged shapes, the FP8 indexer too if `fp8`; returns failure lines (a kernel that
    fails to run is one)."""
    bad = []

    def expect(name, ok_fn):
        try:
            if (msg := ok_fn()) is not None:
                bad.append(f"{name}: {msg}")
        except Exception as e:
            bad.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")

    def indexer_case(tq, op):
        q, k, w, pos, _ = indexer_inputs(2, tq, 1000, seed=tq)
        args = (q, k, w, pos, jnp.array([1000, 700], jnp.int32))
        args = fp8_cache_args(*args) if op == "indexer_fp8" else args
        got, ref = (fns(op, i)(*args) for i in (impl, "xla"))
        e = rel_err(got, ref)
        for kk in (64, TOPK) if op == "indexer" else ():
            expect(f"topk Tq={tq} k={kk}", lambda: None if same_sets(*(fns("topk", i, kk)(ref) for i in (impl, "xla")))
                   else "sets differ")
        # FP8: Hopper's fp8 MMA sums each 128-long dot below fp32 precision, a far smaller error than the
        # rounding of q and k to e4m3 itself (BENCHMARKS.md, "FP8 indexer")
        tol = 1e-3 if op == "indexer_fp8" else 1e-4
        return None if e < tol else f"rel err {e:.2e}"

    def long_rows_case(x, k):  # rows longer than the GPU kernel's candidate buffer: seeded, or overflowing
        return None if same_sets(*(fns("topk", i, k)(x) for i in (impl, "xla"))) else "sets differ"

    def mla_case(tq):
        args = list(mla_inputs(2, tq, 1000, k=256))
        args[-1] = jnp.where(jax.random.uniform(jax.random.key(tq), args[-1].shape) < 0.3, -1, args[-1])
        (o, lse), (ro, rlse) = (fns("mla", i)(*args) for i in (impl, "xla"))
        e = max(rel_err(o, ro), rel_err(lse, rlse))
        return None if e < 2e-2 else f"rel err {e:.2e}"

    for op in ("indexer", "indexer_fp8") if fp8 else ("indexer",):
        for tq in (100, 1):
            expect(f"{op} Tq={tq}", lambda: indexer_case(tq, op))
    for tq in (300, 1):  # 300 queries run unsplit, 1 query split over the selected set
        expect(f"mla Tq={tq}", lambda: mla_case(tq))
    expect("topk ties", lambda: long_rows_case(jnp.round(rand(9, (3, 7, 20000), jnp.float32)), 300))
    expect("topk long rows", lambda: long_rows_case(rand(10, (1, 64, 100000), jnp.float32), TOPK))
    return bad


def attempt(fn, *args) -> float | str:
    try:
        return median_time(fn, *args)
    except Exception as e:  # an out-of-memory or compile failure is a result to report, not a crash
        text = str(e)
        return "OOM" if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() else f"error: {text[:160]}"


def measure(op, mode, tk, b, tq, args, flops, nbytes, ceil, impl, xla: bool) -> dict:
    row = {"op": op, "mode": mode, "tk": tk, "shape": f"{b} x {tq}"}
    t = attempt(fns(op, impl), *args)
    if isinstance(t, str):
        row["ms"] = t
        return row
    row.update(ms=t * 1e3, gbs=nbytes / t / 1e9, pct_copy=100 * nbytes / t / ceil["copy_bytes_s"])
    if flops:
        row.update(tflops=flops / t / 1e12, pct_matmul=100 * flops / t / ceil["matmul_flops"])
    if xla:
        tx = attempt(fns(op, "xla"), *args)
        row["xla_ms"] = tx * 1e3 if isinstance(tx, float) else tx
        if isinstance(tx, float):
            row["speedup"] = tx / t
    return row


def mla_roofline(row: dict, args, flops: float, ceil: dict) -> dict:
    """The gather rate at this shape and the MLA row's share of min(matmul ceiling, FLOP/byte x gather rate)."""
    gathered = args[4].size * (LATENT + ROPE) * 2
    times = [(attempt(functools.partial(gather_rows, block_k=bk), args[2], args[3], args[4]), bk)
             for bk in GATHER_BLOCKS]
    times = [(t, bk) for t, bk in times if isinstance(t, float)]
    if not times or not isinstance(row.get("ms"), float):
        return {}
    t, bk = min(times)
    roof = min(ceil["matmul_flops"], flops / t)  # FLOP per gathered byte x gather rate
    print(f"gather ceiling at Tk={row['tk']}: {gathered / t / 1e12:.2f} TB/s of gathered rows (block {bk}) "
          f"-> sparse MLA roofline {roof / 1e12:.0f} TFLOP/s ({100 * roof / ceil['matmul_flops']:.0f}% of bf16)",
          flush=True)
    return {"gather_tbs": gathered / t / 1e12, "roof_tflops": roof / 1e12,
            "pct_roof": 100 * flops / (row["ms"] / 1e3) / roof}


def run_size(tk, a, ceil, impl) -> list[dict]:
    rows = []
    cases = [("prefill", 1, min(a.chunk, tk))] + [("decode", b, 1) for b in a.decode_batches]
    for mode, b, tq in cases:
        start = len(rows)
        if "indexer" in a.ops or "topk" in a.ops:
            q, k, w, pos, kv_len = indexer_inputs(b, tq, tk)
            vis = float(jnp.sum(jnp.minimum(pos + 1, tk)))
            for op in ("indexer", "indexer_fp8"):
                if op in a.ops:
                    args = (q, k, w, pos, kv_len) if op == "indexer" else fp8_cache_args(q, k, w, pos, kv_len)
                    keys = k.nbytes if op == "indexer" else args[1].nbytes + args[5].nbytes  # FP8: e4m3 + scales
                    rows.append(measure(op, mode, tk, b, tq, args, vis * 2 * H_I * D_I,
                                        keys + q.nbytes + b * tq * tk * 4, ceil, impl, not a.no_xla))
                    del args
            if "topk" in a.ops:
                logits = fns("indexer", impl)(q, k, w, pos, kv_len)
                rows.append(measure("topk", mode, tk, b, tq, (logits,), None, logits.nbytes + b * tq * TOPK * 4,
                                    ceil, impl, not a.no_xla))
                del logits
            del q, k, w
        if "mla" in a.ops:
            args = mla_inputs(b, tq, tk)
            per_query = TOPK * (LATENT + ROPE) * 2 + HEADS * (2 * LATENT + ROPE) * 2
            flops = b * tq * 2.0 * HEADS * (2 * LATENT + ROPE) * TOPK
            rows.append(measure("mla", mode, tk, b, tq, args, flops, b * tq * per_query, ceil, impl, not a.no_xla))
            if mode == "prefill" and impl == "pallas_gpu":
                rows[-1].update(mla_roofline(rows[-1], args, flops, ceil))
            del args
        print_table(rows[start:], COLUMNS)
    return rows


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m ic_jax.bench kernels", description=__doc__)
    p.add_argument("--sizes", type=size_list, default="8Ki,32Ki,64Ki,128Ki,200Ki",
                   help=f"context lengths Tk ({SIZE_HELP}; default 8Ki,32Ki,64Ki,128Ki,200Ki)")
    p.add_argument("--ops", type=subset(OPS), default=",".join(OPS),
                   help=f"comma-separated subset of {','.join(OPS)} (default all)")
    p.add_argument("--chunk", type=positive_int, default=2048, help="prefill queries per chunk (default 2048)")
    p.add_argument("--decode-batches", type=positive_int_list, default="1,64", help="decode batch sizes (default 1,64)")
    p.add_argument("--no-xla", action="store_true", help="skip the XLA reference timings")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check against XLA")
    p.add_argument("--indexer-fp8", action="store_true",
                   help="also time (and check) the FP8 indexer logits: an indexer_fp8 row after each indexer row")
    p.add_argument("--quick", action="store_true", help="8Ki,32Ki only, chunk 512, decode batch 8")
    p.add_argument("--json", type=Path, help="write every row, the ceilings and the device as JSON here")
    return p


def main(argv=None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.chunk, a.decode_batches = [8 * 1024, 32 * 1024], 512, [8]
    if a.indexer_fp8:
        if "indexer" not in a.ops:
            p.error("--indexer-fp8 adds rows beside the indexer's: keep indexer in --ops")
        a.ops.append("indexer_fp8")
    if a.json:
        check_output_file(a.json, "--json")
    impl = pallas_name()
    if jax.default_backend() == "cpu":
        raise UserError("the kernels benchmark needs a GPU or TPU (on CPU, Pallas runs only in interpret mode)")
    device = jax.devices()[0].device_kind
    print(f"{device}, jax {jax.__version__}, implementation {impl}", flush=True)
    failures = [] if a.no_check else check(impl, a.indexer_fp8)
    if not a.no_check:
        print("check: " + ("all kernels match XLA" if not failures else "FAILED: " + "; ".join(failures)), flush=True)
    ceil = measure_ceilings()
    print(f"ceilings: bf16 matmul {ceil['matmul_flops'] / 1e12:.0f} TFLOP/s, copy {ceil['copy_bytes_s'] / 1e9:.0f} GB/s",
          flush=True)
    rows = []
    for tk in a.sizes:
        rows += run_size(tk, a, ceil, impl)
    print("\nall sizes:")
    print_table(rows, COLUMNS)
    if a.json:
        write_json(a.json, {"device": device, "jax": jax.__version__, "implementation": impl,
                            "date": datetime.date.today().isoformat(), "ceilings": ceil,
                            "check_failures": failures, "rows": rows})
    return 0


main = entry(main)
