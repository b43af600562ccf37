"""reproduce and plot: experiment files expand into cells, cells run into the store once,
tables say what the store holds, an interrupted reproduction resumes with exactly the
missing cells, and figures are written. Every run here is real (tiny scale)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from flexgen_lab.config import ConfigError
from flexgen_lab.results import experiment as experiments
from flexgen_lab.results.store import ResultStore
from tests.conftest import python_cli

TABLE4_ROWS = "all optimizations,no disk,row-by-row schedule (same block)"


def reproduce(tmp_path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(python_cli("reproduce", f"store.path={tmp_path / 'r.sqlite'}", *args),
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_every_experiment_file_loads_and_expands_at_every_scale():
    names = experiments.available()
    assert {"table2", "table4", "figure1", "batch_sweep"} <= set(names)
    for name in names:
        exp = experiments.load(name)
        first = (experiments.EXPERIMENTS_DIR / f"{name}.yaml").read_text().splitlines()[0]
        assert first == f"# {exp.command}" and f"experiment={name}" in first
        assert "tiny" in exp.scales, name  # every experiment has a scale the tests run
        for scale in exp.scales.values():
            cells = exp.cells(scale, [])
            assert cells and all(c.setting("backend", "") == scale.backend for c in cells)
            assert len({(c.row, c.column, c.x) for c in cells}) == len(cells)


def test_paper_values_live_in_the_files_and_a_row_states_only_what_differs():
    exp = experiments.load("table4")
    cells = {(c.row, c.column): c for c in exp.cells(exp.scales["paper"], ["seed=3"])}
    base = cells[("all optimizations", "OPT-30B")]
    no_overlap = cells[("no overlapping", "OPT-30B")]
    assert base.paper_token_s == 7.32 and cells[("no disk", "OPT-175B")].paper_oom
    assert set(no_overlap.overrides) - set(base.overrides) == {"policy.overlap=false"}
    assert "seed=3" in base.overrides  # the command line applies to every cell


def test_a_cell_wins_over_the_command_line_except_backend_and_store():
    exp = experiments.load("table4")
    cells = exp.cells(exp.scales["paper"], ["policy.overlap=true", "backend=measured",
                                            "store.path=x.sqlite"])
    no_overlap = next(c for c in cells if c.row == "no overlapping")
    assert no_overlap.setting("policy.overlap", "") == "false"
    assert no_overlap.backend == "measured" and no_overlap.setting("store.path", "") == "x.sqlite"


def test_bad_experiment_files_and_options_fail_before_any_cell(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("title: no command line\nscales: {}\ncolumns: {}\n")
    with pytest.raises(ConfigError, match="first line"):
        experiments.load("broken", tmp_path)
    out = reproduce(tmp_path, "experiment=nope", check=False)
    assert out.returncode == 2 and "table4" in out.stderr and not (tmp_path / "r.sqlite").exists()
    out = reproduce(tmp_path, "experiment=table4", "reproduce.bogus=1", check=False)
    assert out.returncode == 2 and "reproduce.repeats" in out.stderr


def test_tiny_table4_runs_once_prints_what_is_stored_and_resumes(tmp_path):
    """One reproduction checks: cells equal stored rows, an OOM cell, a second run adds no
    rows, and after a kill mid-table the rerun adds exactly the missing cells."""
    args = ["experiment=table4", "reproduce.scale=tiny", f"reproduce.only={TABLE4_ROWS}"]
    dry = reproduce(tmp_path, *args, "reproduce.dry_run=true").stdout
    assert "6 cells, 6 to run" in dry and not (tmp_path / "r.sqlite").exists() or (
        ResultStore(tmp_path / "r.sqlite").runs().empty)
    killed = _kill_after_rows(tmp_path, args, rows=2)
    assert "interrupted" in killed
    store = ResultStore(tmp_path / "r.sqlite")
    done = "status IN ('ok', 'oom')"
    before = store.runs(done)
    assert 2 <= len(before) < 5, killed  # stopped mid-table (5 distinct configurations)
    out = reproduce(tmp_path, *args).stdout
    after = store.runs(done)
    assert after.config_hash.value_counts().max() == 1  # nothing done twice
    assert len(after) == 5  # "no disk" on OPT-30B is "all optimizations": one config
    assert set(before.run_id) < set(after.run_id)
    csv = pd.read_csv(tmp_path / "results/tables/table4-measured-local-tiny.csv")
    for line in csv.itertuples():
        rows = after[after.config_hash == line.config_hash]
        if line.status == "ok":
            assert line.ours_token_s == pytest.approx(rows.generation_throughput.median())
        else:
            assert set(rows.status) == {line.status}
    oom = csv[(csv.row == "no disk") & (csv.column == "OPT-175B")].iloc[0]
    assert oom.status == "oom" and "| no disk | OPT-175B | flexgen_lab | OOM | - | OOM |" in out
    rows = len(store.runs())
    again = reproduce(tmp_path, *args).stdout
    assert "6 stored" in again and len(store.runs()) == rows


def _kill_after_rows(tmp_path, args: list[str], rows: int) -> str:
    """Start reproduce, SIGINT it once `rows` rows are stored; its output."""
    proc = subprocess.Popen(python_cli("reproduce", f"store.path={tmp_path / 'r.sqlite'}",
                                       *args),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        path = tmp_path / "r.sqlite"
        if path.exists() and len(ResultStore(path).runs("status IN ('ok', 'oom')")) >= rows:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=60)
    return out


def test_weight_bytes_row_by_row_over_zigzag_equal_the_number_of_gpu_batches(
        tiny_reproductions):
    csv = pd.read_csv(tiny_reproductions / "results/tables/batch_sweep-measured-local-tiny.csv")
    moved = csv.set_index(["column", "x"]).bytes_decode_cpu_to_gpu  # weights only move
    for ngb in (1, 2, 4, 8):
        assert moved[("row-by-row", ngb)] / moved[("zig-zag", ngb)] == ngb
    assert csv.simulated_token_s.notna().all()  # the simulator's figure beside each cell
    plots = reproduce_plot(tiny_reproductions, "experiment=batch_sweep", "reproduce.scale=tiny")
    assert {p.suffix for p in plots} == {".png", ".svg"} and len(plots) == 6


def reproduce_plot(where: Path, *args: str) -> list[Path]:
    out = subprocess.run(python_cli("plot", f"store.path={where / 'r.sqlite'}", *args),
                         capture_output=True, text=True, timeout=120, cwd=where)
    assert out.returncode == 0, out.stderr[-3000:]
    paths = [where / p for p in out.stdout.split("wrote ")[-1].strip().split(", ")]
    assert all(p.stat().st_size > 1000 for p in paths)
    return paths


def test_simulated_figure1_cells_and_plot(tiny_reproductions):
    csv = pd.read_csv(tiny_reproductions
                      / "results/tables/figure1-simulated-t4-paper-sourced-tiny.csv")
    assert (csv.status == "ok").all() and csv.block_size.notna().all()
    store = ResultStore(tiny_reproductions / "r.sqlite")
    rows = store.runs("backend = 'simulated'")
    assert set(csv.config_hash) == set(rows.config_hash) and (rows.device == "simulated").all()
    assert len(reproduce_plot(tiny_reproductions, "experiment=figure1",
                              "reproduce.scale=tiny")) == 2


def test_tiny_table2_measures_baselines_beside_ours_and_compares_their_tokens(tmp_path):
    out = reproduce(tmp_path, "experiment=table2", "reproduce.scale=tiny",
                    "reproduce.only=FlexGen,HF Accelerate,Petals (per GPU)").stdout
    csv = pd.read_csv(tmp_path / "results/tables/table2-measured-local-tiny.csv")
    status = csv.groupby("row").status.agg(set)
    assert status["HF Accelerate"] == {"ok"} and status["Petals (per GPU)"] == {"not run"}
    assert status["FlexGen"] == {"ok"}
    accelerate = csv[csv.row == "HF Accelerate"]
    assert (accelerate.system == "accelerate").all()
    assert accelerate.tokens_equal_ours.tolist() == [True] * 6  # same weights, float32
    assert csv[csv.row == "FlexGen"].tokens_equal_ours.isna().all()  # the reference itself
    rows = ResultStore(tmp_path / "r.sqlite").runs("system = 'accelerate'")
    # each column's gpu budget is what its FlexGen cell needs: Accelerate fits it there, except
    # where the paper's ratio (OPT-175B on a T4) leaves part of the model on its disk
    assert (rows.w_gpu + rows.w_disk == 1).all() and (rows.w_disk > 0).any()
    assert "| tokens = ours |" in out
    flexgen = csv[csv.row == "FlexGen"]
    assert flexgen.paper_token_s.tolist() == [25.26, 7.32, 0.69, 13.72, 3.50, 0.35]
    assert flexgen.relative.isna().all()  # table2 has no baseline row to divide by
    assert "| Petals (per GPU) | OPT-30B s=512 | petals | 2.84 | - | not run |" in out


def test_tiny_table3_runs_the_pipeline_and_reads_decode_columns(tmp_path):
    out = reproduce(tmp_path, "experiment=table3", "reproduce.scale=tiny").stdout
    # as many cells on t4-paper-sourced (1 GPU) as on t4-paper-x4: the first by name
    csv = pd.read_csv(tmp_path / "results/tables/table3-simulated-t4-paper-sourced-tiny.csv")
    ran = csv[csv.row.str.startswith("FlexGen")]
    assert (ran.status == "ok").all() and "within +-30 %" in out
    runs = ResultStore(tmp_path / "r.sqlite").runs().set_index("config_hash")
    for r in ran.itertuples():
        run = runs.loc[r.config_hash]
        metric = "decode_throughput" if r.column.startswith("decode") else "generation_throughput"
        assert r.ours_token_s == pytest.approx(run[metric])
        assert run.num_stages == (4 if r.row == "FlexGen 4 GPUs" else 1)
    assert len(runs) == 6  # a decode column reuses its generation column's run
