"""`jobcage whois --logs`: back-mapping from collected export records, across nodes, with no agent and no root.

Input: files or directories (walked), plain or gzip (by magic, any name), as a collector writes them: a
JSON-lines file of the export, or syslog/journal lines with the record's JSON after the header (the first
``{"`` of a line).  It streams: the files are read in large blocks and searched with ``bytes.find`` for the
few byte strings a relevant record must contain (the uid as the exporter writes it, ``"uid":1234``, or the
label; and ``"kind":"prologue"`` for each job's pilot and start), so only those lines are parsed.  That is
the same work ``zgrep -c UID`` does, plus JSON for the lines that match.

The answer follows the store's rule (``Store.whois``): a job held uid at `at` when the uid had been seen in
it (first_seen <= at) and the job had not ended (at <= job end).  Jobs are keyed by (node, jid).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Iterator
from datetime import datetime

from jobcage.cgroups.errors import InvalidArgument

BLOCK = 4 << 20
PROLOGUE = b'"kind":"prologue"'


def _epoch(ts: object) -> float | None:
    if isinstance(ts, int | float):
        return float(ts)
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def files_of(paths: Iterable[str]) -> Iterator[str]:
    for p in paths:
        if p == "-":   # standard input, e.g. journalctl -o cat SYSLOG_IDENTIFIER=jobcage | jobcage whois ...
            yield p
        elif os.path.isdir(p):
            def unreadable(e: OSError) -> None:
                raise InvalidArgument(f"{e.filename}: {e.strerror}", path=e.filename)

            for d, dirs, names in os.walk(p, onerror=unreadable):
                dirs.sort()
                for n in sorted(names):
                    f = os.path.join(d, n)
                    if os.path.isfile(f):
                        yield f
        else:
            try:
                os.stat(p)
            except OSError as e:
                raise InvalidArgument(f"{p}: {e.strerror}", path=p) from None
            yield p


def blocks(path: str) -> Iterator[bytes]:
    """The file's bytes in large blocks, gunzipped (also concatenated gzip members) when it starts with gzip's
    magic."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, generator
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}", path=path) from None
    with f:
        head = f.read(BLOCK)
        if not head.startswith(b"\x1f\x8b"):
            while head:
                yield head
                head = f.read(BLOCK)
            return
        d, fed = zlib.decompressobj(31), False   # fed: the current member has begun
        data = head
        try:
            while data:
                while data:
                    out = d.decompress(data)
                    fed = True
                    if out:
                        yield out
                    if d.eof:   # next gzip member, if any
                        data = d.unused_data
                        d, fed = zlib.decompressobj(31), False
                    else:
                        data = b""
                data = f.read(BLOCK)
        except zlib.error as e:
            raise InvalidArgument(f"{path}: not valid gzip ({e})", path=path) from None
        if fed:
            raise InvalidArgument(f"{path}: not valid gzip (truncated)", path=path)


def matching_lines(path: str, needles: list[bytes]) -> Iterator[bytes]:
    """Lines of the file that contain any of the needles.  A plain file is searched in place (mmap: no
    copy); a gzip file is inflated by a thread (zlib lets go of the GIL) while this one searches, the
    same two-stage pipeline as `gzip -dc | grep`."""
    if path == "-":
        import sys

        yield from _scan_stream(iter(lambda: sys.stdin.buffer.read1(BLOCK), b""), needles)
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}", path=path) from None
    try:
        head = os.pread(fd, 2, 0)
        size = os.fstat(fd).st_size
        if head != b"\x1f\x8b" and size > 0:
            import mmap

            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
                m.madvise(mmap.MADV_SEQUENTIAL)
                yield from _scan(m, needles, 0, size)
                if m[size - 1:size] != b"\n":   # a last line without its newline
                    cut = m.rfind(b"\n") + 1
                    yield from _scan(m[cut:] + b"\n", needles, 0, size - cut + 1, tail_only=True)
            return
    finally:
        os.close(fd)
    if size == 0:
        return
    yield from _scan_stream(_threaded(blocks(path)), needles)


def _threaded(it: Iterator[bytes]) -> Iterator[bytes]:
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()

    def run() -> None:
        try:
            for b in it:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(None)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        while True:
            b = q.get()
            if b is None:
                return
            if isinstance(b, BaseException):
                raise b
            yield b
    finally:
        stop.set()


def _scan_stream(chunks: Iterator[bytes], needles: list[bytes]) -> Iterator[bytes]:
    """Search a stream of blocks without gluing them together: only the line cut by a block boundary is
    copied."""
    rest = b""
    for blk in chunks:
        first = blk.find(b"\n")
        if first < 0:
            rest += blk
            continue
        edge = rest + blk[:first + 1]
        yield from _scan(edge, needles, 0, len(edge))
        last = blk.rfind(b"\n") + 1
        yield from _scan(blk, needles, first + 1, last)
        rest = blk[last:]
    if rest:
        rest += b"\n"
        yield from _scan(rest, needles, 0, len(rest))


def _scan(buf: bytes | bytearray | memoryview | object, needles: list[bytes], lo: int, hi: int,
          tail_only: bool = False) -> Iterator[bytes]:
    """Lines within buf[lo:hi] (whole lines, hi just after a newline) that contain a needle, in order."""
    b: bytes = buf  # type: ignore[assignment]  # bytes or mmap: same find/rfind/slicing
    starts: set[int] = set()
    hits: list[tuple[int, int]] = []
    for n in needles:
        pos = b.find(n, lo, hi)
        while pos >= 0:
            s = max(lo, b.rfind(b"\n", lo, pos) + 1)
            e = b.find(b"\n", pos, hi)
            if e < 0:
                e = hi
            if s not in starts:
                starts.add(s)
                hits.append((s, e))
            pos = b.find(n, e, hi)
    hits.sort()
    for s, e in hits:
        yield b[s:e]


