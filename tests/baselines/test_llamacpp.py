"""system=llamacpp: llama.cpp on a GGUF file written from the engine's weights gives the
engine's greedy tokens (batch 1 through its high-level API, batch > 1 through one batched
llama_decode); the row says budgets are not enforced; OPT and a missing extra exit 2.

Needs llama-cpp-python (`pip install 'flexgen_lab[llamacpp]'`): .ci/run installs it, so under
CI=true its absence fails these tests; elsewhere they skip saying what to install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from flexgen_lab.baselines.llamacpp import INSTALL
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.owners import CACHE_DIR
from flexgen_lab.engine.policy import Policy
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.results.store import ResultStore
from flexgen_lab.workload import synthetic_prompts
from tests.conftest import fetched, python_cli

CPU = torch.device("cpu")
UNLIMITED = {"gpu": 2**40, "cpu": 2**40, "disk": 2**40}


def need_llama_cpp():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        message = f"llama-cpp-python is not installed: {INSTALL}"
        if os.environ.get("CI", "").lower() == "true":  # .ci/run installs the extra
            pytest.fail(message)
        pytest.skip(message)


def engine_tokens(spec, weights, ids, mask, gen_len):
    policy = Policy(gpu_batch_size=ids.shape[0])
    return Engine(spec, weights, policy, dtype=torch.float32).generate(ids, mask, gen_len)


@pytest.mark.parametrize("batch_size", [1, 3, 6])  # 1: high-level API; 3, 6: batched decode
def test_greedy_tokens_equal_the_engines(batch_size, tmp_path):
    need_llama_cpp()
    from flexgen_lab.baselines import llamacpp

    spec = ModelSpec.from_name("llama-tiny")
    weights = DummyWeights(spec, seed=3)
    ids, mask = synthetic_prompts(spec, 6, 16, seed=0, varied_lengths=True)
    gen, row = llamacpp.run(spec, weights, ids, mask, 8, batch_size, CPU, torch.float32,
                            UNLIMITED, str(tmp_path))
    assert torch.equal(gen.output_ids, engine_tokens(spec, weights, ids, mask, 8).output_ids)
    assert gen.prefill_s > 0 and gen.decode_s > 0
    placement = json.loads(row["placement_json"])
    assert placement["budgets"] == "not enforced" and placement["n_gpu_layers"] == 0
    assert placement["n_threads"] == torch.get_num_threads()
    assert (row["w_gpu"], row["w_cpu"], row["w_disk"]) == (0.0, 1.0, 0.0)
    assert row["peak_rss_anon_bytes"] >= 0 and row["peak_rss_file_bytes"] >= 0
    assert row["system_version"].startswith("llama-cpp-python ")
    assert [p.name for p in tmp_path.iterdir()] == [CACHE_DIR]  # the written GGUF, cached


def test_cli_run_stores_the_row_and_the_engines_tokens(tmp_path):
    need_llama_cpp()
    out = subprocess.run(python_cli("run", "system=llamacpp", "model=llama-tiny", "workload=tiny",
                                    "store.path=r.sqlite", "engine.offload_dir=off"),
                         cwd=tmp_path, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert out.returncode == 0, out.stderr
    assert "torch threads" in out.stdout
    store = ResultStore(tmp_path / "r.sqlite")
    row = store.runs().iloc[0]
    assert row.system == "llamacpp" and row.status == "ok" and row.w_disk == 0
    assert json.loads(row.placement_json)["budgets"] == "not enforced"
    assert row.system_version.startswith("llama-cpp-python")
    spec = ModelSpec.from_name("llama-tiny")
    ids, mask = synthetic_prompts(spec, 4, 16, seed=0)
    ours = engine_tokens(spec, DummyWeights(spec, 0), ids, mask, 8).output_ids.tolist()
    assert [out_ids for _, _, out_ids in store.tokens(int(row.run_id))] == ours


def test_a_quantised_file_runs_as_it_is(tmp_path):
    """SmolLM2's own Q4_1 file, batch 1 and 2, in a child process: where llama.cpp's AMX path
    is active its extra buffer types crashed with SIGSEGV on this file (extra_buffers())."""
    need_llama_cpp()
    path = fetched("smollm2-135m-instruct")
    out = subprocess.run(python_cli("run", "system=llamacpp", "model=smollm2-135m-instruct",
                                    f"model.path={path}", "workload=tiny", "workload.gen_len=4",
                                    "policy.gpu_batch_size=2", "store.path=r.sqlite",
                                    "engine.offload_dir=off"),
                         cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    row = ResultStore(tmp_path / "r.sqlite").runs().iloc[0]
    assert row.status == "ok" and row.system == "llamacpp"


def test_without_the_extra_exit_2_names_it(tmp_path, monkeypatch, capsys):
    from flexgen_lab.__main__ import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    with pytest.raises(SystemExit) as exit_:
        main(["run", "system=llamacpp", "model=llama-tiny", "workload=tiny",
              "store.path=r.sqlite", "engine.offload_dir=off"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "[llamacpp]" in err and INSTALL in err
    assert "Traceback" not in err
    assert not (tmp_path / "r.sqlite").exists() and not (tmp_path / "off").exists()
