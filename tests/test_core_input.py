"""Bad input gets one clear line and changes nothing: malformed job ids (CLI and, for what argv cannot carry,
the control socket), unknown jobs, garbage on the control socket.  After each case: no cgroup created or
removed, the agent still answers, and it logged no internal error."""

from __future__ import annotations

import json
import os
import random
import secrets
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from jctest import AgentProc, JcEnv, User, frame, hierarchies, request, socket_exchange, wait_for

pytestmark = pytest.mark.root

ESCAPE = f"jct-esc{secrets.token_hex(3)}"  # a name that must never appear next to the subtree
BAD_IDS = ["a/b", "..", ".", "/etc", f"../{ESCAPE}", f"../../{ESCAPE}", "x" * 129, "y" * 5000, "",
           "cgroup.procs", "cgroup.kill", ".hidden", "a b", "a\nb", "\u00fcber", "a..b", "job;rm -rf /", "*"]
COMMANDS: list[tuple[str, ...]] = [("prologue", "{id}", "--uid", "0", "--pids-max", "64"), ("show", "{id}"),
                                   ("kill", "{id}"), ("suspend", "{id}"), ("resume", "{id}"), ("epilogue", "{id}"),
                                   ("adopt", "{id}", "--pid", "{pid}")]


def untouched(env: JcEnv, listing: set[str]) -> None:
    """Nothing was created or removed in our subtree, and nothing escaped beside it."""
    assert env.listing() == listing
    for root in hierarchies().values():
        assert not (root / ESCAPE).exists(), f"created {root / ESCAPE}"


@pytest.fixture(params=["direct", "agent"])
def path(request: pytest.FixtureRequest, jc_env: JcEnv) -> AgentProc | None:
    """Both ways a root CLI call can go: no agent (direct) or through it."""
    if request.param == "agent":
        return request.getfixturevalue("agent_proc")
    return None


def test_malformed_job_ids_cli(path: AgentProc | None, jc_env: JcEnv) -> None:
    jc_env.jobcage("prologue", "ok1", "--uid", "0").ok()   # one real job: bad ids must not touch it
    listing = jc_env.listing()
    sleeper = jc_env.popen(["sleep", "300"])
    for bad in BAD_IDS:
        for cmd in COMMANDS:
            args = [a.format(id=bad, pid=sleeper.pid) for a in cmd]
            r = jc_env.jobcage(*args)
            r.clean_error(1, "invalid job id")
        untouched(jc_env, listing)
    assert jc_env.jobcage("show", "ok1", "--json").json()["state"] == "running"
    if path is not None:
        assert path.ping() and "Traceback" not in path.log(tail=10_000)


def test_malformed_job_ids_socket(jc_env: JcEnv, agent_proc: AgentProc) -> None:
    """What argv cannot carry (NUL) or type (non-strings) goes over the socket: InvalidArgument each time."""
    listing = jc_env.listing()
    ids: list[object] = ["a\0b", "\0", "ok\0/../x", *BAD_IDS, 5, None, True, ["x"], {"a": 1}, 1.5]
    for bad in ids:
        for method, extra in (("prologue", {"uid": 0}), ("show", {}), ("kill", {}), ("suspend", {}),
                              ("resume", {}), ("epilogue", {}), ("adopt", {"pid": os.getpid()}),
                              ("events", {}), ("declare", {"uid": 0, "label": "x"}), ("trace", {})):
            resp = agent_proc.call(method, job_id=bad, **extra)
            assert resp["ok"] is False, (method, bad, resp)
            assert resp["error"]["type"] == "InvalidArgument", (method, bad, resp)
            assert "\n" not in resp["error"]["message"]
    untouched(jc_env, listing)
    assert agent_proc.ping() and "Traceback" not in agent_proc.log(tail=10_000)