def records(paths: Iterable[str], needles: list[bytes]) -> Iterator[dict]:
    for path in files_of(paths):
        for line in matching_lines(path, needles):
            j = line.find(b'{"')
            if j < 0:
                continue
            try:
                rec = json.loads(line[j:])
            except ValueError:
                continue   # a cut or garbled line: not a record
            if isinstance(rec, dict) and "node" in rec and "event_id" in rec:
                yield rec


class _Job:
    __slots__ = ("node", "jid", "job_id", "owner", "start", "end", "idents", "declared")

    def __init__(self, node: str, jid: int, job_id: str) -> None:
        self.node, self.jid, self.job_id = node, jid, job_id
        self.owner: int | None = None
        self.start: float | None = None
        self.end: float | None = None
        self.idents: dict[int, list] = {}        # uid -> [first, last, via]
        self.declared: dict[int, list[tuple[float, str]]] = {}

    def seen(self, uid: int, ts: float | None, via: str | None, authoritative: bool = False) -> None:
        if ts is None:
            return
        cur = self.idents.get(uid)
        if cur is None:
            self.idents[uid] = [ts, ts, via]
            return
        cur[0], cur[1] = min(cur[0], ts), max(cur[1], ts)
        if via and (authoritative or not cur[2]):
            cur[2] = via


def collect(paths: Iterable[str], needles: list[bytes]) -> dict[tuple[str, int], _Job]:
    jobs: dict[tuple[str, int], _Job] = {}
    for r in records(paths, needles):
        jid = r.get("jid")
        if not isinstance(jid, int):
            continue
        key = (str(r["node"]), jid)
        job = jobs.get(key)
        if job is None:
            job = jobs[key] = _Job(key[0], jid, str(r.get("job_id")))
        kind, uid, ts, det = r.get("kind"), r.get("uid"), _epoch(r.get("ts")), r.get("detail") or {}
        if not isinstance(uid, int):
            continue
        if kind == "prologue":
            job.owner, job.start = uid, ts
            job.seen(uid, ts, "batch system", True)
        elif kind == "epilogue":
            job.end = ts
            if isinstance(det.get("owner_uid"), int):
                job.owner = det["owner_uid"]
            job.start = job.start or _epoch(det.get("created"))
            for i in det.get("identities") or []:
                if isinstance(i, dict) and isinstance(i.get("uid"), int):
                    job.seen(i["uid"], _epoch(i.get("first_seen")), i.get("via"), True)
                    job.seen(i["uid"], _epoch(i.get("last_seen")), None)
            for d in det.get("declared") or []:
                if isinstance(d, dict) and isinstance(d.get("uid"), int):
                    _declare(job, d["uid"], _epoch(d.get("ts")), str(d.get("label")))
        elif kind == "exec" and uid >= 0:
            job.seen(uid, ts, det.get("via") if uid != job.owner else None)
        elif kind == "setuid" and det.get("ok") and uid > 0:
            job.seen(uid, ts, det.get("via") if uid != job.owner else None)
        elif kind == "declare":
            job.seen(uid, ts, "declared")
            _declare(job, uid, ts, str(det.get("label")))
    return jobs


def _declare(job: _Job, uid: int, ts: float | None, label: str) -> None:
    lst = job.declared.setdefault(uid, [])
    if ts is not None and all(abs(t - ts) > 0.001 or lab != label for t, lab in lst):
        lst.append((ts, label))


def uid_needles(uid: int) -> list[bytes]:
    # every record that carries the uid has it as ...uid":N (uid, euid, owner_uid, by_uid); digits after N
    # (a longer uid) are weeded out after parsing
    return [b'uid":%d' % uid, PROLOGUE]


def whois_logs(paths: list[str], uid: int, at: float) -> list[dict]:
    from .fmt import iso

    out = []
    for job in collect(paths, uid_needles(uid)).values():
        ident = job.idents.get(uid)
        if ident is None:
            continue
        first, last, via = ident
        # 1 ms of slack: times handed back to us as ISO strings may be cut to milliseconds
        if first > at + 0.001 or (job.end is not None and job.end < at - 0.001):
            continue
        out.append({"node": job.node, "job_id": job.job_id, "jid": job.jid, "uid": uid, "pilot_uid": job.owner,
                    "via": via, "first_seen": iso(first), "last_seen": iso(last), "job_start": iso(job.start),
                    "job_end": iso(job.end), "state": "ended" if job.end is not None else "running",
                    "declared": [lab for _t, lab in sorted(job.declared.get(uid, []))]})
    return sorted(out, key=lambda r: (r["first_seen"] or "", r["node"], r["jid"]))


def label_logs(paths: list[str], label: str) -> list[dict]:
    """The reverse question: which uids, jobs and nodes a declared identity had."""
    from .fmt import iso

    needle = json.dumps(label)[1:-1].encode()   # as the exporter wrote it (JSON, ASCII)
    out = []
    for job in collect(paths, [needle, PROLOGUE]).values():
        for uid, decl in job.declared.items():
            times = sorted(t for t, lab in decl if lab == label)
            if not times:
                continue
            first, last, via = job.idents.get(uid, [None, None, None])
            out.append({"label": label, "node": job.node, "job_id": job.job_id, "jid": job.jid, "uid": uid,
                        "pilot_uid": job.owner, "declared_at": [iso(t) for t in times], "first_seen": iso(first),
                        "last_seen": iso(last), "job_start": iso(job.start), "job_end": iso(job.end),
                        "state": "ended" if job.end is not None else "running"})
    return sorted(out, key=lambda r: (r["declared_at"][0], r["node"], r["jid"]))
