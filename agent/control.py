"""The control socket's transport: one event loop, two small worker lanes.

The socket is mode 0666 (job users adopt their own processes through it), so every payload on the
node can talk to it and nothing a caller does may make the root agent hold more than a fixed amount:

* One thread (the loop) accepts, reads frames incrementally and writes answers, all non-blocking.
  A frame's length prefix is checked against the caller's size limit before any body is buffered,
  and a whole request (and later its answer) has one deadline: a byte-a-second sender gains nothing.
* A non-root uid has at most ``uid_connections`` connections being read or answered; up to
  ``uid_queue`` more wait unread (an fd and a small object each, no buffer) and are served in
  order; beyond that, or beyond ``max_connections`` non-root connections in all, a connection is
  refused.  A refusal is one answer frame (one line for the client), a counter per reason and a
  rate-limited log line.
* Complete requests go to a worker lane: uid 0 (the batch system's hooks) has its own lane, so a
  root request never waits behind a non-root one; non-root requests share a small pool served
  round-robin by uid, so one uid cannot starve another.  While root work runs, the non-root lane
  and the loop step aside (the GIL is one: a busy Python thread delays every I/O return of root's).

The wire format is agent/protocol.py's; the method table is agent/api.py's.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

from . import protocol
from .api import Api, Caller
from .config import Config
from .errors import Busy, JobcageError, ProtocolError

log = logging.getLogger("jobcage.agent")

_CRED = struct.Struct("3i")
_READ, _WORK, _WRITE, _WAIT, _DONE = range(5)
ACCEPT_BATCH = 256        # accepts per loop turn: reads and writes progress under a connect storm
SWITCH_INTERVAL = 0.0005  # seconds (sys.setswitchinterval; Python's default is 0.005)
REPORT_INTERVAL = 10.0    # seconds between log lines about refusals of one reason
REASONS = ("uid_limit", "connection_limit", "too_large", "timeout", "malformed", "incomplete", "no_fds")


class _Conn:
    __slots__ = ("sock", "caller", "hdr", "body", "need", "deadline", "state", "out", "started")

    def __init__(self, sock: socket.socket, caller: Caller) -> None:
        self.sock = sock
        self.caller = caller
        self.hdr = b""
        self.body: bytearray | None = None
        self.need = 0
        self.deadline = 0.0
        self.state = _WAIT
        self.out: memoryview | None = None
        self.started = False   # any byte received


class _Uid:
    __slots__ = ("active", "waiting")

    def __init__(self) -> None:
        self.active = 0
        self.waiting: collections.deque[_Conn] = collections.deque()


class Refusals:
    """Counters per reason (for metrics) and a log that says each reason at most once per interval,
    with the number of refusals it did not spell out."""

    def __init__(self, interval: float = REPORT_INTERVAL) -> None:
        self.interval = interval
        self.lock = threading.Lock()
        self.counts = dict.fromkeys(REASONS, 0)
        self._unsaid = dict.fromkeys(REASONS, 0)
        self._last = dict.fromkeys(REASONS, -1e9)

    def add(self, reason: str, caller: Caller | None, message: str) -> None:
        now = time.monotonic()
        with self.lock:
            self.counts[reason] += 1
            if now - self._last[reason] < self.interval:
                self._unsaid[reason] += 1
                return
            self._last[reason] = now
            more, self._unsaid[reason] = self._unsaid[reason], 0
        who = f"uid {caller.uid} pid {caller.pid}" if caller is not None else "unknown peer"
        extra = f" (and {more} more since the last report)" if more else ""
        log.warning("control socket: refused %s (%s): %s%s", who, reason, message, extra)

    def flush(self) -> None:
        """Say what was left unsaid once its interval is over (called from the loop)."""
        now = time.monotonic()
        said = []
        with self.lock:
            for reason, n in self._unsaid.items():
                if n and now - self._last[reason] >= self.interval:
                    said.append((reason, n))
                    self._unsaid[reason] = 0
                    self._last[reason] = now
        for reason, n in said:
            log.warning("control socket: refused %d more connection(s) (%s) in the last %.0f s", n, reason,
                        self.interval)


class _Lane:
    """Worker threads started on demand up to `size`; per-uid queues served round-robin."""

    def __init__(self, name: str, size: int, run: Callable[[_Conn], None],
                 gate: Callable[[], None] | None = None, idle: threading.Event | None = None) -> None:
        self.name = name
        self.size = max(1, size)
        self.run = run
        self.gate = gate            # called before each item: the user lane waits for root's to be idle
        self.idle_event = idle      # set while nothing is queued or running here
        self.cv = threading.Condition()
        self.queues: dict[int, collections.deque[_Conn]] = {}
        self.order: collections.deque[int] = collections.deque()
        self.threads: list[threading.Thread] = []
        self.idle = 0
        self.busy = 0               # items taken and not finished
        self.closed = False

    def submit(self, c: _Conn) -> None:
        with self.cv:
            uid = c.caller.uid
            q = self.queues.get(uid)
            if q is None:
                q = self.queues[uid] = collections.deque()
                self.order.append(uid)
            q.append(c)
            if self.idle_event is not None:
                self.idle_event.clear()
            if self.idle:
                self.idle -= 1       # that worker is spoken for: the next submit may start another
                self.cv.notify()
            elif len(self.threads) < self.size:
                t = threading.Thread(target=self._worker, name=f"control-{self.name}-{len(self.threads)}",
                                     daemon=True)
                self.threads.append(t)
                t.start()

    def pending(self) -> bool:
        return bool(self.order) or self.busy > 0

    def _worker(self) -> None:
        while True:
            with self.cv:
                while not self.order and not self.closed:
                    self.idle += 1
                    self.cv.wait()
                if self.closed:
                    return
                uid = self.order.popleft()
                q = self.queues[uid]
                c = q.popleft()
                if q:
                    self.order.append(uid)
                else:
                    del self.queues[uid]
                self.busy += 1
            try:
                if self.gate is not None:
                    self.gate()
                self.run(c)
            finally:
                with self.cv:
                    self.busy -= 1
                    if self.idle_event is not None and not self.busy and not self.order:
                        self.idle_event.set()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()


class ControlServer:
    """The control socket at cfg.socket_path, served by `serve_forever` in one thread."""

    def __init__(self, cfg: Config, api: Api) -> None:
        self.api = api
        self.path = cfg.socket_path
        self.per_uid = max(1, cfg.uid_connections)
        self.uid_queue = max(0, cfg.uid_queue)
        self.max_conns = max(1, cfg.max_connections)
        self.user_limit = max(64, min(cfg.max_request_bytes, protocol.MAX_MESSAGE))
        self.timeout = max(0.1, cfg.request_timeout)
        self.refusals = Refusals()
        self.requests = {"root": 0, "user": 0}
        self.queued_total = 0            # non-root connections that had to wait for a slot
        self._uids: dict[int, _Uid] = {}
        self._rr: collections.deque[int] = collections.deque()   # uids with waiting connections
        self._live: set[_Conn] = set()   # reading, working or writing (both lanes)
        self.held = 0                    # non-root connections held: live + waiting
        self.user_live = 0
        self._inbox: collections.deque[tuple[_Conn, bytes | None]] = collections.deque()
        self._stop = False
        self._stopped = threading.Event()
        self._need_promote = False
        self._frames: dict[str, bytes] = {}
        self._last_bug = -1e9
        self._paused_until = 0.0         # accept paused after EMFILE (the listener would spin)
        self._root_idle = threading.Event()
        self._root_idle.set()
        self.root_lane = _Lane("root", cfg.root_workers, self._work, idle=self._root_idle)
        self.user_lane = _Lane("user", cfg.workers, self._work, gate=self._wait_root)
        self._raise_nofile()
        self.listener = self._listen(self.path, None)
        # Root's own listener (0600): a flood of users' connections fills the other one's backlog, not this.
        self.root_path = cfg.root_socket
        self.root_listener = self._listen(self.root_path, 0o600)
        self.listeners = (self.root_listener, self.listener)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel = selectors.DefaultSelector()
        for ls in self.listeners:
            self.sel.register(ls, selectors.EVENT_READ, ls)
        self.sel.register(self._wake_r, selectors.EVENT_READ, "wake")

    @staticmethod
    def _listen(path: str, mode: int | None) -> socket.socket:
        try:
            os.unlink(path)   # a stale socket of an earlier agent
        except FileNotFoundError:
            pass
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if mode is not None:
            os.fchmod(ls.fileno(), mode)   # the socket file is created with this mode: no window at bind
        ls.bind(path)
        if mode is not None:
            os.chmod(path, mode)
        ls.listen(1024)
        ls.setblocking(False)
        return ls

    def _raise_nofile(self) -> None:
        """Room for every connection we may hold plus the agent's own files (db, tracer buffers)."""
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = self.max_conns + 512
        if soft != resource.RLIM_INFINITY and soft < want:
            new = want if hard == resource.RLIM_INFINITY else min(want, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
                soft = new
            except (ValueError, OSError):
                pass
        if soft != resource.RLIM_INFINITY and soft - 256 < self.max_conns:
            self.max_conns = max(16, soft - 256)
            log.warning("control socket: RLIMIT_NOFILE %d allows only %d non-root connections", soft,
                        self.max_conns)

    # -- stats for metrics ------------------------------------------------------------------------------
    def stats(self) -> dict:
        waiting = sum(len(u.waiting) for u in list(self._uids.values()))
        return {"refused": dict(self.refusals.counts), "requests": dict(self.requests),
                "queued_total": self.queued_total, "user_active": self.user_live, "user_waiting": waiting,
                "root_active": len(self._live) - self.user_live}

    # -- the loop ---------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        try:
            self._serve()
        finally:
            self._stopped.set()

    def _serve(self) -> None:
        # A thread returning from I/O waits up to the switch interval for the interpreter while another
        # runs Python code; root's request does a few dozen syscalls.  5 ms -> 0.5 ms bounds that convoy.
        sys.setswitchinterval(SWITCH_INTERVAL)
        next_flush = time.monotonic() + 1.0
        while not self._stop:
            try:
                self._turn()
            except Exception:  # a bug here must not take the socket down: say it (rarely) and go on
                now = time.monotonic()
                if now - self._last_bug >= REPORT_INTERVAL:
                    self._last_bug = now
                    log.exception("control socket: internal error in the loop")
            if self._paused_until and time.monotonic() >= self._paused_until:
                self._paused_until = 0.0
                for ls in self.listeners:
                    self.sel.register(ls, selectors.EVENT_READ, ls)
            if time.monotonic() >= next_flush:
                next_flush = time.monotonic() + 1.0
                self.refusals.flush()
            if not self._root_idle.is_set():
                time.sleep(0.001)  # root work in flight: let its thread have the interpreter

    def _turn(self) -> None:
        events = self.sel.select(self._deadlines())
        if len(events) > 1:   # root's listener and connections first
            events.sort(key=lambda e: not (e[0].data is self.root_listener
                                           or (isinstance(e[0].data, _Conn) and e[0].data.caller.uid == 0)))
        for key, _mask in events:
            if isinstance(key.data, socket.socket):
                self._accept(key.data)
            elif key.data == "wake":
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            else:
                c: _Conn = key.data
                try:
                    if c.state == _READ:
                        self._on_read(c)
                    elif c.state == _WRITE:
                        self._on_write(c)
                except Exception:
                    self._close(c)
                    raise
        self._drain_inbox()
        self._promote()

    def shutdown(self) -> None:
        self._stop = True
        self._wake()
        self._stopped.wait(5)

    def server_close(self) -> None:
        self.root_lane.close()
        self.user_lane.close()
        for c in list(self._live):
            self._close(c)
        for u in self._uids.values():
            for c in u.waiting:
                c.sock.close()
        self._uids.clear()
        self.sel.close()
        for ls, path in ((self.listener, self.path), (self.root_listener, self.root_path)):
            ls.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # full: the loop is already woken

    def _deadlines(self) -> float:
        """Expire connections past their deadline; the select timeout until the next one."""
        now = time.monotonic()
        nxt = now + 1.0
        for c in [c for c in self._live if c.state in (_READ, _WRITE)]:
            if c.deadline <= now:
                if c.state == _READ:
                    self._refuse(c, "timeout", f"request not complete within {self.timeout:g} s")
                else:
                    self.refusals.add("timeout", c.caller, f"answer not read within {self.timeout:g} s")
                    self._close(c)
            else:
                nxt = min(nxt, c.deadline)
        if self._paused_until:
            nxt = min(nxt, self._paused_until)
        return max(0.0, nxt - now)

    def _accept(self, listener: socket.socket) -> None:
        batch = ACCEPT_BATCH if listener is self.root_listener or self._root_idle.is_set() else 8
        for _ in range(batch):
            try:
                sock, _addr = listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.refusals.add("no_fds", None, f"accept failed: {e.strerror}")
                    if not self._paused_until:
                        for ls in self.listeners:   # or the loop spins on a readable listener
                            self.sel.unregister(ls)
                        self._paused_until = time.monotonic() + 0.1
                return
            sock.setblocking(False)
            try:
                pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
            except OSError:
                sock.close()
                continue
            self._admit(_Conn(sock, Caller(pid, uid, gid)))

    def _admit(self, c: _Conn) -> None:
        uid = c.caller.uid
        if uid == 0:
            self._activate(c)
            return
        u = self._uids.get(uid)
        if u is None:
            u = self._uids[uid] = _Uid()
        if self.held >= self.max_conns:
            self._refuse(c, "connection_limit", f"agent busy: {self.max_conns} connections of users open; try again")
        elif u.active < self.per_uid and not u.waiting:
            self.held += 1
            self._activate(c)
        elif len(u.waiting) < self.uid_queue:
            self.held += 1
            self.queued_total += 1
            u.waiting.append(c)
            if len(u.waiting) == 1:
                self._rr.append(uid)
        else:
            self._refuse(c, "uid_limit", f"agent busy: too many connections from uid {uid} "
                                         f"({self.per_uid} served and {self.uid_queue} waiting); try again")
        if not u.active and not u.waiting and self._uids.get(uid) is u:
            del self._uids[uid]

    def _activate(self, c: _Conn) -> None:
        if c.caller.uid != 0:
            self._uids[c.caller.uid].active += 1
            self.user_live += 1
        c.state = _READ
        c.deadline = time.monotonic() + self.timeout
        self._live.add(c)
        try:
            self.sel.register(c.sock, selectors.EVENT_READ, c)
        except (OSError, ValueError):
            self._close(c)
            return
        self._on_read(c)  # a hook's request is usually there already: no second loop turn

    def _promote(self) -> None:
        """Slots freed: start the waiting connections of uids under their cap, round-robin."""
        while self._need_promote:
            self._need_promote = False
            for _ in range(len(self._rr)):
                uid = self._rr.popleft()
                u = self._uids.get(uid)
                if u is None or not u.waiting:
                    continue
                while u.waiting and u.active < self.per_uid:
                    self._activate(u.waiting.popleft())
                if u.waiting:
                    self._rr.append(uid)

    # -- reading ----------------------------------------------------------------------------------------
    def _on_read(self, c: _Conn) -> None:
        try:
            if c.body is None:
                data = c.sock.recv(4 - len(c.hdr))
            else:
                data = c.sock.recv(min(c.need - len(c.body), 65536))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if c.started:
                self.refusals.add("incomplete", c.caller, "connection closed mid-message")
            self._close(c)
            return
        c.started = True
        if c.body is None:
            c.hdr += data
            if len(c.hdr) < 4:
                return
            (n,) = protocol.HEADER.unpack(c.hdr)
            limit = protocol.MAX_MESSAGE if c.caller.uid == 0 else self.user_limit
            if n > limit:  # checked before anything of the body is buffered
                self._refuse(c, "too_large", f"message too large ({n} bytes, limit {limit})")
                return
            c.need = n
            c.body = bytearray()
            if n:
                return self._on_read(c)  # the body is often in the same segment
        else:
            c.body += data
        if len(c.body) < c.need:
            return
        self.sel.unregister(c.sock)
        c.state = _WORK
        if c.caller.uid == 0:
            self.requests["root"] += 1
            self.root_lane.submit(c)
        else:
            self.requests["user"] += 1
            self.user_lane.submit(c)

    # -- answering (worker threads) ---------------------------------------------------------------------
    def _wait_root(self) -> None:
        # Non-root work waits while root's runs (a hook takes milliseconds); bounded, so a long epilogue
        # or a stream of hooks only slows users down.
        self._root_idle.wait(0.05)

    def _work(self, c: _Conn) -> None:
        body, c.body = bytes(c.body or b""), None
        data = protocol.encode(self.answer(c.caller, body))
        if len(data) > protocol.MAX_MESSAGE + protocol.HEADER.size:
            data = protocol.encode({"ok": False, "error": ProtocolError("answer too large").to_dict()})
        try:
            sent = c.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = len(data)   # the caller is gone: nothing left to write
        self._inbox.append((c, data[sent:] if sent < len(data) else None))
        self._wake()

    def answer(self, caller: Caller, body: bytes) -> dict:
        """One request's answer; never raises (a bug must not kill the agent: the caller gets one line)."""
        try:
            req = protocol.decode(body)
        except RecursionError:  # json.loads of a deeply nested document, e.g. "[" * 100000
            req = None
            msg = "message is nested too deeply"
        except ProtocolError as e:
            req = None
            msg = str(e)
        if req is None:
            self.refusals.add("malformed", caller, msg)
            return {"ok": False, "error": ProtocolError(msg).to_dict()}
        try:
            return {"ok": True, "result": self.api.dispatch(caller, req.get("method"), req.get("params", {}))}
        except ProtocolError as e:   # unknown method, params not an object
            self.refusals.add("malformed", caller, str(e))
            return {"ok": False, "error": e.to_dict()}
        except JobcageError as e:
            return {"ok": False, "error": e.to_dict()}
        except Exception as e:
            log.exception("internal error in %r", req.get("method"))
            return {"ok": False, "error": {"type": "JobcageError", "message": f"internal error: {e}"}}

    # -- writing and closing (loop) ---------------------------------------------------------------------
    def _drain_inbox(self) -> None:
        while self._inbox:
            c, rest = self._inbox.popleft()
            if rest is None:
                self._close(c)
                continue
            c.out = memoryview(rest)
            c.state = _WRITE
            c.deadline = time.monotonic() + self.timeout
            try:
                self.sel.register(c.sock, selectors.EVENT_WRITE, c)
            except (OSError, ValueError):
                self._close(c)

    def _on_write(self, c: _Conn) -> None:
        assert c.out is not None
        try:
            sent = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            self._close(c)
            return
        c.out = c.out[sent:]
        if not len(c.out):
            self._close(c)

    def _refuse(self, c: _Conn, reason: str, message: str) -> None:
        """One answer frame (best effort, non-blocking: it fits an empty socket buffer), then close."""
        self.refusals.add(reason, c.caller, message)
        data = self._frames.get(message)
        if data is None:   # a flood repeats a few messages: encode each once
            if len(self._frames) > 256:
                self._frames.clear()
            err = Busy(message) if reason in ("uid_limit", "connection_limit") else ProtocolError(message)
            data = self._frames[message] = protocol.encode({"ok": False, "error": err.to_dict()})
        try:
            c.sock.send(data)
        except OSError:
            pass
        self._close(c)

    def _close(self, c: _Conn) -> None:
        if c in self._live:
            self._live.discard(c)
            if c.state in (_READ, _WRITE):
                try:
                    self.sel.unregister(c.sock)
                except (KeyError, ValueError):
                    pass
            if c.caller.uid != 0:
                self.held -= 1
                self.user_live -= 1
                u = self._uids[c.caller.uid]
                u.active -= 1
                if not u.active and not u.waiting:
                    del self._uids[c.caller.uid]
        c.sock.close()
        c.state = _DONE   # an event of this turn may still name it
        c.body = None
        c.out = None
        if c.caller.uid != 0 and self._rr:
            self._need_promote = True  # at the end of the loop turn: no recursion through _activate
