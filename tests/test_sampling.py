"""Sampling against hand-computed distributions."""

import jax
import jax.numpy as jnp
import numpy as np

from ic_jax.runtime.sampling import RowSampling, Sampling, row_keys, sample, sample_rows

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


# per-row settings: each row of one batch follows its own hand-computed distribution

ROWS = [Sampling(temperature=1.0), Sampling(temperature=1.0, top_k=2), Sampling(temperature=1.0, top_p=0.8),
        Sampling(temperature=0.5), Sampling()]
P = np.array([0.5, 0.25, 0.15, 0.07, 0.03])
ROW_FREQS = [P, [2 / 3, 1 / 3, 0, 0, 0], [0.5 / 0.9, 0.25 / 0.9, 0.15 / 0.9, 0, 0], P**2 / (P**2).sum(),
             [1, 0, 0, 0, 0]]


def test_sample_rows_follows_each_rows_settings():
    n, rows = 20000, len(ROWS)
    logits = jnp.broadcast_to(LOGITS, (rows, 5))
    seeds = jnp.arange(rows, dtype=jnp.int32)
    settings = RowSampling.of(ROWS)
    toks = jax.jit(jax.vmap(lambda i: sample_rows(logits, row_keys(seeds, jnp.full(rows, i)), settings)))(
        jnp.arange(n))
    for b, want in enumerate(ROW_FREQS):
        np.testing.assert_allclose(np.bincount(np.asarray(toks[:, b]), minlength=5) / n, want, atol=0.015)


def test_sample_rows_does_not_depend_on_batchmates():
    """A row's token depends only on its logits, settings, seed and counter: alone or beside other rows, the
    same; greedy rows are the argmax."""
    logits = jax.random.normal(jax.random.key(3), (len(ROWS), 50))
    seeds, counters = jnp.asarray([7, 8, 9, 10, 11]), jnp.asarray([0, 5, 2, 1, 4])
    run = jax.jit(lambda lg, s, n, settings: sample_rows(lg, row_keys(s, n), settings))
    together = run(logits, seeds, counters, RowSampling.of(ROWS))
    for b in range(len(ROWS)):
        alone = run(logits[b:b + 1], seeds[b:b + 1], counters[b:b + 1], RowSampling.of(ROWS[b:b + 1]))
        assert int(alone[0]) == int(together[b])
    assert int(together[-1]) == int(np.argmax(logits[-1]))
