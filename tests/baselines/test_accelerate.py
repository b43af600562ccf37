"""system=accelerate: Accelerate's big-model inference on the engine's weights and prompts."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from flexgen_lab.baselines import accelerate_offload, hf_generate
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.owners import CACHE_DIR
from flexgen_lab.engine.policy import Policy
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights, LocalWeights
from flexgen_lab.results.store import ResultStore
from flexgen_lab.workload import synthetic_prompts
from tests.conftest import python_cli

CPU = torch.device("cpu")
UNLIMITED = {"gpu": 2**40, "cpu": 2**40, "disk": 2**40}


def engine_tokens(spec, weights, ids, mask, gen_len):
    policy = Policy(gpu_batch_size=ids.shape[0])
    return Engine(spec, weights, policy, dtype=torch.float32).generate(ids, mask, gen_len)


def model_bytes(spec) -> int:
    weights = DummyWeights(spec, 0)
    return sum(t.nbytes for part in ("embed", "head") for t in weights.part(part, None,
                                                                            torch.float32)
               .values()) + spec.num_layers * sum(
        t.nbytes for t in weights.part("layer", 0, torch.float32).values())


# share: of the weights Accelerate may keep where it computes (the rest on its disk); all of
# it resident is table2's tiny test (tests/results/test_reproduce.py)
@pytest.mark.parametrize(("name", "share"), [("opt-tiny", 0.4), ("llama-tiny", 0.4),
                                             ("llama-tiny", 0.0)])
def test_greedy_tokens_equal_the_engines_with_part_of_the_model_on_its_disk(
        name, share, tmp_path):
    spec = ModelSpec.from_name(name)
    weights = DummyWeights(spec, seed=3)
    ids, mask = synthetic_prompts(spec, 4, 16, seed=0, varied_lengths=True)
    total = model_bytes(spec)
    budgets = {**UNLIMITED, "gpu": int(share * total * 1.5)}  # 1.5: Accelerate's own reserve
    gen, row = accelerate_offload.run(spec, weights, ids, mask, 8, 2, CPU, torch.float32,
                                      budgets, str(tmp_path))
    assert torch.equal(gen.output_ids, engine_tokens(spec, weights, ids, mask, 8).output_ids)
    placed = {tier: v["achieved"] for tier, v in json.loads(row["placement_json"])
              ["weights"].items()}
    assert sum(placed.values()) == total  # every parameter once (a tied head is the embedding)
    assert row["w_gpu"] + row["w_disk"] == pytest.approx(1) and row["w_cpu"] == 0
    assert row["w_disk"] > 0 and placed["disk"] > (1 - share) * total * 0.5
    assert row["peak_rss_anon_bytes"] >= 0 and row["peak_rss_file_bytes"] >= 0
    assert row["system_version"].startswith("accelerate ") and "transformers " in \
        row["system_version"]
    # only the exported checkpoint stays; the run's offload folder is gone
    assert [p.name for p in tmp_path.iterdir()] == [CACHE_DIR]


def test_a_local_checkpoint_is_used_as_it_is_and_a_failed_run_leaves_no_scratch(
        tmp_path, hf_checkpoint, monkeypatch):
    path, _ = hf_checkpoint("llama-gqa")
    weights = LocalWeights(path)
    spec = weights.spec
    ids, mask = synthetic_prompts(spec, 2, 12, seed=1)
    gen, row = accelerate_offload.run(spec, weights, ids, mask, 6, 2, CPU, torch.float32,
                                      {**UNLIMITED, "gpu": 1}, str(tmp_path / "off"))
    assert row["w_disk"] == 1.0
    assert torch.equal(gen.output_ids, engine_tokens(spec, weights, ids, mask, 6).output_ids)
    assert list((tmp_path / "off").iterdir()) == []  # no export of a local checkpoint

    def broken(*args, **kwargs):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(hf_generate, "generate", broken)
    with pytest.raises(RuntimeError, match="generation failed"):
        accelerate_offload.run(spec, weights, ids, mask, 6, 2, CPU, torch.float32,
                               {**UNLIMITED, "gpu": 1}, str(tmp_path / "off"))
    assert list((tmp_path / "off").iterdir()) == []


def test_budgets_map_onto_accelerates_devices():
    budgets = {"gpu": 10, "cpu": 20, "disk": 30}
    assert accelerate_offload.max_memory(budgets, CPU) == {"cpu": 10}
    assert accelerate_offload.max_memory(budgets, torch.device("cuda", 0)) == {0: 10, "cpu": 20}
    assert [accelerate_offload.our_tier(d, CPU) for d in ("cpu", "disk")] == ["gpu", "disk"]
    cuda = torch.device("cuda", 0)
    assert [accelerate_offload.our_tier(d, cuda) for d in (0, "cpu", "disk")] == [
        "gpu", "cpu", "disk"]


def test_cli_run_stores_the_achieved_placement_and_the_engines_tokens(tmp_path):
    spec = ModelSpec.from_name("opt-tiny")
    half = model_bytes(spec) // 2
    out = subprocess.run(python_cli("run", "system=accelerate", "model=opt-tiny", "workload=tiny",
                                    "hardware=local", f"hardware.gpu_mem={half}",
                                    "store.path=r.sqlite", "engine.offload_dir=off"),
                         cwd=tmp_path, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert out.returncode == 0, out.stderr
    assert "torch threads" in out.stdout
    store = ResultStore(tmp_path / "r.sqlite")
    row = store.runs().iloc[0]
    assert row.system == "accelerate" and row.status == "ok" and 0 < row.w_disk < 1
    assert row.peak_rss_bytes > 0 and row.system_version.startswith("accelerate")
    tokens = store.tokens(int(row.run_id))
    ids, mask = synthetic_prompts(spec, 4, 16, seed=0)
    ours = engine_tokens(spec, DummyWeights(spec, 0), ids, mask, 8).output_ids.tolist()
    assert [out_ids for _, _, out_ids in tokens] == ours
    assert sorted(p.name for p in (tmp_path / "off").iterdir()) == [CACHE_DIR]
