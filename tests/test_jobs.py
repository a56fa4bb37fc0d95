"""Inference jobs (python -m ic_jax.jobs) and the continuous-batching scheduler under them, on the tiny config:
a job's greedy completions equal `generate` run on each prompt alone; a slot refilled after a longer request gives
the new prompt a fresh run's tokens; the refill writes the big cache in place; a job killed midway (a torn last line
included) and run again ends with an uninterrupted job's results; bad lines are skipped or refuse the job; bench
throughput's table and JSON; the refill on a data-split cache (2 fake devices)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from ic_jax import generate, jobs
from ic_jax.bench import throughput
from ic_jax.model.cache import BATCH_AXIS
from ic_jax.model.config import ModelConfig
from ic_jax.model.dsa import DSAModel
from ic_jax.model.pattern import parse_pattern
from ic_jax.package_data import CONFIG_DIR
from ic_jax.runtime.batching import Batcher, Request, SlotCache, write_slot
from ic_jax.runtime.engine import Engine
from ic_jax.runtime.memory import shard_bytes

CONTEXT = 20  # every request's prompt + completion: generate then builds one cache shape for all
PATTERN = "FS"
TINY2 = {**json.loads((CONFIG_DIR / "tiny.json").read_text()), "num_hidden_layers": 2}  # a dense and a MoE layer
PROMPTS = {"a": "def f(x):", "b": "abcd", "c": "import os, sys", "d": "x = [1, 2]", "e": "hello"}
TIMINGS = ("ttft_s", "total_s")


def write_input(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def requests_file(path):
    """Each prompt asks for the tokens that fill CONTEXT; five prompts of different lengths through two slots."""
    return write_input(path, [{"id": k, "prompt": p, "max_new_tokens": CONTEXT - len(p)} for k, p in PROMPTS.items()])


@pytest.fixture(scope="module")
def model_flags(tmp_path_factory):
    config = tmp_path_factory.mktemp("config") / "tiny2.json"
    config.write_text(json.dumps(TINY2))
    return ["--config", str(config), "--init", "random", "--pattern", PATTERN, "--temperature", "0"]


def run_job(model_flags, inp, out, *extra):
    return jobs.main(["--input", str(inp), "--output", str(out), "--slots", "2", "--context", str(CONTEXT),
                      *model_flags, *extra])


def results(path) -> dict:
    """id -> result without its timings (which differ run to run)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({r["id"] for r in lines}) == len(lines), "an id written twice"
    return {r["id"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in lines}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_flags):
    tmp = tmp_path_factory.mktemp("job")
    assert run_job(model_flags, requests_file(tmp / "in.jsonl"), tmp / "out.jsonl") == 0
    return tmp / "out.jsonl"


def test_job_equals_generate_for_each_prompt_alone(uninterrupted, model_flags, capsys):
    got = results(uninterrupted)
    assert set(got) == set(PROMPTS)
    for rid, prompt in PROMPTS.items():
        capsys.readouterr()
        assert generate.main([*model_flags, "--prompt", prompt, "--max-new-tokens", str(CONTEXT - len(prompt)),
                              "--chunk-size", "4", "--json"]) == 0
        alone = json.loads(capsys.readouterr().out)
        assert got[rid]["completion"] == alone["completions"][0], rid
        assert got[rid]["prompt_tokens"] == len(prompt.encode())
        assert got[rid]["finish_reason"] in ("stop", "length")
        if got[rid]["finish_reason"] == "length":
            assert got[rid]["prompt_tokens"] + got[rid]["completion_tokens"] == CONTEXT


@pytest.fixture(scope="module")
def engine():
    cfg = ModelConfig.from_dict(TINY2)
    return Engine(DSAModel(cfg, parse_pattern(PATTERN, cfg.num_hidden_layers), nnx.Rngs(1)))


def test_refilled_slot_gives_a_fresh_runs_tokens(engine):
    """One slot: the short prompt goes where a longer request wrote more positions than it will."""
    long = Request("long", list(range(40, 53)), max_new_tokens=7)
    short = Request("short", [5, 6, 7, 8], max_new_tokens=9)
    after = {f.request.id: f.tokens for f in Batcher(engine, 1, CONTEXT, 16, eos_id=None).run([long, short])}
    fresh = next(Batcher(engine, 1, CONTEXT, 16, eos_id=None).run([short]))
    assert len(after["long"]) == 7 and len(fresh.tokens) == 9
    assert after["short"] == fresh.tokens


def test_refill_writes_the_cache_in_place(engine):
    """The compiled row write aliases the donated cache and needs no temporary the size of a row, let alone of the
    cache; the row lands in its slot and nowhere else."""
    slots = SlotCache(engine, 4, 256, 16)
    row = jax.tree.map(lambda x: x + 1, slots._fresh_row())
    compiled = write_slot.lower(slots.cache, row, np.int32(2)).compile()
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes == shard_bytes(slots.cache)
    assert memory.temp_size_in_bytes < shard_bytes(row)
    before = [np.asarray(x) for x in jax.tree.leaves(slots.cache)]
    after = [np.asarray(x) for x in jax.tree.leaves(compiled(slots.cache, row, np.int32(2)))]
    for old, new, r in zip(before, after, jax.tree.leaves(row)):
        np.testing.assert_array_equal(np.take(new, 2, BATCH_AXIS), np.take(np.asarray(r), 0, BATCH_AXIS))
        np.testing.assert_array_equal(np.delete(new, 2, BATCH_AXIS), np.delete(old, 2, BATCH_AXIS))


