"""The weight cache: weights in their stored form, kept on disk for the disk tier and reused.

    <offload_dir>/weight_cache/<key>/manifest.json, embed.bin, layer0000.bin, ..., head.bin

The key covers everything that changes the bytes: model identity (preset and seed, or the
files' names, sizes and mtimes), dtype and compression. A cache is written in a temporary
directory owned by this process (engine/owners.py) and renamed into place whole, so a
complete cache is exactly a directory with a manifest; a killed build leaves only the
temporary directory, which a later run removes.

Integrity. The manifest records each file's size and an xxh3-64 digest of every aligned
CHUNK_BYTES chunk (chunk i covers bytes [i * CHUNK_BYTES, (i + 1) * CHUNK_BYTES)), plus a
digest of itself. Opening a cache verifies all of it once, before any weight is placed;
verifying each read on the I/O workers instead was measured slower (benchmarks/
weight_cache_verify.py: the rows a run reads rarely start or end on a chunk boundary, so
every read also reads its edge chunks, every token) and could only fail a run midway, where
a check at open can still rebuild. A mismatch, a short or missing file or a damaged
manifest never reaches a run: by default (engine.weight_cache=rebuild) the cache is rebuilt
from the source weights with a WeightCacheWarning naming the file; with
engine.weight_cache=verify a WeightCacheError names the file and how to rebuild.

    >>> cache = WeightCache("results/offload", source, spec, torch.float16, None, "direct")
    >>> list_caches("results/offload")      # what `python -m flexgen_lab cache` prints
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from flexgen_lab.engine.disk import ALIGN, DiskFile, aligned_empty
from flexgen_lab.engine.owners import CACHE_DIR, is_alive, owner_of, temporary_name
from flexgen_lab.engine.weight_homes import part_key, stored_arrays
from flexgen_lab.models.weights import part_names
from flexgen_lab.units import round_up

CHUNK_BYTES = 4 << 20  # a multiple of ALIGN: chunks are read with O_DIRECT
FORMAT = 2  # 1: the manifest held offsets only (no sizes, no digests)
MODES = ("rebuild", "verify")  # engine.weight_cache
MANIFEST = "manifest.json"
_ZEROS = bytes(ALIGN)  # array padding is always shorter than one block


class WeightCacheError(RuntimeError):
    """A damaged cache under engine.weight_cache=verify, or a build that failed."""


class WeightCacheWarning(UserWarning):
    """A damaged cache found and rebuilt (engine.weight_cache=rebuild)."""


def digest(data) -> str:
    return xxhash.xxh3_64_hexdigest(data)


class _ChunkDigests:
    """Digests of a file's bytes, CHUNK_BYTES at a time, fed in order."""

    def __init__(self):
        self.digests: list[str] = []
        self._hash, self._filled = xxhash.xxh3_64(), 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), CHUNK_BYTES - self._filled)
            self._hash.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == CHUNK_BYTES:
                self._close_chunk()

    def finish(self) -> list[str]:
        if self._filled:
            self._close_chunk()
        return self.digests

    def _close_chunk(self) -> None:
        self.digests.append(self._hash.hexdigest())
        self._hash, self._filled = xxhash.xxh3_64(), 0


def write_manifest(path: Path, body: dict) -> None:
    """The manifest with a digest of its own canonical text, so any damage that changes
    what it says is found."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    path.write_text(json.dumps({"xxh3_64": digest(text.encode()), **body},
                               sort_keys=True, separators=(",", ":")))


def read_manifest(path: Path) -> dict:
    """The manifest's body; ValueError when it is damaged or of another format."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "xxh3_64" not in data:
        raise ValueError("it has no digest of itself (written by an older flexgen_lab)")
    recorded = data.pop("xxh3_64")
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    if digest(text.encode()) != recorded:
        raise ValueError("its content does not match its digest")
    if data.get("format") != FORMAT:
        raise ValueError(f"format {data.get('format')!r}, this flexgen_lab writes {FORMAT}")
    return data


def cache_key(source, dtype, config) -> tuple[str, str]:
    """(key, identity): the identity says what the bytes are; the key is its digest."""
    identity = f"{source.identity()}|{dtype}|{config}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16], identity


