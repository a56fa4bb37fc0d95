"""Top-k overlap: identical layers overlap fully; a random model's layers do not."""

import jax
import numpy as np
from flax import nnx

from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel, build_model, layer_params, top_params
from ic_jax.overlap import overlap_matrix


def zero_output(lp):
    """A layer that adds nothing to the residual stream (so the next layer sees the same input)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0 if jax.tree_util.keystr(path).endswith(("['wo']", "['w_down']")) else x, lp)


def test_identical_layers_overlap_one():
    cfg = load_config("tiny").replace(first_k_dense_replace=8)  # all dense: every layer has the same shapes
    model = DSAModel(cfg, "F" * 8, nnx.Rngs(0))
    layer0 = zero_output(layer_params(model)[0])
    same = build_model(cfg, "F" * 8, [layer0] * 8, top_params(model))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (3, 40), 0, 256))
    np.testing.assert_allclose(overlap_matrix(same, tokens, 2), np.ones((8, 8)), atol=1e-6)
    m = overlap_matrix(model, tokens, 2)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6)
    assert m[~np.eye(8, dtype=bool)].max() < 1 and np.allclose(m, m.T)
