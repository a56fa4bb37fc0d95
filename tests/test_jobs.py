"""Inference jobs (python -m ic_jax.jobs) and the continuous-batching scheduler under them, on the tiny config:
a job's greedy completions equal `generate` run on each prompt alone; a slot refilled after a longer request gives
the new prompt a fresh run's tokens; the refill writes the big cache in place; a job killed midway (a torn last line
included) and run again ends with an uninterrupted job's results; bad lines are skipped or refuse the job; bench
throughput's table and JSON."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from ic_jax import generate, jobs
from ic_jax.bench import throughput
from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel
from ic_jax.model.pattern import parse_pattern
from ic_jax.runtime.batching import BATCH_AXIS, Batcher, Request, SlotCache, write_slot
from ic_jax.runtime.engine import Engine
from ic_jax.runtime.memory import shard_bytes

CONTEXT = 20  # every request's prompt + completion: generate then builds one cache shape for all
PATTERN = "FSSS"
MODEL = ["--config", "tiny", "--init", "random", "--pattern", PATTERN, "--temperature", "0"]
PROMPTS = {"a": "def f(x):", "b": "abcd", "c": "import os, sys", "d": "x = [1, 2]", "e": "hello"}
TIMINGS = ("ttft_s", "total_s")


def write_input(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def requests_file(path):
    """Each prompt asks for the tokens that fill CONTEXT; five prompts of different lengths through two slots."""
    return write_input(path, [{"id": k, "prompt": p, "max_new_tokens": CONTEXT - len(p)} for k, p in PROMPTS.items()])


def run_job(inp, out, *extra):
    return jobs.main(["--input", str(inp), "--output", str(out), "--slots", "2", "--context", str(CONTEXT), *MODEL,
                      *extra])


def results(path) -> dict:
    """id -> result without its timings (which differ run to run)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({r["id"] for r in lines}) == len(lines), "an id written twice"
    return {r["id"]: {k: v for k, v in r.items() if k not in TIMINGS} for r in lines}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("job")
    assert run_job(requests_file(tmp / "in.jsonl"), tmp / "out.jsonl") == 0
    return tmp / "out.jsonl"


def test_job_equals_generate_for_each_prompt_alone(uninterrupted, capsys):
    got = results(uninterrupted)
    assert set(got) == set(PROMPTS)
    for rid, prompt in PROMPTS.items():
        capsys.readouterr()
        assert generate.main([*MODEL, "--prompt", prompt, "--max-new-tokens", str(CONTEXT - len(prompt)),
                              "--chunk-size", "4", "--json"]) == 0
        alone = json.loads(capsys.readouterr().out)
        assert got[rid]["completion"] == alone["completions"][0], rid
        assert got[rid]["prompt_tokens"] == len(prompt.encode())
        assert got[rid]["finish_reason"] in ("stop", "length")
        if got[rid]["finish_reason"] == "length":
            assert got[rid]["prompt_tokens"] + got[rid]["completion_tokens"] == CONTEXT


@pytest.fixture(scope="module")
def engine():
    cfg = load_config("tiny")
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
    after = [np.asarray(x) for x in jax.tree.leaves(write_slot(slots.cache, row, np.int32(2)))]
    for old, new, r in zip(before, after, jax.tree.leaves(row)):
        np.testing.assert_array_equal(np.take(new, 2, BATCH_AXIS), np.take(np.asarray(r), 0, BATCH_AXIS))
        np.testing.assert_array_equal(np.delete(new, 2, BATCH_AXIS), np.delete(old, 2, BATCH_AXIS))


def test_killed_job_run_again_ends_as_an_uninterrupted_one(uninterrupted, tmp_path, monkeypatch, capsys):
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
    assert run_job(inp, out) == 130
    assert len(out.read_text().splitlines()) == 3 and not out.read_text().endswith("\n")
    monkeypatch.setattr(jobs, "append_line", real)
    capsys.readouterr()
    assert run_job(inp, out, "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["already_done"] == 2 and stats["requests"] == 3
    assert results(out) == results(uninterrupted)
    capsys.readouterr()
    assert run_job(inp, out, "--json") == 0  # all done: nothing runs, nothing is added
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


def test_bad_lines_are_reported_and_skipped(uninterrupted, tmp_path, capsys):
    inp, out = write_input(tmp_path / "in.jsonl", BAD), tmp_path / "out.jsonl"
    assert run_job(inp, out, "--json") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["bad_lines"] == 6
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped:")]
    for n, rid in [(2, None), (3, '"y"'), (4, '"a"'), (5, '"z"'), (6, "7"), (7, '"t"')]:
        assert any(f"line {n}" + (f" (id {rid})" if rid else ":") in line for line in skipped), (n, skipped)
    assert "duplicate id" in captured.err and "chat template" in captured.err and "no room" in captured.err
    assert results(out) == {k: v for k, v in results(uninterrupted).items() if k in ("a", "b")}


def test_on_bad_line_fail_refuses_before_any_work(tmp_path, capsys):
    inp, out = write_input(tmp_path / "in.jsonl", BAD), tmp_path / "out.jsonl"
    assert run_job(inp, out, "--on-bad-line", "fail") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2" in err[0] and "5 more bad lines" in err[0] and "--on-bad-line skip" in err[0]
    assert not out.exists()


def test_bench_throughput_table_and_json(tmp_path, capsys):
    path = tmp_path / "tp.json"
    assert throughput.main(["--config", "tiny", "--layers", "2", "--context", "40", "--slots", "2",
                            "--decode-steps", "2", "--patterns", "F", "FS", "--json", str(path)]) == 0
    table = capsys.readouterr().out
    assert "decode tok/s" in table and "slots" in table and "peak GB/dev" in table
    rows = json.loads(path.read_text())["rows"]
    assert [r["pattern"] for r in rows] == ["FF", "FS"] and [r["indexers"] for r in rows] == [2, 1]
    for r in rows:
        assert r["slots"] == 2 and r["context"] == 40 and r["decode_tok_s"] > 0 and "peak_bytes_per_device" in r
        assert r["decode_tok_s"] == pytest.approx(2 * r["decode_tok_s_per_request"])
    assert rows[0]["speedup"] == 1.0