class WeightCache:
    """Read-only stored-form weight files on disk: <root>/weight_cache/<key>/<part>.bin."""

    def __init__(self, root: str | Path, source, spec, dtype, config, disk_io: str,
                 mode: str = "rebuild"):
        if mode not in MODES:
            raise ValueError(f"engine.weight_cache={mode!r}: allowed values are {list(MODES)}")
        self.key, identity = cache_key(source, dtype, config)
        self.dir = Path(root) / CACHE_DIR / self.key
        self.mode = disk_io
        self._files: dict[str, DiskFile] = {}
        self.manifest = self._verified(mode) if self.dir.exists() else None
        if self.manifest is None:
            self.manifest = self._build(source, spec, dtype, config, identity)
        _touch(self.dir)

    # --- opening and verifying ----------------------------------------------------------

    def _verified(self, mode: str) -> dict | None:
        """The manifest of the cache in place when all of it checks out; else None (the
        cache removed, to be rebuilt) or, under mode verify, WeightCacheError."""
        manifest, problem = self.check()
        if problem is None:
            return manifest
        where = f"weight cache {self.dir}: {problem}"
        if mode == "verify":
            raise WeightCacheError(
                f"{where}; rebuild it with `python -m flexgen_lab cache clear {self.key} "
                f"engine.offload_dir={self.dir.parent.parent}` (the next run writes it "
                "again) or run with engine.weight_cache=rebuild")
        warnings.warn(f"{where}; rebuilding it from the source weights", WeightCacheWarning,
                      stacklevel=3)
        discard(self.dir)
        return None

    def check(self) -> tuple[dict | None, str | None]:
        """(manifest, None) when every file has its recorded size and every chunk its
        digest; (None, what is wrong, naming the file) otherwise."""
        try:
            manifest = read_manifest(self.dir / MANIFEST)
        except FileNotFoundError:
            return None, f"{MANIFEST} is missing"
        except (OSError, ValueError) as err:
            return None, f"{MANIFEST} is damaged ({err})"
        buf = aligned_empty(manifest["chunk_bytes"])
        for name, entry in manifest["files"].items():
            problem = self._file_problem(name, entry, buf)
            if problem:
                return None, problem
        return manifest, None

    def _file_problem(self, name: str, entry: dict, buf) -> str | None:
        try:
            f = DiskFile(self.dir / name, None, self.mode, create=False)
        except FileNotFoundError:
            return f"{name} is missing"
        with f:
            if f.nbytes != entry["size"]:
                return f"{name} holds {f.nbytes} bytes, the manifest says {entry['size']}"
            chunk = buf.numel()
            for i, expected in enumerate(entry["chunks"]):
                n = min(chunk, f.nbytes - i * chunk)
                f.read_into(i * chunk, buf[:n])
                if digest(buf[:n].numpy()) != expected:
                    return (f"{name}: bytes {i * chunk}-{i * chunk + n} do not match their "
                            "checksum")
        return None

    # --- building -----------------------------------------------------------------------

    def _build(self, source, spec, dtype, config, identity: str) -> dict:
        """Write every part to a temporary directory, then rename it into place (atomic)."""
        tmp = self.dir.parent / temporary_name(f".{self.key}")
        body = {"format": FORMAT, "identity": identity, "chunk_bytes": CHUNK_BYTES,
                "parts": {}, "files": {}}
        try:
            tmp.mkdir(parents=True)
            for part, layer in part_names(spec):
                key = part_key(part, layer)
                body["parts"][key], body["files"][f"{key}.bin"] = self._write_part(
                    tmp / f"{key}.bin", source.part(part, layer, dtype), config)
            write_manifest(tmp / MANIFEST, body)
            os.replace(tmp, self.dir)
        except OSError as err:
            if not (self.dir / MANIFEST).exists():  # else another job built it first: use it
                raise WeightCacheError(f"building the weight cache {self.dir} failed: {err}; "
                                       "nothing of it is left") from err
            body = read_manifest(self.dir / MANIFEST)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return body

    def _write_part(self, path: Path, tensors: dict, config) -> tuple[dict, dict]:
        """One part's arrays at aligned offsets: (layout name -> array -> offset, the file's
        size and chunk digests)."""
        layout, arrays, offset = {}, [], 0
        for name, tensor in tensors.items():
            layout[name] = {}
            for array, (value, _) in stored_arrays(tensor, config, f"{path.stem}.{name}").items():
                layout[name][array] = offset
                arrays.append((offset, value.contiguous()))
                offset += round_up(value.nbytes, ALIGN)
        size = max(offset, ALIGN)
        digests = _ChunkDigests()
        with DiskFile(path, size, self.mode) as f:
            for start, value in arrays:  # in file order: the padding between them is zeros
                f.write_from(start, value)
                digests.update(value.reshape(-1).view(torch.uint8).numpy())
                digests.update(_ZEROS[:-value.nbytes % ALIGN])
            if not arrays:
                digests.update(_ZEROS)
        return layout, {"size": size, "chunks": digests.finish()}

    # --- reading ------------------------------------------------------------------------

    def file(self, key: str) -> DiskFile:
        if key not in self._files:
            self._files[key] = DiskFile(self.dir / f"{key}.bin", None, self.mode, create=False)
        return self._files[key]

    def offset(self, key: str, name: str, array: str) -> int:
        return self.manifest["parts"][key][name][array]

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _touch(path: Path) -> None:
    """Last use: the directory's mtime (a shared read-only cache simply keeps its own)."""
    try:
        os.utime(path)
    except OSError:
        pass


