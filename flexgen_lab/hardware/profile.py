"""HardwareProfile: one machine's capacities (bytes) and speeds (bytes/s, FLOP/s).

Built from the `hardware` config group; every speed carries its unit in its name and the
profile's `source` says where the numbers come from (a datasheet, the paper, a fit, or this
machine's calibration).

    >>> profile = HardwareProfile.from_config(cfg.hardware)
    >>> profile.bw_cpu_to_gpu / 2**30   # GiB/s
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from flexgen_lab.config import ConfigError, HardwareConfig
from flexgen_lab.engine.transfer import IO_THREADS, LINKS
from flexgen_lab.hardware.op_table import OpTable, shape_key
from flexgen_lab.validation import parse_budgets

SPEED_FIELDS = ("bw_cpu_to_gpu", "bw_gpu_to_cpu_cache", "bw_gpu_to_cpu_hidden", "bw_disk_to_cpu",
                "bw_cpu_to_disk_cache_prefill", "bw_cpu_to_disk_hidden_prefill",
                "bw_cpu_to_disk_decode", "mm_flops_prefill", "mm_flops_decode",
                "bmm_flops_prefill", "bmm_flops_decode", "cpu_flops")
MAX_CONTENTION = 4.0  # sharing cores costs at most this much beyond taking turns
OPTIONAL_SPEEDS = ("gpu_mem_bw", "dequant_rate")  # terms the original cost model did not have
NETWORK_FIELDS = ("bw_network", "network_latency_s")  # the link between pipeline stages
_RATE_UNITS = {"B/s": 1, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9, "TB/s": 1e12,
               "KiB/s": 2**10, "MiB/s": 2**20, "GiB/s": 2**30, "FLOP/s": 1, "GFLOP/s": 1e9,
               "TFLOP/s": 1e12}


def parse_rate(value, key: str) -> float | None:
    """A number (bytes/s or FLOP/s) or a string such as "12.89GiB/s" or "21.24TFLOP/s"."""
    if value is None:
        return None
    rate = None
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        rate = float(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([A-Za-z/]*)\s*", str(value))
    if match and match.group(2) in _RATE_UNITS and float(match.group(1)) > 0:
        rate = float(match.group(1)) * _RATE_UNITS[match.group(2)]
    if rate is None or not math.isfinite(rate):
        raise ConfigError(f"hardware.{key}={value!r}: expected a positive finite rate, a "
                          f"number or with a unit ({', '.join(_RATE_UNITS)}), e.g. '12GB/s'")
    return rate


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    gpu_mem: int  # bytes
    cpu_mem: int
    disk_mem: int
    source: str
    bw_cpu_to_gpu: float | None  # bytes/s
    bw_gpu_to_cpu_cache: float | None
    bw_gpu_to_cpu_hidden: float | None
    bw_disk_to_cpu: float | None
    bw_cpu_to_disk_cache_prefill: float | None
    bw_cpu_to_disk_hidden_prefill: float | None
    bw_cpu_to_disk_decode: float | None
    mm_flops_prefill: float | None  # FLOP/s
    mm_flops_decode: float | None
    bmm_flops_prefill: float | None
    bmm_flops_decode: float | None
    cpu_flops: float | None
    gpu_mem_bw: float | None  # bytes/s; optional (the original had no such term)
    dequant_rate: float | None  # bytes/s of dequantised output; optional (nor this one)
    cpu_correction: tuple[float, float, float]
    safety_factor: float
    step_overhead_s: float = 0.0  # seconds per compute step; 0 = none (the original had none)
    overlap_contention: float = 0.0  # compute seconds added per second of overlapped copying
    io_workers: int | None = None  # loads and stores in flight at once; None: IO_THREADS
    io_latency_s: dict[str, float] = field(default_factory=dict)  # link -> seconds per copy
    op_tables: dict[str, OpTable] = field(default_factory=dict)  # shape_key -> measured times
    bw_network: float | None = None  # bytes/s from a stage's machine to the next one's
    network_latency_s: float | None = None  # seconds per message between stages

    @staticmethod
    def from_config(cfg: HardwareConfig, offload_dir: str = "results/offload"
                    ) -> HardwareProfile:
        speeds = {key: parse_rate(getattr(cfg, key), key) for key in (*SPEED_FIELDS,
                                                                      *OPTIONAL_SPEEDS)}
        if not 0 <= cfg.step_overhead_s < 1:
            raise ConfigError(f"hardware.step_overhead_s={cfg.step_overhead_s!r}: seconds per "
                              "compute step; allowed: [0, 1)")
        if not 0 <= cfg.overlap_contention <= MAX_CONTENTION:
            raise ConfigError(f"hardware.overlap_contention={cfg.overlap_contention!r}: compute "
                              "seconds added per second of copying beside it; allowed: "
                              f"[0, {MAX_CONTENTION}]")
        if not 0 < cfg.safety_factor <= 1:
            raise ConfigError(f"hardware.safety_factor={cfg.safety_factor!r}: must be in (0, 1]")
        return HardwareProfile(
            name=cfg.name, source=cfg.source,
            **{f"{tier}_mem": nbytes for tier, nbytes in parse_budgets(cfg, offload_dir).items()},
            cpu_correction=tuple(float(c) for c in cfg.cpu_correction),
            safety_factor=float(cfg.safety_factor),
            step_overhead_s=float(cfg.step_overhead_s), io_workers=cfg.io_workers,
            overlap_contention=float(cfg.overlap_contention),
            io_latency_s=_latencies(cfg.io_latency_s), op_tables=_op_tables(cfg.op_tables),
            bw_network=parse_rate(cfg.bw_network, "bw_network"),
            network_latency_s=_network_latency(cfg.network_latency_s), **speeds)

    def op_table(self, spec, dtype_bytes: int) -> OpTable | None:
        """The measured operator times of this model's shapes, if calibrate measured them."""
        return self.op_tables.get(shape_key(spec, dtype_bytes))

    def latency(self, link: str) -> float:
        """Seconds each copy on `link` costs beyond its bytes over the bandwidth."""
        return self.io_latency_s.get(link, 0.0)

    def workers(self) -> int:
        """The engine's I/O workers on this machine (the cost model, LP and simulator share
        each window's transfers among them)."""
        return self.io_workers or IO_THREADS

    def missing_speeds(self) -> list[str]:
        return [key for key in SPEED_FIELDS if getattr(self, key) is None]

    def require_speeds(self) -> None:
        missing = self.missing_speeds()
        if missing:
            raise ConfigError(f"hardware={self.name} has no speeds for {', '.join(missing)}; "
                              "predictions need them (a preset with speeds, or calibrate)")

    def require_network(self) -> None:
        """A pipeline over several machines needs the link between them."""
        missing = [key for key in NETWORK_FIELDS if getattr(self, key) is None]
        if missing:
            raise ConfigError(f"hardware={self.name} has no {' or '.join(missing)}: a "
                              "pipeline's stages send activations over the network; allowed: "
                              "a profile with both (e.g. hardware=t4-paper-x4), or "
                              "hardware.bw_network=4GB/s hardware.network_latency_s=0.00025")

    def network_seconds(self, nbytes: float) -> float:
        """One message of nbytes from a stage to the next: latency + bytes / bandwidth."""
        return self.network_latency_s + nbytes / self.bw_network

    def cpu_flops_for(self, gpu_batch_size: int, hidden: int) -> float:
        """CPU attention FLOP/s with the original's correction (facts §1):
        cpu_flops x max(0.1, 1 + c1 A B - c2 A - c3 B), A = max(0, log2(64 / gbs)),
        B = max(0, log2(4096 / h))."""
        c1, c2, c3 = self.cpu_correction
        a = max(0.0, math.log2(64 / gpu_batch_size))
        b = max(0.0, math.log2(4096 / hidden))
        return self.cpu_flops * max(0.1, 1 + c1 * a * b - c2 * a - c3 * b)

    def replace(self, **changes) -> HardwareProfile:
        return dataclasses.replace(self, **changes)


def _latencies(value) -> dict[str, float]:
    """hardware.io_latency_s: {link: seconds}, links from engine/transfer.LINKS."""
    out = {}
    for link, seconds in dict(value or {}).items():
        if link not in LINKS or not isinstance(seconds, int | float) or not 0 <= seconds < 1:
            raise ConfigError(f"hardware.io_latency_s.{link}={seconds!r}: expected seconds in "
                              f"[0, 1) per link; links: {', '.join(LINKS)}")
        out[link] = float(seconds)
    return out


def _network_latency(value) -> float | None:
    """hardware.network_latency_s: seconds per message between stages, in [0, 1)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ConfigError(f"hardware.network_latency_s={value!r}: expected seconds per "
                          "message in [0, 1), e.g. 0.00025")
    return float(value)


def _op_tables(value) -> dict[str, OpTable]:
    """hardware.op_tables: {shape key: {op: [[size, seconds], ...]}} as calibrate writes."""
    out = {}
    for key, table in dict(value or {}).items():
        try:
            out[key] = OpTable.from_json(dict(table))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"hardware.op_tables.{key}: {err}; write it with "
                              "`calibrate model=NAME`") from None
    return out
