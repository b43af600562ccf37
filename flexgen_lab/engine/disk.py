"""Disk tier I/O: real files, large positional reads and writes, page cache bypassed by default.

Why not memmap, as the original FlexLLMGen does (digest §6)? A memmap goes through the page
cache, so "disk-resident" bytes quietly live in RAM and a disk-tier run measures RAM bandwidth.
With O_DIRECT (mode "direct", the default) bytes really travel to and from the device, and the
tier's only CPU memory is its bounce buffers, which `bounce_bytes()` reports for the CPU budget.

O_DIRECT wants offsets, lengths and addresses aligned to the logical block size (ALIGN covers
the common ones). The aligned middle of a request moves straight between file and tensor; the
rest goes through a per-thread bounce buffer, and unaligned writes read-modify-write partial
edge blocks under a per-file lock, so threads writing adjacent ranges lose nothing.

A failed system call (a full disk, a file-size limit, an I/O error) raises DiskError, an
OSError naming the file, the offset and the size; `probe` checks before a run starts that a
directory takes an aligned block in the configured mode.

    >>> with DiskDir("/tmp/flexgen_lab", unique=True) as scratch:  # removed on exit
    ...     f = scratch.file("kv.bin", nbytes=8192)
    ...     f.write_from(100, torch.arange(10.0)), f.read_into(100, torch.empty(10))
    (40, 40)
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import threading
import weakref
from pathlib import Path

import torch

from flexgen_lab.engine.owners import temporary_name
from flexgen_lab.units import round_up

ALIGN = 4096
BOUNCE_MAX = 8 << 20  # bytes per thread: big enough for sequential bandwidth, small for budgets
MODES = ("direct", "buffered")

_bounce_lock = threading.Lock()
_bounce_total = 0  # bytes of bounce buffers alive in all threads
_local = threading.local()


def _round_up(x: int) -> int:
    return round_up(x, ALIGN)


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A CPU uint8 tensor of exactly `nbytes` whose data_ptr is ALIGN-aligned. torch's allocator
    only promises 64 bytes, so take ALIGN bytes of slack and slice; the view keeps the base."""
    base = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    shift = -base.data_ptr() % ALIGN
    return base[shift : shift + nbytes]


class DiskError(OSError):
    """A read or write on the disk tier failed; the message names the file."""


def _disk_error(err: OSError, what: str) -> DiskError:
    hint = (" (the disk is full or a file-size limit was reached)"
            if err.errno in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT) else "")
    return DiskError(err.errno, f"{what}: {err.strerror or err}{hint}")


def bounce_bytes() -> int:
    """Bytes of bounce buffers allocated now in all threads, slack included: CPU-tier memory."""
    return _bounce_total


def _count_bounce(delta: int) -> None:
    global _bounce_total
    with _bounce_lock:
        _bounce_total += delta


class _Bounce:
    """Owns one thread's bounce buffer; uncounted when it dies (with its thread, or replaced)."""

    def __init__(self, nbytes: int):
        self.data = aligned_empty(nbytes)
        _count_bounce(nbytes + ALIGN)
        weakref.finalize(self, _count_bounce, -(nbytes + ALIGN))


def _bounce(nbytes: int) -> torch.Tensor:
    """This thread's bounce buffer, grown to at least `nbytes` (threads never share one)."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.data.numel() < nbytes:
        _local.buf = None  # free the old buffer first: peak memory is the new size only
        _local.buf = buf = _Bounce(_round_up(nbytes))
    return buf.data


def _as_bytes(t: torch.Tensor, what: str) -> torch.Tensor:
    """`t`'s storage as a flat uint8 view, so every dtype moves as raw bytes."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{what} must be a contiguous CPU tensor, got {t.device} {t.stride()}")
    return t.detach().reshape(-1).view(torch.uint8)


