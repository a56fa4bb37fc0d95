"""Checkpoint round trip, pattern choice at load time, atomic overwrite, damaged checkpoints and state."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ic_jax.errors import UserError
from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel, repattern
from ic_jax.runtime import checkpoint

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
    np.testing.assert_allclose(np.asarray(loaded.forward(TOKENS).logits),
                               np.asarray(repattern(model, loaded.pattern).forward(TOKENS).logits),
                               rtol=1e-6, atol=1e-6)


SHARDED_RESTORE = """
import collections, os, sys, weakref
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
from pathlib import Path
import jax, numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
import ic_jax
from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel
from ic_jax.runtime import checkpoint
from ic_jax.runtime.sharding import is_variable, make_mesh, param_shardings, parse_mesh
# live device bytes, measured after every line of ic_jax code that runs (sys.settrace): what each device holds
# between the loader's steps, whatever those steps are
PACKAGE = os.path.dirname(ic_jax.__file__)
SIZES = {}  # id -> (weak reference, devices, bytes per device): live arrays are summed at every change


def held(arrays=None):
    per = collections.Counter()
    for a in jax.live_arrays() if arrays is None else arrays:
        hit = SIZES.get(id(a))
        if hit is None or hit[0]() is not a:
            hit = SIZES[id(a)] = (weakref.ref(a), a.sharding.addressable_devices,
                                  int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize)
        for d in hit[1]:
            per[d] += hit[2]
    return per


def peak_during(fn):
    peak, seen = held(), [None]

    def measure(frame, event, arg):
        live = frozenset(map(id, jax.live_arrays()))
        if live != seen[0]:
            seen[0] = live
            for d, n in held().items():
                peak[d] = max(peak[d], n)
        return measure

    sys.settrace(lambda frame, event, arg: measure if frame.f_code.co_filename.startswith(PACKAGE) else None)
    try:
        return fn(), peak
    finally:
        sys.settrace(None)


ck = Path(sys.argv[1])
cfg = load_config("tiny").replace(dtype="float32")
checkpoint.save_checkpoint(ck, DSAModel(cfg, "F" * 8, nnx.Rngs(3)))
mesh = make_mesh(parse_mesh("data=2,tensor=2,expert=2"))
# read straight into shards: a layer's experts over "expert", their hidden dim over "tensor"
top, layers = checkpoint.read_params(ck, cfg, mesh)
assert layers[1]["ffn"]["w_gate"].sharding.spec == P("expert", None, "tensor"), layers[1]["ffn"]["w_gate"].sharding
assert top["lm_head"].sharding.spec == P(None, "tensor") and len(top["lm_head"].sharding.device_set) == 8
whole = checkpoint.load_checkpoint(ck, "FSSSFSSS")
# the bound: while it loads, no device holds more than its share of the stacked params and of one layer
one_layer = {d: max(held(jax.tree.leaves(layer))[d] for layer in layers) for d in mesh.devices.flat}
before = held()
placed, peak = peak_during(lambda: checkpoint.load_checkpoint(ck, "FSSSFSSS", mesh=mesh))
stacked = held(jax.tree.leaves(nnx.state(placed, nnx.Param)))
for d in peak:
    assert peak[d] - before[d] <= stacked[d] + one_layer[d], (d, peak[d] - before[d], stacked[d], one_layer[d])
assert min(stacked.values()) > 0 and len(peak) == 8
leaves = lambda m: jax.tree.leaves(nnx.state(m, nnx.Param), is_leaf=is_variable)
for v, want, ref in zip(leaves(placed), jax.tree.leaves(param_shardings(placed, mesh)), leaves(whole), strict=True):
    x = v.get_value()
    assert x.sharding.is_equivalent_to(want, x.ndim), (x.sharding, want)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(ref.get_value()))
