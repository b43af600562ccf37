"""The weight cache checks itself: a damaged cache never gives an ok row with other tokens.

By default it is rebuilt from the source weights with a warning naming the file; under
engine.weight_cache=verify the run fails (one error row) naming the file and how to rebuild.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch

from flexgen_lab.__main__ import main
from flexgen_lab.compose import compose_run_config
from flexgen_lab.config import WEIGHT_CACHE
from flexgen_lab.engine import owners
from flexgen_lab.engine.engine import Engine
from flexgen_lab.engine.policy import Placement, Policy
from flexgen_lab.engine.weight_cache import (
    CHUNK_BYTES,
    MANIFEST,
    MODES,
    WeightCache,
    WeightCacheWarning,
    clear_caches,
    digest,
    list_caches,
)
from flexgen_lab.models.spec import ModelSpec
from flexgen_lab.models.weights import DummyWeights
from flexgen_lab.results.store import ResultStore
from flexgen_lab.runner import RunFailed, config_hash, run


def config(tmp_path, *extra: str):
    """opt-tiny with every weight on the disk tier: a run reads every byte of the cache."""
    return compose_run_config(["model=opt-tiny", "workload=tiny", "policy.weights.gpu=0",
                               "policy.weights.cpu=0", f"store.path={tmp_path}/r.sqlite",
                               f"engine.offload_dir={tmp_path}/off", *extra])


def the_cache(tmp_path):
    (path,) = (tmp_path / "off" / "weight_cache").iterdir()
    return path, json.loads((path / MANIFEST).read_text())


def flip(path, offset: int, mask: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def byte_in_read_rows(tmp_path):
    """A byte in the middle of layer 1's fc1 weight (every row of it is read)."""
    path, manifest = the_cache(tmp_path)
    flip(path / "layer0001.bin", manifest["parts"]["layer0001"]["fc1.weight"]["value"] + 999)
    return "layer0001.bin"


def manifest_byte(tmp_path):
    path, _ = the_cache(tmp_path)
    text = (path / MANIFEST).read_text()
    flip(path / MANIFEST, text.index('"fc2.weight"') + 20, 0x01)  # inside an offset
    return MANIFEST


def weight_to_inf(tmp_path):
    """The exponent bits of one float32 weight of the embedding set: it reads as inf."""
    path, manifest = the_cache(tmp_path)
    file = path / "embed.bin"
    offset = manifest["parts"]["embed"]["embed_tokens.weight"]["value"] + 4 * 100
    data = bytearray(file.read_bytes())
    (bits,) = struct.unpack_from("<I", data, offset)
    struct.pack_into("<I", data, offset, (bits & 0x80000000) | 0x7F800000)
    file.write_bytes(bytes(data))
    assert struct.unpack_from("<f", file.read_bytes(), offset)[0] in (float("inf"),
                                                                      float("-inf"))
    return "embed.bin"


@pytest.mark.parametrize("damage", [byte_in_read_rows, manifest_byte, weight_to_inf])
def test_damaged_cache_is_refused_or_rebuilt_never_read(tmp_path, damage):
    first = run(config(tmp_path))
    path, manifest = the_cache(tmp_path)
    pristine = {f: (path / f).read_bytes() for f in manifest["files"]}
    named = damage(tmp_path)
    with pytest.raises(RunFailed) as failed:
        run(config(tmp_path, "engine.weight_cache=verify"))
    message = str(failed.value)
    assert failed.value.status == "error" and named in message
    assert f"cache clear {path.name}" in message and "engine.weight_cache=rebuild" in message
    with pytest.warns(WeightCacheWarning, match=named.replace(".", r"\.")):
        again = run(config(tmp_path))
    assert {f: (path / f).read_bytes() for f in manifest["files"]} == pristine  # rebuilt
    store = ResultStore(tmp_path / "r.sqlite")
    rows = store.runs()
    assert list(rows.status) == ["ok", "error", "ok"] and named in rows.error[1]
    for run_id in (first.run_id, again.run_id):  # no ok row with other tokens
        assert store.tokens(run_id) == store.tokens(first.run_id)
    assert {p.name for p in (tmp_path / "off").iterdir()} == {"weight_cache"}
    assert [p.name for p in (tmp_path / "off" / "weight_cache").iterdir()] == [path.name]


