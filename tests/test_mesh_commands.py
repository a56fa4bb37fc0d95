"""--mesh in eval, search, overlap and bench e2e/step: on 8 fake CPU devices (data=2, tensor=2, expert=2) each
command gives what it gives unsharded (losses, overlaps and the searched pattern; bench's born-sharded random params
equal the one-device ones, and bench step's random cache lies as the engine places caches). One subprocess runs
them all, since the device count is fixed when the backend starts. Bad parallelism flags end with one line and exit
code 2."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ic_jax import eval as evaluation
from ic_jax import overlap, search
from ic_jax.bench import e2e, step
from ic_jax.package_data import DEFAULT_CKPT

ROOT = Path(__file__).resolve().parent.parent
MESH = "data=2,tensor=2,expert=2"

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import contextlib, io, json
    from pathlib import Path
    import jax, numpy as np
    from flax import nnx
    from ic_jax import eval as evaluation, overlap, search
    from ic_jax.bench import e2e, step
    from ic_jax.model.config import load_config
    from ic_jax.model.dsa import DSAModel
    from ic_jax.runtime.checkpoint import save_checkpoint
    from ic_jax.runtime.engine import Engine
    from ic_jax.runtime.sharding import make_mesh, parse_mesh
    tmp, mesh, data = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    ckpt = str(save_checkpoint(tmp / "m", DSAModel(load_config("tiny"), "F" * 8, nnx.Rngs(3))))

    def run(main, argv):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(argv) == 0, argv
        return out.getvalue()

    def close(a, b, what):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-4, err_msg=what)

    def both(main, argv):  # stdout without a mesh, then on the mesh
        return run(main, argv), run(main, argv + ["--mesh", mesh])

    # eval: the loss and retrieval columns of every row (held-out and retrieval windows of one length and count
    # share one compiled program)
    common = ["--ckpt", ckpt, "--data", data, "--batch", "2", "--impl", "xla"]
    plain, sharded = (json.loads(out)["rows"] for out in both(evaluation.main, common + [
        "--seq-len", "128", "--seqs", "2", "--lengths", "128", "--retrieval-n", "2", "--json", "--patterns", "F",
        "FSSS"]))
    assert [r["pattern"] for r in plain] == [r["pattern"] for r in sharded] == ["FFFFFFFF", "FSSSFSSS"]
    for key in ("loss", "answer_nll@128", "retrieval@128"):
        close([r[key] for r in plain], [r[key] for r in sharded], "eval " + key)

    # search: one greedy step (keep 7 of 8), the same flip and candidate losses
    results = []
    for name, extra in (("plain", []), ("sharded", ["--mesh", mesh])):
        run(search.main, ["--ckpt", ckpt, "--calib", data, "--calib-seqs", "2", "--seq-len", "40", "--batch", "2",
                          "--keep", "0.875", "--impl", "xla", "--json", "--out", str(tmp / f"search_{name}.json"),
                          "--state", str(tmp / f"search_{name}.state.json"), *extra])
        results.append(json.loads((tmp / f"search_{name}.json").read_text()))
    plain, sharded = results
    assert plain["pattern"] == sharded["pattern"] and plain["pattern"].count("S") == 1, (plain, sharded)
    assert [s["flipped"] for s in plain["trajectory"]] == [s["flipped"] for s in sharded["trajectory"]]
    for a, b in zip(plain["trajectory"], sharded["trajectory"]):
        close(a["loss"], b["loss"], "search loss")
        close(list(a.get("candidates", {}).values()), list(b.get("candidates", {}).values()), "search candidates")

    # overlap: the whole matrix
    for name, extra in (("plain", []), ("sharded", ["--mesh", mesh])):
        run(overlap.main, ["--ckpt", ckpt, "--data", data, "--seqs", "2", "--seq-len", "40", "--batch", "2",
                           "--json", "--out", str(tmp / f"overlap_{name}"), *extra])
    plain, sharded = (json.loads((tmp / f"overlap_{n}.json").read_text())["matrix"] for n in ("plain", "sharded"))
    close(plain, sharded, "overlap matrix")

    # bench: random params born sharded equal the one-device ones; e2e runs on the mesh and records it; step's
    # random cache lies where the engine's zeroed one does
    cfg = load_config("tiny").replace(num_hidden_layers=2, dtype="bfloat16")  # random_cache draws bf16 buffers
    sizes = parse_mesh(mesh)
    one = e2e.random_model(cfg, "FS", 0, None)
    engine = Engine(e2e.random_model(cfg, "FS", 0, make_mesh(sizes)), mesh=make_mesh(sizes))
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(engine.params)} == {8}
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                 nnx.state(one, nnx.Param), nnx.state(engine.model, nnx.Param))
    zeros = engine.new_cache(2, 8)
    drawn = step.random_cache(zeros, 0)
    assert all(x.sharding.is_equivalent_to(z.sharding, z.ndim) and x.dtype == z.dtype
               for x, z in zip(jax.tree.leaves(drawn), jax.tree.leaves(zeros)))
    assert any(np.asarray(x).std() > 0.5 for x in jax.tree.leaves(drawn))
    run(e2e.main, ["--config", "tiny", "--layers", "2", "--impl", "xla", "--batch", "2", "--mesh", mesh,
                   "--patterns", "FS", "--contexts", "16", "--chunk-size", "16", "--decode-steps", "2",
                   "--json", str(tmp / "e2e.json")])
    report = json.loads((tmp / "e2e.json").read_text())
    assert report["mesh"] == sizes and report["devices"] == 8, report
    assert [(r["pattern"], r["context"]) for r in report["rows"]] == [("FS", 16)]
    assert all(r["peak_bytes_per_device"] is None and r["prefill_s"] > 0 for r in report["rows"])  # CPU: no peak

    # a batch that does not split over the data axis: one line, exit 2, before any model is loaded
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert evaluation.main(common + ["--batch", "3", "--patterns", "F", "--mesh", mesh]) == 2
    assert err.getvalue().count("\\n") == 1 and "--batch 3 does not split" in err.getvalue(), err.getvalue()
    print("MESH_COMMANDS_OK")
""")


def test_commands_on_a_mesh_equal_unsharded(tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), MESH, str(ROOT / "ic_jax/**/*.py")],
                       check=False, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert "MESH_COMMANDS_OK" in r.stdout, r.stderr[-3000:]


BENCH = ["--config", "tiny", "--layers", "2", "--impl", "xla", "--patterns", "F"]


@pytest.mark.parametrize("main,argv", [
    (evaluation.main, ["--ckpt", str(DEFAULT_CKPT), "--patterns", "F"]),
    (search.main, ["--ckpt", str(DEFAULT_CKPT)]),
    (overlap.main, ["--ckpt", str(DEFAULT_CKPT)]),
    (e2e.main, BENCH + ["--contexts", "64"]),
    (step.main, BENCH + ["--context", "64"]),
], ids=["eval", "search", "overlap", "bench-e2e", "bench-step"])
@pytest.mark.parametrize("mesh,message", [("pipeline=2", "write axis=size pairs"),
                                          ("data=64", "needs 64 devices but")])
def test_bad_mesh_is_one_line(main, argv, mesh, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # default output files would land here; none is written
    assert main(argv + ["--mesh", mesh]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []
