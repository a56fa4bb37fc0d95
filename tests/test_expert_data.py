"""--expert-parallel-data (SGLang's data-parallel attention with expert-parallel MoE) on fake CPU devices: the routed
experts split over data x expert (each device holds 1/(data*expert) of them, checked on the shard shapes and in the
memory plan's param bytes), and the sharded model's prefill logits and generated tokens equal the unsharded ones
for a batch that splits over data and for one prompt whose chunks split instead (XLA path), and the MoE op with the
Pallas kernels in interpret mode equals XLA unsharded, on rows split over data (gathered, then reduce-scattered)
and on rows whole on every device (decode of one sequence). One subprocess runs it all, since the device count is
fixed when the backend starts. Every command that takes --mesh takes the flag, and refuses it without a data
axis."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ic_jax import eval as evaluation
from ic_jax import generate, jobs, overlap, plan, search
from ic_jax.bench import e2e, step, throughput
from ic_jax.package_data import DEFAULT_CKPT

SCRIPT = textwrap.dedent("""
    import argparse, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import math
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from flax import nnx
    from ic_jax.model.config import load_config
    from ic_jax.model.dsa import DSAModel
    from ic_jax.model.layers import MoE
    from ic_jax.model.run_options import RunOptions
    from ic_jax.runtime.engine import Engine
    from ic_jax.runtime.memory import abstract_model, abstract_params, shard_bytes
    from ic_jax.runtime.sharding import (is_variable, make_mesh, mesh_from_args, param_shardings, parse_mesh,
                                        shard_model)

    def mesh_of(spec, expert_parallel_data=True):
        sizes = parse_mesh(spec)
        return make_mesh(sizes, jax.devices()[:math.prod(sizes.values())], expert_parallel_data)

    # two MoE layers (E = 8 experts), one F and one S
    cfg = load_config("tiny").replace(dtype="float32", num_hidden_layers=2, first_k_dense_replace=0)
    opts = RunOptions.for_impl("xla")
    model = DSAModel(cfg, "FS", nnx.Rngs(0))
    prompts = [list(np.random.default_rng(b).integers(0, 256, 5 + 2 * b)) for b in range(2)]

    def run(engine):  # prefill logits and greedy tokens of the batch, then of the second prompt alone (7 tokens)
        logits = np.asarray(engine.prefill(prompts, 11, chunk_size=4)[0])
        out = engine.generate(prompts, 4, chunk_size=4)[0]
        return logits, out, engine.generate([prompts[1]], 4, chunk_size=3)[0]  # data: chunks rounded up to split

    ref = run(Engine(model, opts))
    mesh = mesh_of("data=2")
    shard_model(model, mesh)
    w = model.groups[0].blocks[0].ffn.w_gate.get_value()  # [1 repeat, E, D, F]
    assert w.sharding.shard_shape(w.shape) == (1, 4, *w.shape[2:])  # 8 experts over 2 devices
    logits, out, one = run(Engine(model, opts, mesh))
    np.testing.assert_allclose(logits, ref[0], rtol=1e-4, atol=1e-4)
    assert (out, one) == ref[1:], (out, one, ref[1:])
    print("MODEL_OK data=2")

    # the flags of every command: the experts' stacks over expert x data, the same flags without it over expert
    for on, axes in ((True, ("expert", "data")), (False, "expert")):
        flags = argparse.Namespace(mesh="data=2,expert=4", expert_parallel_data=on, distributed=False)
        specs = param_shardings(model, mesh_from_args(flags))
        assert specs["groups"][0]["blocks"][0]["ffn"]["w_gate"].spec == P(None, axes, None, None), on
    print("FLAGS_OK")

    # the memory plan's params: every param with an "experts" axis (the stacks and the router) halves on data=2
    abstract = abstract_model(cfg, "FS")
    experts = sum(v.get_value().nbytes for v in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=is_variable)
                  if "experts" in v.logical_axes)
    plain, split = (shard_bytes(abstract_params(abstract, mesh_of("data=2", on))) for on in (False, True))
    assert plain - split == experts // 2, (plain, split, experts)
    print("PLAN_OK")

    # the op with the Pallas kernels (interpret mode), against XLA unsharded
    moe = MoE(cfg, nnx.Rngs(1))
    xs = {n: jnp.asarray(np.random.default_rng(n).standard_normal((n, cfg.hidden_size)), jnp.float32) for n in (16, 1)}
    want = {n: np.asarray(moe(x, "xla")) for n, x in xs.items()}
    pallas, interpret = RunOptions.for_impl("pallas").implementation, True
    for spec in ("data=2", "data=2,tensor=2,expert=2"):
        mesh = mesh_of(spec)
        shard_model(moe, mesh)
        w = moe.w_gate.get_value()  # [E, D, F]
        d, t, e = (mesh.shape[a] for a in ("data", "tensor", "expert"))
        assert w.sharding.shard_shape(w.shape) == (8 // (d * e), w.shape[1], w.shape[2] // t), spec
        for n, x in xs.items():  # 16 rows split over data; 1 row whole (on data=2: the gathered matmul)
            got = jax.jit(lambda x: moe(x, pallas, interpret, mesh=mesh))(x)
            np.testing.assert_allclose(np.asarray(got), want[n], rtol=1e-4, atol=1e-4, err_msg=f"{spec} {n}")
        print("OP_OK", spec)

    # rows split over data are gathered in one collective (the rows, their experts and weights packed as bytes)
    mesh = mesh_of("data=2")
    shard_model(moe, mesh)
    assert str(jax.make_jaxpr(lambda x: moe(x, "xla", mesh=mesh))(xs[16])).count("all_gather[") == 1

    # a decode step's rows take the gathered matmul on each device's share of the experts, as unsharded: 2 rows x 2
    # routed are fewer than the 8 experts, though not fewer than a device's 4 (a grouped matmul of mostly empty groups)
    mesh = mesh_of("data=2")
    shard_model(moe, mesh)
    x = xs[16][:2]
    assert "ragged_dot" in str(jax.make_jaxpr(lambda x: moe(x, "xla"))(xs[16]))  # the grouped path, for contrast
    assert "ragged_dot" not in str(jax.make_jaxpr(lambda x: moe(x, "xla", mesh=mesh))(x))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda x: moe(x, "xla", mesh=mesh))(x)), want[16][:2], rtol=1e-4,
                               atol=1e-4)
    print("DECODE_OK")
