"""The files shipped inside the package (so a wheel or a non-editable install carries them too): the model
presets, the paper's published patterns and the embedded trained model."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"  # presets by name (tiny.json, ...) and patterns/ (the paper's patterns)
DEFAULT_CKPT = PACKAGE_DIR / "checkpoints" / "default"  # the embedded model


def shipped_path(path: str | Path) -> Path:
    """`path`, or the shipped file it names: a relative `configs/...` path that the working directory lacks
    resolves inside the package, so the documented spellings (`--config configs/code24.json`,
    `--pattern @configs/patterns/glm5_1of4.json`) work from any directory and from an installed wheel."""
    p = Path(path)
    if p.exists() or p.is_absolute() or p.parts[:1] != ("configs",):
        return p
    return PACKAGE_DIR / p
