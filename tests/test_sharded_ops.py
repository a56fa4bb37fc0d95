"""Every op per shard (`jax.shard_map`) on a fake 8-device CPU mesh: the sharded model's logits and generated tokens
equal the unsharded model's, for data, tensor and expert meshes, on the XLA path and with the Pallas kernels in
interpret mode, for a batch, and on meshes with a data axis for one odd-length prompt alone (a sequence-parallel
prefill in chunks rounded up to split; without a data axis one prompt runs as a batch does), whose tokens are the
unsharded batch's for that prompt. Each implementation runs in one subprocess (the device count is fixed when the
backend starts), which computes the unsharded reference once and checks every mesh of its list against it.

Compilation is most of the time, and it grows with the layer bodies a pattern traces: the model is 4 layers FSSS,
two bodies (an F layer with a dense FFN, then S layers with MoE), which run every op. XLA checks each mesh axis
alone; the Pallas kernels run on the one mesh of all three axes, where each kernel runs per shard of every axis that
cuts its operands (the per-shard wrapping is the one the XLA ops use)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import dataclasses
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from ic_jax.model.config import load_config
    from ic_jax.model.dsa import DSAModel
    from ic_jax.model.run_options import RunOptions
    from ic_jax.runtime.engine import Engine
    from ic_jax.runtime.sharding import make_mesh, parse_mesh, shard_model
    impl, specs = sys.argv[1], sys.argv[2:]
    cfg = load_config("tiny").replace(dtype="float32", num_hidden_layers=4)
    opts = RunOptions.for_impl(impl)
    model = DSAModel(cfg, "FSSS", nnx.Rngs(0))
    prompts = [list(np.random.default_rng(b).integers(0, 256, 5 + 2 * b)) for b in range(2)]
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, 256, (2, 8)), jnp.int32)
    ref_logits = np.asarray(model.forward(tokens, opts).logits)
    ref_out, _ = Engine(model, opts).generate(prompts, 4, chunk_size=4)
    for spec in specs:
        sizes = parse_mesh(spec)
        mesh = make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
        shard_model(model, mesh)
        sharded = dataclasses.replace(opts, mesh=mesh)
        logits = np.asarray(jax.jit(lambda t: model.forward(t, sharded).logits)(tokens))
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4, err_msg=spec)
        out, _ = Engine(model, opts, mesh).generate(prompts, 4, chunk_size=4)
        assert out == ref_out, (spec, out, ref_out)
        if sizes["data"] > 1:  # 7 tokens in chunks of 3, rounded up to 4 to split over data
            one, _ = Engine(model, opts, mesh).generate([prompts[1]], 4, chunk_size=3)
            assert one == ref_out[1:], (spec, one, ref_out)
        print("SHARDED_OK", spec)
""")


@pytest.mark.parametrize("impl,meshes", [("xla", ["data=2", "tensor=2", "expert=2"]),
                                         ("pallas", ["data=2,tensor=2,expert=2"])])
def test_sharded_ops_equal_unsharded(impl, meshes):
    r = subprocess.run([sys.executable, "-c", SCRIPT, impl, *meshes], capture_output=True, text=True, timeout=900,
                       cwd=Path(__file__).resolve().parent.parent)
    passed = [line for line in r.stdout.splitlines() if line.startswith("SHARDED_OK")]
    assert passed == [f"SHARDED_OK {m}" for m in meshes], r.stdout + r.stderr[-3000:]
