"""examples/seed_in_a_notebook.ipynb runs top to bottom headlessly and tells the seed's story."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("keras")
pytest.importorskip("sklearn")

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "seed_in_a_notebook.ipynb"


def _text(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append(o["text"])
        elif "data" in o and "text/plain" in o["data"]:
            out.append(o["data"]["text/plain"])
    return "".join(out)


def test_notebook_is_stored_without_outputs_and_runs_top_to_bottom():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    # run where a user would: next to the notebook
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    text = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
    symptom = re.search(r"SYMPTOM accuracy=([\d.]+) val_accuracy=([\d.]+)", text)
    assert symptom and float(symptom[1]) - float(symptom[2]) > 0.2, text  # the gap on the same data
    assert re.search(r"CAUSE stale_moving_statistics \+0\.\d+", text), text
    fixed = re.search(r"FIXED val_accuracy ([\d.]+) -> ([\d.]+); training accuracy ([\d.]+)", text)
    assert fixed and float(fixed[2]) > float(fixed[1]) + 0.2 and abs(float(fixed[2]) - float(fixed[3])) < 0.02, text
    precise = re.search(r"WITH_PRECISE_BN accuracy=([\d.]+) val_accuracy=([\d.]+)", text)
    assert precise and float(precise[2]) >= float(precise[1]) - 0.02, text  # validation no longer lags
    same = re.search(r"SAME_TRAINING loss ([\d.]+) vs ([\d.]+)", text)
    assert same and same[1] == same[2]  # the callback changes what validation reports, not training
    # the report and the recalibration show as HTML, once each, and nothing prints twice
    report_cell = next(c for c in nb.cells if c.cell_type == "code" and "eg.diagnose" in c.source)
    shown = [o for o in report_cell.outputs if o.get("output_type") == "execute_result"]
    assert len(shown) == 1 and shown[0]["data"]["text/html"].startswith("<!doctype html>")
    assert "Training vs evaluation: the gap explained" in shown[0]["data"]["text/html"]
    assert _text(report_cell).count("CAUSE") == 1 and "metrics by mode" not in _text(report_cell)
    recal_cell = next(c for c in nb.cells if c.cell_type == "code" and "eg.recalibrate" in c.source)
    html = [o for o in recal_cell.outputs if o.get("output_type") == "execute_result"][0]["data"]["text/html"]
    assert "recalibrated 7 BatchNorm layers" in html