def test_unknown_jobs(path: AgentProc | None, jc_env: JcEnv) -> None:
    listing = jc_env.listing()
    for cmd in COMMANDS[1:]:
        args = [a.format(id="nosuchjob", pid=os.getpid()) for a in cmd]
        jc_env.jobcage(*args).clean_error(1, "nosuchjob")
    untouched(jc_env, listing)
    # an ended job is history, not a target: lifecycle calls on it fail cleanly too
    jc_env.jobcage("prologue", "done1", "--uid", "0").ok()
    jc_env.jobcage("epilogue", "done1").ok()
    listing = jc_env.listing()
    for cmd in (("kill", "done1"), ("suspend", "done1"), ("resume", "done1"), ("adopt", "done1", "--pid", "1")):
        jc_env.jobcage(*cmd).clean_error(1, "done1")
    assert jc_env.jobcage("show", "done1", "--json").json()["state"] == "ended"
    untouched(jc_env, listing)


def test_bad_option_values(jc_env: JcEnv) -> None:
    """Usage errors: exit 2, one message, nothing created."""
    listing = jc_env.listing()
    for args in (("prologue",), ("prologue", "j"), ("prologue", "j", "--uid", "x"), ("prologue", "j", "--uid"),
                 ("prologue", "j", "k", "--uid", "0"), ("prologue", "j", "--uid", "0", "--bogus"),
                 ("adopt", "j", "--pid", "self"), ("run", "j"), ("run", "j", "--"), ("epilogue",),
                 ("suspend",), ("kill",), ("show",)):
        r = jc_env.jobcage(*args)
        assert r.rc == 2 and "Traceback" not in r.err and r.err.strip(), (args, r)
    # values that parse but make no sense: exit 1
    for args in (("prologue", "j", "--uid", "-1"), ("prologue", "j", "--uid", "0", "--pids-max", "0"),
                 ("prologue", "j", "--uid", "0", "--pids-max", "-5"), ("prologue", "j", "--uid", "0", "--pid", "-3")):
        jc_env.jobcage(*args).clean_error(1)
    untouched(jc_env, listing)


def garbage_cases() -> list[tuple[str, bytes]]:
    rnd = random.Random(20241125)  # reproducible "random" bytes
    cases = [(f"random{i}", bytes(rnd.getrandbits(8) for _ in range(rnd.choice([1, 3, 4, 7, 64, 512]))))
             for i in range(12)]
    cases += [
        ("empty", b""),
        ("half-header", b"\x00\x00"),
        ("too-long", struct.pack("!I", 0xFFFFFFFF) + b"{}"),
        ("just-over-limit", struct.pack("!I", (1 << 20) + 1) + b"{}"),
        ("short-body", struct.pack("!I", 100) + b'{"method":'),
        ("zero-length", struct.pack("!I", 0)),
        ("not-json", frame(b"hello agent")),
        ("not-utf8", frame(b"\xff\xfe\xfd")),
        ("json-array", frame(b"[1, 2, 3]")),
        ("json-number", frame(b"42")),
        ("json-string", frame(b'"prologue"')),
        ("json-null", frame(b"null")),
        ("no-method", frame({})),
        ("method-number", frame({"method": 5})),
        ("method-list", frame({"method": ["ping"]})),
        ("unknown-method", frame({"method": "rm_rf", "params": {}})),
        ("private-attr", frame({"method": "__init__", "params": {}})),
        ("dispatch", frame({"method": "dispatch", "params": {}})),
        ("params-list", frame({"method": "show", "params": [1]})),
        ("params-string", frame({"method": "prologue", "params": "job_id=x"})),
        ("extra-param", frame({"method": "show", "params": {"job_id": "x", "evil": 1}})),
        ("missing-param", frame({"method": "prologue", "params": {"job_id": "newjob"}})),
        ("uid-string", frame({"method": "prologue", "params": {"job_id": "newjob", "uid": "0"}})),
        ("uid-bool", frame({"method": "prologue", "params": {"job_id": "newjob", "uid": True}})),
        ("uid-negative", frame({"method": "prologue", "params": {"job_id": "newjob", "uid": -1}})),
        ("uid-float", frame({"method": "prologue", "params": {"job_id": "newjob", "uid": 1.5}})),
        ("pids-max-zero", frame({"method": "prologue", "params": {"job_id": "newjob", "uid": 0, "pids_max": 0}})),
        ("pid-zero", frame({"method": "prologue", "params": {"job_id": "newjob", "uid": 0, "pid": 0}})),
        ("pid-huge", frame({"method": "adopt", "params": {"job_id": "newjob", "pid": 1 << 40}})),
        ("signal-bogus", frame({"method": "kill", "params": {"job_id": "newjob", "signal_name": "SIGBOGUS"}})),
        ("whois-time", frame({"method": "whois", "params": {"uid": 0, "at": "yesterday"}})),
        ("nested-deep", frame(b"[" * 100_000 + b"]" * 100_000)),
        ("json-huge-int", frame(b'{"method": "adopt", "params": {"job_id": "x", "pid": ' + b"9" * 5000 + b"}}")),
    ]
    return cases