SPLIT_WRITE = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ic_jax.runtime.batching import write_slot
    from ic_jax.runtime.sharding import make_mesh
    mesh = make_mesh({"data": 2, "tensor": 1, "expert": 1})
    rng = np.random.default_rng(0)
    host = {"kv": rng.normal(size=(2, 4, 64, 8)).astype(np.float32), "scale": np.ones((2, 4, 64, 1), np.float32)}
    row = {"kv": rng.normal(size=(2, 1, 64, 8)).astype(np.float32), "scale": np.full((2, 1, 64, 1), 3.0, np.float32)}
    cache = jax.device_put(host, NamedSharding(mesh, P(None, "data")))
    row = jax.device_put(row, NamedSharding(mesh, P()))
    compiled = write_slot.lower(cache, row, np.int32(3), mesh=mesh).compile()
    assert "all-gather" not in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < row["kv"].nbytes
    out = compiled(cache, row, np.int32(3))
    for name in host:
        want = host[name].copy()
        want[:, 3:4] = np.asarray(row[name])
        np.testing.assert_array_equal(np.asarray(out[name]), want)
        assert out[name].sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data")), 4)
    print("SPLIT_WRITE_OK")
""")


def test_refill_on_a_data_split_cache_writes_only_the_owners_rows():
    """On a mesh whose "data" axis splits the rows, the row lands in its slot on the device holding it, with no
    gather of the cache (2 fake CPU devices, in a subprocess: the device count is fixed when the backend starts)."""
    r = subprocess.run([sys.executable, "-c", SPLIT_WRITE], capture_output=True, text=True, timeout=300, check=False,
                       cwd=Path(__file__).resolve().parent.parent)
    assert "SPLIT_WRITE_OK" in r.stdout, r.stderr[-3000:]


def test_killed_job_run_again_ends_as_an_uninterrupted_one(uninterrupted, model_flags, tmp_path, monkeypatch, capsys):
    """The job dies while writing its third result (two whole lines and part of a third on disk); run again, it
    drops the torn line, skips the two done ids, and ends with the uninterrupted job's results."""
    inp, out = requests_file(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    real = jobs.append_line

    def dies_on_third(f, record):
        if len(out.read_text().splitlines()) == 2:
            f.write(json.dumps(record)[:15])
            f.flush()
            raise KeyboardInterrupt
        real(f, record)

    monkeypatch.setattr(jobs, "append_line", dies_on_third)
    assert run_job(model_flags, inp, out) == 130
    assert len(out.read_text().splitlines()) == 3 and not out.read_text().endswith("\n")
    monkeypatch.setattr(jobs, "append_line", real)
    capsys.readouterr()
    assert run_job(model_flags, inp, out, "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["already_done"] == 2 and stats["requests"] == 3
    assert results(out) == results(uninterrupted)
    capsys.readouterr()
    assert run_job(model_flags, inp, out, "--json") == 0  # all done: nothing runs, nothing is added
    assert json.loads(capsys.readouterr().out)["requests"] == 0
    assert results(out) == results(uninterrupted)


BAD = [
    {"id": "a", "prompt": PROMPTS["a"], "max_new_tokens": CONTEXT - len(PROMPTS["a"])},
    '{"id": "x", "prompt": ',  # line 2: invalid JSON
    {"id": "y"},  # 3: no prompt
    {"id": "a", "prompt": "again"},  # 4: duplicate id
    {"id": "z", "prompt": "p" * CONTEXT},  # 5: no room left in the context
    {"id": 7, "messages": [{"role": "user", "content": "hi"}]},  # 6: the random model has no chat template
    {"id": "t", "prompt": "abcd", "temperature": -1},  # 7: bad setting
    {"id": "b", "prompt": PROMPTS["b"], "max_new_tokens": CONTEXT - len(PROMPTS["b"])},
]


def test_bad_lines_are_reported_and_skipped(uninterrupted, model_flags, tmp_path, capsys):
    inp, out = write_input(tmp_path / "in.jsonl", BAD), tmp_path / "out.jsonl"
    assert run_job(model_flags, inp, out, "--json") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["bad_lines"] == 6
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped:")]
    for n, rid in [(2, None), (3, '"y"'), (4, '"a"'), (5, '"z"'), (6, "7"), (7, '"t"')]:
        assert any(f"line {n}" + (f" (id {rid})" if rid else ":") in line for line in skipped), (n, skipped)
    assert "duplicate id" in captured.err and "chat template" in captured.err and "no room" in captured.err
    assert results(out) == {k: v for k, v in results(uninterrupted).items() if k in ("a", "b")}


def test_on_bad_line_fail_refuses_before_any_work(model_flags, tmp_path, capsys):
    inp, out = write_input(tmp_path / "in.jsonl", BAD), tmp_path / "out.jsonl"
    assert run_job(model_flags, inp, out, "--on-bad-line", "fail") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2" in err[0] and "5 more bad lines" in err[0] and "--on-bad-line skip" in err[0]
    assert not out.exists()


def test_bench_throughput_table_and_json(tmp_path, capsys):
    path = tmp_path / "tp.json"
    assert throughput.main(["--config", "tiny", "--layers", "2", "--context", "40", "--slots", "2",
                            "--decode-steps", "2", "--patterns", "FS", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    assert all(h in table for h in ("pattern", "slots", "prefill s/req", "decode tok/s", "speedup", "peak GB/dev"))
    (row,) = json.loads(path.read_text())["rows"]
    assert row["pattern"] == "FS" and row["indexers"] == 1 and row["slots"] == 2 and row["context"] == 40
    assert row["decode_tok_s"] > 0 and row["prefill_s_per_request"] > 0 and row["speedup"] == 1.0
    assert row["decode_tok_s"] == pytest.approx(2 * row["decode_tok_s_per_request"])
    assert "peak_bytes_per_device" in row  # None on a CPU
