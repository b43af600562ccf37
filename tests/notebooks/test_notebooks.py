"""Every notebook runs top to bottom over a real store filled by real (tiny) runs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from flexgen_lab.config import RunConfig
from flexgen_lab.runner import run

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def filled_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "runs.sqlite"
    for batch in (1, 2):
        cfg = RunConfig()
        cfg.model.name, cfg.store.path = "opt-tiny", str(path)
        cfg.workload.prompt_len, cfg.workload.gen_len = 8, 4
        cfg.policy.gpu_batch_size = batch
        run(cfg)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(notebook, filled_store, tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXGEN_LAB_STORE", str(filled_store))
    monkeypatch.setenv("FLEXGEN_LAB_FIGURE", str(tmp_path / "figure.png"))
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(notebook.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "opt-tiny" in outputs
    assert (tmp_path / "figure.png").stat().st_size > 0
