"""Evaluation: retrieval scoring on a hand-computed case, and the eval command's rows against direct
forward passes of the pattern models."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ic_jax import eval as evaluation
from ic_jax.calibration.data import ANSWER_DIGITS, Corpus, resolve_files
from ic_jax.calibration.losses import lm_loss
from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel, repattern
from ic_jax.runtime.checkpoint import save_checkpoint
from tests.test_model import forward

ROOT = Path(__file__).resolve().parent.parent
DATA = str(ROOT / "ic_jax/**/*.py")


class FixedOutputs:
    """Stands in for a ReuseEvaluator: fixed (losses, argmax) whatever the pattern."""

    def __init__(self, losses, argmax):
        self.out = (losses, argmax)

    def run(self, own, tokens):
        return self.out


def test_retrieval_scores_hand_computed():
    assert ANSWER_DIGITS == 4
    tokens = np.array([[9, 9, 1, 2, 3, 4, 9, 9], [9, 9, 9, 5, 6, 7, 8, 9]])
    starts = np.array([2, 3])  # answers: 1 2 3 4 at 2..5, 5 6 7 8 at 3..6
    argmax = np.zeros_like(tokens)
    argmax[0, 1:5] = [1, 2, 3, 4]  # position t predicts token t + 1: row 0 gets every digit
    argmax[1, 2:6] = [5, 6, 0, 8]  # row 1 misses its third digit
    losses = np.arange(14, dtype=float).reshape(2, 7)
    acc, nll = evaluation.retrieval_scores(FixedOutputs(losses, argmax), None, tokens, starts)
    assert acc == 0.5
    assert nll == pytest.approx(np.mean([1, 2, 3, 4, 9, 10, 11, 12]))


def test_eval_rows_equal_direct_forward_passes(tmp_path, capsys):
    cfg = load_config("tiny")
    model = DSAModel(cfg, "F" * 8, nnx.Rngs(3))
    save_checkpoint(tmp_path / "m", model)
    argv = ["--ckpt", str(tmp_path / "m"), "--data", DATA, "--seqs", "3", "--seq-len", "40", "--lengths", "128",
            "--retrieval-n", "2", "--batch", "2", "--impl", "xla", "--json", "--patterns", "F", "FSSSFSSS"]
    assert evaluation.main(argv) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    tokens = jnp.asarray(Corpus(resolve_files(DATA)).windows(np.random.default_rng(99), 3, 40))
    for row, pattern in zip(rows, ["FFFFFFFF", "FSSSFSSS"]):
        assert row["pattern"] == pattern and row["indexers"] == pattern.count("F")
        want = float(lm_loss(forward(repattern(model, pattern), tokens), tokens))
        assert row["loss"] == pytest.approx(want, abs=1e-4)
        assert 0 <= row["retrieval@128"] <= 1 and row["answer_nll@128"] > 0


def test_eval_refuses_an_empty_request(tmp_path, capsys):
    save_checkpoint(tmp_path / "m", DSAModel(load_config("tiny"), "F" * 8, nnx.Rngs(0)))
    assert evaluation.main(["--ckpt", str(tmp_path / "m")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
