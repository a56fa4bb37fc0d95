"""The multi-layer distillation loss (the paper's Proposition 1) and the indexer's loss isolation."""

import jax
import jax.numpy as jnp
import numpy as np

from ic_jax.calibration.losses import groups, multi_layer_kl


def test_multi_layer_gradient_equals_kl_to_the_average():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    M, B, T, S = 3, 2, 5, 7
    support = jax.random.uniform(k3, (B, T, S)) < 0.7
    support = support.at[..., 0].set(True)
    ps = jax.nn.softmax(jnp.where(support, 3 * jax.random.normal(k1, (M, B, T, S)), -jnp.inf), axis=-1)
    logits = jax.random.normal(k2, (B, T, S))

    def kl_to_average(z):  # written out independently: KL(pbar || softmax over the support)
        pbar = ps.mean(0)
        logq = jax.nn.log_softmax(jnp.where(support, z, -1e30), axis=-1)
        return jnp.sum(jnp.where(pbar > 0, pbar * (jnp.log(jnp.where(pbar > 0, pbar, 1)) - logq), 0)) / (B * T)

    g_multi = jax.grad(lambda z: multi_layer_kl(ps, z, support))(logits)
    g_avg = jax.grad(kl_to_average)(logits)
    np.testing.assert_allclose(g_multi, g_avg, atol=1e-6)
    # the losses differ by a constant (the average entropy gap), not in their gradient
    assert abs(float(multi_layer_kl(ps, logits, support)) - float(kl_to_average(logits))) > 1e-4
    # a finite-difference check of one coordinate
    e = jnp.zeros_like(logits).at[1, 2, 3].set(1e-2)
    fd = (multi_layer_kl(ps, logits + e, support) - multi_layer_kl(ps, logits - e, support)) / 2e-2
    np.testing.assert_allclose(float(fd), float(g_avg[1, 2, 3]), rtol=1e-2, atol=1e-5)


def test_groups_follow_the_pattern():
    assert groups("FSSFSF") == [(0, [0, 1, 2]), (3, [3, 4]), (5, [5])]