def test_manifest_records_sizes_and_aligned_chunk_digests(tmp_path):
    spec = ModelSpec(name="wide-vocab", family="opt", num_layers=1, hidden=64, num_heads=4,
                     num_kv_heads=4, ffn=128, vocab=40000, max_positions=64)
    WeightCache(tmp_path, DummyWeights(spec, 0), spec, torch.float32, None, "direct").close()
    path, manifest = the_cache_at(tmp_path)
    assert manifest["chunk_bytes"] == CHUNK_BYTES
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert len(data) == entry["size"]
        assert entry["chunks"] == [digest(data[i:i + CHUNK_BYTES])
                                   for i in range(0, len(data), CHUNK_BYTES)]
    assert len(manifest["files"]["embed.bin"]["chunks"]) == 3  # 10.2 MB in 4 MiB chunks


def the_cache_at(root):
    (path,) = (root / "weight_cache").iterdir()
    return path, json.loads((path / MANIFEST).read_text())


@pytest.mark.parametrize("damage", ["truncated", "deleted", "no manifest", "old manifest"])
def test_short_missing_or_old_files_are_rebuilt(tmp_path, damage):
    spec, policy = ModelSpec.from_name("llama-tiny"), Policy(weights=Placement(0, 0.5))
    with Engine(spec, DummyWeights(spec, 0), policy, offload_dir=tmp_path):
        pass
    path, manifest = the_cache_at(tmp_path)
    layer = path / "layer0000.bin"
    if damage == "truncated":
        layer.write_bytes(layer.read_bytes()[:-4096])
    elif damage == "deleted":
        layer.unlink()
    elif damage == "no manifest":
        (path / MANIFEST).unlink()
    else:  # what flexgen_lab wrote before the manifest had digests
        (path / MANIFEST).write_text(json.dumps(manifest["parts"]))
    with pytest.warns(WeightCacheWarning, match="layer0000.bin|manifest.json"):
        with Engine(spec, DummyWeights(spec, 0), policy, offload_dir=tmp_path):
            pass
    assert the_cache_at(tmp_path)[1] == manifest


def test_weight_cache_mode_is_not_in_the_config_hash(tmp_path):
    hashes = {config_hash(config(tmp_path, f"engine.weight_cache={mode}"), "float32", "cpu")
              for mode in ("rebuild", "verify")}
    assert len(hashes) == 1


def test_caches_are_listed_and_cleared(tmp_path, capsys):
    for name in ("opt-tiny", "llama-tiny"):
        spec = ModelSpec.from_name(name)
        with Engine(spec, DummyWeights(spec, 0), Policy(weights=Placement(0, 0)),
                    offload_dir=tmp_path):
            pass
    gone = owners.Owner(owners.this_process().host, 2**22 + 1, 1)  # no such pid
    dead = tmp_path / "weight_cache" / f".0123456789abcdef-{gone.tag()}-0000abcd"
    dead.mkdir()
    entries = list_caches(tmp_path)
    complete = [e for e in entries if e.building is None]
    assert {e.identity.split("|")[0] for e in complete} == {"dummy:opt-tiny:seed=0",
                                                           "dummy:llama-tiny:seed=0"}
    assert all(e.nbytes == sum(p.stat().st_size for p in e.path.iterdir()) for e in complete)
    assert [e.building for e in entries if e.building] == ["dead"]
    with pytest.raises(ValueError, match="allowed: all, or a key"):
        clear_caches(tmp_path, "feedfacefeedface")
    removed = clear_caches(tmp_path, complete[0].key)
    assert {e.path for e in removed} == {complete[0].path, dead}
    assert [e.key for e in list_caches(tmp_path)] == [complete[1].key]
    main(["cache", f"engine.offload_dir={tmp_path}"])  # the command prints the same
    listed = capsys.readouterr().out
    assert complete[1].key in listed and "MiB" in listed and complete[0].key not in listed
    main(["cache", "clear", "all", f"engine.offload_dir={tmp_path}"])
    assert "removed 1 directory" in capsys.readouterr().out
    assert list_caches(tmp_path) == [] and list((tmp_path / "weight_cache").iterdir()) == []


def test_config_offers_the_modes_the_cache_implements():
    assert WEIGHT_CACHE == MODES
