"""ic_jax's hook into Pallas' Triton lowering (`ic_jax.ops.triton_lowering`) leaves JAX as it is: importing
ic_jax rebinds no JAX function and adds or replaces no lowering rule, and the fp8 dot marking reaches only the
kernels built with `fp8_dot_params`, whatever else is lowered with them."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ic_jax.ops import triton_lowering
from ic_jax.ops.triton_lowering import fp8_dot_params, triton_modules

# Run in a fresh interpreter: JAX and the public Pallas modules first, then a snapshot of every function and class
# of every loaded jax module and of every lowering registry; then ic_jax's ops are imported, and our fp8 kernel is
# lowered (which also sets some of jax's own state, the backend's, hence functions and classes only).
JAX_STATE_SCRIPT = r'''
import importlib, json, pkgutil, sys
import jax, jax.numpy as jnp
from jax.experimental import pallas
from jax.experimental.pallas import tpu, triton
from jax._src.interpreters import mlir
from jax._src.pallas import core
from jax._src.pallas.triton import lowering

def attributes():
    return {(name, key): value for name, module in list(sys.modules.items())
            if name.split(".")[0] in ("jax", "jaxlib") and module is not None for key, value in vars(module).items()}

def rules():
    tables = {"mlir": mlir._lowerings, "pallas backends": core._backend_lowering_rules,
              "triton": lowering.triton_lowering_rules,
              **{f"mlir {platform}": table for platform, table in mlir._platform_specific_lowerings.items()}}
    return {(table, key): rule for table, entries in tables.items() for key, rule in entries.items()}

def owner(rule):
    rule = rule[0] if isinstance(rule, tuple) else rule
    return getattr(getattr(rule, "func", rule), "__module__", "?")

def changes(before_attributes, before_rules):
    after_attributes, after_rules = attributes(), rules()
    return {"rebound": sorted(f"{m}.{k}" for (m, k), v in before_attributes.items()
                              if callable(v) and after_attributes[m, k] is not v),
            "rules replaced": sorted(str(k) for k, v in before_rules.items() if after_rules.get(k) is not v),
            "rules added": sorted(f"{k} by {owner(v)}" for k, v in after_rules.items() if k not in before_rules)}

before = attributes(), rules()
import ic_jax, ic_jax.ops
for module in pkgutil.walk_packages(ic_jax.ops.__path__, "ic_jax.ops."):
    importlib.import_module(module.name)
report = {"import": changes(*before)}

from ic_jax.ops.indexer_logits import gpu
from ic_jax.ops.triton_lowering import triton_modules
args = [jax.ShapeDtypeStruct(s, t) for s, t in [((1, 64, 4, 64), jnp.bfloat16), ((1, 256, 64), jnp.bfloat16),
                                                ((1, 64, 4), jnp.float32), ((1, 64), jnp.int32), ((1,), jnp.int32)]]
report["fp8 dot marked"] = "maxNumImpreciseAcc = 64" in triton_modules(gpu.indexer_logits_fp8, *args)[0]
report["lowering"] = changes(*before)
print(json.dumps(report))
'''


def test_importing_ic_jax_leaves_jax_lowering_as_it_was():
    """Importing ic_jax and all its ops leaves every function and class of every jax module the same object and
    every lowering registry as it was. Lowering our fp8 kernel then adds one Pallas rule of ours, for its own params,
    and replaces nothing (jax 0.10.2 registers its own Triton rule at its first Triton lowering, 0.11.2 earlier)."""
    run = subprocess.run([sys.executable, "-c", JAX_STATE_SCRIPT], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.splitlines()[-1])
    assert report["import"] == {"rebound": [], "rules replaced": [], "rules added": []}
    assert report["fp8 dot marked"]
    assert report["lowering"]["rebound"] == [] and report["lowering"]["rules replaced"] == []
    ours = [re.sub(r"<class '([\w.]+)'>", r"\1", rule) for rule in report["lowering"]["rules added"]
            if not rule.endswith(" by jax._src.pallas.triton.pallas_call_registration")]
    assert ours == ["('pallas backends', ic_jax.ops.triton_lowering.Fp8DotParams) by ic_jax.ops.triton_lowering"]


def _two_dots(params):
    """A Pallas kernel that is not ic_jax's: an fp8 dot contracting 64 plus a bf16 dot contracting 32."""
    def kernel(x8_ref, y8_ref, a_ref, b_ref, o_ref):
        dot = lambda u, v: jax.lax.dot_general(u, v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        o_ref[...] = dot(x8_ref[...], y8_ref[...]) + dot(a_ref[...], b_ref[...])

    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((64, 32), jnp.float32), compiler_params=params)


TWO_DOTS_ARGS = [jax.ShapeDtypeStruct(s, t) for s, t in [((64, 64), jnp.float8_e4m3fn), ((64, 32), jnp.float8_e4m3fn),
                                                         ((64, 32), jnp.bfloat16), ((32, 32), jnp.bfloat16)]]


def dot_lines(module: str) -> list[str]:
    return [line for line in module.splitlines() if "tt.dot" in line]


def test_only_kernels_with_fp8_dot_params_get_their_fp8_dots_marked():
    """The same kernel twice in one jitted call, lowered together: with plain params neither dot is marked; with
    `fp8_dot_params` the fp8 dot gets maxNumImpreciseAcc = its contraction length and the bf16 dot nothing."""
    plain, fp8 = plgpu.CompilerParams(num_warps=4), fp8_dot_params(num_warps=4)
    modules = triton_modules(lambda *a: _two_dots(plain)(*a) + _two_dots(fp8)(*a), *TWO_DOTS_ARGS)
    assert len(modules) == 2
    (plain_f8, plain_bf16), (f8, bf16) = (dot_lines(m) for m in modules)
    assert "f8E4M3FN" in plain_f8 and "f8E4M3FN" in f8 and "bf16" in plain_bf16 and "bf16" in bf16
    assert all("maxNumImpreciseAcc" not in line for line in (plain_f8, plain_bf16, bf16))
    assert "{maxNumImpreciseAcc = 64 : i32}" in f8


def test_fp8_dot_params_fall_back_to_plain_params_on_an_unknown_jax(monkeypatch):
    """Where this jax lacks the private Triton rule: plain params (the kernel lowers, its fp8 dot unmarked), and a
    warning."""
    monkeypatch.setattr(triton_lowering, "_pallas_triton_rule", lambda: None)
    with pytest.warns(RuntimeWarning, match="slower upcast MMA"):
        params = fp8_dot_params(num_warps=8, num_stages=2)
    assert type(params) is plgpu.CompilerParams and params == plgpu.CompilerParams(num_warps=8, num_stages=2)
    (module,) = triton_modules(_two_dots(params), *TWO_DOTS_ARGS)
    assert len(dot_lines(module)) == 2 and "maxNumImpreciseAcc" not in module
