"""Measure this machine's speeds and write them as a hardware profile Hydra finds by name.

    python -m flexgen_lab calibrate                      # writes hardware/calibrated.yaml
    python -m flexgen_lab calibrate name=mybox quick=true
    python -m flexgen_lab run hardware=mybox policy=search

Copies between the tiers (real CUDA copies from pinned memory on a GPU; host copies into
another buffer without one, as the engine does), disk reads and writes with the page cache
bypassed (the engine's own DiskFile), matmul and batched-matmul throughput shaped like
prefill and decode, CPU attention, and device memory bandwidth. Each figure is the median of
a few repeats after a warm-up. Also: what one small copy costs on each link beyond its bytes
(`io_latency_s`), the engine's own cost per compute step (`step_overhead_s`, on a model too
small to compute), what a copy beside a compute costs the compute (`overlap_contention`:
on a CPU the "device" and the host are one memory and two cores), and with `model=` each
model's operator time table at its own shapes (hardware/op_table.py). The profile goes to
$FLEXGEN_LAB_CONFIG_DIR/hardware/ (default ~/.config/flexgen_lab), a directory
conf/config.yaml adds to Hydra's search path.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import torch
from omegaconf import OmegaConf

from flexgen_lab.config import user_config_dir
from flexgen_lab.engine.disk import DiskFile, aligned_empty
from flexgen_lab.engine.transfer import io_pool
from flexgen_lab.hardware.op_table import OpTable, measure_table, shape_key

GiB = 2**30


def _median_seconds(fn, repeats: int, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def io_thread() -> ThreadPoolExecutor:
    """A worker like the engine's I/O threads (transfer.io_pool: one torch thread, so a copy
    does not take compute's cores). On a CPU it copies at about half the rate of the main
    thread's two (measured: 11.7 against 19.2 GB/s for 512 MB), so links are timed on it,
    as the engine uses them."""
    return io_pool(1)


def _copy_rates(device: torch.device, nbytes: int, repeats: int, sync) -> dict[str, float]:
    pinned = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    compute = torch.empty(nbytes, dtype=torch.uint8, device=device)
    with io_thread() as pool:
        def on_io(fn):
            return lambda: pool.submit(lambda: (fn(), sync())).result()
        up = nbytes / _median_seconds(on_io(lambda: compute.copy_(host)), repeats, sync)
        down = nbytes / _median_seconds(on_io(lambda: host.copy_(compute)), repeats, sync)
    other = torch.empty_like(compute)
    local = 2 * nbytes / _median_seconds(lambda: other.copy_(compute), repeats, sync)
    return {"bw_cpu_to_gpu": up, "bw_gpu_to_cpu_cache": down, "bw_gpu_to_cpu_hidden": down,
            "gpu_mem_bw": local}


def _disk_rates(directory: Path, nbytes: int, repeats: int) -> dict[str, float]:
    buf = aligned_empty(nbytes)
    buf.random_(0, 255)
    writes, reads = [], []
    for r in range(repeats + 1):
        with DiskFile(directory / f"calibrate-{r}.bin", nbytes, "direct") as f:
            start = time.perf_counter()
            f.write_from(0, buf)
            fd = os.open(f.path, os.O_RDONLY)
            os.fsync(fd)  # the write is on the device, not in a cache, before the clock stops
            os.close(fd)
            writes.append(time.perf_counter() - start)
            start = time.perf_counter()
            f.read_into(0, buf)
            reads.append(time.perf_counter() - start)
        (directory / f"calibrate-{r}.bin").unlink()
    write = nbytes / statistics.median(writes[1:])
    return {"bw_disk_to_cpu": nbytes / statistics.median(reads[1:]),
            "bw_cpu_to_disk_cache_prefill": write, "bw_cpu_to_disk_hidden_prefill": write,
            "bw_cpu_to_disk_decode": write}


def _flop_rates(device: torch.device, dtype: torch.dtype, h: int, repeats: int,
                sync) -> dict[str, float]:
    """Matmuls shaped like a prefill (512 tokens) and a decode step (16 tokens); attention
    bmm over 512 keys for 512 queries (prefill) or one (decode), head_dim 128."""
    def rate(a_shape, b_shape, batched=False):
        a = torch.randn(a_shape, dtype=dtype, device=device)
        b = torch.randn(b_shape, dtype=dtype, device=device)
        op = torch.bmm if batched else torch.matmul
        flops = 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if batched else 1)
        return flops / _median_seconds(lambda: op(a, b), repeats, sync)

    heads = max(1, h // 128)
    return {"mm_flops_prefill": rate((512, h), (h, 4 * h)),
            "mm_flops_decode": rate((16, h), (h, 4 * h)),
            "bmm_flops_prefill": rate((heads, 512, 128), (heads, 128, 512), True),
            "bmm_flops_decode": rate((16 * heads, 1, 128), (16 * heads, 128, 512), True)}


def _dequant_rate(device: torch.device, dtype: torch.dtype, h: int, repeats: int,
                  sync) -> float:
    """Bytes of dequantised output per second (4-bit, groups of 64), on the compute device."""
    from flexgen_lab.engine.compress import CompressionConfig, dequantize, quantize

    packed = quantize(torch.randn(h, 4 * h, dtype=dtype, device=device),
                      CompressionConfig(4, 64, 0))
    out = torch.empty(h, 4 * h, dtype=dtype, device=device)
    return out.nbytes / _median_seconds(lambda: dequantize(packed, out=out), repeats, sync)


def _cpu_attention_rate(h: int, repeats: int) -> float:
    """Delegated decode attention on the CPU in fp32: (b*heads, 1, d) x (d, s)."""
    heads = max(1, h // 128)
    q = torch.randn(16 * heads, 1, 128)
    k = torch.randn(16 * heads, 128, 512)
    return 2 * 16 * heads * 128 * 512 / _median_seconds(lambda: torch.bmm(q, k), repeats,
                                                        lambda: None)


def copy_latencies(device: torch.device, directory: Path, repeats: int = 200
                   ) -> dict[str, float]:
    """Seconds one small copy (4 KiB) costs on each link, handed to an I/O thread and waited
    for as the engine's loads and stores are: what a copy costs beyond its bytes."""
    nbytes, sync = 4096, (torch.cuda.synchronize if device.type == "cuda" else (lambda: None))
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    compute = torch.empty(nbytes, dtype=torch.uint8, device=device)
    buf = aligned_empty(nbytes)
    out = {}
    with io_thread() as pool, DiskFile(directory / "calibrate-latency.bin",
                                                 nbytes, "direct") as f:
        ops = {"cpu_to_gpu": lambda: compute.copy_(host), "gpu_to_cpu": lambda: host.copy_(
            compute), "disk_to_cpu": lambda: f.read_into(0, buf),
               "cpu_to_disk": lambda: f.write_from(0, buf)}
        for link, op in ops.items():
            out[link] = _median_seconds(lambda op=op: pool.submit(op).result(), repeats, sync)
    (directory / "calibrate-latency.bin").unlink(missing_ok=True)
    return out


