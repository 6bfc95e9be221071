"""notebooks/celebrity-scan.ipynb runs top to bottom in a real Jupyter kernel (nbclient)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "celebrity-scan.ipynb"


def test_the_notebook_runs_and_shows_results(tmp_path, monkeypatch):
    monkeypatch.setenv("CELEBSCAN_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    for name in ("CELEBSCAN_NOTEBOOK_SOURCE", "CELEBSCAN_NOTEBOOK_GALLERY", "CELEBSCAN_BACKEND", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "<table>" in html and "Grace Hopper" in html and "Eileen Collins" in html
    pictures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pictures) >= 6, "the annotated pictures are shown inline"
    text = "".join(o.get("text", "") for o in outputs)
    assert "all 9 sample images as expected" in text
    assert (tmp_path / "work" / "report.html").is_file()
