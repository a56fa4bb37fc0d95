"""The Colab notebooks in colab/: committed without outputs, and each runs top to bottom in a fresh kernel.

The run uses the notebooks' smallest sizes (IC_JAX_NOTEBOOK_FAST=1, read by their runtime cell) on the CPU;
a cell that raises fails the test. Their plots must come out inline, as images in the cell outputs.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbclient
import nbformat
import pytest

COLAB = Path(__file__).resolve().parent.parent / "colab"
NOTEBOOKS = sorted(p.name for p in COLAB.glob("*.ipynb"))
# plots each notebook draws inline (layout strip + speed bars; overlap heatmap + search loss curve; memory plan bars +
# prefill speedup curve)
IMAGES = {"01_quickstart.ipynb": 2, "02_calibrate.ipynb": 2, "03_scale_and_convert.ipynb": 2}


def read(name: str):
    return nbformat.read(COLAB / name, as_version=4)


def test_the_notebooks_are_the_expected_ones():
    assert set(IMAGES) <= set(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    stale = [i for i, c in enumerate(read(name).cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not stale, f"{name}: cells {stale} keep outputs; clear them before committing"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_opens_with_its_own_colab_badge(name):
    first = read(name).cells[0]
    assert first.cell_type == "markdown"
    assert re.search(rf"colab\.research\.google\.com/github/[^)\s]+/blob/main/colab/{re.escape(name)}\)", first.source)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_runs_top_to_bottom(name, monkeypatch):
    monkeypatch.setenv("IC_JAX_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own inline backend shows the plots
    nb = read(name)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(COLAB)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    assert images >= IMAGES[name], f"{name}: {images} inline images, expected {IMAGES[name]}"
    assert not [o for o in outputs if o.output_type == "error"]
