"""The one place where ic_jax reaches into Pallas' private Triton lowering, for two things, neither of which
replaces anything of JAX's:

- `fp8_dot_params`: compiler params under which a kernel's fp8 dots run on Hopper's fp8 warpgroup MMA. Pallas
  builds Triton dots without `maxNumImpreciseAcc` (so 0), and for fp8 operands with an fp32 result Triton then
  refuses Hopper's warpgroup MMA: it upcasts them to fp16 for the Ampere MMA (SASS: F2FP...UNPACK_B and HMMA.16816
  where the bf16 kernel has HGMMA). The params are a subclass of `plgpu.CompilerParams`, and Pallas picks a
  kernel's lowering rule by the exact type of its params, so only the kernels built with them reach their rule:
  Pallas' own Triton rule, then each fp8 dot of the Triton module it put in the kernel call gets
  `maxNumImpreciseAcc` = the dot's contraction length (one MMA accumulation chain per dot, added to the fp32
  accumulator after it; DeepGEMM promotes every 128 too). The SASS then has QGMMA (BENCHMARKS.md). The rule is
  registered by the first `fp8_dot_params` call, while a kernel is traced, so before any lowering of it, however
  much later and however deep in a jit or an export that lowering happens.
- `triton_modules`: the Triton IR of the kernels in a call, read from its lowering for CUDA (tests, scripts).

Both read jax's private Triton lowering (as jax 0.10.2 and 0.11.2 have it): Pallas' Triton rule and its registry,
the Triton IR context, and the serialized module in the `ir` field of the `__gpu$xla.gpu.triton` call's config.
On a jax without these, `fp8_dot_params` gives plain params (fp8 dots correct, on the slower path) and warns.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import warnings

import jax
from jax._src.lib.mlir import ir
from jax.experimental.pallas import triton as plgpu

try:  # loaded by jax.experimental.pallas.triton already
    from jax._src.pallas import core as pallas_core
    from jax._src.pallas.triton import lowering as jax_triton_lowering
except ImportError:
    pallas_core = jax_triton_lowering = None

TRITON_CALL = "__gpu$xla.gpu.triton"
CONFIG = "mhlo.backend_config"  # the call's fields, the serialized Triton module "ir" among them
SLOW_FP8 = ("this jax's private Pallas Triton lowering is not the one ic_jax marks fp8 dots in (jax 0.10.2-0.11.2): "
            "fp8 kernels run correct but on the slower upcast MMA")


@dataclasses.dataclass(frozen=True)
class Fp8DotParams(plgpu.CompilerParams):
    """plgpu.CompilerParams of a kernel whose fp8 dots run on Hopper's fp8 warpgroup MMA (`fp8_dot_params`)."""


def fp8_dot_params(**kwargs) -> plgpu.CompilerParams:
    """plgpu.CompilerParams(**kwargs) under which the kernel's fp8 dots take Hopper's fp8 warpgroup MMA."""
    triton_rule = _pallas_triton_rule()
    if triton_rule is None:
        warnings.warn(SLOW_FP8, RuntimeWarning, stacklevel=2)
        return plgpu.CompilerParams(**kwargs)
    if pallas_core.get_lowering_rule(Fp8DotParams, "gpu") is None:
        pallas_core.register_lowering_rule(Fp8DotParams, functools.partial(_lower_with_fp8_dots, triton_rule), "gpu")
    return Fp8DotParams(**kwargs)


def _pallas_triton_rule():
    """Pallas' own Triton lowering rule, or None on a jax without it or the other private pieces used here.
    Imported on first use, as Pallas does: importing it registers it."""
    try:
        from jax._src.pallas.triton.pallas_call_registration import pallas_call_lowering
    except ImportError:
        return None
    needed = [(pallas_core, "get_lowering_rule"), (pallas_core, "register_lowering_rule"),
              (jax_triton_lowering, "_new_ir_context")]
    return pallas_call_lowering if all(hasattr(module, name) for module, name in needed) else None


def _lower_with_fp8_dots(triton_rule, ctx, *in_nodes, **params):
    """Pallas' Triton rule for the kernel, then the fp8 dots of the Triton module in the call it built marked."""
    results = triton_rule(ctx, *in_nodes, **params)
    call = results[0].owner
    module = _triton_ir(call)
    if module is None:
        warnings.warn(SLOW_FP8, RuntimeWarning, stacklevel=2)
        return results
    config = call.attributes[CONFIG]
    fields = {config[i].name: config[i].attr for i in range(len(config))}
    call.attributes[CONFIG] = ir.DictAttr.get({**fields, "ir": ir.StringAttr.get(_with_fp8_dots_marked(module))})
    return results


def _with_fp8_dots_marked(module: bytes) -> bytes:
    """The serialized Triton module with `maxNumImpreciseAcc` = the contraction length on each fp8 dot."""
    def mark(op):
        if op.name == "tt.dot" and "f8" in str(op.operands[0].type):
            k = ir.RankedTensorType(op.operands[0].type).shape[-1]
            op.attributes["maxNumImpreciseAcc"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), k)
        return ir.WalkResult.ADVANCE

    with jax_triton_lowering._new_ir_context():
        triton = ir.Module.parse(module)
        triton.operation.walk(mark)
        buf = io.BytesIO()
        triton.operation.write_bytecode(buf)
    return buf.getvalue()


def _triton_ir(op) -> bytes | None:
    """The serialized Triton module of a Pallas Triton kernel call, None for any other op."""
    if op.name != "stablehlo.custom_call" or ir.StringAttr(op.attributes["call_target_name"]).value != TRITON_CALL:
        return None
    if CONFIG not in op.attributes or "ir" not in op.attributes[CONFIG]:
        return None
    return ir.StringAttr(op.attributes[CONFIG]["ir"]).value_bytes


def triton_modules(fn, *args) -> list[str]:
    """The Triton IR of every Pallas GPU kernel in `jax.jit(fn)(*args)`, as text, as it goes to XLA: the call is
    lowered for CUDA (any machine will do; `args` may be shapes) and the modules are read from its kernel calls."""
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    serialized = []

    def keep(op):
        module = _triton_ir(op)
        if module is not None:
            serialized.append(module)
        return ir.WalkResult.ADVANCE

    lowered.operation.walk(keep)
    with jax_triton_lowering._new_ir_context():
        return [ir.Module.parse(module).operation.get_asm() for module in serialized]