def discard(path: Path) -> None:
    """Remove a cache directory: first renamed to a temporary name owned by this process, so
    no run ever sees half of it and a removal cut short is swept later like a killed build."""
    doomed = path.parent / temporary_name(f".{path.name}")
    try:
        os.replace(path, doomed)
    except FileNotFoundError:  # another process removed it first
        return
    shutil.rmtree(doomed, ignore_errors=True)


# --- listing and clearing (python -m flexgen_lab cache) ------------------------------------


@dataclass
class CacheEntry:
    key: str
    path: Path
    nbytes: int
    last_used: float  # seconds since the epoch
    identity: str  # what the bytes are; "damaged: ..." when the manifest is unreadable
    building: str | None = None  # for a temporary directory: "live" or "dead" owner


def _entry(path: Path, building: str | None = None) -> CacheEntry:
    files = [p for p in path.rglob("*") if p.is_file()]
    nbytes = sum(p.stat().st_size for p in files)
    try:
        identity = read_manifest(path / MANIFEST)["identity"] if building is None else ""
    except (OSError, ValueError, KeyError) as err:
        identity = f"damaged: {err}"
    return CacheEntry(path.name, path, nbytes, path.stat().st_mtime, identity, building)


def list_caches(offload_dir: str | Path) -> list[CacheEntry]:
    """Complete caches (newest use first), then temporary directories (builds, removals)."""
    root = Path(offload_dir) / CACHE_DIR
    if not root.is_dir():
        return []
    complete, temporary = [], []
    for path in sorted(root.iterdir()):
        owner = owner_of(path.name)
        if owner is not None:
            temporary.append(_entry(path, "live" if is_alive(owner) else "dead"))
        elif path.is_dir() and not path.name.startswith("."):
            complete.append(_entry(path))
    return sorted(complete, key=lambda e: -e.last_used) + temporary


def clear_caches(offload_dir: str | Path, which: str) -> list[CacheEntry]:
    """Remove the complete cache `which` (a key) or all of them, and leftovers of dead
    builds; returns what was removed. ValueError naming the keys when `which` is unknown."""
    entries = list_caches(offload_dir)
    complete = [e for e in entries if e.building is None]
    if which != "all" and which not in {e.key for e in complete}:
        keys = ", ".join(e.key for e in complete) or "none"
        raise ValueError(f"cache clear {which!r}: no such cache in "
                         f"{Path(offload_dir) / CACHE_DIR}; allowed: all, or a key ({keys})")
    doomed = [e for e in complete if which in ("all", e.key)]
    doomed += [e for e in entries if e.building == "dead"]
    for entry in doomed:
        discard(entry.path)
    return doomed


def format_caches(entries: list[CacheEntry]) -> str:
    if not entries:
        return "no weight caches"
    lines = [f"{'key':16s}  {'size':>12s}  {'last used':16s}  what"]
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        what = (e.identity if e.building is None
                else f"{e.key}: being written or removed ({e.building} owner)")
        key = e.key if e.building is None else "(temporary)"
        lines.append(f"{key:16s}  {e.nbytes / 2**20:8.1f} MiB  {when:16s}  {what}")
    lines.append(f"{sum(e.nbytes for e in entries) / 2**20:.1f} MiB in {len(entries)} "
                 "director" + ("y" if len(entries) == 1 else "ies"))
    return "\n".join(lines)
