"""Audit export: every row of the trail (trace events and lifecycle records) to the site's log pipeline.

One worker thread per sink (JSON-lines file, syslog, systemd journal).  The store is the queue that never
loses anything: each sink has a cursor in it (``export_cursors``: the last ``events.id`` it delivered), so
after a collector outage or an agent restart the records missed are read from the store and sent
(at least once; ``node`` + ``event_id`` make duplicates detectable).  In memory, each sink has a bounded
queue the agent fills right after its writes commit (``Store.listener``); a full queue drops the record
*from memory only* and the worker reads it from the store instead.  Nothing here runs on a hook's path:
a hook's cost is its own SQLite insert, whatever state a collector or a disk is in.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import sqlite3
import struct
import threading
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from jobcage.cgroups.errors import InvalidArgument

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("jobcage.export")

# The contract's event keys, then what makes a record unique and joinable across nodes.
RECORD_KEYS = ("ts", "node", "event_id", "jid", "job_id", "kind", "pid", "ppid", "uid", "euid", "comm",
               "filename", "detail")
EVENT_COLS = ("id", "jid", "job_id", "ts", "kind", "pid", "ppid", "uid", "euid", "comm", "filename", "detail")
BATCH = 500
LINGER = 0.05   # seconds a woken worker waits for more records before it sends
FACILITIES = {"kern": 0, "user": 1, "daemon": 3, "auth": 4, "syslog": 5, "authpriv": 10,
              **{f"local{i}": 16 + i for i in range(8)}}
SEVERITY_INFO = 6


def iso_us(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def record(node: str, row: dict) -> dict:
    """A store row (EVENT_COLS, detail decoded) as an export record with stable keys."""
    return {"ts": iso_us(float(row["ts"])), "node": node, "event_id": row["id"], "jid": row["jid"],
            "job_id": row["job_id"], "kind": row["kind"], "pid": row["pid"] or 0, "ppid": row["ppid"] or 0,
            "uid": -1 if row["uid"] is None else row["uid"], "euid": -1 if row["euid"] is None else row["euid"],
            "comm": row["comm"] or "", "filename": row["filename"] or "", "detail": row["detail"] or {}}


def encode(rec: dict, limit: int) -> str:
    """Compact JSON, ASCII only (no byte a syslog relay would escape), at most `limit` bytes: a larger
    record keeps every key but its detail is replaced by a note (relays cut long messages anyway)."""
    text = json.dumps(rec, separators=(",", ":"))
    if len(text) > limit:
        text = json.dumps(dict(rec, detail={"truncated": True, "bytes": len(text)}), separators=(",", ":"))
    return text


# -- sinks -------------------------------------------------------------------------------------------------

class SinkError(Exception):
    pass


class Sink:
    """send() delivers a batch or raises; `settle` is how long a sent record stays 'in flight' (the transport
    cannot confirm it yet) before the cursor may move past it."""
    name = ""
    settle = 0.0

    def send(self, lines: list[str], recs: list[dict]) -> None:
        raise NotImplementedError

    def broken(self) -> bool:
        """True when the transport saw its peer go away since the last send."""
        return False

    def close(self) -> None:
        pass


class FileSink(Sink):
    """JSON lines, fsync'd per batch; size-based rotation PATH -> PATH.1 .. PATH.<keep>.  A failed write
    (full disk) is cut back to the last whole line, so a retry never glues two records together."""

    def __init__(self, path: str, max_bytes: int, keep: int) -> None:
        self.name = f"file:{path}"
        self.path, self.max_bytes, self.keep = path, max_bytes, keep
        self.f: int | None = None

    def _open(self) -> int:
        if self.f is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self.f = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        return self.f

    def _rotate(self) -> None:
        self.close()
        for i in range(self.keep - 1, 0, -1):
            if os.path.exists(f"{self.path}.{i}"):
                os.replace(f"{self.path}.{i}", f"{self.path}.{i + 1}")
        if self.keep > 0:
            os.replace(self.path, f"{self.path}.1")
        else:
            os.unlink(self.path)

    def send(self, lines: list[str], recs: list[dict]) -> None:
        try:
            fd = self._open()
            size = os.fstat(fd).st_size
            chunk: list[bytes] = []
            for ln in lines:   # a file never grows past max_bytes, unless one line alone is longer
                b = ln.encode() + b"\n"
                if size and size + len(b) > self.max_bytes:
                    self._write(fd, b"".join(chunk), size - sum(map(len, chunk)))
                    chunk = []
                    self._rotate()
                    fd, size = self._open(), 0
                chunk.append(b)
                size += len(b)
            self._write(fd, b"".join(chunk), size - sum(map(len, chunk)))
        except OSError as e:
            self.close()
            raise SinkError(f"{self.path}: {e.strerror}") from None

    @staticmethod
    def _write(fd: int, data: bytes, size_before: int) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size_before)   # whole lines only: the retry starts on a line of its own
            raise

    def close(self) -> None:
        if self.f is not None:
            os.close(self.f)
            self.f = None


class SyslogSink(Sink):
    """unix:PATH (the local syslog socket, syslog(3)'s format, which rsyslog's imuxsock and journald parse),
    udp://HOST:PORT (RFC 5424, one datagram per record) or tcp://HOST:PORT (RFC 5424, octet-counted framing,
    RFC 6587).  TCP: a batch counts as sent when the peer's kernel acknowledged every byte (SIOCOUTQ = 0);
    records stay in flight for `settle` seconds after that, and when the connection breaks they are sent again
    (the collector may have died before reading them)."""

    def __init__(self, target: str, facility: str, node: str) -> None:
        if facility not in FACILITIES:
            raise InvalidArgument(f"[export] syslog_facility: unknown facility {facility!r}")
        self.pri = FACILITIES[facility] * 8 + SEVERITY_INFO
        # RFC 5424 HOSTNAME: 1-255 printable ASCII, no space (the record's "node" keeps the name as it is)
        self.node = "".join(c if "!" <= c <= "~" else "_" for c in node)[:255] or "-"
        self.name = f"syslog:{target}"
        if target.startswith("unix:"):
            self.proto, self.addr = "unix", target[5:]
        else:
            u = urlsplit(target)
            if u.scheme not in ("udp", "tcp") or not u.hostname or not u.port:
                raise InvalidArgument(f"[export] syslog: want unix:PATH, udp://HOST:PORT or tcp://HOST:PORT, "
                                      f"not {target!r}")
            self.proto, self.addr = u.scheme, (u.hostname, u.port)
        self.settle = 2.0 if self.proto in ("tcp", "udp") else 0.0
        self.sock: socket.socket | None = None
        self.procid = str(os.getpid())

    def _connect(self) -> socket.socket:
        if self.sock is None:
            if self.proto == "unix":
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            else:
                host, port = self.addr  # type: ignore[misc]
                fam = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM if self.proto == "udp"
                                         else socket.SOCK_STREAM)[0][0]
                s = socket.socket(fam, (socket.SOCK_DGRAM if self.proto == "udp" else socket.SOCK_STREAM)
                                  | socket.SOCK_CLOEXEC)
            s.settimeout(5)
            try:
                s.connect(self.addr)
            except OSError:
                s.close()
                raise
            self.sock = s
        return self.sock

    def frame(self, line: str, rec: dict) -> bytes:
        if self.proto == "unix":
            stamp = datetime.now().strftime("%b %d %H:%M:%S")  # syslog(3): local time, no year
            return f"<{self.pri}>{stamp} jobcage[{self.procid}]: {line}".encode()
        # RFC 5424: PRI VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG (MSGID = the record's kind)
        msg = f"<{self.pri}>1 {rec['ts']} {self.node} jobcage {self.procid} {rec['kind'] or '-'} - {line}".encode()
        return msg if self.proto == "udp" else str(len(msg)).encode() + b" " + msg

    def send(self, lines: list[str], recs: list[dict]) -> None:
        try:
            s = self._connect()
            if self.proto == "tcp":
                s.sendall(b"".join(self.frame(ln, r) for ln, r in zip(lines, recs, strict=True)))
                self._wait_acked(s)
            else:
                for ln, r in zip(lines, recs, strict=True):
                    s.send(self.frame(ln, r))
        except OSError as e:
            self.close()
            raise SinkError(f"{self.name}: {e.strerror or e}") from None

    def _wait_acked(self, s: socket.socket, timeout: float = 5.0) -> None:
        import fcntl
        import termios

        deadline = time.monotonic() + timeout
        while struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]:
            if time.monotonic() > deadline or self.broken():
                raise OSError("the relay does not acknowledge")
            time.sleep(0.005)

    def broken(self) -> bool:
        s = self.sock
        if s is None or self.proto == "unix":
            return False
        try:
            data = s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True     # ECONNREFUSED (UDP: ICMP port unreachable), ECONNRESET
        return self.proto == "tcp" and data == b""   # the relay closed the connection

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class JournalSink(Sink):
    """The systemd journal's native protocol: one datagram per record on journald's socket, the record's
    keys as JOBCAGE_* fields (searchable with journalctl JOBCAGE_UID=1234) and the JSON as MESSAGE."""

    def __init__(self, path: str) -> None:
        self.name = "journal"
        self.path = path
        self.sock: socket.socket | None = None

    @staticmethod
    def fields(line: str, rec: dict) -> bytes:
        out = [b"MESSAGE=" + line.encode(), b"PRIORITY=%d" % SEVERITY_INFO, b"SYSLOG_IDENTIFIER=jobcage"]
        for k in RECORD_KEYS:
            v = rec[k]
            text = json.dumps(v, separators=(",", ":")) if isinstance(v, dict) else "" if v is None else str(v)
            name = b"JOBCAGE_" + k.upper().encode()
            raw = text.encode()
            if b"\n" in raw:   # the protocol's binary form: NAME\n<le64 length><value>\n
                out.append(name + b"\n" + struct.pack("<Q", len(raw)) + raw)
            else:
                out.append(name + b"=" + raw)
        return b"\n".join(out) + b"\n"

    def send(self, lines: list[str], recs: list[dict]) -> None:
        try:
            if self.sock is None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                s.settimeout(5)
                s.connect(self.path)
                self.sock = s
            for ln, r in zip(lines, recs, strict=True):
                self.sock.send(self.fields(ln, r))
        except OSError as e:
            self.close()
            raise SinkError(f"journal {self.path}: {e.strerror or e}") from None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def make_sinks(cfg: Config) -> list[Sink]:
    sinks: list[Sink] = []
    if cfg.export_file:
        if cfg.export_file_max_bytes < 4096 or cfg.export_file_keep < 0:
            raise InvalidArgument("[export] file_max_bytes must be >= 4096 and file_keep >= 0")
        sinks.append(FileSink(cfg.export_file, cfg.export_file_max_bytes, cfg.export_file_keep))
    if cfg.export_syslog:
        sinks.append(SyslogSink(cfg.export_syslog, cfg.export_syslog_facility, cfg.node))
    if cfg.export_journal:
        sinks.append(JournalSink(cfg.export_journal_socket))
    return sinks


# -- workers -----------------------------------------------------------------------------------------------

class _Reader:
    """The exporter's own connection to the store: WAL readers never block the agent's writers."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA busy_timeout=30000")
        self.db.execute("CREATE TABLE IF NOT EXISTS export_cursors(sink TEXT PRIMARY KEY, last_id INTEGER "
                        "NOT NULL, ts REAL)")
        self.lock = threading.Lock()

    def rows_after(self, after: int, limit: int) -> list[dict]:
        with self.lock:
            rows = self.db.execute(f"SELECT {','.join(EVENT_COLS)} FROM events WHERE id>? ORDER BY id LIMIT ?",
                                   (after, limit)).fetchall()
        out = []
        for r in rows:
            d = dict(zip(EVENT_COLS, r, strict=True))
            try:
                d["detail"] = json.loads(d["detail"]) if d["detail"] else {}
            except ValueError:
                d["detail"] = {"raw": d["detail"]}
            out.append(d)
        return out

    def head(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])

    def ts_after(self, after: int) -> float | None:
        with self.lock:
            row = self.db.execute("SELECT ts FROM events WHERE id>? ORDER BY id LIMIT 1", (after,)).fetchone()
        return float(row[0]) if row else None

    def cursor(self, sink: str) -> int:
        with self.lock:
            row = self.db.execute("SELECT last_id FROM export_cursors WHERE sink=?", (sink,)).fetchone()
        return int(row[0]) if row else 0

    def save(self, sink: str, last_id: int) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO export_cursors(sink, last_id, ts) VALUES(?,?,?)",
                            (sink, last_id, time.time()))


