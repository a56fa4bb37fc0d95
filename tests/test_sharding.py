"""Sharded execution on a fake 4-device CPU mesh equals the unsharded model (run in a subprocess, since the
device count is fixed when the backend starts)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ic_jax.errors import UserError
from ic_jax.runtime.sharding import parse_mesh

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ic_jax.model.config import load_config
    from ic_jax.runtime.engine import Engine
    from ic_jax.model.dsa import DSAModel
    from ic_jax.runtime.sharding import RULES, cache_shardings, make_mesh, parse_mesh, shard_model
    cfg = load_config("tiny").replace(dtype="float32")
    model = DSAModel(cfg, "FSSSFSSS", nnx.Rngs(0))
    model_ref = DSAModel(cfg, "FSSSFSSS", nnx.Rngs(0))
    prompts = [list(np.random.default_rng(b).integers(0, 256, 5 + b)) for b in range(4)]
    ref_out, _ = Engine(model).generate(prompts, 6, chunk_size=4)
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, 256, (4, 16)), jnp.int32)
    ref = np.asarray(model.forward(tokens).logits)
    mesh = make_mesh(parse_mesh("data=2,tensor=2"))
    shard_model(model, mesh)
    assert model.lm_head.get_value().sharding.spec == P(None, "tensor")
    assert model.groups[-1].blocks[0].ffn.w_gate.get_value().sharding.spec == P(None, None, None, "tensor")
    assert len(model.lm_head.get_value().sharding.device_set) == 4
    out = np.asarray(jax.jit(lambda t: model.forward(t).logits)(tokens))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    engine = Engine(model, mesh=mesh)
    assert engine.new_cache(4, 8)[0][0].kv.sharding.spec == P(None, "data", None, None)
    out_tokens, _ = engine.generate(prompts, 6, chunk_size=4)
    assert out_tokens == ref_out, (out_tokens, ref_out)
    # a batch of 3 on data=2 is padded to 4 and split, never left whole on every device
    ref3, _ = Engine(model_ref).generate(prompts[:3], 6, chunk_size=4)
    out3, _ = engine.generate(prompts[:3], 6, chunk_size=4)
    assert out3 == ref3, (out3, ref3)
    _, cache, _ = engine.prefill(prompts[:3], 13, chunk_size=4)
    kv = cache[0][0].kv
    assert kv.shape[1] == 4 and kv.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data", None, None)), 4)
    try:
        engine.new_cache(3, 8)
        raise AssertionError("a batch of 3 was placed on data=2")
    except ValueError:
        pass
    # each buffer's sharding follows its logical axes through the rules table
    rules = dict(RULES, kv_lora="tensor")
    sh = cache_shardings(jax.eval_shape(lambda: model.init_cache(2, 8)), mesh, rules)[0][0]
    assert sh.kv.spec == P(None, "data", None, "tensor") and sh.k_rope.spec == P(None, "data", None, None)
    assert sh.index_k.spec == P(None, "data", None, None)
    print("SHARDED_OK")
""")


def test_sharded_model_equals_unsharded():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600,
                       cwd=Path(__file__).resolve().parent.parent)
    assert "SHARDED_OK" in r.stdout, r.stderr[-3000:]


def test_mesh_spec_parsing():
    assert parse_mesh("data=2,tensor=4") == {"data": 2, "tensor": 4, "expert": 1}
    for bad in ("data=0", "pipeline=2", "data=x"):
        with pytest.raises(UserError):
            parse_mesh(bad)
