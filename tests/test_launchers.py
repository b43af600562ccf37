"""Sweeps through Hydra's submitit launcher: submitit's local executor runs a real 2-job sweep
(no Slurm needed), and the Slurm presets compose (nothing is submitted)."""

from __future__ import annotations

import pytest
from hydra import compose

from flexgen_lab.compose import Source, initialize
from flexgen_lab.config import register_configs
from flexgen_lab.results.store import ResultStore
from tests.test_cli import TINY, cli


@pytest.mark.slow
def test_a_sweep_through_submitit_local_stores_every_job(tmp_path):
    db = tmp_path / "r.sqlite"
    out = cli(tmp_path, "run", "--multirun", "hydra/launcher=local-jobs",
              "policy.gpu_batch_size=1,2", *TINY, "hardware=local", f"store.path={db}")
    assert out.returncode == 0, out.stderr[-3000:]
    runs = ResultStore(db).runs()
    assert sorted(runs.gpu_batch_size) == [1, 2] and set(runs.status) == {"ok"}
    assert list(tmp_path.glob("results/hydra/multirun/*/*/.submitit/*"))  # submitit's logs


@pytest.mark.parametrize("launcher,target", [("slurm", "SlurmLauncher"),
                                             ("submitit_slurm", "SlurmLauncher"),
                                             ("local-jobs", "LocalLauncher")])
def test_the_launcher_presets_compose(launcher, target):
    register_configs()
    with initialize(Source()):
        cfg = compose(Source().config_name, overrides=[f"hydra/launcher={launcher}",
                                           "distributed=pipeline"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    if launcher == "slurm":
        assert (cfg.hydra.launcher.gpus_per_node, cfg.hydra.launcher.tasks_per_node) == (1, 1)