def measure(quick: bool, offload_dir: str | Path, dtype: torch.dtype) -> dict[str, float]:
    """Every speed of a profile (bytes/s, FLOP/s), measured here."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    repeats, nbytes, h = (2, 32 * 2**20, 512) if quick else (5, 512 * 2**20, 4096)
    directory = Path(offload_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return {**_copy_rates(device, nbytes, repeats, sync),
            **_disk_rates(directory, nbytes, repeats),
            **_flop_rates(device, dtype, h, repeats, sync),
            "cpu_flops": _cpu_attention_rate(h, repeats),
            "dequant_rate": _dequant_rate(device, dtype, h, repeats, sync)}


def model_table(spec, dtype: torch.dtype, device: torch.device, quick: bool
                ) -> tuple[str, OpTable]:
    """(shape key, operator table) of one model, measured here (hardware/op_table.py)."""
    return (shape_key(spec, dtype.itemsize),
            measure_table(spec, dtype, device, quick, progress=lambda m: print("   ", m)))


OVERHEAD_MODEL, OVERHEAD_TOKENS = "opt-tiny", 17  # arithmetic negligible beside bookkeeping


def engine_step_overhead(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """Seconds the engine spends per compute step beyond its operators: a resident decode of
    opt-tiny (2 layers of width 64, batch 1) timed, minus what its own operator table says
    the arithmetic takes, per step. Measured on a model too small to compute, not fitted on
    the runs a profile will be judged on."""
    from flexgen_lab.engine.engine import Engine
    from flexgen_lab.engine.policy import Policy
    from flexgen_lab.models.spec import ModelSpec
    from flexgen_lab.models.weights import DummyWeights
    from flexgen_lab.workload import synthetic_prompts

    spec = ModelSpec.from_name(OVERHEAD_MODEL)
    table = measure_table(spec, dtype, device, quick=True)
    ids, mask = synthetic_prompts(spec, 1, 8, seed=0)
    with torch.inference_mode(), Engine(spec, DummyWeights(spec, 0), Policy(1), "zigzag",
                                        device, dtype) as engine:
        engine.generate(ids, mask, OVERHEAD_TOKENS)
        decode = statistics.median(engine.generate(ids, mask, OVERHEAD_TOKENS).decode_s
                                   for _ in range(repeats))
    steps = OVERHEAD_TOKENS - 1
    arithmetic = sum(table.seconds("embed", 1) + table.seconds("head", 1)
                     + spec.num_layers * (table.seconds("dense", 1)
                                          + table.seconds("attention_decode", 8 + t))
                     for t in range(steps))
    return max(0.0, (decode - arithmetic) / (steps * (spec.num_layers + 2)))


def overlap_contention(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Compute seconds added per second of copying beside it, as the engine runs the two: a
    decode-shaped matmul on the main thread, a cpu->gpu copy on an I/O thread of one torch
    thread (transfer.Executor's), sized to take about as long. (both - max(alone)) /
    min(alone), clipped to [0, MAX_CONTENTION]: 0 where the copy hides (a GPU's copy engine),
    about 1 where the two take turns, more where sharing costs beyond that."""
    from flexgen_lab.hardware.profile import MAX_CONTENTION

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    h = 768
    a = torch.randn(16, h, dtype=dtype, device=device)
    w = torch.randn(4 * h, h, dtype=dtype, device=device)

    def compute():
        for _ in range(20):
            torch.nn.functional.linear(a, w)
    compute_s = _median_seconds(compute, repeats, sync)
    host = torch.empty(2**20, dtype=torch.uint8, pin_memory=device.type == "cuda")
    rate = host.numel() / _median_seconds(lambda: torch.empty_like(host, device=device)
                                          .copy_(host), repeats, sync)
    host = torch.empty(max(4096, int(rate * compute_s)), dtype=torch.uint8,
                       pin_memory=device.type == "cuda")
    target = torch.empty_like(host, device=device)

    def copy():
        target.copy_(host, non_blocking=device.type == "cuda")
        sync()
    with io_thread() as pool:
        copy_s = _median_seconds(lambda: pool.submit(copy).result(), repeats, sync)

        def both():
            future = pool.submit(copy)
            compute()
            sync()
            future.result()
        both_s = _median_seconds(both, repeats, sync)
    extra = (both_s - max(compute_s, copy_s)) / min(compute_s, copy_s)
    return min(MAX_CONTENTION, max(0.0, extra))


