"""SQLite (WAL) store: jobs, their state changes, identities, the audit trail.

The kernel (cgroupfs) is the truth about which jobs run; the store is the
memory: history that must survive agent restarts and job ends (whois after the
epilogue).  One row per job *run* (``jid``) so a reused batch id keeps its
past.  Both the agent and the direct CLI path write here; WAL plus a busy
timeout lets them share it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from .errors import StoreError
from .events import TraceEvent
from .protocol import dumps_plain

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs(
  jid INTEGER PRIMARY KEY AUTOINCREMENT,
  job_id TEXT NOT NULL, owner_uid INTEGER NOT NULL, owner_gid INTEGER, cgroup TEXT,
  pids_max INTEGER, state TEXT NOT NULL, created REAL NOT NULL, ended REAL,
  cpu_seconds REAL, pids_limit_hits INTEGER, events_lost INTEGER DEFAULT 0,
  tmpdir TEXT, summary TEXT, mode TEXT DEFAULT 'own', cgroup_ino INTEGER);
CREATE INDEX IF NOT EXISTS jobs_id ON jobs(job_id, jid);
CREATE TABLE IF NOT EXISTS job_states(
  id INTEGER PRIMARY KEY, jid INTEGER NOT NULL, ts REAL NOT NULL, state TEXT NOT NULL, detail TEXT);
CREATE TABLE IF NOT EXISTS identities(
  jid INTEGER NOT NULL, uid INTEGER NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
  via TEXT, cpu_seconds REAL DEFAULT 0, PRIMARY KEY(jid, uid));
CREATE INDEX IF NOT EXISTS identities_uid ON identities(uid);
CREATE TABLE IF NOT EXISTS declarations(
  id INTEGER PRIMARY KEY, jid INTEGER NOT NULL, uid INTEGER NOT NULL, label TEXT NOT NULL,
  ts REAL NOT NULL, declared_by INTEGER);
CREATE TABLE IF NOT EXISTS events(
  id INTEGER PRIMARY KEY, jid INTEGER, job_id TEXT, ts REAL NOT NULL, kind TEXT NOT NULL,
  pid INTEGER, ppid INTEGER, uid INTEGER, euid INTEGER, comm TEXT, filename TEXT, detail TEXT);
CREATE INDEX IF NOT EXISTS events_jid ON events(jid, id);
-- lineage rows of versions that wrote one per event; the trail's events carry the lineage now (Store.lineage)
CREATE TABLE IF NOT EXISTS lineage(
  jid INTEGER NOT NULL, pid INTEGER NOT NULL, orig_ppid INTEGER, via TEXT, ts REAL,
  PRIMARY KEY(jid, pid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS export_cursors(sink TEXT PRIMARY KEY, last_id INTEGER NOT NULL, ts REAL);
"""

TS_SLACK = 0.001 + 1e-6   # printed times are truncated to ms

JOB_COLS = ("jid", "job_id", "owner_uid", "owner_gid", "cgroup", "pids_max", "state", "created", "ended",
            "cpu_seconds", "pids_limit_hits", "events_lost", "tmpdir", "summary", "mode", "cgroup_ino")
# Columns added after the first release: (name, declaration) for databases made before them.
ADDED_COLS = (("mode", "TEXT DEFAULT 'own'"), ("cgroup_ino", "INTEGER"))


