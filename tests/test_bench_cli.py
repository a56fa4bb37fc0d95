"""The bench subcommands as a user runs them: the shared size parser, the defaults it gives each benchmark, and
one-line exit-2 errors for bad input, each naming its flag and refused before any work; roofline's and step's good
paths."""

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from ic_jax.bench import e2e, grouped_matmul, kernels, roofline, step, sweep
from ic_jax.cli import parse_size, size_list


@pytest.mark.parametrize("text, value", [
    ("200k", 200_000), ("200K", 200_000), ("128Ki", 131_072), ("8ki", 8_192), ("1.5M", 1_500_000),
    ("2Mi", 2_097_152), ("4096", 4_096), ("1.5k", 1_500), ("1", 1),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["abc", "0", "-5", "", "200kb", "1e3", "0.5", "1.0001k", "2 k", "k", "1.5"])
def test_parse_size_refuses_bad_spellings(text):
    with pytest.raises(argparse.ArgumentTypeError, match="is not a size"):
        parse_size(text)


def test_size_list():
    assert size_list("10k,60k, 200Ki") == [10_000, 60_000, 204_800]
    with pytest.raises(argparse.ArgumentTypeError):
        size_list(",")


def test_bench_defaults_keep_their_measured_shapes():
    """The kernel benchmarks keep the binary lengths they always measured (8 x 1024 ... 200 x 1024), the
    whole-model ones the decimal ones (200k = 200,000), now with one parser for both."""
    assert kernels.parser().parse_args([]).sizes == [8192, 32768, 65536, 131072, 204800]
    assert sweep.parser().parse_args([]).tk == 204800
    assert sweep.parser().parse_args([]).chunks == [2048, 16384]
    assert e2e.parser().parse_args([]).contexts == [10_000, 60_000, 120_000, 200_000]
    assert step.parser().parse_args([]).context == 200_000


@pytest.mark.parametrize("args, message", [
    (["--tk", "1k,2k"], "one context length"),
    (["--ops", "indexer,attn"], "choose from"),
])
def test_bench_sweep_bad_input_is_one_line_exit_2(args, message, capsys):
    assert sweep.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


TINY = ["--config", "tiny"]


@pytest.mark.parametrize("command, args, message", [
    (e2e, [*TINY, "--layers", "0"], "argument --layers: must be >= 1, got 0"),
    (step, [*TINY, "--layers", "0"], "argument --layers: must be >= 1, got 0"),
    (e2e, [*TINY, "--seed", "-1"], "argument --seed: must be in 0.."),
    (step, [*TINY, "--seed", "-1"], "argument --seed: must be in 0.."),
    (e2e, [*TINY, "--impl", "triton"], "argument --impl: invalid choice"),
    (e2e, [*TINY, "--decode-steps", "1"], "argument --decode-steps: must be >= 2, got 1"),
    (e2e, [*TINY, "--contexts", "1k,abc"], "argument --contexts: 'abc' is not a size"),
    (e2e, [*TINY, "--contexts", "100,4k", "--decode-steps", "100"], "max_position_embeddings 4096"),
    (step, [*TINY, "--top", "0"], "argument --top: must be >= 1, got 0"),
    (sweep, ["--tk", "abc"], "argument --tk: 'abc' is not a size"),
    (sweep, ["--chunks", "2048,0"], "argument --chunks: '0' is not a size"),
    (kernels, ["--sizes", "8Ki,x"], "argument --sizes: 'x' is not a size"),
    (kernels, ["--chunk", "0"], "argument --chunk: must be >= 1, got 0"),
    (kernels, ["--decode-batches", "1,0"], "argument --decode-batches: must be >= 1, got 0"),
    (kernels, ["--ops", "mla", "--indexer-fp8"], "keep indexer in --ops"),
])
def test_bench_bad_flag_is_one_line_exit_2_naming_it(command, args, message, capsys):
    t = time.perf_counter()
    assert command.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert time.perf_counter() - t < 20  # refused before any model is built or timed


@pytest.mark.parametrize("command, args", [
    (kernels, []), (sweep, []), (grouped_matmul, []), (e2e, TINY), (step, [*TINY, "--context", "100"]),
])
def test_bench_json_that_is_a_folder_is_refused_first(tmp_path, command, args, capsys):
    """Before the GPU check and any work: the folder is left as it was."""
    (tmp_path / "keep.txt").write_text("mine")
    t = time.perf_counter()
    assert command.main([*args, "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--json" in err and str(tmp_path) in err and len(err.strip().splitlines()) == 1
    assert time.perf_counter() - t < 20
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "mine"


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
    ('{"rows": [1], "ceilings": {}}', "row 0 lacks"),
    ('{"rows": [{"op": "mla", "mode": "prefill", "tk": 1, "shape": "1 x 1", "gbs": 1.0, "tflops": 1.0}], '
     '"ceilings": {"matmul_flops": "fast"}}', "ceilings lack"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_bench_roofline_bad_input_is_one_line_exit_2(tmp_path, content, message, capsys):
    path = tmp_path / "k.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert roofline.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("out, message", [("plot.txt", "ending in .png"), ("folder.png", "folder.png")])
def test_bench_roofline_bad_out_is_refused_before_plotting(tmp_path, out, message, capsys):
    (tmp_path / "folder.png").mkdir()
    path = kernels_json(tmp_path / "k.json")
    assert roofline.main([str(path), "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png", "k.json"]


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


def test_bench_step_json_in_a_new_folder_and_fewer_layers(tmp_path):
    """--layers 2 builds a 2-layer model; the --json folder is made before the run."""
    out = tmp_path / "new" / "step.json"
    assert step.main([*TINY, "--layers", "2", "--patterns", "FS", "--context", "1.5k", "--steps", "1",
                      "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["layers"] == 2 and payload["context"] == 1500 and payload["rows"][0]["pattern"] == "FS"


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
    (["--context", "0"], "is not a size"),
    (["--context", "1k,2k"], "give one length"),
    (["--patterns", "SF", "--context", "100"], "starts with S"),
    (["--context", "200k"], "max_position_embeddings"),
    (["--context", "100", "--chunk", "0"], "must be >= 1"),
])
def test_bench_step_bad_input_is_one_line_exit_2(args, message, capsys):
    assert step.main(["--config", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