def _transfer(fd: int, buf: torch.Tensor, offset: int, write: bool, need: int = -1) -> None:
    """Move all of uint8 `buf` to/from the file at `offset`, looping on short transfers; a
    read may stop at end of file once `need` bytes (default: all) have arrived."""
    view, done = memoryview(buf.numpy()), 0
    call = os.pwritev if write else os.preadv
    while done < len(view):
        moved = call(fd, [view[done:]], offset + done)
        if moved == 0:
            break
        done += moved
    if done < (len(view) if need < 0 else need):
        raise EOFError(f"{'write' if write else 'read'} at offset {offset} stopped at {done} B")


def _segments(offset: int, buf: torch.Tensor) -> list[tuple[int, torch.Tensor, bool]]:
    """Split a request into (file offset, bytes, goes direct): when buffer and file offset share
    their phase the aligned middle goes direct; the rest needs the bounce buffer."""
    n = buf.numel()
    if buf.data_ptr() % ALIGN != offset % ALIGN:
        return [(offset, buf, False)]
    head = min(n, -offset % ALIGN)
    mid = head + (n - head) // ALIGN * ALIGN
    parts = [(offset, buf[:head], False), (offset + head, buf[head:mid], True)]
    return [p for p in [*parts, (offset + mid, buf[mid:], False)] if p[1].numel()]


def _chunks(offset: int, n: int):
    """(pos, take, lo, hi): request bytes [pos, pos+take), their aligned file range [lo, hi)."""
    pos = 0
    while pos < n:
        start = offset + pos
        lo = start - start % ALIGN
        take = min(n - pos, BOUNCE_MAX - (start - lo))
        yield pos, take, lo, _round_up(start + take)
        pos += take


def _open(path: Path, flags: int, mode: str) -> tuple[int, str]:
    """Open with O_DIRECT when asked; a filesystem refusing it (EINVAL, e.g. old tmpfs) gets
    buffered I/O plus fadvise(DONTNEED) after each access, which keeps RAM mostly clear."""
    if mode not in MODES:
        raise ValueError(f"disk I/O mode={mode!r}: allowed are {MODES}")
    if mode == "direct" and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), "direct"
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    fallback = "fadvise" if mode == "direct" and hasattr(os, "posix_fadvise") else "buffered"
    return os.open(path, flags, 0o644), fallback


