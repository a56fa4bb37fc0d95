"""Training: the train mode, loss isolation, and exact resumption of a killed run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ic_jax import train
from ic_jax.calibration.losses import indexer_loss, lm_loss
from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel, layer_params
from ic_jax.model.run_options import RunOptions
from ic_jax.runtime.checkpoint import load_checkpoint

CFG = load_config("tiny")


def test_train_mode_matches_forward_and_isolates_the_indexer():
    model = DSAModel(CFG, "FSSFSFSS", nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 256)
    graphdef, params = nnx.split(model)
    # jitted: one compile per program (eagerly each op and scan compiles on its own)
    forward = jax.jit(lambda p, opts: nnx.merge(graphdef, p).forward(tokens, opts), static_argnums=1)
    train = RunOptions(mode="train")
    logits, aux = forward(params, train)
    np.testing.assert_allclose(logits, forward(params, RunOptions()).logits, atol=1e-4)
    np.testing.assert_allclose(aux[1]["attn"].sum(-1), 1.0, atol=1e-5)
    assert "logits" in aux[0] and "logits" not in aux[1]

    def grads(loss):
        g = nnx.merge(graphdef, jax.jit(jax.grad(lambda p: loss(*forward(p, train))))(params))
        return [(jax.tree_util.keystr(k), float(jnp.abs(v).max())) for k, v in
                jax.tree_util.tree_flatten_with_path(layer_params(g))[0]]

    kl = grads(lambda lg, ax: indexer_loss(ax, "FSSFSFSS"))
    assert all(v == 0 for k, v in kl if "indexer" not in k) and any(v > 0 for k, v in kl if "indexer" in k)
    lm = grads(lambda lg, ax: lm_loss(lg, tokens))
    assert all(v == 0 for k, v in lm if "indexer" in k) and any(v > 0 for k, v in lm)


def test_infer_mode_returns_the_same_structure_with_empty_aux():
    model = DSAModel(CFG, "FSSFSFSS", nnx.Rngs(0))
    out = jax.eval_shape(lambda t: model.forward(t), jax.ShapeDtypeStruct((2, 24), jnp.int32))
    assert out.logits.shape == (2, 24, CFG.vocab_size) and out.aux == [{}] * 8
    with pytest.raises(ValueError, match="mode"):
        RunOptions(mode="collect")


def test_killed_training_resumes_to_the_same_model(tmp_path, monkeypatch):
    # tiny with every layer MoE: one layer group to compile (three runs compile each training step)
    config = tmp_path / "moe.json"
    config.write_text(json.dumps(CFG.replace(first_k_dense_replace=0, num_hidden_layers=2).to_dict()))
    args = ["--config", str(config), "--data", "ic_jax/**/*.py", "--steps", "5", "--dense-steps", "2", "--batch", "2",
            "--seq-len", "96", "--save-every", "2", "--warmup", "1", "--retrieval-frac", "0.5"]
    assert train.main(args + ["--out", str(tmp_path / "a")]) == 0
    calls, real = [0], train.training_batch

    def dies(*a):
        calls[0] += 1
        if calls[0] == 4:  # killed during step 4: steps 1-2 saved, step 3 lost
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(train, "training_batch", dies)
    assert train.main(args + ["--out", str(tmp_path / "b")]) == 130
    monkeypatch.setattr(train, "training_batch", real)
    assert train.main(args + ["--out", str(tmp_path / "b")]) == 0
    a, b = (layer_params(load_checkpoint(tmp_path / d)) for d in "ab")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert train.main(args + ["--out", str(tmp_path / "c"), "--seq-len", "99999"]) == 2
