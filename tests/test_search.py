"""Greedy search: the runtime-pattern evaluator equals real pattern models, a planted structure is found
first, and an interrupted search resumes to the same result."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ic_jax import search
from ic_jax.calibration.losses import lm_loss, token_losses
from ic_jax.calibration.reuse import ReuseEvaluator
from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel, build_model, layer_params, repattern, top_params
from ic_jax.runtime.checkpoint import save_checkpoint
from tests.test_model import forward
from tests.test_overlap import zero_output

ROOT = Path(__file__).resolve().parent.parent
CFG = load_config("tiny")


@pytest.fixture(scope="module")
def model():
    return DSAModel(CFG, "F" * 8, nnx.Rngs(0))


def test_runtime_pattern_equals_the_pattern_model(model):
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (4, 33), 0, 256))
    ev = ReuseEvaluator(model, batch=2)
    for pattern in ["FFFFFFFF", "FSSFSFSS", "FSSSSSSS", "FFSSFFFS"]:
        got = ev.token_losses(search.flags(pattern), tokens)
        want = token_losses(forward(repattern(model, pattern), jnp.asarray(tokens)), jnp.asarray(tokens))
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_runtime_flags_need_the_all_f_model_and_layer_0(model):
    with pytest.raises(ValueError, match="all-F model"):
        repattern(model, "FSSSFSSS").forward(jnp.zeros((1, 4), jnp.int32), own=search.flags("F" * 8))
    with pytest.raises(ValueError, match="shape"):
        model.forward(jnp.zeros((1, 4), jnp.int32), own=search.flags("F" * 4))
    with pytest.raises(ValueError, match="layer 0"):
        ReuseEvaluator(model, batch=2).token_losses(search.flags("SFFFFFFF"), np.zeros((2, 8), np.int32))


def test_greedy_finds_planted_lossless_layers(model):
    """Layers 3 and 6 get an exact copy of their selection one layer earlier (layer 2 and 5 take layer 3's and
    6's indexer path and add nothing to the residual, so both see the same input): reusing there is
    lossless. Calibration text is the model's own greedy output under a sharpened head, so any other
    flip, which changes some selection, raises the loss. The first two commits must be lossless flips
    inside the planted pairs."""
    layers = layer_params(model)
    for p in (3, 6):
        donor = layers[p]
        layers[p - 1] = zero_output({**layers[p - 1], "attn_norm": donor["attn_norm"], "indexer": donor["indexer"],
                                     "attn": {**layers[p - 1]["attn"], "wq_a": donor["attn"]["wq_a"],
                                              "q_norm": donor["attn"]["q_norm"]}})
    top = dict(top_params(model), lm_head=top_params(model)["lm_head"] * 1000)
    planted = build_model(CFG, "F" * 8, layers, top)
    fwd = jax.jit(lambda t: jnp.argmax(planted.forward(t).logits, -1))
    tokens = jax.random.randint(jax.random.key(3), (4, 48), 0, 256)
    for _ in range(48):  # greedy continuation: a fixed point after T rounds
        tokens = jnp.concatenate([tokens[:, :1], fwd(tokens)[:, :-1]], axis=1)
    tokens = np.asarray(tokens)
    base = float(lm_loss(forward(planted, jnp.asarray(tokens)), jnp.asarray(tokens)))
    for i in (1, 4, 7):  # premise, on real pattern models: other single flips hurt
        pattern = "F" * i + "S" + "F" * (7 - i)
        logits = forward(repattern(planted, pattern), jnp.asarray(tokens))
        assert float(lm_loss(logits, jnp.asarray(tokens))) > base
    ev = ReuseEvaluator(planted, batch=2)
    pattern, committed = "F" * 8, []
    for _ in range(2):
        step = search.greedy_step(ev, tokens, pattern, 1, 1, 4)
        pattern = step["pattern"]
        committed += step["flipped"]
        assert step["loss"] == pytest.approx(base, abs=1e-6)
    assert [i in (2, 3) for i in committed].count(True) == 1 and [i in (5, 6) for i in committed].count(True) == 1


def run_search(tmp, ckpt, *extra):
    return search.main(["--ckpt", str(ckpt), "--calib", str(ROOT / "ic_jax/ops/**/*.py"), "--calib-seqs", "4",
                        "--batch", "2", "--seq-len", "32", "--keep", "0.25", "--out", str(tmp / "p.json"), *extra])


def test_interrupted_search_resumes_to_the_same_result(model, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "ck"
    save_checkpoint(ckpt, model)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run_search(tmp_path / "a", ckpt) == 0
    found = json.loads((tmp_path / "a/p.json").read_text())["pattern"]
    assert capsys.readouterr().out.splitlines()[-2:] == search.serving_settings(found)
    calls, real = [0], search.greedy_step

    def dies(*args):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(search, "greedy_step", dies)
    assert run_search(tmp_path / "b", ckpt) == 130
    assert len(json.loads((tmp_path / "b/search.state.json").read_text())["trajectory"]) == 3
    monkeypatch.setattr(search, "greedy_step", real)
    assert run_search(tmp_path / "b", ckpt) == 0
    a, b = (json.loads((tmp_path / d / "p.json").read_text()) for d in "ab")
    assert a["pattern"] == b["pattern"] and a["trajectory"] == b["trajectory"]
    assert a["pattern"].count("F") == 2 and (tmp_path / "a/p.png").is_file()
    assert search.main(["--ckpt", str(ckpt), "--keep", "1.5"]) == 2


def test_serving_settings():
    assert search.serving_settings("FFSF") == [
        """vLLM:   --hf-overrides '{"use_index_cache": true, "index_topk_pattern": "FFSF"}'""",
        """SGLang: --json-model-override-args '{"index_topk_pattern": "FFSF"}'"""]
