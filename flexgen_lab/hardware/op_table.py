"""Operator time tables: seconds of each compute operator at a model's own shapes.

One FLOP rate per phase cannot describe a CPU whose BLAS is not monotone in batch size (this
machine's head matmul takes longer at 8 rows than at 16) nor the fixed cost of a small
kernel. Simulators that predict within a few percent (Vidur) profile each operator at the
shapes the model really runs and interpolate; so does this module. `calibrate model=NAME`
times the model's own operator functions (models/<family>.py, models/ops.py, the engine's
decode attention) with random weights over a grid of sizes fixed here, before any validation:

    dense             a decoder layer minus its attention core (norms, projections, MLP) on
                      `rows` = batch x tokens token rows
    attention_decode  one decode step's attention: size = batch x keys
    attention_prefill the prompt's causal attention: size = batch x prompt x prompt
    head              final norm and output projection of `rows` rows (the last position)
    embed             token (and position) embedding of `rows` rows
    dequant_layer     dequantising one decoder layer's compressed matrices (size 1: one
    dequant_embed     part, at the model's own shapes; the rate depends on the shape by 2-4x
    dequant_head      on a CPU, so one bytes/s figure misses it)
    dequant_cache     dequantising past keys and values: size = batch x keys
    quant_cache       quantising the keys and values a step stores: size = batch x tokens
    attention_decode_decoded
                      attention_decode over a compressed cache's decoded past, in the dtype
                      it decodes into (cache_homes.decoded_dtype): measured only where that
                      differs from the compute dtype (a half type on a CPU, which attends in
                      float32, about 2x faster there); elsewhere attention_decode stands

The compression operators are measured at 4 bits in groups of 64 (the paper's setting) and
are optional in a stored table: without them the cost model uses the profile's dequant_rate.

Each op's grid is powers of two, cut where one call passes MAX_CALL_S (the rest is
extrapolated at the last point's rate). A profile stores tables keyed by shape (`shape_key`),
so one profile holds several models; the cost model and the simulator look times up
(`OpTable.seconds`), interpolating linearly between grid points, and fall back to the
profile's FLOP rates for a model without a table (as for the paper's T4).

    >>> table = measure_table(spec, torch.float32, torch.device("cpu"), quick=True)
    >>> table.seconds("dense", 48)     # seconds for 48 token rows
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexgen_lab.engine import compress
from flexgen_lab.engine.attention import decode_attention
from flexgen_lab.engine.cache_homes import cache_group, decoded_dtype
from flexgen_lab.models import families, ops
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import loaded_shapes

OPS = ("dense", "attention_decode", "attention_prefill", "head", "embed")
COMPRESSION_OPS = ("dequant_layer", "dequant_embed", "dequant_head", "dequant_cache",
                   "quant_cache", "attention_decode_decoded")
MIN_SAMPLE_S = 0.05  # short calls are repeated until they add up to this
MAX_CALL_S = 0.5  # a grid stops growing past a call this long: beyond it time is linear
GRID_EXPONENTS = {  # log2 of the sizes measured per op (full grid; quick takes every other)
    "dense": range(0, 13),  # 1 .. 4096 token rows
    "attention_decode": range(5, 18),  # batch x keys: 32 .. 128k
    "attention_prefill": range(8, 23),  # batch x s x s: 16^2 .. 2048^2
    "head": range(0, 10),  # 1 .. 512 rows
    "embed": range(0, 13),
    "dequant_layer": range(0, 1), "dequant_embed": range(0, 1), "dequant_head": range(0, 1),
    "dequant_cache": range(5, 18),  # batch x keys, as attention_decode
    "quant_cache": range(0, 13),  # batch x tokens, as dense
    "attention_decode_decoded": range(5, 18),  # as attention_decode
}
DEQUANT_CONFIG = (4, 64)  # bits, group size


def shape_key(spec: ModelSpec, dtype_bytes: int) -> str:
    """What an operator's time depends on: the family, the matrix shapes and the element
    size (bf16 and fp16 share a key: calibrate with the dtype you run)."""
    return (f"{spec.family}-h{spec.hidden}-f{spec.ffn}-nh{spec.num_heads}-kv{spec.num_kv_heads}"
            f"-v{spec.vocab}-{dtype_bytes}B")


@dataclass(frozen=True)
class OpTable:
    """op -> ((size, seconds), ...) sorted by size."""

    points: dict[str, tuple[tuple[float, float], ...]]

    def seconds(self, op: str, size: float) -> float:
        """Seconds of one call at `size`: linear between grid points, the smallest point's
        time below the grid (a call's fixed cost), the last point's rate above it."""
        if size <= 0:
            return 0.0
        pts = self.points[op]
        sizes = [s for s, _ in pts]
        i = bisect.bisect_left(sizes, size)
        if i == 0:
            return pts[0][1]
        if i == len(pts):
            return pts[-1][1] * size / pts[-1][0]
        (s0, t0), (s1, t1) = pts[i - 1], pts[i]
        return t0 + (t1 - t0) * (size - s0) / (s1 - s0)

    def scaled(self, factors: dict[str, float]) -> OpTable:
        """Every time of op divided by factors[op] (a speed factor, as the fit applies)."""
        return OpTable({op: tuple((s, t / factors.get(op, 1.0)) for s, t in pts)
                        for op, pts in self.points.items()})

    def has(self, op: str) -> bool:
        return op in self.points

    def to_json(self) -> dict[str, list[list[float]]]:
        return {op: [[s, t] for s, t in pts] for op, pts in self.points.items()}

    @staticmethod
    def from_json(data: dict) -> OpTable:
        missing = [op for op in OPS if op not in data]
        if missing:
            raise ValueError(f"operator table without {', '.join(missing)}; expected {OPS}")
        return OpTable({op: tuple(sorted((float(s), float(t)) for s, t in data[op]))
                        for op in (*OPS, *COMPRESSION_OPS) if op in data})


def _fastest_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """The fastest of at least `repeats` calls after a warm-up (more for short calls, up to
    MIN_SAMPLE_S of calls): another process can only add time to a call, never take it away."""
    fn()
    sync()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < MIN_SAMPLE_S and len(times) < 50):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def _weights(spec: ModelSpec, part: str, dtype, device) -> dict[str, torch.Tensor]:
    shapes = loaded_shapes(spec, part)
    gen = torch.Generator().manual_seed(0)
    return {name: (torch.randn(shape, generator=gen) * shape[-1] ** -0.5).to(device, dtype)
            for name, shape in shapes.items()}


class _Operators:
    """The model's operator functions, as the engine's compute step calls them."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device):
        self.spec, self.dtype, self.device = spec, dtype, device
        self.family = families.get(spec.family)
        self.layer = _weights(spec, "layer", dtype, device)
        self.head_w = _weights(spec, "head", dtype, device)
        self.embed_w = _weights(spec, "embed", dtype, device)
        self.scale = families.score_scale(spec)

    def _hidden(self, rows: int) -> torch.Tensor:
        return torch.randn(1, rows, self.spec.hidden, dtype=self.dtype, device=self.device)

    def dense(self, size: int) -> Callable[[], object]:
        x, positions = self._hidden(size), torch.arange(size, device=self.device)[None]
        attn = torch.randn(1, size, self.spec.q_dim, dtype=self.dtype, device=self.device)

        def run():
            self.family.attention_inputs(self.spec, self.layer, x, positions)
            y = self.family.attention_output(self.spec, self.layer, attn, x)
            return self.family.mlp(self.spec, self.layer, y)
        return run

    def _attention(self, batch: int, queries: int, keys: int) -> Callable[[], object]:
        s, d = self.spec, self.spec.head_dim
        q = torch.randn(batch, s.num_heads, queries, d, dtype=self.dtype, device=self.device)
        k = torch.randn(batch, s.num_kv_heads, keys, d, dtype=self.dtype, device=self.device)
        v = torch.randn_like(k)
        key_mask = torch.ones(batch, keys, dtype=torch.bool, device=self.device)
        mask = ops.attention_mask(key_mask, keys - queries, queries)
        return lambda: ops.attention(q, k, v, mask, self.scale)

    def attention_decode(self, size: int, dtype: torch.dtype | None = None
                         ) -> Callable[[], object]:
        """The engine's decode attention (engine/attention.py: a token-major cache), in the
        compute dtype or `dtype` (a compressed cache's decoded past)."""
        keys = min(size, 1024)  # sizes above it grow the batch: batch x keys is what counts
        batch, s, d = max(1, size // keys), self.spec, self.spec.head_dim
        dtype = dtype or self.dtype
        q = torch.randn(batch, s.num_heads, 1, d, dtype=dtype, device=self.device)
        k = torch.randn(keys, batch, s.num_kv_heads, d, dtype=dtype, device=self.device)
        v = torch.randn_like(k)
        key_mask = torch.ones(batch, keys, dtype=torch.bool, device=self.device)
        return lambda: decode_attention(q, k, v, key_mask, self.scale)

    def attention_prefill(self, size: int) -> Callable[[], object]:
        prompt = max(1, round(size ** 0.5))
        return self._attention(1, prompt, prompt)

    def head(self, size: int) -> Callable[[], object]:
        x = self._hidden(size)
        return lambda: self.family.head(self.spec, self.head_w, x)

    def embed(self, size: int) -> Callable[[], object]:
        ids = torch.randint(0, self.spec.vocab, (1, size), device=self.device)
        positions = torch.arange(size, device=self.device)[None] % self.spec.max_positions
        return lambda: self.family.embed(self.spec, self.embed_w, ids, positions)


class _Compressors:
    """What the engine dequantises and quantises, at the model's shapes
    (weight_homes.compute_view: each compressed matrix of a part, into the workspace it
    reuses; cache_homes.unpack: past keys and values; cache_homes.stored: the keys and values
    a step stores)."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                 operators: _Operators):
        self.spec, self.dtype, self.device = spec, dtype, device
        self.operators = operators
        # what cache_io decodes the past into, in the dtype attention reads
        self.decoded = decoded_dtype(dtype, "gpu", device.type == "cpu")

    def _part(self, part: str) -> Callable[[], object]:
        config = compress.CompressionConfig(*DEQUANT_CONFIG, 0)  # as weight homes pack
        matrices = [w for w in _weights(self.spec, part, self.dtype, self.device).values()
                    if w.dim() >= 2]
        packed = [compress.quantize(w, config) for w in matrices]
        outs = [torch.empty_like(w) for w in matrices]  # the engine's dequant workspace
        return lambda: [compress.dequantize(c, out=o) for c, o in zip(packed, outs, strict=True)]

    def dequant_layer(self, size: int) -> Callable[[], object]:
        return self._part("layer")

    def dequant_embed(self, size: int) -> Callable[[], object]:
        return self._part("embed")

    def dequant_head(self, size: int) -> Callable[[], object]:
        return self._part("head")

    def dequant_cache(self, size: int) -> Callable[[], object]:
        keys = min(size, 1024)
        batch, s = max(1, size // keys), self.spec
        rows = torch.randn(keys, batch, s.num_kv_heads, s.head_dim, dtype=self.dtype,
                           device=self.device)
        packed = compress.quantize(rows, self._cache_config())
        work = torch.empty_like(rows, dtype=self.decoded)  # cache_io's dequant buffer
        return lambda: [compress.dequantize(packed, out=work) for _ in "kv"]

    def quant_cache(self, size: int) -> Callable[[], object]:
        s = self.spec
        rows = torch.randn(size, 1, s.num_kv_heads, s.head_dim, dtype=self.dtype,
                           device=self.device)
        config = self._cache_config()
        return lambda: [compress.quantize(rows, config) for _ in "kv"]

    def attention_decode_decoded(self, size: int) -> Callable[[], object]:
        return self.operators.attention_decode(size, self.decoded)

    def _cache_config(self) -> compress.CompressionConfig:
        """As cache homes pack (cache_homes.cache_config: groups dividing head_dim)."""
        bits, group = DEQUANT_CONFIG
        return compress.CompressionConfig(bits, cache_group(self.spec.head_dim, group), -1)


def measure_table(spec: ModelSpec, dtype: torch.dtype, device: torch.device, quick: bool,
                  progress: Callable[[str], None] | None = None) -> OpTable:
    """Time every operator over its grid (median of a few calls after a warm-up)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    operators, repeats = _Operators(spec, dtype, device), 2 if quick else 3
    compressors = _Compressors(spec, dtype, device, operators)
    points = {}
    with torch.inference_mode():
        for op in (*OPS, *COMPRESSION_OPS):
            if op == "attention_decode_decoded" and compressors.decoded == dtype:
                continue  # attention_decode is that time
            source = compressors if op in COMPRESSION_OPS else operators
            exponents = list(GRID_EXPONENTS[op])[:: 2 if quick else 1]
            points[op] = []
            for e in exponents:
                size = 2**e
                seconds = _fastest_seconds(getattr(source, op)(size), repeats, sync)
                points[op].append((float(size), seconds))
                if seconds > MAX_CALL_S:
                    break
            if progress:
                progress(f"{op}: {len(points[op])} sizes up to {int(points[op][-1][0])}")
    return OpTable({op: tuple(pts) for op, pts in points.items()})