""")


def test_experts_split_over_data_equal_unsharded():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=900,
                       cwd=Path(__file__).resolve().parent.parent)
    passed = [line for line in r.stdout.splitlines() if line.endswith("_OK") or "_OK " in line]
    assert passed == ["MODEL_OK data=2", "FLAGS_OK", "PLAN_OK", "OP_OK data=2",
                      "OP_OK data=2,tensor=2,expert=2", "DECODE_OK"], r.stdout + r.stderr[-3000:]


CKPT = ["--ckpt", str(DEFAULT_CKPT)]
COMMANDS = [
    (generate.main, [*CKPT, "--prompt", "x"]),
    (jobs.main, ["--input", "prompts.jsonl", "--output", "r.jsonl", *CKPT]),
    (evaluation.main, [*CKPT, "--patterns", "F"]),
    (search.main, CKPT),
    (overlap.main, CKPT),
    (e2e.main, ["--config", "tiny", "--contexts", "100", "--patterns", "F"]),
    (step.main, ["--config", "tiny", "--context", "100"]),
    (throughput.main, ["--config", "tiny", "--context", "100"]),
    (plan.main, ["--config", "tiny", "--context", "256"]),
]


@pytest.mark.parametrize("main, argv", COMMANDS, ids=[m.__module__ for m, _ in COMMANDS])
def test_every_mesh_command_takes_the_flag_and_refuses_it_without_a_data_axis(main, argv, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"id": "a", "prompt": "x"}\n')
    assert main([*argv, "--mesh", "tensor=1", "--expert-parallel-data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--expert-parallel-data" in err[0] and "data=N" in err[0], err
