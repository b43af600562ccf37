"""Bytes per link, counted by the copy primitive, equal a count written here from shapes."""

from __future__ import annotations

import pytest
import torch

from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.workload import synthetic_prompts

S, N, B, K = 10, 4, 3, 2  # prompt length, new tokens, gpu batch size, GPU batches
F32 = 4


def run(policy: Policy, schedule: str, tmp_path, model: str = "opt-tiny"):
    spec = ModelSpec.from_name(model)
    ids, mask = synthetic_prompts(spec, B * K, S, seed=0)
    with Engine(spec, DummyWeights(spec, 0), policy, schedule, offload_dir=tmp_path) as engine:
        return spec, engine.generate(ids, mask, N).link_bytes


def streamed_weight_bytes(spec: ModelSpec) -> int:
    """Bytes of every part loaded once: embed, layers, head (+ the tied embedding again)."""
    tied = spec.vocab * spec.hidden if spec.tie_embeddings else 0
    return (spec.weight_bytes(1) + tied) * F32


@pytest.mark.parametrize("schedule,loads_per_token", [("zigzag", 1), ("row_by_row", K)])
@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_weights_stream_once_per_block_or_per_batch(tmp_path, schedule, loads_per_token, tier):
    weights = Placement(0, 1) if tier == "cpu" else Placement(0, 0)
    spec, moved = run(Policy(gpu_batch_size=B, num_gpu_batches=K, weights=weights), schedule,
                      tmp_path)
    per_token = streamed_weight_bytes(spec) * loads_per_token
    for phase, tokens in (("prefill", 1), ("decode", N - 1)):
        assert moved[phase]["cpu_to_gpu"] == per_token * tokens
        assert moved[phase]["disk_to_cpu"] == (per_token * tokens if tier == "disk" else 0)
        assert moved[phase]["gpu_to_cpu"] == moved[phase]["cpu_to_disk"] == 0


def test_cache_and_activations_on_cpu(tmp_path):
    policy = Policy(gpu_batch_size=B, num_gpu_batches=K, cache=Placement(0, 1),
                    activations=Placement(0, 1))
    spec, moved = run(policy, "zigzag", tmp_path)
    L, h, kv = spec.num_layers, spec.hidden, spec.kv_dim
    # prefill: every layer stores the prompt's K and V; layers 0..L store their output and
    # layers 1..L+1 load their input
    cache_prefill = L * K * 2 * S * B * kv * F32
    hidden_prefill = (L + 1) * K * B * S * h * F32
    assert moved["prefill"]["gpu_to_cpu"] == cache_prefill + hidden_prefill
    assert moved["prefill"]["cpu_to_gpu"] == hidden_prefill
    # decode token i loads S + i - 1 past rows and stores 1 new row (not at the last token)
    loads = sum(L * K * 2 * (S + i - 1) * B * kv * F32 for i in range(1, N))
    stores = sum(L * K * 2 * B * kv * F32 for i in range(1, N - 1))
    hidden_decode = (N - 1) * (L + 1) * K * B * h * F32
    assert moved["decode"]["cpu_to_gpu"] == loads + hidden_decode
    assert moved["decode"]["gpu_to_cpu"] == stores + hidden_decode


@pytest.mark.parametrize("model", ["opt-tiny", "llama-tiny"])
def test_cpu_delegation_moves_only_queries_new_rows_and_outputs(tmp_path, model):
    policy = Policy(gpu_batch_size=B, num_gpu_batches=K, cache=Placement(0, 1),
                    cpu_delegation=True)
    spec, moved = run(policy, "zigzag", tmp_path, model)
    L, q, kv = spec.num_layers, spec.q_dim, spec.kv_dim
    steps = (N - 1) * L * K
    assert moved["decode"]["gpu_to_cpu"] == steps * B * (q + 2 * kv) * F32
    assert moved["decode"]["cpu_to_gpu"] == steps * B * q * F32
    assert moved["prefill"]["gpu_to_cpu"] == L * K * 2 * S * B * kv * F32


def test_cache_on_disk_goes_through_the_cpu(tmp_path):
    policy = Policy(gpu_batch_size=B, num_gpu_batches=K, cache=Placement(0, 0))
    spec, moved = run(policy, "zigzag", tmp_path)
    L, kv = spec.num_layers, spec.kv_dim
    loads = sum(L * K * 2 * (S + i - 1) * B * kv * F32 for i in range(1, N))
    assert moved["decode"]["disk_to_cpu"] == moved["decode"]["cpu_to_gpu"] == loads
    assert moved["prefill"]["cpu_to_disk"] == L * K * 2 * S * B * kv * F32


def test_zigzag_moves_the_weights_of_row_by_row_when_there_is_one_batch(tmp_path):
    policy = Policy(gpu_batch_size=B, num_gpu_batches=1, weights=Placement(0.3, 0.4))
    _, zigzag = run(policy, "zigzag", tmp_path)
    _, rows = run(policy, "row_by_row", tmp_path)
    assert zigzag == rows
    assert torch.tensor([v for p in zigzag.values() for v in p.values()]).sum() > 0
