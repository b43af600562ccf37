"""What verifying the weight cache costs, both ways, on opt-1.3b with its weights on disk.

    python -m benchmarks.weight_cache_verify                     # opt-1.3b, bfloat16
    python -m benchmarks.weight_cache_verify --model opt-125m --gen-len 4

Three ways to open and read the same cache (built once, page cache bypassed), in turn:
  none     trust the manifest: no verification (the figure the other two are compared with)
  open     verify every chunk of every file once when the cache is opened (what
           flexgen_lab does: engine/weight_cache.py)
  read     verify on the I/O workers as chunks arrive: every read of a part's disk rows also
           hashes the chunks it covers, reading the edge chunks it covers only partly
Prints the seconds to open the cache and to generate (prefill + decode) for each, the
median of --repeats runs; also xxh3-64 against zlib.crc32 over the same bytes in memory.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import zlib
from pathlib import Path

import torch

from flexgen_lab.checks import compute_device
from flexgen_lab.engine import engine as engine_module
from flexgen_lab.engine.disk import DiskFile, aligned_empty
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.engine.weight_cache import WeightCache, digest, read_manifest
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.runner import device_name
from flexgen_lab.workload import synthetic_prompts


class TrustingCache(WeightCache):
    """No verification: the manifest is read and believed."""

    def check(self):
        return read_manifest(self.dir / "manifest.json"), None


class VerifyingFile:
    """A cache file whose reads hash every chunk they touch (edges read whole, once each)."""

    def __init__(self, file: DiskFile, chunks: list[str], chunk: int):
        self.file, self.chunks, self.chunk = file, chunks, chunk
        self.local = threading.local()

    def read_into(self, offset: int, dst: torch.Tensor) -> int:
        raw = dst.reshape(-1).view(torch.uint8)
        n, c = raw.numel(), self.chunk
        for i in range(offset // c, -(-(offset + n) // c)):
            lo, hi = i * c, min((i + 1) * c, self.file.nbytes)
            if lo >= offset and hi <= offset + n:  # wholly inside: read in place, hash it
                self.file.read_into(lo, raw[lo - offset:hi - offset])
                data = raw[lo - offset:hi - offset]
            else:  # an edge: read the whole chunk aside, hash it, copy out the asked bytes
                buf = getattr(self.local, "buf", None)
                if buf is None:
                    buf = self.local.buf = aligned_empty(c)
                data = buf[:hi - lo]
                self.file.read_into(lo, data)
                a, b = max(lo, offset), min(hi, offset + n)
                raw[a - offset:b - offset].copy_(data[a - lo:b - lo])
            if digest(data.numpy()) != self.chunks[i]:
                raise ValueError(f"{self.file.path}: chunk {i} does not match")
        return n

    def close(self) -> None:
        self.file.close()


class ReadVerifyingCache(TrustingCache):
    def file(self, key: str):
        if key not in self._files:
            entry = self.manifest["files"][f"{key}.bin"]
            inner = DiskFile(self.dir / f"{key}.bin", None, self.mode, create=False)
            self._files[key] = VerifyingFile(inner, entry["chunks"], self.manifest["chunk_bytes"])
        return self._files[key]


WAYS = {"none": TrustingCache, "open": WeightCache, "read": ReadVerifyingCache}


def one_run(way: str, spec, dtype, offload: str, ids, mask, gen_len: int) -> tuple[float, float]:
    """(seconds to open the cache, seconds to generate) with the cache class of `way`."""
    engine_module.WeightCache = WAYS[way]
    try:
        start = time.perf_counter()
        cache = WAYS[way](offload, DummyWeights(spec, 0), spec, dtype, None, "direct")
        opened = time.perf_counter() - start
        cache.close()
        with Engine(spec, DummyWeights(spec, 0), Policy(gpu_batch_size=ids.shape[0],
                                                        weights=Placement(0, 0)),
                    device=compute_device(), dtype=dtype, offload_dir=offload) as engine:
            gen = engine.generate(ids, mask, gen_len)
        return opened, gen.prefill_s + gen.decode_s
    finally:
        engine_module.WeightCache = WeightCache


def hash_rates(offload: str) -> dict[str, float]:
    """GB/s of xxh3-64 and zlib.crc32 over one cache file's bytes, in memory."""
    path = max(Path(offload).rglob("layer*.bin"), key=lambda p: p.stat().st_size)
    data = path.read_bytes()
    rates = {}
    for name, fn in (("xxh3_64", digest), ("crc32", zlib.crc32)):
        start = time.perf_counter()
        for _ in range(5):
            for i in range(0, len(data), 4 << 20):
                fn(memoryview(data)[i:i + (4 << 20)])
        rates[name] = 5 * len(data) / (time.perf_counter() - start) / 1e9
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-1.3b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gen-len", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--offload", default=tempfile.gettempdir() + "/flexgen_lab_verify")
    args = parser.parse_args()
    spec, dtype = ModelSpec.from_name(args.model), getattr(torch, args.dtype)
    ids, mask = synthetic_prompts(spec, 1, 16, seed=0)
    start = time.perf_counter()
    cache = WeightCache(args.offload, DummyWeights(spec, 0), spec, dtype, None, "direct")
    size = sum(e["size"] for e in cache.manifest["files"].values())
    cache.close()
    print(f"{spec.name} {args.dtype}, cache {size / 1e9:.2f} GB in {cache.dir} (ready in "
          f"{time.perf_counter() - start:.1f} s), batch 1, prompt 16, {args.gen_len} new "
          f"tokens, weights on the disk tier, {device_name(compute_device())}; "
          f"medians of {args.repeats} (measured)")
    times = {way: [] for way in WAYS}
    for _ in range(args.repeats):  # interleaved: the machine's drift hits every way alike
        for way in WAYS:
            times[way].append(one_run(way, spec, dtype, args.offload, ids, mask, args.gen_len))
    base = statistics.median(g for _, g in times["none"])
    for way, runs in times.items():
        opened = statistics.median(o for o, _ in runs)
        gen = statistics.median(g for _, g in runs)
        print(f"  {way:5s} open {opened:7.2f} s  generate {gen:7.2f} s  (generate "
              f"{100 * (gen / base - 1):+5.1f} % vs none; open + generate "
              f"{opened + gen:7.2f} s, spread {min(g for _, g in runs):.2f}-"
              f"{max(g for _, g in runs):.2f} s)")
    rates = hash_rates(args.offload)
    print("  hash in memory: " + ", ".join(f"{k} {v:.1f} GB/s" for k, v in rates.items()))


if __name__ == "__main__":
    main()
