"""Memory plans (python -m ic_jax.plan): per-device params and caches against sums over the shapes computed here
from the parameter list and the cache layout, the largest batch against a capacity chosen by hand, and the
bad-input contract of the command's flags."""

import json
import math
import subprocess
import sys

import jax
import pytest
from flax import nnx

from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.memory import abstract_model, make_plan, max_batch, max_context, scaled

MESH = {"data": 2, "tensor": 2, "expert": 1}
SPLIT = {"vocab": "tensor", "heads": "tensor", "index_heads": "tensor", "mlp": "tensor", "experts": "expert"}


def run_plan(*args):
    return subprocess.run([sys.executable, "-m", "ic_jax.plan", *args], capture_output=True, text=True, timeout=600)


def shard_bytes_by_hand(shape, axes, itemsize) -> int:
    """A dim splits over its mesh axis when that axis divides it and no earlier dim took the axis."""
    used, local = set(), []
    for dim, name in zip(shape, axes):
        axis = SPLIT.get(name)
        n = MESH[axis] if axis and axis not in used else 1
        if n > 1 and dim % n == 0:
            used.add(axis)
            local.append(dim // n)
        else:
            local.append(dim)
    return math.prod(local) * itemsize


def test_plan_of_a_sharded_tiny_model_matches_the_shapes():
    """--layers 3 plans the first 3 layers of tiny (its one dense layer, then MoE layers)."""
    cfg = load_config("tiny").replace(num_hidden_layers=3)
    r = run_plan("--config", "tiny", "--layers", "3", "--mesh", "data=2,tensor=2", "--context", "256", "--batch", "2",
                 "--chunk-size", "64", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    model = DSAModel(cfg, "F" * cfg.num_hidden_layers, nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    expected = sum(shard_bytes_by_hand(v.get_value().shape, v.logical_axes, v.get_value().dtype.itemsize)
                   for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    assert plan["params_bytes"] == expected
    # every layer caches latent, RoPE key and indexer key (all F), its batch split over data=2
    per_token = cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim
    assert plan["cache_bytes"] == cfg.num_hidden_layers * (2 // 2) * 256 * per_token * 4
    assert plan["devices"] == 4 and plan["prefill_temp_bytes"] > 0 and plan["decode_temp_bytes"] > 0
    assert plan["total_bytes"] == plan["params_bytes"] + plan["cache_bytes"] + max(plan["prefill_temp_bytes"],
                                                                                  plan["decode_temp_bytes"])
    assert plan["fits"] and plan["max_batch"] >= 2


def test_largest_batch_and_context_for_a_capacity():
    cfg = load_config("tiny")
    model = abstract_model(cfg, "FSSSFSSS")
    plan = make_plan(model, None, 2, 128, 32, RunOptions())
    capacity = scaled(plan, model, None, 5, 128).total  # exactly what batch 5 needs
    assert max_batch(plan, model, None, capacity) == 5
    assert scaled(plan, model, None, 6, 128).total > capacity
    assert max_batch(plan, model, None, plan.params) == 0  # the params alone fill it
    longest = max_context(plan, model, None, scaled(plan, model, None, 2, 300).total)
    assert longest == 300


@pytest.mark.parametrize("args, names", [
    (["--config", "tiny", "--mesh", "tensor=x"], "--mesh"),
    (["--config", "tiny", "--context", "0"], "--context"),
    (["--config", "tiny", "--context", "1M"], "--context"),
    (["--config", "tiny", "--batch", "0"], "--batch"),
    (["--config", "tiny", "--device", "a100"], "--device"),
    (["--config", "no_such_preset"], "no_such_preset"),
    (["--config", "tiny", "--context", "256", "--pattern", "SF"], "SF"),
    (["--config", "tiny", "--context", "256", "--mesh", "data=3", "--batch", "2"], "3 devices"),
    (["--config", "tiny", "--context", "256", "--mesh", "tensor=2", "--backend", "local"], "--backend local"),
])
def test_bad_input_is_one_line(args, names):
    r = run_plan(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert names in lines[0], lines[0]


def test_generate_that_cannot_fit_ends_with_one_line_before_allocating(monkeypatch, capsys):
    from ic_jax import generate
    from ic_jax.runtime import engine, memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 1000)  # bytes: less than any cache
    monkeypatch.setattr(engine.Engine, "new_cache", lambda *a: pytest.fail("the cache was allocated"))
    rc = generate.main(["--config", "tiny", "--init", "random", "--prompt", "hello", "--max-new-tokens", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "GiB per device" in err[0] and "free" in err[0] and "--chunk-size" in err[0], err[0]


def test_local_backend_plans_what_the_fake_device_plan_computes_on_the_same_compiler():
    """On a CPU host both backends compile the same program for the same CPU compiler: equal plans."""
    args = ["--config", "tiny", "--context", "256", "--chunk-size", "64", "--json"]
    fake, local = run_plan(*args), run_plan(*args, "--backend", "local")
    assert fake.returncode == 0 and local.returncode == 0, fake.stderr + local.stderr
    fake, local = json.loads(fake.stdout), json.loads(local.stdout)
    for key in ("params_bytes", "cache_bytes", "prefill_temp_bytes", "decode_temp_bytes", "max_batch"):
        assert local[key] == fake[key], key
    assert local["backend"] == "local" and local["compiled_for"] == jax.devices()[0].device_kind
