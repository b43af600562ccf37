"""Run configuration: one dataclass per Hydra config group, registered in Hydra's ConfigStore.

Hydra composes YAML presets (conf/<group>/*.yaml) over these schemas, so a typo or a wrong type
fails at compose time; `validate` then checks values and names the key, the value and what is
allowed, before any weight is made. Library code receives plain dataclasses: only
`register_configs` touches Hydra.

    python -m flexgen_lab run model=opt-1.3b policy.gpu_batch_size=8 workload.prompt_len=512
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexgen_lab.units import TORCH_DTYPES

SCHEDULES = ("row_by_row", "zigzag")  # engine/schedule.py implements each (a test checks)
DTYPES = (*TORCH_DTYPES, "auto")
BACKENDS = ("measured", "simulated")
SYSTEMS = ("flexgen_lab", "hf", "accelerate", "deepspeed", "llamacpp")
DISK_IO = ("direct", "buffered")
PROMPT_SOURCES = ("synthetic", "text", "corpus")
TOKENIZED = ("text", "corpus")  # prompt sources that need the model's tokenizer
POLICY_KINDS = ("manual", "search")
DISTRIBUTED = ("none", "pipeline")
COST_MODELS = ("flexgen_lab", "flexgen-original")  # planner/cost_model.py implements each
WEIGHT_CACHE = ("rebuild", "verify")  # engine/weight_cache.py implements each (a test checks)
# Sizes no machine could hold are configuration errors, not runs that fail: more prompts (or
# a bigger block) than this, a memory size over MAX_BYTES, a seed outside torch's range.
MAX_PROMPTS = 2**31
MAX_BYTES = 2**62  # 4 EiB; the store keeps bytes as 64-bit integers
MAX_SEED = 2**63 - 1
MAX_GROUP_SIZE = 2**16


class ConfigError(ValueError):
    """A bad configuration value: the message names the key, the value and what is allowed."""


def user_config_dir() -> Path:
    """Where `calibrate` writes profiles (hardware/<name>.yaml), on Hydra's search path."""
    default = Path(os.environ.get("HOME", tempfile.gettempdir())) / ".config" / "flexgen_lab"
    return Path(os.environ.get("FLEXGEN_LAB_CONFIG_DIR", default))


@dataclass
class ModelConfig:
    name: str = "opt-125m"  # a preset from models/spec.py, or "local" with path
    path: str | None = None  # a Hugging Face directory (config.json + *.safetensors) or .gguf


@dataclass
class PlacementConfig:
    gpu: float = 1.0
    cpu: float = 0.0  # disk = 1 - gpu - cpu


@dataclass
class PolicyConfig:
    name: str = "manual"  # manual | search
    gpu_batch_size: int = 4
    num_gpu_batches: int = 1
    weights: PlacementConfig = field(default_factory=PlacementConfig)
    cache: PlacementConfig = field(default_factory=PlacementConfig)
    activations: PlacementConfig = field(default_factory=PlacementConfig)
    overlap: bool = True
    cpu_delegation: bool | None = False  # null: left to the search
    attn_sparsity: float = 1.0
    attn_renormalize: bool = False
    compress_weight: bool | None = False  # set by the compress group; null = search decides
    compress_cache: bool | None = False
    compress_bits: int = 4
    compress_group_size: int = 64
    pin_memory: bool = True


