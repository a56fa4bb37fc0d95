"""Package data: the presets, the paper's patterns and the embedded model ship inside the package. The documented
`configs/...` spellings resolve there from any directory, and a wheel installed into a fresh virtual environment
runs `python -m ic_jax.generate` from outside the repository."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from ic_jax.errors import UserError
from ic_jax.model.config import load_config
from ic_jax.model.pattern import parse_pattern
from ic_jax.package_data import CONFIG_DIR, DEFAULT_CKPT, PACKAGE_DIR

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [CONFIG_DIR, DEFAULT_CKPT]
TIMEOUT = 300


def shipped_json(rel: str) -> dict:
    return json.loads((PACKAGE_DIR / rel).read_text())


# ----------------------------------------------------------------------------------------------------------
# the documented spellings, from a directory that has no configs/


def test_config_path_spelling_finds_the_shipped_preset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/code24.json")
    expected = shipped_json("configs/code24.json")
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (expected["num_hidden_layers"], expected["hidden_size"])
    assert cfg == load_config("code24")


def test_pattern_file_spelling_finds_the_shipped_pattern(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = shipped_json("configs/patterns/glm47_flash_dsa_1of4.json")["pattern"]
    assert parse_pattern("@configs/patterns/glm47_flash_dsa_1of4.json", len(expected)) == expected


def test_a_file_in_the_working_directory_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "patterns").mkdir(parents=True)
    (tmp_path / "configs" / "tiny.json").write_text(json.dumps({**shipped_json("configs/tiny.json"),
                                                                "num_hidden_layers": 3}))
    (tmp_path / "configs" / "patterns" / "glm5_1of4.json").write_text('{"pattern": "FSF"}')
    assert load_config("configs/tiny.json").num_hidden_layers == 3
    assert parse_pattern("@configs/patterns/glm5_1of4.json", 3) == "FSF"


def test_a_missing_configs_file_is_still_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="'configs/nope.json' not found"):
        load_config("configs/nope.json")
    with pytest.raises(UserError, match="'configs/patterns/nope.json' not found"):
        parse_pattern("@configs/patterns/nope.json", 8)


# ----------------------------------------------------------------------------------------------------------
# the wheel


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    assert r.returncode == 0, f"{cmd[:4]} exit {r.returncode}: {r.stderr[-2000:]}"
    return r.stdout


def build_wheel(tmp: Path) -> Path:
    """Builds from a copy of the sources, so the build leaves nothing in the repository."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    shutil.copytree(ROOT / "ic_jax", src / "ic_jax", ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(tmp / "dist"), str(src)], env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (wheel,) = (tmp / "dist").glob("ic_jax-*.whl")
    return wheel


def fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A virtual environment holding the wheel; a .pth borrows the dependencies (jax, flax, ...) from this one
    without running its .pth files, so the editable ic_jax here cannot shadow the wheel's."""
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
         str(wheel)], env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).strip())
    deps = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "borrowed_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    return python


def test_wheel_ships_the_data_and_generates_outside_the_repository(tmp_path):
    wheel = build_wheel(tmp_path)
    shipped = {p.relative_to(ROOT).as_posix() for d in SHIPPED for p in d.rglob("*") if p.is_file()}
    assert len(shipped) > 20 and shipped <= set(zipfile.ZipFile(wheel).namelist())

    python = fresh_venv(tmp_path, wheel)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    generate = [str(python), "-m", "ic_jax.generate", "--max-new-tokens", "8"]
    commands = {
        "where": [str(python), "-c", "import ic_jax, ic_jax.model.config as c; print(ic_jax.__file__); "
                                     "print(c.load_config('configs/code24.json').num_hidden_layers)"],
        "embedded": [*generate, "--prompt", "def fib(n):", "--json"],
        "random": [*generate, "--config", "tiny", "--init", "random", "--prompt", "hi"],
    }
    # the three start together: each spends its time importing jax and compiling
    procs = {k: subprocess.Popen(c, cwd=outside, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, c in commands.items()}
    out = {}
    for k, p in procs.items():
        stdout, stderr = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, f"{k}: exit {p.returncode}: {stderr[-2000:]}"
        out[k] = stdout

    module_file, layers = out["where"].split()
    assert Path(module_file).is_relative_to(tmp_path / "venv")
    assert int(layers) == shipped_json("configs/code24.json")["num_hidden_layers"]
    embedded = json.loads(out["embedded"])
    assert embedded["new_tokens"] == 8
    assert embedded["pattern"] == shipped_json("checkpoints/default/pattern.json")["pattern"]
    assert out["random"].startswith("hi") and len(out["random"]) > len("hi")