class DiskFile:
    """One file on the disk tier, read and written by byte offset from many threads at once
    (non-overlapping ranges). `create=False` opens an existing file read-only, as the weight
    cache does; `nbytes=None` then means the file's size."""

    def __init__(self, path, nbytes: int | None, mode: str = "direct", create: bool = True):
        if create and (nbytes is None or nbytes < 0):
            raise ValueError(f"DiskFile nbytes={nbytes!r}: a new file needs a size >= 0")
        self._path = Path(path)
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC if create else os.O_RDONLY
        try:
            self._fd, self._mode = _open(self._path, flags | getattr(os, "O_CLOEXEC", 0), mode)
        except FileNotFoundError:
            raise  # callers tell a missing file apart (the weight cache rebuilds then)
        except OSError as err:
            raise _disk_error(err, f"opening {self._path}") from err
        self._closer = weakref.finalize(self, os.close, self._fd)  # no fd leak if never closed
        try:
            size = os.fstat(self._fd).st_size
            if create:
                os.ftruncate(self._fd, _round_up(nbytes))  # whole blocks: O_DIRECT never hits EOF
            elif nbytes is None:
                nbytes = size
            elif size < nbytes:
                raise ValueError(f"{self._path} holds {size} bytes, fewer than nbytes={nbytes}")
        except OSError as err:
            self.close()
            raise _disk_error(err, f"sizing {self._path} ({nbytes} bytes)") from err
        except BaseException:
            self.close()
            raise
        self._nbytes, self._writable = nbytes, create
        self._rmw_lock = threading.Lock()  # serialises read-modify-write of partial blocks

    path = property(lambda self: self._path)
    nbytes = property(lambda self: self._nbytes)
    closed = property(lambda self: not self._closer.alive)
    mode_used = property(lambda self: self._mode)  # direct | fadvise (O_DIRECT refused) | buffered

    def read_into(self, offset: int, dst: torch.Tensor) -> int:
        """Fill CPU tensor `dst` (any dtype, contiguous) with dst.nbytes bytes from `offset`;
        returns the bytes delivered, which the caller counts."""
        return self._move(offset, _as_bytes(dst, "dst"), write=False)

    def write_from(self, offset: int, src: torch.Tensor) -> int:
        """Write CPU tensor `src`'s bytes at `offset`; returns src.nbytes."""
        if not self._writable:
            raise io.UnsupportedOperation(f"{self._path} was opened with create=False: read-only")
        return self._move(offset, _as_bytes(src, "src"), write=True)

    def _move(self, offset: int, buf: torch.Tensor, write: bool) -> int:
        n, op = buf.numel(), "write" if write else "read"
        if self.closed:
            raise ValueError(f"{op} on closed DiskFile {self._path}")
        if offset < 0 or offset + n > self._nbytes:
            raise ValueError(
                f"{op} of {n} bytes at offset {offset} falls outside {self._path} "
                f"(size {self._nbytes} bytes)"
            )
        segments = _segments(offset, buf) if self._mode == "direct" else [(offset, buf, True)]
        try:
            for start, part, direct in segments:
                if direct:
                    _transfer(self._fd, part, start, write)
                elif write:
                    self._bounced_write(start, part)
                else:
                    self._bounced_read(start, part)
            self._drop_cache(offset, n, write)
        except OSError as err:
            raise _disk_error(err, f"{op} of {n} bytes at offset {offset} in {self._path}") from err
        return n

    def _bounced_read(self, offset: int, dst: torch.Tensor) -> None:
        """Read whole covering blocks into the bounce buffer and copy out the asked bytes."""
        for pos, take, lo, hi in _chunks(offset, dst.numel()):
            bounce, skip = _bounce(hi - lo), offset + pos - lo
            _transfer(self._fd, bounce[: hi - lo], lo, False, need=skip + take)
            dst[pos : pos + take].copy_(bounce[skip : skip + take])

    def _bounced_write(self, offset: int, src: torch.Tensor) -> None:
        """Write through the bounce buffer. Partial edge blocks are read first, under the lock,
        since another thread may be writing the rest of the same block; whole blocks are not."""
        for pos, take, lo, hi in _chunks(offset, src.numel()):
            bounce, start, end = _bounce(hi - lo), offset + pos, offset + pos + take
            partial = start != lo or end != hi
            with self._rmw_lock if partial else contextlib.nullcontext():
                if start != lo:
                    _transfer(self._fd, bounce[:ALIGN], lo, False)
                if end != hi and (hi - ALIGN > lo or start == lo):  # last block, unless just read
                    _transfer(self._fd, bounce[hi - lo - ALIGN : hi - lo], hi - ALIGN, False)
                bounce[start - lo : end - lo].copy_(src[pos : pos + take])
                _transfer(self._fd, bounce[: hi - lo], lo, True)

    def _drop_cache(self, offset: int, n: int, written: bool) -> None:
        """fadvise mode: evict the range's pages. Dirty pages must reach the disk first or
        DONTNEED skips them; the range is widened to whole pages, which DONTNEED rounds inward."""
        if self._mode == "fadvise" and n:  # (length 0 would mean "to the end of the file")
            if written:
                os.fdatasync(self._fd)
            lo = offset - offset % ALIGN
            os.posix_fadvise(self._fd, lo, _round_up(offset + n) - lo, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self._closer()  # closes the fd once; later calls do nothing

    def remove(self) -> None:
        self.close()
        self._path.unlink(missing_ok=True)

    def __enter__(self) -> DiskFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DiskDir:
    """A directory of DiskFiles: a run's scratch dir (`unique=True` makes a fresh
    `run-<host>-<pid>-<start>-<nonce>` under `path`, so parallel jobs never collide, and a
    later run can tell that its owner is gone: engine/owners.py) or a named one. As a context
    manager a unique (scratch) dir is removed on exit, a named one only closed."""

    def __init__(self, path, unique: bool = False, mode: str = "direct"):
        path = Path(path)
        if unique:
            path = path / temporary_name("run")
        path.mkdir(parents=True, exist_ok=not unique)  # a unique name that exists fails loudly
        self._path, self._mode, self._unique = path, mode, unique
        self._files: dict[str, DiskFile] = {}
        self._lock = threading.Lock()

    path = property(lambda self: self._path)

    def file(self, name: str, nbytes: int | None = None, create: bool = True) -> DiskFile:
        """The open DiskFile `name`, opened (and with create=True, sized) on first use."""
        if Path(name).name != name or name in (".", ".."):
            raise ValueError(f"DiskDir.file name={name!r}: must be a plain file name")
        with self._lock:
            old = self._files.get(name)
            if old is not None and not old.closed:
                if nbytes is not None and nbytes != old.nbytes:
                    raise ValueError(f"{old.path} is open with {old.nbytes} bytes, not {nbytes}")
                return old
            self._files[name] = DiskFile(self._path / name, nbytes, self._mode, create)
            return self._files[name]

    def total_bytes(self) -> int:
        """Sum of the sizes of every file under the directory: what the disk tier holds."""
        return sum(p.stat().st_size for p in self._path.rglob("*") if p.is_file())

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()

    def remove(self) -> None:
        """Close every file and delete the directory tree."""
        self.close()
        if self._path.exists():
            shutil.rmtree(self._path)

    def __enter__(self) -> DiskDir:
        return self

    def __exit__(self, *exc) -> None:
        self.remove() if self._unique else self.close()


def filesystem_type(path) -> str:
    """The type of the filesystem holding `path` (or its nearest existing parent), from
    /proc/self/mountinfo: the mount point that is the longest prefix; "unknown" without it."""
    target = Path(path).resolve()
    while not target.exists() and target != target.parent:
        target = target.parent
    best, fstype = "", "unknown"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return fstype
    for line in lines:
        fields, _, rest = line.partition(" - ")
        mount = fields.split()[4].replace("\\040", " ")
        inside = str(target) == mount or str(target).startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best) and rest:
            best, fstype = mount, rest.split()[0]
    return fstype


