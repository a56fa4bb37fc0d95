"""Checkpoint round trip, pattern choice at load time, atomic overwrite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ic_jax import checkpoint
from ic_jax.config import load_config
from ic_jax.errors import UserError
from ic_jax.model import DSAModel, repattern

CFG = load_config("tiny").replace(dtype="float32")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)


def params(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_round_trip_restores_every_parameter(tmp_path):
    model = DSAModel(CFG, "F" * 8, nnx.Rngs(7))
    checkpoint.save_checkpoint(tmp_path / "ck", model, pattern="FSSSFSSS", meta={"step": 3})
    same = checkpoint.load_checkpoint(tmp_path / "ck", "F" * 8)
    for a, b in zip(jax.tree.leaves(params(model)), jax.tree.leaves(params(same))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert checkpoint.load_checkpoint(tmp_path / "ck").pattern == "FSSSFSSS"


def test_load_with_pattern_drops_unused_indexers(tmp_path):
    model = DSAModel(CFG, "F" * 8, nnx.Rngs(8))
    checkpoint.save_checkpoint(tmp_path / "ck", model)
    loaded = checkpoint.load_checkpoint(tmp_path / "ck", "freq:4")
    n_params = lambda m: sum(x.size for x in jax.tree.leaves(params(m)))
    assert n_params(loaded) < n_params(model)
    np.testing.assert_allclose(np.asarray(loaded.forward(TOKENS)), np.asarray(repattern(model, loaded.pattern).forward(TOKENS)),
                               rtol=1e-6, atol=1e-6)


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old = DSAModel(CFG, "F" * 8, nnx.Rngs(1))
    checkpoint.save_checkpoint(tmp_path / "ck", old)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.ocp.PyTreeCheckpointer, "save", boom)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(tmp_path / "ck", DSAModel(CFG, "F" * 8, nnx.Rngs(2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    np.testing.assert_array_equal(np.asarray(checkpoint.load_checkpoint(tmp_path / "ck").forward(TOKENS)),
                                  np.asarray(old.forward(TOKENS)))


def test_mismatched_config_is_refused(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "ck", DSAModel(CFG, "F" * 8, nnx.Rngs(0)))
    with pytest.raises(UserError, match="does not match"):
        checkpoint.load_checkpoint(tmp_path / "ck", None, CFG.replace(kv_lora_rank=16))
