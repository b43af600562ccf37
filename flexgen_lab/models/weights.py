"""Weight sources: per-part tensors (embedding, one layer, output head) from dummy or local files.

A part is ("embed", None), ("layer", j) or ("head", None). Parameter names inside a part are
the HF checkpoint's names with the layer prefix removed (see models/opt.py, models/llama.py).
A tied output head has no tensor of its own: whoever runs the head passes the embedding's.
Sources hand out one part at a time so a model bigger than memory never exists whole.

    >>> src = DummyWeights(ModelSpec.from_name("opt-125m"), seed=0)
    >>> src.part("layer", 3, torch.float32)["fc1.weight"].shape   # (3072, 768)
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from flexgen_lab.models import families
from flexgen_lab.models.spec import ModelSpec

PARTS = ("embed", "layer", "head")
EMBED_STD = 0.02  # as HF's init; larger makes tied-embedding models echo their input


def part_shapes(spec: ModelSpec, part: str) -> dict[str, tuple[int, ...]]:
    if part == "embed":
        return spec.embedding_param_shapes()
    if part == "layer":
        return spec.layer_param_shapes()
    if part == "head":
        return spec.head_param_shapes()
    raise ValueError(f"weight part {part!r}; allowed: {PARTS}")


def loaded_shapes(spec: ModelSpec, part: str) -> dict[str, tuple[int, ...]]:
    """The tensors a part's step reads: its own, and for the head of a model with tied
    embeddings the embedding matrix too (one home, loaded by both ends). The one place the
    tied-head rule is written; the traffic, memory and cost models and the operator tables
    read it here."""
    shapes = dict(part_shapes(spec, part))
    if part == "head" and spec.tie_embeddings:
        shapes["embed_tokens.weight"] = (spec.vocab, spec.hidden)
    return shapes


def part_names(spec: ModelSpec) -> list[tuple[str, int | None]]:
    """Every part of a model in execution order."""
    return [("embed", None), *[("layer", j) for j in range(spec.num_layers)], ("head", None)]


class DummyWeights:
    """Seeded random weights, deterministic per (seed, part, layer, name), order-independent.

    Scales keep activations O(1) through any depth so greedy tokens depend on the input (an
    all-ones model would hide wrong math): matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02^2),
    norm scales ~ 1 + N(0, 0.1^2), biases and norm shifts ~ N(0, 0.02^2).
    """

    def __init__(self, spec: ModelSpec, seed: int):
        self.spec = spec
        self.seed = seed

    def identity(self) -> str:
        return f"dummy:{self.spec.name}:seed={self.seed}"

    def part(self, part: str, layer: int | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, shape in part_shapes(self.spec, part).items():
            tensors[name] = self._tensor(part, layer, name, shape).to(dtype)
        return tensors

    def _tensor(self, part: str, layer: int | None, name: str, shape: tuple[int, ...]):
        key = f"{self.seed}/{part}/{layer}/{name}".encode()
        gen = torch.Generator().manual_seed(zlib.crc32(key))
        x = torch.randn(shape, generator=gen)
        if name.startswith("embed"):
            return x * EMBED_STD
        if "norm" in name and name.endswith("weight"):
            return 1.0 + 0.1 * x
        if len(shape) == 1:
            return 0.02 * x
        return x * shape[1] ** -0.5


def safetensors_files(path: str | Path) -> list[Path]:
    """A model directory's weight files; ValueError naming model.path when it has none."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in Path(path).glob("*.bin")) + sorted(
            p.name for p in Path(path).glob("*.pt"))
        found = f" (found {', '.join(pickles)}: pickle checkpoints are refused)" if pickles else ""
        raise ValueError(f"model.path={str(path)!r} has no *.safetensors files{found}; "
                         "allowed: a directory with config.json and *.safetensors (convert "
                         "with transformers' save_pretrained(..., safe_serialization=True))")
    return files


def safetensors_keys(file: Path, model_path: str | Path) -> list[str]:
    """The tensor names in a safetensors file's header; ValueError naming the file and
    model.path when it is corrupt or truncated (the header covers the whole file)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise ValueError(f"model.path={str(model_path)!r}: {file.name} is not a valid "
                         f"safetensors file ({err}); download or save it again; allowed: a "
                         "directory with config.json and valid *.safetensors") from None


class LocalWeights:
    """A Hugging Face directory: config.json plus *.safetensors (never pickle)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.spec = ModelSpec.from_hf_config(self.path)
        self._family = families.get(self.spec.family)
        self._files = safetensors_files(path)
        self._key_to_file = self._index()

    def identity(self) -> str:
        """Changes whenever a weight file changes (name, size, mtime)."""
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in self._files]
        return f"local:{self.path.resolve()}:{json.dumps(stats)}"

    def _index(self) -> dict[str, Path]:
        index: dict[str, Path] = {}
        for file in self._files:
            index |= {key: file for key in safetensors_keys(file, self.path)}
        return index

    def part(self, part: str, layer: int | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        tensors = {}
        for name, shape in part_shapes(self.spec, part).items():
            key = self._family.hf_key(name, "embed" if name.startswith("embed") else part, layer)
            tensor = self._read(key)
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{key} has shape {tuple(tensor.shape)}, expected {shape}")
            tensors[name] = tensor.to(dtype)
        return tensors

    def _read(self, key: str) -> torch.Tensor:
        if key not in self._key_to_file:
            raise ValueError(f"weight {key!r} is missing from {self.path}")
        with safe_open(str(self._key_to_file[key]), framework="pt") as f:
            return f.get_tensor(key)


def open_weights(spec_name: str, path: str | None, seed: int):
    """The weight source for a run: a .gguf file or a local directory when a path is given,
    else dummy weights."""
    if path and str(path).endswith(".gguf"):
        from flexgen_lab.models.gguf import GGUFWeights

        return GGUFWeights(path, name=spec_name)
    if path:
        return LocalWeights(path)
    return DummyWeights(ModelSpec.from_name(spec_name), seed)
