"""The generate command as a user runs it: good path, and one-line exit-2 errors for bad input (the bench
subcommands': test_bench_cli.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel
from ic_jax.runtime.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "ic_jax.generate", *args], capture_output=True, text=True,
                          input=stdin, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny"
    save_checkpoint(path, DSAModel(load_config("tiny"), "F" * 8, nnx.Rngs(0)), pattern="FSSSFSSS")
    return path


def test_generate_json_good_path(ckpt):
    r = run("--ckpt", str(ckpt), "--pattern", "freq:4", "--prompt", "def f(x):", "--prompt", "import",
            "--max-new-tokens", "4", "--chunk-size", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["completions"]) == 2 and out["new_tokens"] == 4
    assert out["pattern"] == "FFSSSFSS" and out["indexer_layers"] == 3 and out["prompt_tokens"] == 15


def test_generate_streams_text_and_stats_from_stdin(ckpt):
    r = run("--ckpt", str(ckpt), "--max-new-tokens", "3", stdin="x = 1\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("x = 1\n")
    assert "2 of 8 layers run the indexer" in r.stderr  # the checkpoint's own pattern FSSSFSSS


@pytest.mark.parametrize("args, message", [
    (["--pattern", "FSXS"], "characters"),
    (["--pattern", "SFFF"], "starts with S"),
    (["--pattern", "F" * 9], "only 8 layers"),
    (["--config", "tiny", "--init", "random", "--max-new-tokens", "4000"], "max_position_embeddings"),
])
def test_bad_input_is_one_line_exit_2(ckpt, args, message):
    base = [] if "--init" in args else ["--ckpt", str(ckpt)]
    r = run(*base, *args, "--prompt", "hello" * 40)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_missing_checkpoint_and_mismatched_config(ckpt, tmp_path):
    r = run("--ckpt", str(tmp_path / "nope"), "--prompt", "x")
    assert r.returncode == 2 and "not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**load_config("tiny").to_dict(), "hidden_size": 32}))
    r = run("--ckpt", str(ckpt), "--config", str(other), "--prompt", "x")
    assert r.returncode == 2 and "does not match" in r.stderr and "Traceback" not in r.stderr