class Worker:
    """One sink: live records from the bounded queue while it keeps up, the store's backlog otherwise."""

    def __init__(self, sink: Sink, reader: _Reader, node: str, queue_size: int, max_record: int) -> None:
        self.sink, self.reader, self.node, self.max_record = sink, reader, node, max_record
        self.q: queue.Queue[dict] = queue.Queue(maxsize=max(1, queue_size))
        self.cursor = reader.cursor(sink.name)     # last id the sink holds for sure
        self.sent_to = self.cursor                 # last id handed to the sink (>= cursor while in flight)
        self.in_flight: list[tuple[float, int]] = []   # (monotonic time sent, last id of the batch)
        self.behind = True                         # read the store first: what happened while we were down
        self.sent = self.resent = self.dropped = self.failures = 0
        self.last_error = ""
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"export {sink.name}", daemon=True)

    def offer(self, rows: list[dict]) -> None:
        for row in rows:
            try:
                self.q.put_nowait(row)
            except queue.Full:
                self.dropped += 1   # from memory only: the worker reads it from the store
                self.behind = True
        self.wake.set()

    def _next_batch(self) -> tuple[list[dict], bool]:
        """(rows, from_store).  Live rows are used only while they continue the sequence exactly."""
        if not self.behind:
            rows: list[dict] = []
            while len(rows) < BATCH:
                try:
                    row = self.q.get_nowait()
                except queue.Empty:
                    break
                if row["id"] <= self.sent_to:
                    continue
                if row["id"] != self.sent_to + len(rows) + 1:
                    self.behind = True   # a record committed by another thread or process, or a drop: the store
                    break
                rows.append(row)
            if rows or self.behind:
                return rows, False
            if self.reader.head() <= self.sent_to:
                return [], False
            self.behind = True   # written without passing the queue (e.g. the direct CLI path as root)
        rows = self.reader.rows_after(self.sent_to, BATCH)
        if len(rows) < BATCH:
            self.behind = False
            while True:   # the queue's copies of these are stale now
                try:
                    self.q.get_nowait()
                except queue.Empty:
                    break
        return rows, True

    def _settle(self) -> None:
        now = time.monotonic()
        while self.in_flight and now - self.in_flight[0][0] >= self.sink.settle:
            self.cursor = self.in_flight.pop(0)[1]

    def _fail(self, err: str) -> None:
        self.failures += 1
        if err != self.last_error:
            log.warning("export to %s failing (records are kept in the store): %s", self.sink.name, err)
        self.last_error = err
        self.sink.close()
        # what was in flight may not have arrived: send it again (at least once)
        self.sent_to = self.cursor
        self.in_flight.clear()
        self.behind = True

    def _run(self) -> None:
        backoff = 0.2
        saved, last_save = self.cursor, 0.0
        while not self.stop.is_set():
            if self.sink.broken():
                self._fail("the collector closed the connection")
            self._settle()
            if self.cursor != saved and time.monotonic() - last_save >= 0.5:   # at most 2 writes a second
                try:
                    self.reader.save(self.sink.name, self.cursor)
                    saved, last_save = self.cursor, time.monotonic()
                except sqlite3.Error as e:
                    log.warning("export cursor not saved: %s", e)
            try:
                rows, from_store = self._next_batch()
            except sqlite3.Error as e:
                self._fail(f"store: {e}")
                rows, from_store = [], False
            if not rows:
                if self.wake.wait(0.2 if self.in_flight else 1.0):
                    # linger: a hook's records come in twos and threes; one batch (one fsync, one
                    # send) for them all keeps the export's work off the hooks' backs
                    self.stop.wait(LINGER)
                self.wake.clear()
                continue
            recs = [record(self.node, r) for r in rows]
            try:
                self.sink.send([encode(r, self.max_record) for r in recs], recs)
            except SinkError as e:
                self._fail(str(e))
                self.stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if self.last_error:
                log.info("export to %s works again", self.sink.name)
                self.last_error = ""
            backoff = 0.2
            self.sent += len(rows)
            if from_store:
                self.resent += len(rows)
            self.sent_to = rows[-1]["id"]
            self.in_flight.append((time.monotonic(), self.sent_to))
        self.sink.close()

    def pending(self) -> int:
        return max(0, self.reader.head() - self.cursor)

    def lag(self) -> float:
        ts = self.reader.ts_after(self.cursor)
        return max(0.0, time.time() - ts) if ts is not None else 0.0


