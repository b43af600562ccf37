"""Every notebook runs top to bottom over a real store filled by real (tiny) runs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from flexgen_lab.config import RunConfig
from flexgen_lab.results.store import ResultStore
from flexgen_lab.runner import run

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = [p for p in sorted(NOTEBOOK_DIR.glob("*.ipynb")) if p.name != "analysis.ipynb"]


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


def _execute(notebook: Path) -> str:
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(notebook.parent)}}).execute()
    return "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_analysis_notebook_reads_reproduced_tables_against_the_store(tiny_reproductions,
                                                                     tmp_path, monkeypatch):
    store = ResultStore(tiny_reproductions / "r.sqlite")
    monkeypatch.setenv("FLEXGEN_LAB_STORE", str(store.path))
    monkeypatch.setenv("FLEXGEN_LAB_TABLES", str(tiny_reproductions / "results/tables"))
    monkeypatch.setenv("FLEXGEN_LAB_FIGURES", str(tmp_path))
    outputs = _execute(NOTEBOOK_DIR / "analysis.ipynb")
    lines = {line.split()[0]: line.split() for line in outputs.splitlines() if line.strip()}
    sweep = lines["batch_sweep-measured-local-tiny"]
    runs = store.runs("status = 'ok' AND backend = 'measured'")
    assert float(sweep[5]) == pytest.approx(runs.generation_throughput.max())  # best token/s
    assert sweep[-1] == "True"  # the table says what the store holds
    assert len(list(tmp_path.glob("*.png"))) == 4  # batch_sweep's three figures, figure1's
