#!/usr/bin/python3
"""A hostile local user against the agent's control socket (stdlib only; run as a test user).

    flooder.py SOCKET STATUS_FILE idle N      hold N idle connections; reopen each one the agent closes
    flooder.py SOCKET STATUS_FILE slow N      N connections sending a valid request one byte per second
    flooder.py SOCKET STATUS_FILE garbage N   N malformed frames, one connection each, 4 at a time

It writes a JSON status line to STATUS_FILE every half second (and at the end for garbage):
{"mode", "open", "opened", "closed_by_agent", "answers", "refusals", "sent"}.  Used by
tests/test_control_socket.py and bench/control_flood.py.
"""

from __future__ import annotations

import json
import os
import random
import resource
import selectors
import socket
import struct
import sys
import time

SOCK, STATUS, MODE, N = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
stats = {"mode": MODE, "open": 0, "opened": 0, "closed_by_agent": 0, "answers": 0, "refusals": 0, "sent": 0,
         "connect_errors": 0, "done": False}
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = N + 64
if soft != resource.RLIM_INFINITY and soft < want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def write_status() -> None:
    tmp = STATUS + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(stats))
    os.replace(tmp, STATUS)


def frame(data: bytes) -> bytes:
    return struct.pack("!I", len(data)) + data


def connect() -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(SOCK)
    except OSError:
        stats["connect_errors"] += 1
        s.close()
        return None
    s.setblocking(False)
    stats["opened"] += 1
    return s


def note_answer(data: bytes) -> None:
    if len(data) >= 4:
        stats["answers"] += 1
        if b"agent busy" in data:
            stats["refusals"] += 1


def hold(slow: bool) -> None:
    """Keep N connections open; what the agent closes is reopened after a pause (a persistent attacker)."""
    sel = selectors.DefaultSelector()
    request = frame(json.dumps({"method": "ping", "params": {}}).encode())
    progress: dict[socket.socket, int] = {}
    next_status = next_byte = 0.0
    while True:
        while len(progress) < N:
            s = connect()
            if s is None:
                time.sleep(0.05)
                break
            progress[s] = 0
            sel.register(s, selectors.EVENT_READ)
        stats["open"] = len(progress)
        now = time.monotonic()
        if slow and now >= next_byte:
            next_byte = now + 1.0
            for s, i in list(progress.items()):
                if i < len(request):
                    try:
                        s.send(request[i:i + 1])
                        progress[s] = i + 1
                        stats["sent"] += 1
                    except OSError:
                        pass
        if now >= next_status:
            next_status = now + 0.5
            write_status()
        for key, _ in sel.select(0.2):
            s = key.fileobj  # type: ignore[assignment]
            try:
                data = s.recv(65536)  # type: ignore[union-attr]
            except OSError:
                data = b""
            note_answer(data)
            sel.unregister(s)
            s.close()  # type: ignore[union-attr]
            progress.pop(s, None)  # type: ignore[arg-type]
            stats["closed_by_agent"] += 1
        if len(progress) < N:
            time.sleep(0.1)  # reopen in batches, not in a hot loop


def garbage_frames(rnd: random.Random) -> list[tuple[bytes, bool]]:
    """(payload, shut down the write side after it) — the kinds of malformed frame of the issue."""
    out: list[tuple[bytes, bool]] = []
    nested = b"[" * 5000 + b"]" * 5000
    bad_params = [
        {"method": "prologue", "params": {"job_id": "x", "uid": "0"}},
        {"method": "adopt", "params": {"job_id": "../../etc", "pid": -1}},
        {"method": "show", "params": [1, 2]},
        {"method": "__init__", "params": {}},
        {"method": "whois", "params": {"uid": True, "at": "yesterday"}},
        {"method": "kill", "params": {"job_id": "j", "signal_name": "SIGBOGUS"}},
        {"method": "events", "params": {"job_id": "j", "after_id": -5, "limit": 10 ** 12}},
    ]
    for i in range(N):
        k = i % 5
        if k == 0:
            out.append((bytes(rnd.getrandbits(8) for _ in range(rnd.choice([1, 3, 4, 7, 64, 512]))), True))
        elif k == 1:
            out.append((struct.pack("!I", 0xFFFFFFFF) + b"{}", False))
        elif k == 2:
            out.append((frame(nested), False))
        elif k == 3:
            out.append((frame(json.dumps(bad_params[i % len(bad_params)]).encode()), False))
        else:
            out.append((frame(b"\xff\xfe not json"), False))
    return out


def garbage() -> None:
    rnd = random.Random(17)
    todo = garbage_frames(rnd)
    sel = selectors.DefaultSelector()
    inflight = 0
    next_status = 0.0
    while todo or inflight:
        while todo and inflight < 4:
            payload, shut = todo.pop()
            s = connect()
            if s is None:
                time.sleep(0.01)
                todo.append((payload, shut))
                break
            try:
                s.setblocking(True)
                s.settimeout(5)
                s.sendall(payload)
                if shut:
                    s.shutdown(socket.SHUT_WR)
                stats["sent"] += 1
            except OSError:
                pass
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            inflight += 1
        for key, _ in sel.select(1.0):
            s = key.fileobj  # type: ignore[assignment]
            try:
                data = s.recv(65536)  # type: ignore[union-attr]
            except OSError:
                data = b""
            note_answer(data)
            sel.unregister(s)
            s.close()  # type: ignore[union-attr]
            inflight -= 1
        if time.monotonic() >= next_status:
            next_status = time.monotonic() + 0.5
            write_status()
    stats["done"] = True
    write_status()


if MODE == "garbage":
    garbage()
else:
    hold(slow=MODE == "slow")