class Exporter:
    def __init__(self, cfg: Config) -> None:
        sinks = make_sinks(cfg)
        self.workers: list[Worker] = []
        if not sinks:
            return
        self.reader = _Reader(cfg.db_path)
        self.workers = [Worker(s, self.reader, cfg.node, cfg.export_queue_size, cfg.export_max_record)
                        for s in sinks]

    def start(self) -> None:
        for w in self.workers:
            w.thread.start()

    def offer(self, rows: list[dict]) -> None:
        """Called by the store after a commit: never blocks."""
        for w in self.workers:
            w.offer(rows)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers; what they have not sent stays in the store for the next start."""
        deadline = time.monotonic() + timeout
        for w in self.workers:   # a last chance to send what the agent wrote while stopping
            while w.thread.is_alive() and not w.last_error and w.reader.head() > w.sent_to \
                    and time.monotonic() < deadline:
                w.wake.set()
                time.sleep(0.02)
            w.stop.set()
            w.wake.set()
        for w in self.workers:
            w.thread.join(max(0.1, deadline - time.monotonic()))
            w._settle()   # records still in flight are sent again at the next start (at least once)
            try:
                w.reader.save(w.sink.name, w.cursor)
            except sqlite3.Error:
                pass

    def stats(self) -> list[dict]:
        return [{"sink": w.sink.name, "sent": w.sent, "resent": w.resent, "dropped": w.dropped,
                 "pending": w.pending(), "lag_seconds": w.lag(), "failures": w.failures,
                 "last_error": w.last_error} for w in self.workers]
