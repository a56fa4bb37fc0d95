"""The generate command as a user runs it: good path, and one-line exit-2 errors for bad input (the bench sweep's,
roofline's and decode's too)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

import jax
import jax.numpy as jnp

from ic_jax.bench import roofline, step, sweep
from ic_jax.checkpoint import save_checkpoint
from ic_jax.config import load_config
from ic_jax.model import DSAModel

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


@pytest.mark.parametrize("args, message", [
    (["--tk", "1k,2k"], "one context length"),
    (["--ops", "indexer,attn"], "choose from"),
])
def test_bench_sweep_bad_input_is_one_line_exit_2(args, message, capsys):
    assert sweep.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def kernels_json(path: Path) -> Path:
    """A `bench kernels --json` file in miniature: an indexer row (1 TFLOP in 2 ms, 4 GB moved), a decode row,
    a top-k row (no FLOP rate) and a sparse MLA row with its gather rate."""
    rows = [{"op": "indexer", "mode": "prefill", "tk": 8192, "shape": "1 x 2048", "ms": 2.0, "tflops": 500.0,
             "gbs": 2000.0},
            {"op": "mla", "mode": "decode", "tk": 8192, "shape": "64 x 1", "ms": 0.1, "tflops": 60.0, "gbs": 1600.0},
            {"op": "topk", "mode": "prefill", "tk": 8192, "shape": "1 x 2048", "ms": 0.3, "gbs": 300.0},
            {"op": "mla", "mode": "prefill", "tk": 32768, "shape": "1 x 2048", "ms": 1.1, "tflops": 166.0,
             "gbs": 4400.0, "gather_tbs": 7.5}]
    path.write_text(json.dumps({"device": "test", "jax": "0", "date": "2026-11-25", "rows": rows,
                                "ceilings": {"matmul_flops": 7e14, "copy_bytes_s": 2.9e12}}))
    return path


def test_bench_roofline_points_and_plot(tmp_path, capsys):
    path = kernels_json(tmp_path / "k.json")
    pts = roofline.points(json.loads(path.read_text()))
    # FLOP per byte = (TFLOP/s * 1e12) / (GB/s * 1e9); top-k has no FLOP rate
    assert [(p["group"], p["intensity"]) for p in pts] == [("indexer prefill", 250.0), ("mla decode B=64", 37.5),
                                                          ("mla prefill", 166e3 / 4400)]
    assert roofline.main([str(path)]) == 0
    png = tmp_path / "k.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "3 points" in capsys.readouterr().out


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not JSON"),
    ('{"rows": []}', "no rows and ceilings"),
    ('{"rows": [{"op": "topk", "mode": "prefill", "tk": 1, "shape": "1 x 1", "gbs": 1.0}], "ceilings": {}}',
     "no row has a FLOP rate"),
])
def test_bench_roofline_bad_input_is_one_line_exit_2(tmp_path, content, message, capsys):
    path = tmp_path / "k.json"
    if content is not None:
        path.write_text(content)
    assert roofline.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("chunk", [1, 24])
def test_bench_step_times_each_pattern(tmp_path, capsys, chunk):
    out = tmp_path / "step.json"
    assert step.main(["--config", "tiny", "--patterns", "F", "FSSS", "--context", "100", "--chunk", str(chunk),
                      "--steps", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["pattern"] for r in rows] == ["F" * 8, "FSSSFSSS"] and [r["indexers"] for r in rows] == [8, 2]
    assert all(r["ms_per_step"] > 0 for r in rows) and rows[0]["speedup"] == 1.0
    assert all(abs(r["tok_s"] - 1e3 * chunk / r["ms_per_step"]) < 1e-6 for r in rows)
    assert "FSSS" in capsys.readouterr().out


def test_bench_step_profile_counts_a_known_program():
    """Three calls of a program of two ops, a 512^3 matmul and 512^2 sines: two kernels per step, each once, one
    of them the sines (on the CPU XLA names the matmul after the library that runs it), the times adding up. Which
    takes longer is left open: on a loaded 2-core machine the order of the two changes."""
    x = jnp.ones((512, 512))
    f = jax.jit(lambda x: jnp.sin(x @ x))
    jax.block_until_ready(f(x))
    prof = step.device_profile(lambda: [jax.block_until_ready(f(x)) for _ in range(3)], steps=3, top=5)
    assert prof["kernels"] == 2.0 and [k["calls"] for k in prof["top"]] == [1.0, 1.0]
    assert sorted("sin" in k["name"] for k in prof["top"]) == [False, True]
    assert abs(sum(k["ms"] for k in prof["top"]) - prof["kernel_ms"]) < 1e-9 < prof["kernel_ms"] <= prof["span_ms"]


@pytest.mark.parametrize("args, message", [
    (["--context", "0"], "write lengths like"),
    (["--context", "1k,2k"], "give one length"),
    (["--patterns", "SF", "--context", "100"], "starts with S"),
    (["--context", "200k"], "max_position_embeddings"),
    (["--context", "100", "--chunk", "0"], "must be >= 1"),
])
def test_bench_step_bad_input_is_one_line_exit_2(args, message, capsys):
    assert step.main(["--config", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
