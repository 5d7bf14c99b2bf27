"""A BPF ring buffer read straight from its mapped pages, a whole poll's records at once.

bcc (libbpf's ``ring_buffer__poll``) calls back into Python once per record: a ctypes callback and a copy, about
0.7 us each, which at thousands of execs a second was a seventh of the agent's work.  Every record of the
tracer's ring is one ``struct jc_event``, so the committed part of the ring is a run of equal records that one
``struct.iter_unpack`` decodes.

The kernel's ABI (include/uapi/linux/bpf.h, kernel/bpf/ringbuf.c; libbpf's ringbuf.c reads it the same way):
the map fd's first page holds the consumer position (the one page user space may write); from the second page on
a read-only mapping holds the producer position, then the data pages, mapped twice in a row so a record that
wraps around the end reads as one piece.  Each record is an 8-byte header (u32 length with a BUSY bit while the
producer still writes it and a DISCARD bit, u32 page offset) and the sample, rounded up to 8 bytes.

Positions are read and written as single native 8-byte loads and stores (a memoryview of format ``Q``), never
byte by byte: a torn position would make the reader or the kernel see records that are not there.  The order of
the reads (producer position, then headers, then data) is the order x86's memory model keeps for loads; other
architectures need acquire loads that Python cannot issue, so there the backend keeps bcc's callback
(:func:`usable`).
"""

from __future__ import annotations

import mmap
import platform
import struct

from jobcage.cgroups import proc

BUSY = 1 << 31
DISCARD = 1 << 30
HDR = 8


def usable() -> bool:
    """Whether this machine's memory model lets plain loads stand in for the kernel's acquire/release pairs."""
    return platform.machine() in ("x86_64", "AMD64", "i686", "i386")


def map_size(fd: int) -> int:
    """The ring's data size (the map's max_entries), from /proc/self/fdinfo."""
    info = proc.fdinfo(fd)
    if not info or not info.get("max_entries", "").isdigit():
        raise OSError(f"fd {fd} is not a BPF map")
    return int(info["max_entries"])


class RingReader:
    """The records of one ring buffer map whose samples are all ``sample.size`` bytes, each unpacked with
    ``sample`` (a struct.Struct); :meth:`read` returns those committed so far and hands their room back."""

    def __init__(self, fd: int, sample: struct.Struct) -> None:
        size = map_size(fd)
        if size <= 0 or size & (size - 1):
            raise OSError(f"ring buffer size {size} is not a power of two")
        page = mmap.PAGESIZE
        self._size = sample.size
        self._step = (sample.size + HDR + 7) & ~7   # a multiple of 8: the length words are u32 aligned
        # the header's 8 bytes skipped, the sample, the padding to the next record
        self._rec = struct.Struct(f"={HDR}x{sample.format.lstrip('=@<>!')}{self._step - HDR - sample.size}x")
        self._mask = size - 1
        self._cons_map = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data_map = mmap.mmap(fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._cons = memoryview(self._cons_map)[:8].cast("Q")
        whole = memoryview(self._data_map)
        self._prod = whole[:8].cast("Q")
        self._data = whole[page:]
        self._words = self._data.cast("I")
        self._views = [self._cons, self._prod, self._data, self._words, whole]

    def read(self) -> list[tuple]:
        cons = self._cons[0]
        prod = self._prod[0]
        if prod == cons:
            return []
        off = cons & self._mask
        step, size = self._step, self._size
        n = (prod - cons) // step
        # the length words of the n records, in one strided slice
        lens = self._words[off // 4:(off + n * step) // 4:step // 4].tolist()
        if lens.count(size) != n:
            return self._read_mixed(cons, lens)
        out = list(self._rec.iter_unpack(self._data[off:off + n * step]))
        self._cons[0] = cons + n * step
        return out

    def _read_mixed(self, cons: int, lens: list[int]) -> list[tuple]:
        """Some record is still being written (BUSY: it and everything after it waits for the next read) or was
        discarded (skipped); anything else is not this ring's kind of record."""
        out: list[tuple] = []
        step, size = self._step, self._size
        for h in lens:
            if h & BUSY:
                break
            if h & ~DISCARD != size:
                raise OSError(f"ring buffer record of {h & ~(BUSY | DISCARD)} bytes, expected {size}")
            if not h & DISCARD:
                out.append(self._rec.unpack_from(self._data, cons & self._mask))
            cons += step
        self._cons[0] = cons
        return out

    def close(self) -> None:
        for v in self._views:
            v.release()
        self._cons_map.close()
        self._data_map.close()