print("RESTORED_SHARDED")
"""


def test_restore_into_shardings_on_a_mesh(tmp_path):
    """With a mesh, orbax reads every array into its shards on 8 fake CPU devices (a subprocess: the device count
    is fixed when the backend starts); the params equal an unsharded load. While the model loads, no device holds
    more than its share of the stacked params plus its share of one layer (the old restore held every layer as
    saved and then the stacked copy: about twice the params)."""
    r = subprocess.run([sys.executable, "-c", SHARDED_RESTORE, str(tmp_path / "ck")], capture_output=True, text=True,
                       timeout=600)
    assert "RESTORED_SHARDED" in r.stdout, r.stderr[-3000:]


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old = DSAModel(CFG, "F" * 8, nnx.Rngs(1))
    checkpoint.save_checkpoint(tmp_path / "ck", old)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.ocp.Checkpointer, "save", boom)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(tmp_path / "ck", DSAModel(CFG, "F" * 8, nnx.Rngs(2)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    np.testing.assert_array_equal(np.asarray(checkpoint.load_checkpoint(tmp_path / "ck").forward(TOKENS).logits),
                                  np.asarray(old.forward(TOKENS).logits))


def test_mismatched_config_is_refused(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "ck", DSAModel(CFG, "F" * 8, nnx.Rngs(0)))
    with pytest.raises(UserError, match="does not match"):
        checkpoint.load_checkpoint(tmp_path / "ck", None, CFG.replace(kv_lora_rank=16))


# ----------------------------------------------------------------------------------------------------------
# damaged checkpoints and training state: one UserError naming the checkpoint and what is wrong


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "ck"
    checkpoint.save_checkpoint(path, DSAModel(load_config("tiny"), "F" * 8, nnx.Rngs(0)), pattern="FSSSFSSS",
                               meta={"seq_len": 96})
    return path


def cut_in_half(file):
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def largest_file(folder):
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def edit_config(ck, **changes):
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, **changes}))


DAMAGE = {
    "truncated params file": (lambda ck: cut_in_half(largest_file(ck / "params")), "params/ is cut short"),
    "truncated array index": (lambda ck: [cut_in_half(p) for p in (ck / "params" / "d").iterdir()],
                              "params/ has a damaged array index"),
    "missing manifest": (lambda ck: (ck / "params" / "manifest.ocdbt").unlink(), "params/manifest.ocdbt is missing"),
    "missing metadata": (lambda ck: (ck / "params" / "_METADATA").unlink(), "params/_METADATA is missing"),
    "truncated metadata": (lambda ck: cut_in_half(ck / "params" / "_METADATA"), "params/_METADATA is damaged"),
    "empty params": (lambda ck: [shutil.rmtree(ck / "params"), (ck / "params").mkdir()], "params/ is empty"),
    "truncated config": (lambda ck: cut_in_half(ck / "config.json"), "config.json is damaged"),
    "config not UTF-8": (lambda ck: (ck / "config.json").write_bytes(b'{"a": "\xff"}'), "config.json is damaged"),
    "truncated meta": (lambda ck: cut_in_half(ck / "meta.json"), "meta.json is damaged"),
    "pattern without its key": (lambda ck: (ck / "pattern.json").write_text('{"patern": "FSSSFSSS"}'),
                                'pattern.json.* needs a string field "pattern"'),
    "invalid pattern": (lambda ck: (ck / "pattern.json").write_text('{"pattern": "FSXSFSSS"}'),
                        "pattern.json is not valid for it .*characters 'X'"),
    "pattern of another length": (lambda ck: (ck / "pattern.json").write_text('{"pattern": "FS"}'),
                                  "pattern.json is not valid for it .*2 layers but the model has 8"),
    "fewer layers in config": (lambda ck: [(ck / "pattern.json").unlink(), edit_config(ck, num_hidden_layers=6)],
                               "params/ holds 8 layers but its config.json says 6"),
    "other shapes in config": (lambda ck: edit_config(ck, hidden_size=128), "does not match the config"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_checkpoint_is_one_line_naming_it(saved, tmp_path, case):
    damage, problem = DAMAGE[case]
    ck = tmp_path / "damaged"
    shutil.copytree(saved, ck)
    damage(ck)
    with pytest.raises(UserError, match=problem) as e:
        checkpoint.load_checkpoint(ck)
    assert str(ck) in str(e.value) and "\n" not in str(e.value)


def test_damaged_meta_is_one_line_where_it_is_read(saved, tmp_path):
    assert checkpoint.trained_seq_len(saved) == 96
    ck = tmp_path / "damaged"
    shutil.copytree(saved, ck)
    (ck / "meta.json").write_text('{"seq_len": 0}')
    with pytest.raises(UserError, match=f"checkpoint {ck}: meta.json has seq_len 0"):
        checkpoint.trained_seq_len(ck)
    cut_in_half(ck / "meta.json")
    with pytest.raises(UserError, match=f"checkpoint {ck}: meta.json is damaged"):
        checkpoint.trained_seq_len(ck)


def test_the_cli_prints_one_line_and_nothing_at_exit(saved, tmp_path):
    """orbax's reader threads print 'Event loop is closed' tracebacks when a read fails halfway, even after
    the error is handled: the damaged file must be found before orbax reads."""
    ck = tmp_path / "damaged"
    shutil.copytree(saved, ck)
    for p in (ck / "params").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            cut_in_half(p)
    run = subprocess.run([sys.executable, "-m", "ic_jax.generate", "--ckpt", str(ck), "--prompt", "x"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith(f"error: checkpoint {ck}: params/") and run.stderr.count("\n") == 1, run.stderr


SETTINGS = {"lr": 0.1}


def tree(step):
    return (np.full(3, float(step)), {"count": np.asarray(step)})


def test_a_damaged_latest_training_state_falls_back_to_the_step_before(tmp_path, capsys):
    store = checkpoint.StateStore(tmp_path / "s.state", SETTINGS)
    for step in (2, 4):
        store.save(step, tree(step), [{"step": step}])
    cut_in_half(largest_file(tmp_path / "s.state" / "4" / "leaves"))
    store = checkpoint.StateStore(tmp_path / "s.state", SETTINGS)
    step, got, history = store.restore(tree(0))
    assert step == 2 and history == [{"step": 2}]
    np.testing.assert_array_equal(got[0], tree(2)[0])
    assert f"training state step 4 in {tmp_path / 's.state'} is damaged" in capsys.readouterr().err
    store.save(4, tree(4), [{"step": 4}])  # the damaged step is gone, so it can be saved again
    assert checkpoint.StateStore(tmp_path / "s.state", SETTINGS).restore(tree(0))[0] == 4


def test_a_training_state_with_no_readable_step_names_the_fix(tmp_path):
    store = checkpoint.StateStore(tmp_path / "s.state", SETTINGS)
    store.save(2, tree(2), [])
    (tmp_path / "s.state" / "2" / "leaves" / "_METADATA").unlink()
    with pytest.raises(UserError, match=f"state {tmp_path / 's.state'} is damaged .*delete it or pass --overwrite"):
        checkpoint.StateStore(tmp_path / "s.state", SETTINGS).restore(tree(0))
    fresh = checkpoint.StateStore(tmp_path / "s.state", SETTINGS, overwrite=True)
    assert fresh.restore(tree(0))[0] == 0


def test_a_state_folder_of_user_files_or_another_run_is_refused(tmp_path):
    (tmp_path / "s.state").mkdir()
    (tmp_path / "s.state" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a training state .*pass --overwrite"):
        checkpoint.StateStore(tmp_path / "s.state", SETTINGS)
    assert (tmp_path / "s.state" / "notes.txt").read_text() == "mine"
    store = checkpoint.StateStore(tmp_path / "s.state", SETTINGS, overwrite=True)
    store.save(2, tree(2), [])
    with pytest.raises(UserError, match="holds a run with other settings"):
        checkpoint.StateStore(tmp_path / "s.state", {"lr": 0.2}).restore(tree(0))
    assert checkpoint.StateStore(tmp_path / "s.state", {"lr": 0.2}, overwrite=True).restore(tree(0))[0] == 0