@dataclass
class HardwareConfig:
    """Capacities (budgets a measured run enforces) and speeds (what predictions use).

    Speeds are numbers (bytes/s, FLOP/s) or strings with units ("12.89GiB/s", "21.24TFLOP/s");
    null means unknown (predictions then refuse to run). `source` says where they come from.
    """

    name: str = "local"
    gpu_mem: Any = "4GiB"  # bytes (int), a string with a unit ("16GiB", "15GB"), or "local"
    cpu_mem: Any = "8GiB"
    disk_mem: Any = "32GiB"
    source: str = ""
    bw_cpu_to_gpu: Any = None
    bw_gpu_to_cpu_cache: Any = None  # the original fitted cache and activations apart
    bw_gpu_to_cpu_hidden: Any = None
    bw_disk_to_cpu: Any = None
    bw_cpu_to_disk_cache_prefill: Any = None
    bw_cpu_to_disk_hidden_prefill: Any = None
    bw_cpu_to_disk_decode: Any = None
    mm_flops_prefill: Any = None  # GPU matmul
    mm_flops_decode: Any = None
    bmm_flops_prefill: Any = None  # GPU batched matmul (attention)
    bmm_flops_decode: Any = None
    gpu_mem_bw: Any = None  # device memory bandwidth: decode reads every weight each step
    dequant_rate: Any = None  # bytes/s of dequantised output (4-bit groups -> compute dtype)
    step_overhead_s: float = 0.0  # fixed seconds per compute step (launches, bookkeeping)
    # extra compute seconds per second of copying beside it: 0 = copies hide behind compute
    # (a GPU's copy engines), 1 = copy and compute take turns (one memory, shared cores)
    overlap_contention: float = 0.0
    cpu_flops: Any = None  # CPU attention, times the original's batch/hidden correction:
    cpu_correction: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # c1 c2 c3
    safety_factor: float = 0.8  # share of each capacity a searched policy may plan to use
    io_workers: Any = None  # I/O workers (loads and stores in flight); null: the device's default
    io_latency_s: Any = None  # {link: seconds each copy on it costs beyond bytes / bandwidth}
    op_tables: Any = None  # {shape key: {op: [[size, seconds], ...]}} (hardware/op_table.py)
    bw_network: Any = None  # bytes/s from one machine to the next stage's (distributed=pipeline)
    network_latency_s: Any = None  # seconds each message between stages costs beyond bytes / bw


@dataclass
class ScheduleConfig:
    name: str = "zigzag"  # row_by_row | zigzag


@dataclass
class WorkloadConfig:
    prompt_len: int = 128
    gen_len: int = 32
    num_prompts: int | None = None  # null: one block (gpu_batch_size x num_gpu_batches)
    prompts: str = "synthetic"  # synthetic (seeded ids) | text (built-in sentences) | corpus
    prompt_text: str | None = None  # one prompt (every sequence), e.g. a question; a tokenizer
    chat_template: bool = True  # format prompt_text with the tokenizer's chat template, if any
    varied_lengths: bool = False  # left-padded prompts of different lengths
    temperature: float = 0.0  # 0 = greedy
    stop_token: int | None = None


@dataclass
class StoreConfig:
    path: str = "results/flexgen_lab.sqlite"


@dataclass
class BackendConfig:
    name: str = "measured"


@dataclass
class SystemConfig:
    name: str = "flexgen_lab"


@dataclass
class DistributedConfig:
    """distributed=pipeline splits the layers over `stages` processes (flexgen_lab/pipeline/);
    `micro_blocks` blocks are in flight at once (null: as many as stages), and every
    collective gives up after timeout_s seconds."""

    name: str = "none"
    stages: int = 1
    micro_blocks: int | None = None
    timeout_s: float = 60.0


@dataclass
class EngineConfig:
    offload_dir: str = "results/offload"
    disk_io: str = "direct"
    io_workers: Any = None  # overrides hardware.io_workers; null: the profile's, else the device's
    weight_cache: str = "rebuild"  # a damaged weight cache: rebuild it (warn) | verify (fail)


@dataclass
class CostModelConfig:
    variant: str = "flexgen_lab"  # flexgen_lab | flexgen-original (the original's formulas)


@dataclass
class SearchConfig:
    """Bounds on what policy=search may choose (and the `search` command)."""

    max_block_size: int | None = None  # gpu_batch_size x num_gpu_batches at most (latency)
    rerank_top: int = 5  # the cost model's best answers the simulator re-ranks (0: none)


@dataclass
class EvalConfig:
    """The `eval` command's text and cuts (flexgen_lab/evaluation.py): perplexity over n_windows
    windows of window_len tokens (stride apart; null = window_len) and last-word accuracy on
    `passages` passages of window_len tokens, each prefilled prefix_len tokens, then decoded."""

    corpus: str | None = None  # a text file, one document per line; null: the fetched corpus
    window_len: int = 64
    stride: int | None = None
    n_windows: int = 8
    passages: int = 16
    prefix_len: int = 16


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    cost_model: CostModelConfig = field(default_factory=CostModelConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dtype: str = "auto"
    seed: int = 0
    trace: bool = False


def register_configs() -> None:
    """Register the schema with Hydra (called by the CLI only)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunConfig)
