"""Sampling against hand-computed distributions."""

import jax
import jax.numpy as jnp
import numpy as np

from ic_jax.runtime.sampling import Sampling, sample

LOGITS = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.07, 0.03]]))


def freqs(s: Sampling, n=20000):
    keys = jax.random.split(jax.random.key(0), n)
    toks = jax.vmap(lambda k: sample(LOGITS, k, s)[0])(keys)
    return np.bincount(np.asarray(toks), minlength=5) / n


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(1), (4, 50))
    np.testing.assert_array_equal(sample(logits, jax.random.key(2), Sampling()), np.argmax(logits, -1))


def test_temperature_one_follows_softmax():
    np.testing.assert_allclose(freqs(Sampling(temperature=1.0)), [0.5, 0.25, 0.15, 0.07, 0.03], atol=0.015)


def test_temperature_sharpens():
    p = np.array([0.5, 0.25, 0.15, 0.07, 0.03]) ** 2
    np.testing.assert_allclose(freqs(Sampling(temperature=0.5)), p / p.sum(), atol=0.015)


def test_top_k_keeps_k_most_likely():
    np.testing.assert_allclose(freqs(Sampling(temperature=1.0, top_k=2)), [2 / 3, 1 / 3, 0, 0, 0], atol=0.015)


def test_top_p_keeps_smallest_prefix_reaching_p():
    # mass above each token: 0, .5, .75, .9, .97 -> top_p=0.8 keeps the first three
    np.testing.assert_allclose(freqs(Sampling(temperature=1.0, top_p=0.8)), [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0],
                               atol=0.015)