def test_control_socket_garbage(jc_env: JcEnv, agent_proc: AgentProc) -> None:
    jc_env.jobcage("prologue", "keep", "--uid", "0").ok()
    listing = jc_env.listing()
    for name, payload in garbage_cases():
        resp = socket_exchange(jc_env.socket_path, payload)
        if resp is not None:  # closing without an answer is fine too; an answer must be a clean error
            assert resp.get("ok") is False, (name, resp)
            err = resp["error"]
            assert err["type"] in ("ProtocolError", "InvalidArgument", "NoSuchJob", "AccessDenied"), (name, resp)
            assert err["message"] and "\n" not in err["message"], (name, resp)
            assert "internal error" not in err["message"], (name, resp)
        assert agent_proc.ping(), f"agent stopped answering after {name}:\n{agent_proc.log()}"
    assert agent_proc.alive
    untouched(jc_env, listing)
    assert agent_proc.result("show", job_id="keep")["state"] == "running"
    log = agent_proc.log(tail=100_000)
    assert "Traceback" not in log and "internal error" not in log, log


def test_silent_and_slow_clients_do_not_block(jc_env: JcEnv, agent_proc: AgentProc) -> None:
    """A client that connects and says nothing must not stop others from being served."""
    import socket

    idle = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(5)]
    try:
        for s in idle:
            s.connect(jc_env.socket_path)
            s.sendall(b"\x00\x00")  # half a header, then silence
        assert request(jc_env.socket_path, "ping")["ok"]
        assert agent_proc.result("list") == []
    finally:
        for s in idle:
            s.close()
    assert agent_proc.ping()


def test_non_root_raw_socket(jc_env: JcEnv, make_user: Callable[..., User], agent_proc: AgentProc) -> None:
    """SO_PEERCRED decides, not what the request claims: a user speaking the protocol directly gets
    AccessDenied for root-only methods, whatever it puts in params."""
    user = make_user()
    jc_env.jobcage("prologue", "rootjob", "--uid", "0").ok()
    listing = jc_env.listing()
    script = Path(jc_env.scratch) / "raw.py"
    script.write_text(
        "import json, socket, struct, sys\n"
        "out = []\n"
        "for req in json.loads(sys.argv[2]):\n"
        "    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
        "    d = json.dumps(req).encode(); s.sendall(struct.pack('!I', len(d)) + d)\n"
        "    n = struct.unpack('!I', s.recv(4, socket.MSG_WAITALL))[0]\n"
        "    out.append(json.loads(s.recv(n, socket.MSG_WAITALL)))\n"
        "print(json.dumps(out))\n")
    reqs = [{"method": m, "params": p} for m, p in (
        ("prologue", {"job_id": "userjob", "uid": user.uid}),
        ("prologue", {"job_id": "userjob", "uid": 0}),
        ("kill", {"job_id": "rootjob"}), ("suspend", {"job_id": "rootjob"}), ("resume", {"job_id": "rootjob"}),
        ("epilogue", {"job_id": "rootjob"}), ("show", {"job_id": "rootjob"}),
        ("adopt", {"job_id": "rootjob", "pid": 1}), ("whois", {"uid": 0}))]
    r = jc_env.run(["/usr/bin/python3", "-I", str(script), jc_env.socket_path, json.dumps(reqs)], user=user).ok()
    answers = json.loads(r.out)
    assert len(answers) == len(reqs)
    for req, resp in zip(reqs, answers, strict=True):
        assert resp["ok"] is False and resp["error"]["type"] == "AccessDenied", (req, resp)
    untouched(jc_env, listing)
    assert agent_proc.result("show", job_id="rootjob")["state"] == "running"
    wait_for(agent_proc.ping, 5, "the agent to answer")