def engine_settings(device: torch.device, dtype: torch.dtype, offload_dir: str | Path
                    ) -> dict:
    """A profile's measured non-speed fields: per-copy latencies, the engine's overhead per
    compute step, and what a copy beside a compute costs it."""
    return {"io_latency_s": copy_latencies(device, Path(offload_dir)),
            "step_overhead_s": engine_step_overhead(device, dtype),
            "overlap_contention": overlap_contention(device, dtype)}


def kept_tables(name: str, directory: Path | None = None) -> dict:
    """The operator tables of an existing profile of that name: calibrating again (another
    model, say) adds to them instead of losing them."""
    path = (directory or user_config_dir()) / "hardware" / f"{name}.yaml"
    if not path.exists():
        return {}
    data = OmegaConf.to_container(OmegaConf.load(path))
    return dict(data.get("op_tables") or {})


def default_capacities(offload_dir: str | Path) -> dict[str, int]:
    """Budgets this machine can honour: a quarter of RAM (or 90 % of the GPU) as the gpu tier,
    half of RAM as the cpu tier, half of the free disk as the disk tier."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpu = (int(0.9 * torch.cuda.get_device_properties(0).total_memory)
           if torch.cuda.is_available() else ram // 4)
    free = shutil.disk_usage(Path(offload_dir)).free
    return {"gpu_mem": gpu, "cpu_mem": ram // 2, "disk_mem": free // 2}


def write_profile(name: str, speeds: dict[str, float], capacities: dict[str, int],
                  source: str, directory: Path | None = None,
                  settings: dict | None = None) -> Path:
    """hardware/<name>.yaml under the user config directory (or `directory`); settings are
    the profile's non-speed fields (cpu_correction, safety_factor, step_overhead_s,
    io_latency_s, overlap_contention, op_tables), written as JSON (which YAML reads)."""
    target = (directory or user_config_dir()) / "hardware" / f"{name}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    settings = {"cpu_correction": [0.0, 0.0, 0.0], "safety_factor": 0.8, **(settings or {})}
    lines = [f"# python -m flexgen_lab run hardware={name}   (written by calibrate)",
             f"name: {name}",
             *[f"{key}: {value}" for key, value in capacities.items()],
             f"source: {json.dumps(source)}",
             *[f"{key}: {value:.6g}" for key, value in speeds.items()],
             *[f"{key}: {json.dumps(value)}" for key, value in settings.items()]]
    target.write_text("\n".join(lines) + "\n")
    return target


def measured_source(quick: bool) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"calibrate on {socket.gethostname()}, {when}{', quick' if quick else ''}; "
            f"torch {torch.__version__}")