def probe(directory, mode: str) -> None:
    """Make `directory` (and parents) and write, read back and remove one aligned block in it
    with I/O mode `mode`: an offload directory that cannot hold the disk tier fails here,
    before a run starts. Raises DiskError naming the directory and its filesystem type;
    directories it made are removed again on failure (only while empty)."""
    directory = Path(directory)
    made = [p for p in (directory, *directory.parents) if not p.exists()]
    path = directory / temporary_name(".probe")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        pattern = aligned_empty(ALIGN)
        pattern.copy_(torch.arange(ALIGN, dtype=torch.int64).to(torch.uint8))
        back = aligned_empty(ALIGN)
        with DiskFile(path, ALIGN, mode) as f:
            f.write_from(0, pattern)
            f.read_into(0, back)
        if not torch.equal(pattern, back):
            raise DiskError(errno.EIO, "the block read back differs from the block written")
    except (OSError, ValueError) as err:
        for p in made:  # innermost first; rmdir refuses a directory someone else filled
            with contextlib.suppress(OSError):
                p.rmdir()
        raise DiskError(getattr(err, "errno", None) or errno.EIO,
                        f"{directory} ({filesystem_type(directory)} filesystem) cannot hold "
                        f"the disk tier with engine.disk_io={mode}: {err}") from err
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
