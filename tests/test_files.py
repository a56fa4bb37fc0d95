"""Data safety of everything a command writes: --out never destroys what it does not recognise, a replaced
checkpoint is never missing, interrupted writes leave nothing behind after the next one, the umask is kept,
and damaged JSON reads back as one line."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from ic_jax import files
from ic_jax.bench.timing import write_json
from ic_jax.errors import UserError
from ic_jax.files import atomic_write_text, check_output_file, claim_output_dir, read_json
from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel, layer_params
from ic_jax.runtime.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def model():
    return DSAModel(load_config("tiny"), "F" * 8, nnx.Rngs(0))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def listing(folder: Path) -> dict:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_user_files_at_out_survive(tmp_path, model):
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "notes.txt").write_text("mine")
    (proj / "src" / "a.py").write_text("print(1)")
    before = listing(tmp_path)
    with pytest.raises(UserError, match=r"proj exists and is not a checkpoint of this run \(it holds 2 files\)"):
        save_checkpoint(proj, model)
    with pytest.raises(UserError, match="pass --overwrite"):
        claim_output_dir(proj, "--out", settings={"steps": 1})
    assert listing(tmp_path) == before


def test_the_current_folder_and_its_ancestors_are_never_replaced(tmp_path, monkeypatch, model):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    for out in (".", "..", str(work), str(Path.home())):
        with pytest.raises(UserError, match="never replaced"):
            claim_output_dir(out, "--out", overwrite=True)
    with pytest.raises(UserError, match="--out . is the current folder"):
        save_checkpoint(".", model, overwrite=True)
    assert listing(work) == {"keep.txt": b"x"}


def test_an_existing_file_is_refused_unless_overwrite(tmp_path, model):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(UserError, match="notes.txt is an existing file; choose another --out or pass --overwrite"):
        save_checkpoint(notes, model)
    assert listing(tmp_path) == {"notes.txt": b"mine"}
    save_checkpoint(notes, model, overwrite=True)
    assert files.is_checkpoint(notes) and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_checkpoint_is_replaced_by_a_new_one(tmp_path, model):
    ck = tmp_path / "ck"
    save_checkpoint(ck, model, meta={"settings": {"run": 1}})
    other = DSAModel(model.cfg, "F" * 8, nnx.Rngs(5))
    assert claim_output_dir(ck, "--out", settings={"run": 1}) == ck  # the same run finishing again
    with pytest.raises(UserError, match="not a checkpoint of this run"):
        claim_output_dir(ck, "--out", settings={"run": 2})
    save_checkpoint(ck, other, meta={"settings": {"run": 2}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    for a, b in zip(jax.tree.leaves(layer_params(load_checkpoint(ck))), jax.tree.leaves(layer_params(other))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_without_an_atomic_exchange_the_old_one_is_renamed_aside(tmp_path, model, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    ck = tmp_path / "ck"
    save_checkpoint(ck, model, meta={"n": 1})
    save_checkpoint(ck, model, meta={"n": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and (ck / "meta.json").read_text() == '{\n  "n": 2\n}'


def test_an_interrupted_write_leaves_no_litter_after_the_next(tmp_path, model):
    ck = tmp_path / "ck"
    save_checkpoint(ck, model, meta={"n": 1})
    pid = dead_pid()
    half = tmp_path / f".ck.tmp-{pid}-0a1b2c3d"  # a write killed halfway
    (half / "params").mkdir(parents=True)
    (half / "config.json").write_text('{"hidden_si')
    old = tmp_path / f".ck.old-{pid}-0a1b2c3d"  # a rename-aside killed before its clean-up
    old.mkdir()
    (old / "meta.json").write_text("{}")
    busy = tmp_path / f".ck.tmp-{os.getpid()}-0a1b2c3d"  # a write still running (this process): left alone
    busy.mkdir()
    (tmp_path / ".other.tmp-1-0a1b2c3d").mkdir()  # another output's: left alone
    save_checkpoint(ck, model, meta={"n": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ck", busy.name, ".other.tmp-1-0a1b2c3d"])
    assert load_checkpoint(ck).cfg == model.cfg


def test_a_rename_aside_killed_before_the_new_one_arrived_is_put_back(tmp_path, model):
    ck = tmp_path / "ck"
    save_checkpoint(ck, model, meta={"n": 1})
    os.rename(ck, tmp_path / f".ck.old-{dead_pid()}-0a1b2c3d")
    files.remove_leftovers(ck)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"] and files.is_checkpoint(ck)


def test_leftovers_of_a_json_write_are_removed(tmp_path):
    out = tmp_path / "r.json"
    (tmp_path / f".r.json.tmp-{dead_pid()}-0a1b2c3d").write_text('{"half')
    atomic_write_text(out, '{"a": 1}')
    assert listing(tmp_path) == {"r.json": b'{"a": 1}'}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_and_folders_follow_the_umask(tmp_path, model, umask):
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "new" / "ck", model, pattern="FSSSFSSS")
        save_checkpoint(tmp_path / "new" / "ck", model)  # a replacement too
        atomic_write_text(tmp_path / "j" / "s.json", "{}")
        write_json(tmp_path / "j" / "b.json", {"x": 1})
    finally:
        os.umask(old)
    for p in [tmp_path / "new", *(tmp_path / "new").rglob("*"), tmp_path / "j", *(tmp_path / "j").iterdir()]:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_output_file_is_checked_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="--json .* is a folder"):
        check_output_file(tmp_path, "--json")
    with pytest.raises(UserError, match="--json .*afile is a file, not a folder"):
        check_output_file(tmp_path / "afile" / "sub" / "r.json", "--json")
    assert check_output_file(tmp_path / "a" / "b" / "r.json", "--json") == tmp_path / "a" / "b" / "r.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # created nothing
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(0o500)
        with pytest.raises(UserError, match="no permission to write"):
            check_output_file(locked / "r.json", "--json")


def test_claim_allows_nothing_there_an_empty_folder_or_this_runs_checkpoint(tmp_path):
    assert claim_output_dir(tmp_path / "a" / "b", "--out") == tmp_path / "a" / "b"
    (tmp_path / "empty").mkdir()
    assert claim_output_dir(tmp_path / "empty", "--out", settings={"x": 1}) == tmp_path / "empty"
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("content, problem", [
    (b'{"settings": {}, "traj', "invalid JSON, line 1"),
    (b'{"settings": "\xff"}', "not UTF-8"),
    (b'[1, 2]', "not a JSON object"),
    (b'{"settings": {}}', "no trajectory"),
])
def test_damaged_json_state_is_one_line(tmp_path, content, problem):
    state = tmp_path / "search.state.json"
    state.write_bytes(content)
    with pytest.raises(UserError) as e:
        read_json(state, f"search state {state}", fix="delete it to start again", keys=("settings", "trajectory"))
    assert str(e.value).startswith(f"search state {state} is damaged ({problem}")
    assert str(e.value).endswith("; delete it to start again") and "\n" not in str(e.value)


def test_missing_json_state_is_none(tmp_path):
    assert read_json(tmp_path / "none.json", "state", fix="") is None
