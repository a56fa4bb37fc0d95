"""The MoE layer against a float64 loop over every expert (sigmoid router, bias for choice only, groups)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ic_jax.model.layers import DenseFFN, MoE


def moe_params(layer):
    pure = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    return jax.tree.map(lambda a: np.asarray(a, np.float64), pure)


def set_router_bias(layer, bias):
    layer.router_bias[...] = jnp.asarray(bias, jnp.float32)


CASES = {
    # tiny.json itself: 8 experts in 2 groups, keep 1 group, top-2
    "tiny": {},
    # 16 experts in 4 groups, keep 2, top-4, no renormalisation
    "groups4_nonorm": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4, norm_topk_prob=False,
                           routed_scaling_factor=2.5),
    # ungrouped, two shared experts
    "ungrouped_shared2": dict(n_routed_experts=8, n_group=1, topk_group=1, num_experts_per_tok=3, n_shared_experts=2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_moe_matches_dense_per_expert_reference(tiny_cfg, ref, case, seed):
    cfg = tiny_cfg.replace(**CASES[case])
    layer = MoE(cfg, nnx.Rngs(100 + seed))
    rng = np.random.default_rng(seed)
    set_router_bias(layer, 0.3 * rng.standard_normal(cfg.n_routed_experts))
    x = rng.standard_normal((3, 20, cfg.hidden_size)).astype(np.float32)

    got = np.asarray(jax.jit(lambda m, x: m(x))(layer, jnp.asarray(x)), np.float64)
    p = moe_params(layer)
    want = ref.moe(p, x.astype(np.float64), cfg)
    assert got.shape == want.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

    # the inputs exercise what is being tested: the bias and the group restriction change the routing
    _, chosen, unbiased, ungrouped = ref.moe_gates(p, x.reshape(-1, cfg.hidden_size).astype(np.float64), cfg)
    assert sum(a != b for a, b in zip(chosen, unbiased)) >= 3, "router bias does not change any choice"
    if cfg.n_group > 1:
        assert sum(a != b for a, b in zip(chosen, ungrouped)) >= 3, "group restriction does not change any choice"


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_sized_batches_match_reference(tiny_cfg, ref, tokens, impl):
    """Fewer routed rows than experts takes the gathered-experts path (the GPU kernel in interpret mode): it
    must compute the same function."""
    cfg = tiny_cfg
    assert tokens * cfg.num_experts_per_tok < cfg.n_routed_experts
    layer = MoE(cfg, nnx.Rngs(7))
    rng = np.random.default_rng(tokens)
    set_router_bias(layer, 0.3 * rng.standard_normal(cfg.n_routed_experts))
    x = rng.standard_normal((tokens, 1, cfg.hidden_size)).astype(np.float32)
    got = np.asarray(jax.jit(lambda m, x: m(x, impl, impl != "xla"))(layer, jnp.asarray(x)), np.float64)
    want = ref.moe(moe_params(layer), x.astype(np.float64), cfg)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_bias_is_for_choice_only(tiny_cfg, ref):
    """A huge bias on one expert makes every token choose it, but its weight still comes from the sigmoid score."""
    cfg = tiny_cfg.replace(n_group=1, topk_group=1, norm_topk_prob=False, n_shared_experts=0)
    layer = MoE(cfg, nnx.Rngs(5))
    bias = np.zeros(cfg.n_routed_experts)
    bias[3] = 100.0
    set_router_bias(layer, bias)
    x = np.random.default_rng(3).standard_normal((1, 16, cfg.hidden_size)).astype(np.float32)
    got = np.asarray(layer(jnp.asarray(x)), np.float64)
    p = moe_params(layer)
    want = ref.moe(p, x.astype(np.float64), cfg)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    G, chosen, *_ = ref.moe_gates(p, x.reshape(16, -1).astype(np.float64), cfg)
    assert all(3 in c for c in chosen)
    assert np.all(G[:, 3] < cfg.routed_scaling_factor)  # a weight of sigmoid(.) * scale, not (sigmoid + 100)


def test_routing_matches_reference(tiny_cfg, ref):
    """MoE.route: the chosen expert sets and their weights, against the per-token loop."""
    cfg = tiny_cfg.replace(n_routed_experts=32, n_group=8, topk_group=3, num_experts_per_tok=6)
    layer = MoE(cfg, nnx.Rngs(9))
    rng = np.random.default_rng(9)
    set_router_bias(layer, 0.2 * rng.standard_normal(32))
    x = rng.standard_normal((40, cfg.hidden_size)).astype(np.float32)
    experts, weights = layer.route(jnp.asarray(x))
    G, chosen, *_ = ref.moe_gates(moe_params(layer), x.astype(np.float64), cfg)
    experts, weights = np.asarray(experts), np.asarray(weights, np.float64)
    for n in range(40):
        assert sorted(experts[n].tolist()) == chosen[n]
        np.testing.assert_allclose(weights[n], G[n, experts[n]], rtol=1e-5)
    np.testing.assert_allclose(weights.sum(-1), cfg.routed_scaling_factor, rtol=1e-5)


def test_dense_ffn_matches_reference(ref):
    layer = DenseFFN(24, 40, jnp.float32, nnx.Rngs(2))
    x = np.random.default_rng(2).standard_normal((5, 24)).astype(np.float32)
    want = ref.dense_ffn(moe_params(layer), x.astype(np.float64))
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-4, atol=1e-6)
