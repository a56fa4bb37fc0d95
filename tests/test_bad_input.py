"""The bad-input contract of every command, table-driven: bad or unusual input ends within seconds with exit code
2 and one line on stderr that names the problem, no traceback, and no file outside the command's own output touched.

Each case runs the command's `main` in a fresh working folder holding a tiny checkpoint, damaged copies of it and a
user's files; the folder is compared before and after. A few cases run as real processes (stdin, and the damaged
checkpoints, where a library thread could still print at interpreter exit)."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flax import nnx

from ic_jax.model.config import load_config
from ic_jax.model.dsa import DSAModel
from ic_jax.runtime.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 60  # generous for a loaded 2-core machine; a hang runs for minutes


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _largest_params_file(ckpt: Path) -> Path:
    return max((p for p in (ckpt / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


DAMAGE = {
    "truncated params file": lambda c: _truncate(_largest_params_file(c)),
    "missing manifest": lambda c: (c / "params" / "manifest.ocdbt").unlink(),
    "empty params": lambda c: (shutil.rmtree(c / "params"), (c / "params").mkdir()),
    "truncated config": lambda c: _truncate(c / "config.json"),
    "truncated meta": lambda c: _truncate(c / "meta.json"),
    "pattern without key": lambda c: (c / "pattern.json").write_text('{"patern": "FSSSFSSS"}'),
    "invalid pattern": lambda c: (c / "pattern.json").write_text('{"pattern": "SFFFFFFF"}'),
}

BAD_CONFIG_VALUES = {
    "rope_theta": "abc",
    "rope_scaling": "yarn",
    "rms_norm_eps": None,
    "index_topk": 0,
    "num_attention_heads": 0,
    "hidden_size": 64.5,
    "tie_word_embeddings": True,
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder the cases copy: ckpt/ (tiny, 8 layers, max 4096 positions), damaged copies, bad configs, a user's
    folder and file, non-UTF-8 text."""
    base = tmp_path_factory.mktemp("workspace")
    save_checkpoint(base / "ckpt", DSAModel(load_config("tiny"), "F" * 8, nnx.Rngs(0)), pattern="FSSSFSSS",
                    meta={"seq_len": 128})
    for name, damage in DAMAGE.items():
        shutil.copytree(base / "ckpt", base / name.replace(" ", "_"))
        damage(base / name.replace(" ", "_"))
    tiny = load_config("tiny").to_dict()
    for key, value in BAD_CONFIG_VALUES.items():
        (base / f"bad_{key}.json").write_text(json.dumps({**tiny, key: value}))
    (base / "latin1.json").write_bytes(json.dumps({**tiny, "model_type": "t\xefny"}, ensure_ascii=False)
                                       .encode("latin-1"))
    (base / "latin1.txt").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    (base / "proj").mkdir()
    (base / "proj" / "notes.txt").write_text("a user's notes\n")
    (base / "notes.txt").write_text("a user's file\n")
    (base / "a_folder").mkdir()
    (base / "search.state.json").write_text('{"settings": {"ckpt": ')
    (base / "prompts.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    (base / "bad.jsonl").write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": \n')
    return base


def snapshot(folder: Path) -> dict:
    """Every path under `folder` with its size, mode and modification time."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (st.st_size, st.st_mode, st.st_mtime_ns)
    return out


def run_main(command: str, argv: list[str], capsys) -> tuple[int, str]:
    package_commands = ("bench", "convert")  # python -m runs their __main__
    module = importlib.import_module(f"ic_jax.{command}" + (".__main__" if command in package_commands else ""))
    rc = module.main(argv)
    return rc, capsys.readouterr().err


def dmg(name: str) -> str:
    return name.replace(" ", "_")


CKPT = ["--ckpt", "ckpt"]
TRAIN = ["--out", "run", "--steps", "1", "--dense-steps", "0", "--seq-len", "128", "--batch", "2"]

CASES = [
    # data safety: --out holding what the command did not write
    ("train", ["--config", "tiny", "--out", "proj", *TRAIN[2:]], "--out proj"),
    ("train", ["--config", "tiny", "--out", ".", *TRAIN[2:]], "--out ."),
    ("train", ["--config", "tiny", "--out", "notes.txt", *TRAIN[2:]], "--out notes.txt"),
    ("train", ["--config", "tiny", "--out", "..", *TRAIN[2:]], "--out .."),
    ("distill", [*CKPT, "--pattern", "FSSS", "--out", "proj", "--steps", "1"], "--out proj"),
    ("distill", [*CKPT, "--pattern", "FSSS", "--out", "ckpt", "--steps", "1"], "--out ckpt"),
    # damaged checkpoints, in every command that reads one
    *[("generate", ["--ckpt", dmg(name), "--prompt", "x"], dmg(name)) for name in DAMAGE if name != "truncated meta"],
    *[(cmd, ["--ckpt", dmg(name), *extra], dmg(name))
      for cmd, extra in [("eval", ["--patterns", "F"]), ("search", ["--keep", "0.5", "--out", "new/s.json"]),
                         ("overlap", []),
                         ("distill", ["--pattern", "FSSS", "--out", "d"])]
      for name in ("truncated params file", "missing manifest", "truncated config", "truncated meta")],
    ("eval", ["--ckpt", "ckpt", "--extra-ckpt", dmg("pattern without key")], "pattern"),
    ("search", [*CKPT, "--keep", "0.5", "--out", "s.json"], "search state"),
    # config values of the wrong type or range
    *[("generate", ["--config", f"bad_{key}.json", "--init", "random", "--prompt", "x"], key)
      for key in BAD_CONFIG_VALUES],
    *[("train", ["--config", f"bad_{key}.json", *TRAIN], key) for key in ("rope_theta", "index_topk")],
    ("generate", ["--config", "latin1.json", "--init", "random", "--prompt", "x"], "UTF-8"),
    # files that are not UTF-8
    ("generate", [*CKPT, "--prompt-file", "latin1.txt"], "UTF-8"),
    ("generate", [*CKPT, "--prompt-file", "a_folder"], "a_folder"),
    # sizes past what the model can take
    ("search", [*CKPT, "--seq-len", "100000"], "--seq-len"),
    ("eval", [*CKPT, "--patterns", "F", "--lengths", "100000"], "--lengths"),
    ("eval", [*CKPT, "--patterns", "F", "--lengths", "64"], "--lengths"),
    ("distill", [*CKPT, "--pattern", "FSSS", "--out", "d", "--seq-len", "100000"], "--seq-len"),
    ("overlap", [*CKPT, "--seq-len", "100000"], "--seq-len"),
    ("train", ["--config", "tiny", *TRAIN[:-4], "--seq-len", "100000", "--batch", "2"], "--seq-len"),
    ("train", ["--config", "tiny", *TRAIN[:-4], "--seq-len", "64", "--batch", "2"], "--seq-len"),
    ("train", ["--config", "tiny", *TRAIN[:-4], "--seq-len", "4096", "--batch", "64"], "--batch"),  # terabytes
    ("generate", ["--config", "tiny", "--init", "random", "--prompt", "x", "--max-new-tokens", "5000"],
     "max_position_embeddings"),
    # output paths checked before the work
    ("eval", [*CKPT, "--patterns", "F", "--out", "a_folder"], "--out"),
    ("eval", [*CKPT, "--patterns", "F", "--out", "notes.txt/table.json"], "--out"),
    ("search", [*CKPT, "--out", "a_folder"], "--out"),
    ("overlap", [*CKPT, "--out", "notes.txt/overlap"], "--out"),
    ("bench", ["step", "--config", "tiny", "--context", "100", "--json", "a_folder"], "--json"),
    ("bench", ["e2e", "--config", "tiny", "--contexts", "100", "--json", "notes.txt/e2e.json"], "--json"),
    # flags, one message per flag naming it
    ("generate", [*CKPT, "--prompt", "x", "--seed", "-1"], "--seed"),
    ("generate", [*CKPT, "--prompt", "x", "--top-p", "0"], "--top-p"),
    ("generate", [*CKPT, "--prompt", "x", "--temperature", "-1"], "--temperature"),
    ("generate", [*CKPT, "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    ("generate", [*CKPT, "--prompt", "x", "--impl", "cuda"], "--impl"),
    ("generate", [*CKPT, "--prompt", "x", "--mesh", "data=two"], "--mesh"),
    ("generate", [*CKPT, "--prompt", "x", "--distributed"], "--distributed"),
    ("generate", [*CKPT, "--prompt", ""], "empty"),
    ("train", ["--config", "tiny", *TRAIN, "--lr", "nan"], "--lr"),
    ("train", ["--config", "tiny", *TRAIN, "--lr", "-1"], "--lr"),
    ("train", ["--config", "tiny", *TRAIN[:-4], "--seq-len", "0"], "--seq-len"),
    ("train", ["--config", "tiny", *TRAIN, "--seed", "-1"], "--seed"),
    ("train", ["--config", "tiny", *TRAIN[:-6], "--dense-steps", "5"], "--dense-steps"),
    ("train", ["--config", "tiny", *TRAIN, "--retrieval-frac", "1.5"], "--retrieval-frac"),
    ("distill", [*CKPT, "--pattern", "FSSS", "--out", "d", "--steps", "0"], "--steps"),
    ("distill", [*CKPT, "--pattern", "FSSS", "--out", "d", "--sparse-lr", "inf"], "--sparse-lr"),
    ("search", [*CKPT, "--keep", "0"], "--keep"),
    ("search", [*CKPT, "--blocks", "9"], "--blocks"),
    ("search", [*CKPT, "--calib-seqs", "6", "--batch", "4"], "--calib-seqs"),
    ("search", [*CKPT, "--seq-len", "0"], "--seq-len"),
    ("overlap", [*CKPT, "--seqs", "0"], "--seqs"),
    ("eval", [*CKPT], "--patterns"),
    ("eval", [*CKPT, "--patterns", "F", "--impl", "triton"], "--impl"),
    ("bench", ["step", "--config", "tiny", "--context", "100", "--layers", "0"], "--layers"),
    ("bench", ["e2e", "--config", "tiny", "--contexts", "100", "--seed", "-1"], "--seed"),
    ("bench", ["sweep", "--tk", "abc"], "--tk"),
    ("bench", ["kernels", "--sizes", "8k,x"], "--sizes"),
    # jobs and bench throughput
    ("jobs", ["--input", "nowhere.jsonl", "--output", "r.jsonl", *CKPT], "--input nowhere.jsonl"),
    ("jobs", ["--input", "latin1.txt", "--output", "r.jsonl", *CKPT], "latin1.txt"),
    ("jobs", ["--input", "prompts.jsonl", "--output", "a_folder", *CKPT], "--output a_folder"),
    ("jobs", ["--input", "bad.jsonl", "--output", "r.jsonl", "--on-bad-line", "fail", *CKPT], "line 2"),
    ("jobs", ["--input", "prompts.jsonl", "--output", "r.jsonl", "--slots", "0", *CKPT], "--slots"),
    ("jobs", ["--input", "prompts.jsonl", "--output", "r.jsonl", "--mesh", "data=64", *CKPT], "64"),
    ("bench", ["throughput", "--config", "tiny", "--context", "0"], "--context"),
    ("bench", ["throughput", "--config", "tiny", "--context", "100k"], "100000"),
    ("bench", ["throughput", "--config", "tiny", "--context", "256", "--slots", "0"], "--slots"),
    # convert and plan
    ("convert", ["--hf", "nowhere", "--out", "x"], "--hf nowhere"),
    ("convert", ["--hf", "ckpt", "--out", "x"], "architecture"),
    ("convert", ["--to-hf", "--ckpt", "ckpt", "--out", "proj"], "--out proj"),
    ("convert", ["--to-hf", "--ckpt", dmg("missing manifest"), "--out", "x"], dmg("missing manifest")),
    ("plan", ["--config", "tiny", "--mesh", "tensor=x"], "--mesh"),
    ("plan", ["--config", "tiny", "--context", "0"], "--context"),
    ("plan", ["--config", "bad_index_topk.json"], "index_topk"),
]


@pytest.mark.parametrize("command, argv, names", CASES, ids=[f"{c}:{' '.join(a)}"[:90] for c, a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(workspace, tmp_path, monkeypatch, capsys, command, argv,
                                                         names):
    work = tmp_path / "w"
    shutil.copytree(workspace, work)
    monkeypatch.chdir(work)
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    before = snapshot(work)
    start = time.monotonic()
    rc, err = run_main(command, argv, capsys)
    assert time.monotonic() - start < SECONDS
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert names in lines[0], lines[0]
    assert snapshot(work) == before


def run_process(args: list[str], cwd: Path, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    return subprocess.run([sys.executable, "-m", *args], input=stdin, capture_output=True, cwd=cwd, timeout=300,
                          env={**env, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("damage", ["truncated params file", "missing manifest", "empty params"])
def test_damaged_checkpoint_as_a_process_prints_one_line(workspace, damage):
    """Also nothing printed by library threads when the interpreter exits."""
    r = run_process(["ic_jax.generate", "--ckpt", dmg(damage), "--prompt", "x"], workspace)
    err = r.stderr.decode()
    assert r.returncode == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert dmg(damage) in err


def test_stdin_that_is_not_utf8_is_one_line(workspace):
    r = run_process(["ic_jax.generate", "--ckpt", "ckpt"], workspace, stdin="caf\xe9".encode("latin-1"))
    err = r.stderr.decode()
    assert r.returncode == 2 and len(err.strip().splitlines()) == 1 and "standard input" in err and "UTF-8" in err