class Store:
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        # timeout: how long a write waits for another writer's lock (the PAM hook bounds it: a login
        # must not wait on a stopped agent's transaction)
        self.path = path
        self._lock = threading.RLock()
        # The agent's exporter (agent/export.py) hears of trail rows once they are committed.
        self.listener: Callable[[list[dict]], None] | None = None
        self._tx_depth = 0
        self._tx_rows: list[dict] = []
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=timeout, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            have = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
            for col, decl in ADDED_COLS:
                if col not in have:
                    self.db.execute(f"ALTER TABLE jobs ADD COLUMN {col} {decl}")
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"cannot open state database {path}: {e}", path=path) from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group many writes into one commit (the agent's event batches)."""
        with self._lock:
            if self._tx_depth:   # nested: part of the outer one
                self._tx_depth += 1
                try:
                    yield
                finally:
                    self._tx_depth -= 1
                return
            self.db.execute("BEGIN IMMEDIATE")
            self._tx_depth, self._tx_rows = 1, []
            try:
                yield
            except BaseException:
                self._tx_depth, self._tx_rows = 0, []
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            rows, self._tx_depth, self._tx_rows = self._tx_rows, 0, []
            self._notify(rows)

    def _notify(self, rows: list[dict]) -> None:
        if rows and self.listener is not None:
            try:
                self.listener(rows)
            except Exception:  # export must never fail a write that has committed
                pass

    def _x(self, sql: str, args: Iterable = ()) -> sqlite3.Cursor:
        with self._lock:
            try:
                return self.db.execute(sql, tuple(args))
            except sqlite3.Error as e:
                raise StoreError(f"state database error: {e}", path=self.path) from None

    # -- jobs ---------------------------------------------------------------
    def add_job(self, job_id: str, owner_uid: int, owner_gid: int | None, cgroup: str, pids_max: int | None,
                created: float, tmpdir: str | None = None, mode: str = "own", cgroup_ino: int | None = None) -> int:
        """mode 'own': jobcage made `cgroup`; 'attach': the batch system's cgroup at `cgroup`,
        inode `cgroup_ino` (a cgroup made again at that path is another one)."""
        with self._lock:
            cur = self._x("INSERT INTO jobs(job_id, owner_uid, owner_gid, cgroup, pids_max, state, created, tmpdir,"
                          " mode, cgroup_ino) VALUES(?,?,?,?,?,?,?,?,?,?)",
                          (job_id, owner_uid, owner_gid, cgroup, pids_max, "running", created, tmpdir, mode,
                           cgroup_ino))
            jid = int(cur.lastrowid or 0)
            self._x("INSERT INTO job_states(jid, ts, state) VALUES(?,?,?)", (jid, created, "running"))
            self.touch_identity(jid, owner_uid, created, "batch system")
            return jid

    def job(self, job_id: str) -> dict | None:
        """The latest run of this batch job id."""
        row = self._x(f"SELECT {','.join(JOB_COLS)} FROM jobs WHERE job_id=? ORDER BY jid DESC LIMIT 1",
                      (job_id,)).fetchone()
        return dict(zip(JOB_COLS, row, strict=True)) if row else None

    def jobs(self, state: str | None = None) -> list[dict]:
        sql = f"SELECT {','.join(JOB_COLS)} FROM jobs"
        rows = (self._x(sql + " WHERE state!='ended' ORDER BY jid") if state == "active"
                else self._x(sql + " ORDER BY jid"))
        return [dict(zip(JOB_COLS, r, strict=True)) for r in rows]

    def set_state(self, jid: int, state: str, detail: str | None = None, ts: float | None = None) -> None:
        ts = ts or time.time()
        with self._lock:
            self._x("UPDATE jobs SET state=? WHERE jid=?", (state, jid))
            self._x("INSERT INTO job_states(jid, ts, state, detail) VALUES(?,?,?,?)", (jid, ts, state, detail))

    def end_job(self, jid: int, ended: float, cpu_seconds: float | None, limit_hits: int | None,
                summary: dict, detail: str | None = None) -> None:
        with self._lock:
            self._x("UPDATE jobs SET ended=?, cpu_seconds=?, pids_limit_hits=?, summary=? WHERE jid=?",
                    (ended, cpu_seconds, limit_hits, json.dumps(summary), jid))
            self.set_state(jid, "ended", detail, ended)

    def set_cpu(self, jid: int, cpu_seconds: float) -> None:
        """The latest CPU reading of a running job: what is left when its cgroup goes first."""
        self._x("UPDATE jobs SET cpu_seconds=? WHERE jid=?", (cpu_seconds, jid))

    def set_summary(self, jid: int, summary: dict) -> None:
        self._x("UPDATE jobs SET summary=? WHERE jid=?", (json.dumps(summary), jid))

    def add_events_lost(self, jid: int, n: int) -> None:
        self._x("UPDATE jobs SET events_lost=? WHERE jid=?", (n, jid))

    # -- identities ------------------------------------------------------------
    def touch_identity(self, jid: int, uid: int, ts: float, via: str | None = None,
                       last: float | None = None) -> None:
        """Record that uid acted in the job from ts to last (default ts).  first_seen only ever
        moves earlier, last_seen later: writers come in any order (the accounting may see a uid
        before the batched trace event that shows the switch is written), and whois must name the
        job at the time of the earliest event of the trail that shows the uid."""
        self._x("INSERT INTO identities(jid, uid, first_seen, last_seen, via) VALUES(?,?,?,?,?) "
                "ON CONFLICT(jid, uid) DO UPDATE SET first_seen=min(first_seen, excluded.first_seen), "
                "last_seen=max(last_seen, excluded.last_seen), "
                "via=coalesce(identities.via, excluded.via)", (jid, uid, ts, ts if last is None else last, via))

    def set_identity_cpu(self, jid: int, cpu: dict[int, float], ts: float) -> None:
        with self._lock:
            for uid, secs in cpu.items():
                self.touch_identity(jid, uid, ts)
                self._x("UPDATE identities SET cpu_seconds=? WHERE jid=? AND uid=?", (secs, jid, uid))

    def identities(self, jid: int) -> list[dict]:
        cols = ("uid", "first_seen", "last_seen", "via", "cpu_seconds")
        return [dict(zip(cols, r, strict=True)) for r in
                self._x(f"SELECT {','.join(cols)} FROM identities WHERE jid=? ORDER BY first_seen", (jid,))]

    def declare(self, jid: int, uid: int, label: str, ts: float, declared_by: int) -> None:
        self._x("INSERT INTO declarations(jid, uid, label, ts, declared_by) VALUES(?,?,?,?,?)",
                (jid, uid, label, ts, declared_by))

    def declarations(self, jid: int) -> list[dict]:
        return [{"uid": u, "label": lab, "ts": ts} for u, lab, ts in
                self._x("SELECT uid, label, ts FROM declarations WHERE jid=? ORDER BY id", (jid,))]

    def uid_seen(self, uid: int) -> bool:
        """Whether any job, running or ended, ever held uid."""
        return self._x("SELECT 1 FROM identities WHERE uid=? LIMIT 1", (uid,)).fetchone() is not None

    def whois(self, uid: int, at: float) -> list[dict]:
        """Jobs in which uid was held at time `at` (job start .. job end, or still running)."""
        rows = self._x(
            "SELECT j.jid, j.job_id, j.owner_uid, j.created, j.ended, j.state, i.first_seen, i.last_seen, i.via "
            "FROM identities i JOIN jobs j ON j.jid=i.jid WHERE i.uid=? AND j.created<=? "
            "AND (j.ended IS NULL OR j.ended>=?) "
            # a job that took uid only later did not hold it at `at`.  Slack: the trail prints
            # times truncated to milliseconds (plus a microsecond for float rounding), and an
            # investigator asks at exactly such a printed time.
            "AND i.first_seen<=? ORDER BY j.jid", (uid, at + TS_SLACK, at, at + TS_SLACK)).fetchall()
        out = []
        for jid, job_id, owner, created, ended, state, first, last, via in rows:
            decl = [d for d in self.declarations(jid) if d["uid"] == uid]
            out.append({"job_id": job_id, "pilot_uid": owner, "job_start": created, "job_end": ended,
                        "state": state, "first_seen": first, "last_seen": last, "via": via,
                        "declared": [d["label"] for d in decl]})
        return out

    # -- audit trail ------------------------------------------------------------
    def add_events(self, jid: int | None, events: Iterable[TraceEvent]) -> None:
        events = list(events)
        # json's C encoder called directly (protocol.dumps_plain): json.dumps' Python layers were a third of a row's cost
        rows = [(jid, e.job_id, e.ts, e.kind, e.pid, e.ppid, e.uid, e.euid, e.comm, e.filename,
                 dumps_plain(e.detail) if e.detail else None) for e in events]
        if not rows:
            return
        sql = ("INSERT INTO events(jid, job_id, ts, kind, pid, ppid, uid, euid, comm, filename, detail) "
               "VALUES(?,?,?,?,?,?,?,?,?,?,?)")
        with self._lock:
            if self.listener is None:
                self.db.executemany(sql, rows)
                return
            cols = ("jid", "job_id", "ts", "kind", "pid", "ppid", "uid", "euid", "comm", "filename")
            with self.transaction():   # ids and commit known before the exporter hears of them
                for r, e in zip(rows, events, strict=True):
                    self._tx_rows.append(dict(zip(cols, r, strict=False), id=self.db.execute(sql, r).lastrowid,
                                              detail=e.detail))

    def events(self, jid: int, after_id: int = 0, limit: int = 100000) -> list[dict]:
        cols = ("id", "ts", "job_id", "kind", "pid", "ppid", "uid", "euid", "comm", "filename", "detail")
        out = []
        for r in self._x(f"SELECT {','.join(cols)} FROM events WHERE jid=? AND id>? ORDER BY id LIMIT ?",
                         (jid, after_id, limit)):
            d = dict(zip(cols, r, strict=True))
            d["detail"] = json.loads(d["detail"]) if d["detail"] else {}
            out.append(d)
        return out

    def events_of_kind(self, jid: int, kind: str) -> list[dict]:
        """A job's events of one kind (e.g. its sshd adoptions), oldest first, without reading the trail."""
        out = []
        for pid, uid, ts, detail in self._x("SELECT pid, uid, ts, detail FROM events WHERE jid=? AND kind=? "
                                            "ORDER BY id", (jid, kind)):
            out.append({"pid": pid, "uid": uid, "ts": ts, "detail": json.loads(detail) if detail else {}})
        return out

    def set_lineage(self, jid: int, pid: int, orig_ppid: int, via: str | None, ts: float) -> None:
        """A lineage row of its own: what the agent wrote beside each trail event before the events carried it
        (kept readable for stores of that time)."""
        self._x("INSERT OR REPLACE INTO lineage(jid, pid, orig_ppid, via, ts) VALUES(?,?,?,?,?)",
                (jid, pid, orig_ppid, via, ts))

    def lineage(self, jid: int) -> dict[int, dict]:
        """pid -> {orig_ppid, via, ts} of a job's processes: what the latest trail event of each that names its
        original parent says (every tracer event does, in ``detail``), over the rows of the lineage table.

        Read from the trail, not written twice: a row per exec beside the event was a tenth of the agent's
        CPU per exec.  One pass over the job's events (its index), at the rate jobtrace asks."""
        out = {pid: {"orig_ppid": pp, "via": via, "ts": ts} for pid, pp, via, ts in
               self._x("SELECT pid, orig_ppid, via, ts FROM lineage WHERE jid=?", (jid,))}
        for pid, pp, via, ts in self._x(
                "SELECT pid, json_extract(detail, '$.orig_ppid'), json_extract(detail, '$.via'), ts FROM events "
                "WHERE jid=? AND detail LIKE '%\"orig\\_ppid\"%' ESCAPE '\\' AND json_valid(detail) ORDER BY id", (jid,)):
            if isinstance(pp, int):
                out[pid] = {"orig_ppid": pp, "via": via if isinstance(via, str) else None, "ts": ts}
        return out

    # -- misc -------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self._x("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._x("INSERT OR REPLACE INTO meta(key, value) VALUES(?,?)", (key, value))
