"""The engine's weights as a Hugging Face checkpoint directory (or a GGUF file), for baselines
that load one.

Accelerate's big-model inference (and DeepSpeed's ZeRO-Inference) read a checkpoint from
disk, so a model bigger than memory never exists whole. A run on `model.path` hands them
that directory as it is; a run on dummy weights exports them once, in the run's dtype:

    <offload_dir>/weight_cache/<key>/config.json, model-00000.safetensors, ...,
                                     model.safetensors.index.json, manifest.json

The directory follows the weight cache's conventions (engine/weight_cache.py), so `python
-m flexgen_lab cache` lists and clears it: the key is a digest of what the bytes are, it is
written part by part (one layer in memory at a time) into a temporary directory owned by
this process and renamed into place whole; a killed export leaves only the temporary
directory, which the next run's sweep removes.

system=llamacpp gets a GGUF file the same way (gguf_file: `<key>/model.gguf`, the key
naming the GGUF export).

    >>> path = checkpoint_dir(weights, spec, torch.float32, "results/offload")
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from flexgen_lab.engine import owners
from flexgen_lab.engine.weight_cache import FORMAT, MANIFEST, cache_key, write_manifest
from flexgen_lab.models import families
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import LocalWeights, part_names

EXPORT = "hf-safetensors"  # the "compression" slot of the cache key: a checkpoint, not .bin
GGUF_EXPORT, GGUF_NAME = "llamacpp-gguf", "model.gguf"  # system=llamacpp's file


def checkpoint_dir(weights, spec: ModelSpec, dtype: torch.dtype, offload_dir: str) -> Path:
    """A transformers checkpoint holding exactly `weights`: model.path itself, or the export."""
    if isinstance(weights, LocalWeights):
        return weights.path
    return cached_export(weights, dtype, offload_dir, EXPORT,
                         lambda tmp: _write_checkpoint(weights, spec, dtype, tmp))


def gguf_file(weights, spec: ModelSpec, dtype: torch.dtype, offload_dir: str,
              rewrite: bool = False) -> Path:
    """A llama.cpp GGUF file holding exactly `weights`: model.path when it is a .gguf (unless
    `rewrite`: then its dequantised tensors in `dtype`), else written once
    (models/gguf_writer.py) into the weight cache as `<key>/model.gguf`."""
    from flexgen_lab.models.gguf import GGUFWeights
    from flexgen_lab.models.gguf_writer import write_gguf

    if isinstance(weights, GGUFWeights) and not rewrite:
        return weights.path
    target = cached_export(weights, dtype, offload_dir, GGUF_EXPORT,
                           lambda tmp: write_gguf(weights, spec, dtype, tmp / GGUF_NAME))
    return target / GGUF_NAME


def cached_export(weights, dtype: torch.dtype, offload_dir: str, kind: str, write) -> Path:
    """The cache directory for (weights, dtype, kind), made by `write(tmp_dir)` if absent."""
    key, identity = cache_key(weights, dtype, kind)
    target = Path(offload_dir) / owners.CACHE_DIR / key
    if not (target / MANIFEST).exists():
        _export(target, identity, write)
    os.utime(target)  # last use, as the weight cache records it
    return target


def _export(target: Path, identity: str, write) -> None:
    owners.sweep(target.parent.parent)  # half-written exports of killed runs
    tmp = target.parent / owners.temporary_name(f".{target.name}")
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        write_manifest(tmp / MANIFEST, {"format": FORMAT, "identity": f"{identity}",
                                        "parts": {}, "files": {}})
        os.replace(tmp, target)
    except OSError:
        if not (target / MANIFEST).exists():  # else another job exported it first: use it
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_checkpoint(weights, spec: ModelSpec, dtype: torch.dtype, tmp: Path) -> None:
    from flexgen_lab.baselines.hf_generate import hf_config

    hf_config(spec).save_pretrained(tmp)
    family, index = families.get(spec.family), {}
    for n, (part, layer) in enumerate(part_names(spec)):
        tensors = {}
        for name, tensor in weights.part(part, layer, dtype).items():
            key_part = "embed" if name.startswith("embed") else part
            tensors[family.hf_key(name, key_part, layer)] = tensor.contiguous()
        if not tensors:  # a tied head has no tensor of its own
            continue
        file = f"model-{n:05d}.safetensors"
        save_file(tensors, tmp / file, metadata={"format": "pt"})
        index |= {key: file for key in tensors}
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": index}, indent=1))
