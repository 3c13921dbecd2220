"""The example notebooks (examples/*.ipynb): stored without outputs, and they run.

Each notebook is executed with nbclient in a fresh kernel whose working directory is an empty
temporary folder, with `LSEG_SHARED_DATA` pointing at the shared data and no `LSEG_MODEL` (the
notebooks fall back to a random tiny model) or a saved tiny model. To store a notebook you ran
without its outputs: `jupyter nbconvert --clear-output --inplace examples/NAME.ipynb`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT, shared_data_dir

EXAMPLES = REPO_ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
CELL_TIMEOUT = 120  # seconds per cell; each notebook runs in about 10 s on 2 CPU cores


def test_the_examples_are_there_and_linked_from_the_readme():
    assert {p.name for p in NOTEBOOKS} >= {"segment.ipynb", "evaluate.ipynb"}
    readme = (REPO_ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"(examples/{path.name})" in readme, f"README.md does not link examples/{path.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stored_without_outputs(path):
    notebook = json.loads(path.read_text())
    for number, cell in enumerate(notebook["cells"], 1):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name} cell {number} is stored with outputs"
            assert cell["execution_count"] is None, f"{path.name} cell {number} has an execution count"


def run_notebook(name: str, cwd: Path, monkeypatch, shared: Path, model: Path | None = None):
    """Execute examples/NAME in a fresh kernel working in `cwd`; the executed notebook."""
    nbformat = pytest.importorskip("nbformat", reason="the example tests need nbformat (lseg[test])")
    nbclient = pytest.importorskip("nbclient", reason="the example tests need nbclient (lseg[test])")
    pytest.importorskip("ipykernel", reason="the example tests need ipykernel (lseg[test])")
    # The kernel inherits this environment (PYTHONPATH, HF_HUB_OFFLINE=1 from conftest included).
    monkeypatch.setenv("LSEG_SHARED_DATA", str(shared))
    if model is None:
        monkeypatch.delenv("LSEG_MODEL", raising=False)
    else:
        monkeypatch.setenv("LSEG_MODEL", str(model))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # like the suite (conftest): tiny models, a shared CPU
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    # A last cell says which lseg the kernel imported: this checkout's, not another installed copy.
    notebook.cells.append(nbformat.v4.new_code_cell("import lseg\nprint(lseg.__file__)"))
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    import lseg

    assert text_of(notebook.cells[-1]).strip() == lseg.__file__
    return notebook


def text_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def outputs_of(notebook, kind: str) -> list:
    """All `kind` (e.g. "image/png", "text/markdown") outputs of the executed notebook."""
    return [
        o["data"][kind]
        for cell in notebook.cells
        for o in cell.get("outputs", [])
        if kind in o.get("data", {})
    ]


def test_segment_notebook_runs_and_says_the_model_is_random(tmp_path, monkeypatch):
    notebook = run_notebook("segment.ipynb", tmp_path, monkeypatch, shared_data_dir())
    printed = "".join(text_of(cell) for cell in notebook.cells)
    assert "RANDOM tiny model" in printed
    sample = shared_data_dir() / "images" / "cat1.jpeg"
    assert f"image: {sample if sample.is_file() else 'synthetic'}" in printed
    assert "label map on 100.00% of the pixels" in printed  # CPU, float32: exactly segment's argmax
    # image, overlay, per-label heat maps, text queries, pixel query
    assert len(outputs_of(notebook, "image/png")) == 5
    assert not list(tmp_path.iterdir()), "the notebook wrote into its working folder"


def test_evaluate_notebook_scores_camvid(tmp_path, monkeypatch):
    shared = shared_data_dir()
    if not (shared / "camvid" / "val.txt").is_file():
        pytest.skip(f"CamVid not found at {shared / 'camvid'} (../shared/data is absent)")
    torch.manual_seed(0)
    from lseg import LSeg

    model = LSeg.from_config("tiny", pretrained=False).save_pretrained(tmp_path / "model")
    work = tmp_path / "work"
    work.mkdir()
    notebook = run_notebook("evaluate.ipynb", work, monkeypatch, shared, model=model)
    printed = "".join(text_of(cell) for cell in notebook.cells)
    assert f"model: {model}" in printed and "RANDOM" not in printed
    assert "scoring the first 8 of 101 validation images at long side 240" in printed
    assert "8 images in" in printed
    (table,) = outputs_of(notebook, "text/markdown")
    assert "| mIoU |" in table and "| Bicyclist |" in table
    assert len(outputs_of(notebook, "image/png")) == 3  # IoU bars, confusion matrix, best/worst grid
    assert not list(work.iterdir()), "the notebook wrote into its working folder"


def test_evaluate_notebook_stops_with_a_clear_message_without_camvid(tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="the example tests need nbclient (lseg[test])")
    with pytest.raises(nbclient.exceptions.CellExecutionError) as stopped:
        run_notebook("evaluate.ipynb", tmp_path, monkeypatch, shared=tmp_path / "no-shared-data")
    assert "SystemExit" in str(stopped.value) and "CamVid not found" in str(stopped.value)
