"""Disk tier I/O: byte-exact round trips, concurrent writers, and the page cache left empty."""

from __future__ import annotations

import ctypes
import errno
import gc
import io
import mmap
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from flexgen_lab.engine import disk
from flexgen_lab.engine.disk import ALIGN, DiskDir, DiskFile, aligned_empty, bounce_bytes

MODES = ("direct", "buffered", "fadvise")  # fadvise = direct asked, O_DIRECT refused


@pytest.fixture
def open_file(monkeypatch):
    """DiskFile factory; mode "fadvise" makes os.open refuse O_DIRECT as tmpfs once did."""

    def make(path, nbytes, mode, **kw):
        if mode == "fadvise":
            real_open = os.open

            def refuse_direct(p, flags, *args):
                if flags & os.O_DIRECT:
                    raise OSError(errno.EINVAL, "O_DIRECT refused", str(p))
                return real_open(p, flags, *args)

            monkeypatch.setattr(os, "open", refuse_direct)
        f = DiskFile(path, nbytes, "direct" if mode == "fadvise" else mode, **kw)
        monkeypatch.undo()
        assert f.mode_used == mode
        return f

    return make


def random_bytes(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def placed(data: torch.Tensor, shift: int) -> torch.Tensor:
    """`data` copied to an address `shift` bytes past an ALIGN boundary."""
    out = aligned_empty(data.numel() + shift)[shift:]
    return out.copy_(data)


def resident_pages(path) -> tuple[int, int]:
    """(resident, total) pages of `path` in the page cache, from mincore(2) on a fresh mapping:
    mapping faults nothing in, so this looks without disturbing (what fincore(1) does)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t) + (ctypes.c_int,) * 3 + (ctypes.c_long,)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    size = os.path.getsize(path)
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec), len(vec)


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def test_aligned_empty():
    for n in (0, 1, 4095, 4097, 1 << 20):
        t = aligned_empty(n)
        assert t.numel() == n and t.dtype == torch.uint8 and t.data_ptr() % ALIGN == 0


CASES = {  # name: (file offset, bytes, buffer address past an ALIGN boundary)
    "aligned": (4096, 8192, 0),
    "offset": (100, 8192, 0),
    "length": (4096, 5000, 0),
    "pointer": (4096, 8192, 4),
    "same_phase": (4100, 3 * 4096 + 12, 4),  # bounced head and tail, direct middle
    "inside_one_block": (10, 20, 8),
    "file_tail": (40000 - 52, 52, 0),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("case", CASES)
def test_round_trip(tmp_path, open_file, mode, dtype, case):
    offset, n, shift = CASES[case]
    size = 40000  # not a multiple of ALIGN
    background, data = random_bytes(size, 1), random_bytes(n, 2)
    with open_file(tmp_path / "f", size, mode) as f:
        f.write_from(0, background)
        assert f.write_from(offset, placed(data, shift).view(dtype)) == n
        dst = placed(torch.zeros(n, dtype=torch.uint8), 0 if shift else 8).view(dtype)
        assert f.read_into(offset, dst) == n
        whole = torch.empty(size, dtype=torch.uint8)
        f.read_into(0, whole)
    assert torch.equal(dst.view(torch.uint8), data)
    background[offset : offset + n] = data  # neighbours of the written range are untouched
    assert torch.equal(whole, background)


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_concurrent_adjacent_unaligned_writes_lose_nothing(tmp_path, mode):
    size, threads = 64 * 1024 + 123, 8
    rng = random.Random(0)
    with DiskFile(tmp_path / "f", size, mode) as f:
        for rnd in range(4):
            data = placed(random_bytes(size, rnd), 0)
            cuts = sorted(rng.sample(range(1, size), 63))  # ~1 KiB ranges: blocks are shared
            ranges = list(zip([0, *cuts], [*cuts, size], strict=True))
            barrier = threading.Barrier(threads)

            def write_share(t, data=data, ranges=ranges, barrier=barrier):
                barrier.wait()
                for lo, hi in ranges[t::threads]:  # odd threads write from unaligned copies
                    f.write_from(lo, data[lo:hi].clone() if t % 2 else data[lo:hi])

            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(write_share, range(threads)))
            out = torch.empty(size, dtype=torch.uint8)
            f.read_into(0, out)
            assert torch.equal(out, data), f"round {rnd}: {(out != data).sum()} bytes lost"


@pytest.mark.parametrize("nbytes", [1, 4096, 5000])
def test_file_size_on_disk_is_rounded(tmp_path, nbytes):
    rounded = -(-nbytes // ALIGN) * ALIGN
    with DiskDir(tmp_path) as d:
        f = d.file("a", nbytes)
        d.file("b", 10)
        assert f.nbytes == nbytes and os.stat(f.path).st_size == rounded
        assert d.total_bytes() == rounded + ALIGN


def test_direct_io_keeps_data_out_of_page_cache(tmp_path):
    n = 64 << 20
    src = aligned_empty(n).random_()
    with DiskFile(tmp_path / "big", n) as f:
        f.write_from(0, src)
        dst = aligned_empty(n)  # untouched: its pages count in RSS once the read fills them
        rss_before, bounce_before = rss_anon_bytes(), bounce_bytes()
        assert f.read_into(0, dst) == n
        grown = rss_anon_bytes() - rss_before
        assert torch.equal(dst, src)
        resident, pages = resident_pages(f.path)
    assert resident <= pages // 100, f"{resident} of {pages} pages in the page cache"
    assert n // 2 < grown < n + (8 << 20), f"RssAnon grew by {grown} bytes reading {n}"
    assert bounce_bytes() == bounce_before  # aligned: no bounce buffer involved


@pytest.mark.parametrize(
    "mode, cached", [("direct", False), ("fadvise", False), ("buffered", True)]
)
def test_page_cache_residency_by_mode(tmp_path, open_file, mode, cached):
    n = 8 << 20
    with open_file(tmp_path / "f", n, mode) as f:
        f.write_from(0, random_bytes(n))
        f.read_into(0, torch.empty(n, dtype=torch.uint8))
        resident, pages = resident_pages(f.path)
    if cached:
        assert resident >= pages // 2, f"only {resident} of {pages} pages cached"
    else:
        assert resident <= pages // 100, f"{resident} of {pages} pages in the page cache"


def test_bounce_buffers_are_chunked_reused_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "BOUNCE_MAX", 2 * ALIGN)  # forces many chunks per request
    data, baseline, seen = random_bytes(30001), bounce_bytes(), []

    def unaligned_round_trip():
        with DiskFile(tmp_path / "f", 40000) as f:
            f.write_from(7, data)
            seen.append(bounce_bytes() - baseline)
            out = torch.empty_like(data)
            f.read_into(7, out)
            seen.append(bounce_bytes() - baseline)
            assert torch.equal(out, data)

    worker = threading.Thread(target=unaligned_round_trip)
    worker.start()
    worker.join()
    assert seen == [3 * ALIGN, 3 * ALIGN]  # one 2-block buffer (+ALIGN slack), reused
    for _ in range(100):  # the thread's buffer goes with it
        gc.collect()
        if bounce_bytes() == baseline:
            break
        time.sleep(0.01)
    assert bounce_bytes() == baseline


def test_disk_dir_unique_remove_and_reopen(tmp_path):
    a, b = DiskDir(tmp_path, unique=True), DiskDir(tmp_path, unique=True)
    assert a.path != b.path and a.path.parent == b.path.parent == tmp_path
    assert a.path.name.startswith("run-") and f"-{os.getpid()}-" in a.path.name
    f = a.file("x", 10)
    f.write_from(0, torch.ones(10, dtype=torch.uint8))
    assert a.file("x") is f
    a.remove()
    assert f.closed and not a.path.exists()
    with b:  # a scratch dir goes away with the run
        b.file("y", 1)
    assert not b.path.exists()
    with DiskDir(tmp_path / "cache") as cache:  # a named dir (weight cache) stays
        cache.file("w", 3).write_from(0, torch.tensor([1, 2, 3], dtype=torch.uint8))
    out = torch.empty(3, dtype=torch.uint8)
    with DiskDir(tmp_path / "cache") as cache:
        cache.file("w", 3, create=False).read_into(0, out)
    assert out.tolist() == [1, 2, 3] and (tmp_path / "cache" / "w").exists()


def test_errors_are_clear(tmp_path):
    with DiskFile(tmp_path / "f", 5000) as f:
        with pytest.raises(ValueError, match=r"2000 bytes at offset 4000 .*size 5000"):
            f.read_into(4000, torch.empty(2000, dtype=torch.uint8))
        with pytest.raises(ValueError, match="offset -1"):
            f.write_from(-1, torch.zeros(4))
        with pytest.raises(ValueError, match="contiguous"):
            f.read_into(0, torch.empty(4, 4).t())
    with pytest.raises(ValueError, match="closed"):
        f.read_into(0, torch.empty(4))
    with pytest.raises(ValueError, match="fewer than nbytes=9000"):
        DiskFile(tmp_path / "f", 9000, create=False)
    with DiskFile(tmp_path / "f", None, create=False) as ro:
        assert ro.nbytes == 8192
        with pytest.raises(io.UnsupportedOperation, match="read-only"):
            ro.write_from(0, torch.zeros(4))
    with pytest.raises(ValueError, match="mode='fast'"):
        DiskFile(tmp_path / "g", 10, mode="fast")
    with pytest.raises(ValueError, match="plain file name"):
        DiskDir(tmp_path).file("../escape", 10)
