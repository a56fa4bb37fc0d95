"""python -m ic_jax.convert --mesh in a job of two local CPU processes with two fake devices each (`--distributed`,
a coordinator on localhost, as tests/test_multihost.py): the layers are converted by both processes, each writes its
own shards, and the checkpoint equals a plain one-process conversion. The job resumes a work folder that a stopped
run left behind."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ic_jax.convert import hf_import
from ic_jax.convert.__main__ import main, work_dir
from ic_jax.runtime.checkpoint import load_checkpoint, read_config, read_params
from tests.test_convert import FIXTURES, forward
from tests.test_multihost import run_two_processes

NAME = "glm52"  # FP8 with edge blocks, two shard files, shared layers without indexer weights
ARGS = ["--hf", str(FIXTURES / NAME), "--dtype", "float32", "--quiet"]


def stopped_after_two_units(out, monkeypatch):
    """Runs the conversion in this process until two units are done, as a killed run leaves its work folder."""
    real = hf_import.mark_done

    def stop(unit):
        real(unit)
        if len(list(work_dir(out).glob("*/done"))) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(hf_import, "mark_done", stop)
    assert main([*ARGS, "--out", str(out)]) == 130
    monkeypatch.undo()


def test_two_processes_convert_what_one_process_converts(tmp_path, monkeypatch):
    plain, job = tmp_path / "plain", tmp_path / "job"
    assert main([*ARGS, "--out", str(plain)]) == 0
    stopped_after_two_units(job, monkeypatch)
    marker = work_dir(job) / "top" / "final_norm.scale.npy"  # a unit done before: the job must keep it as it is
    np.save(marker, np.full_like(np.load(marker), 2.0))
    outs = run_two_processes([sys.executable, "-m", "ic_jax.convert", *ARGS, "--out", str(job), "--mesh",
                              "tensor=2,expert=2"])
    assert f"wrote {job}" in outs[0] and outs[1] == ""
    assert not work_dir(job).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["job", "plain"]
    for process in (0, 1):  # each process wrote its own shards
        assert any(f.is_file() for f in (job / "params" / f"ocdbt.process_{process}" / "d").iterdir())

    (top_a, layers_a), (top_b, layers_b) = (read_params(c, read_config(c)) for c in (plain, job))
    np.testing.assert_array_equal(top_b["final_norm"]["scale"], 2.0)
    top_a["final_norm"]["scale"] = np.full_like(top_a["final_norm"]["scale"], 2.0)
    leaves = [jax.tree_util.tree_leaves_with_path(tree) for tree in ((top_a, layers_a), (top_b, layers_b))]
    assert [path for path, _ in leaves[0]] == [path for path, _ in leaves[1]]
    for (path, a), (_, b) in zip(*leaves):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))

    tokens = jnp.asarray([json.loads((FIXTURES / NAME / "prompt.json").read_text())["tokens"]], jnp.int32)
    want = load_checkpoint(plain)
    want.final_norm.scale.set_value(jnp.full_like(want.final_norm.scale.get_value(), 2.0))
    np.testing.assert_array_equal(np.asarray(forward(load_checkpoint(job), tokens)),
                                  np.asarray(forward(want, tokens)))
