"""User namespaces end to end, through the real agent and the real CLIs (issue 14).

Container payloads (apptainer-style) run in unprivileged user namespaces: `unshare -Ur` makes the pilot "root"
inside while it stays the pilot's host uid; `newuidmap` (setuid root, from `uidmap`) gives a namespace a range of
*other* host uids from /etc/subuid.  Every uid in the trail, identities and whois must be a host uid; namespaced ids
only in `detail`.  Real users, a real /etc/subuid range (fixture, removed at teardown), real unshare / newuidmap /
nsenter; checked from the outside: `jobtrace --events --json`, `jobtrace --json`, `jobcage show/whois/kill/epilogue`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from jctest import (
    BOTH,
    JOBTRACE,
    PYTHON,
    AgentProc,
    Helpers,
    JcEnv,
    User,
    alive,
    create_user,
    delete_user,
    fifo,
    first,
    idents,
    job_scratch,
    open_gate,
    pick,
    pid_file,
    prologue,
    require,
    script,
    show,
    trail,
    wait_events,
    wait_for,
    whois,
)

pytestmark = [pytest.mark.root, pytest.mark.bpf]

UNSHARE, NSENTER, NEWUIDMAP = "/usr/bin/unshare", "/usr/bin/nsenter", "/usr/bin/newuidmap"
SUB_COUNT = 65536

# Inside a user namespace: become "root" there (setresgid/setresuid 0), say who we are, burn CPU, leave a file,
# wait.  argv: pidfile, burn seconds, file to create ('' = none), fifo to wait on.
NSROOT_PY = r"""
import os, sys, time
pidfile, burn, leave, gate = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
os.setresgid(0, 0, 0)
os.setresuid(0, 0, 0)
end = time.process_time() + burn
while time.process_time() < end:
    pass
if leave:
    with open(leave, "w") as f:
        f.write("left by the payload\n")
with open(pidfile + ".tmp", "w") as f:
    f.write("%d %s\n" % (os.getpid(), os.getresuid()))
os.rename(pidfile + ".tmp", pidfile)
with open(gate) as f:
    f.read()
"""


def whois_names_no_job(env: JcEnv, uid: int) -> None:
    """`jobcage whois --uid UID` names no job: an empty answer, or the one-line "never seen" refusal."""
    r = env.jobcage("whois", "--uid", str(uid), "--json")
    if r.rc == 0:
        assert json.loads(r.out) == [], r.out
    else:
        assert r.rc == 1 and "never seen" in r.err and len(r.err.strip().splitlines()) == 1, (r.rc, r.out, r.err)


def ns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/user").st_ino


def no_host_root(evs: list[dict], pilot: User) -> None:
    """No event of the job claims host uid 0 (or any uid but the pilot's)."""
    bad = [e for e in evs if e["kind"] != "declare" and (e["uid"] not in (-1, pilot.uid)
                                                         or e["euid"] not in (-1, pilot.uid))]
    assert not bad, f"events claim host ids the job never held: {bad}"


def tree_nodes(env: JcEnv, job: str) -> dict[int, dict]:
    doc = json.loads(env.run([JOBTRACE, job, "--json"]).ok().out)
    out: dict[int, dict] = {}

    def walk(nodes: list[dict]) -> None:
        for n in nodes:
            out[n["pid"]] = n
            walk(n.get("children", []))
    walk(doc["tree"] if isinstance(doc, dict) else doc)
    return out


@dataclass(frozen=True)
class NsUsers:
    pilot: User


@pytest.fixture(scope="module")
def nsusers() -> Iterator[NsUsers]:
    require(os.access(UNSHARE, os.X_OK) and os.access(NSENTER, os.X_OK), "util-linux unshare/nsenter are needed")
    u = create_user("jcns")
    try:
        yield NsUsers(u)
    finally:
        delete_user(u)


def userns_entries(evs: list[dict], backend: str) -> list[dict]:
    if backend == "bpf":
        return pick(evs, kind="userns", detail_syscall="unshare", detail_ok=True)
    return pick(evs, kind="userns", detail_observed=True)


# -- unshare -Ur: root inside, the pilot outside ---------------------------------------------------------------

@pytest.mark.parametrize("jc_env", BOTH, indirect=True)
def test_unshare_root_is_not_host_root(jc_env: JcEnv, agent_proc: AgentProc, nsusers: NsUsers,
                                       helpers: Helpers) -> None:
    """`unshare -Ur` + setresuid(0,0,0) inside: the trail has the namespace entry with its map (0 -> the pilot's
    host uid), the identity event (BPF) carries host ids with the namespaced ones in detail; no event, identity or
    whois answer names host uid 0; jobtrace marks the process as running in a user namespace."""
    backend = jc_env.doc["tracer"]["backend"]
    doc = jc_env.jobcage("doctor", "--json").json()["tracing"]
    if backend == "proc":   # what the fallback cannot see, said where admins look
        assert "does not report user-namespace entry" in doc["user namespaces"], doc
    else:
        assert doc["user namespaces"].startswith("traced"), doc
    pilot = nsusers.pilot
    job = f"ns-{secrets.token_hex(2)}"
    prologue(jc_env, job, pilot)
    d = job_scratch(jc_env, job)
    end = fifo(d, "end")
    py = script(d, "nsroot.py", NSROOT_PY)
    jc_env.start_job(job, f"{UNSHARE} -Ur {PYTHON} {py} {d}/payload.pid 0 '' {end}\nexit 0", user=pilot,
                     via_root=False)
    wait_for(lambda: (d / "payload.pid").exists(), 60, "the namespaced payload")
    pid_s, resuid = (d / "payload.pid").read_text().split(" ", 1)
    pid = int(pid_s)
    assert resuid.strip() == "(0, 0, 0)", "root inside its namespace"
    ino = ns_inode(pid)

    def entered(evs: list[dict]) -> bool:
        return any(e["detail"].get("userns", {}) and e["detail"]["userns"].get("inode") == ino
                   for e in userns_entries(evs, backend))
    evs = wait_events(agent_proc, job, entered, "the namespace entry")
    if backend == "bpf":
        evs = wait_events(agent_proc, job, lambda evs: bool(pick(evs, kind="setuid", pid=pid)), "the setresuid")

    tree = tree_nodes(jc_env, job)   # while the payload lives
    assert tree[pid]["userns"] == ino and tree[pid]["uid"] == tree[pid]["euid"] == pilot.uid, tree[pid]
    text = jc_env.run([JOBTRACE, job]).ok().out
    assert "[userns]" in text and f"user namespace {ino}" in text, text

    evs = trail(jc_env, job)
    entry = first(userns_entries(evs, backend), "namespace entry")
    ns = entry["detail"]["userns"]
    assert (ns["inode"], ns["owner_uid"], ns["level"]) == (ino, pilot.uid, 1), entry
    assert entry["uid"] == pilot.uid and entry["pid"] in (pid,) + tuple(
        e["pid"] for e in pick(evs, kind="exec", filename=UNSHARE)), entry
    maps = [e["detail"].get("uid_map") for e in pick(evs, kind="userns")] + \
        [e["detail"].get("idmap") for e in pick(evs, kind="userns", detail_map="uid_map")]
    assert [[0, pilot.uid, 1]] in maps, f"the namespace's map is in the trail: {maps}"
    if backend == "bpf":
        assert entry["detail"]["uid_map"] == [[0, pilot.uid, 1]] and entry["detail"]["gid_map"] == \
            [[0, pilot.gid, 1]], entry
        sw = first(evs, "setresuid inside", kind="setuid", pid=pid)
        dd = sw["detail"]
        assert dd["ok"] and dd["ns_args"] == [0, 0, 0] and dd["args"] == [pilot.uid] * 3, sw
        assert sw["uid"] == sw["euid"] == pilot.uid and dd["userns"]["inode"] == ino, sw
        assert dd["ns_ids"] == {"uid": 0, "euid": 0}, sw
        gid = first(evs, "setresgid inside", kind="setgid", pid=pid)["detail"]
        assert gid["ns_args"] == [0, 0, 0] and gid["args"] == [pilot.gid] * 3 and gid["gid"] == pilot.gid, gid
    # after the entry (the exec of unshare itself ran in the initial namespace)
    later = [e for e in evs if e["pid"] == pid and e["kind"] in ("exec", "setuid", "setgid")
             and e["filename"] != UNSHARE]
    assert later and all(e["detail"]["userns"]["inode"] == ino for e in later), later
    no_host_root(evs, pilot)

    s = show(jc_env, job)
    assert set(idents(s)) == {pilot.uid}, s["identities"]
    whois_names_no_job(jc_env, 0)   # nobody's job held host root
    assert [r["job_id"] for r in whois(jc_env, pilot.uid)] == [job]
    open_gate(end)
    wait_events(agent_proc, job, lambda evs: bool(pick(evs, kind="exit", pid=pid)), "the payload's exit")
    no_host_root(trail(jc_env, job), pilot)
    whois_names_no_job(jc_env, 0)


# -- newuidmap: another host uid from the subordinate range ---------------------------------------------------------

@pytest.fixture
def subids(nsusers: NsUsers) -> Iterator[tuple[int, int]]:
    """An /etc/subuid and /etc/subgid range for the pilot (host ids no user has), removed at teardown."""
    require(os.access(NEWUIDMAP, os.X_OK) and shutil.which("newgidmap") is not None,
            "newuidmap/newgidmap are missing (apt-get install uidmap)")
    used = set()
    for f in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f).read_text().splitlines():
                parts = line.split(":")
                if len(parts) == 3 and parts[1].isdigit():
                    used.add(int(parts[1]) // SUB_COUNT)
    block = next(b for b in (secrets.randbelow(20000) + 20000 for _ in range(100)) if b not in used)
    start = block * SUB_COUNT   # 1.3e9 .. 2.6e9: no passwd entry, no other test's range
    line = f"{nsusers.pilot.name}:{start}:{SUB_COUNT}\n"
    for f in ("/etc/subuid", "/etc/subgid"):
        _edit(f, lambda text: text + ("" if not text or text.endswith("\n") else "\n") + line)
    try:
        yield start, start
    finally:
        for f in ("/etc/subuid", "/etc/subgid"):
            _edit(f, lambda text: "".join(x for x in text.splitlines(keepends=True) if x != line))


def _edit(path: str, change: object) -> None:
    """Rewrite a shadow-utils file under shadow-utils' own lock (``PATH.lock``, made by link(2) like
    commonio_lock does), so a concurrent useradd/userdel (other test sessions) neither loses our line nor
    has its own change lost; atomically (rename)."""
    p = Path(path)
    lock, mine = Path(path + ".lock"), Path(f"{path}.{os.getpid()}.jctest")
    mine.write_text(f"{os.getpid()}\0")
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                os.link(mine, lock)
                break
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{lock} held for 30 s") from None
                time.sleep(0.05)
        try:
            p.touch(exist_ok=True)
            new = change(p.read_text())  # type: ignore[operator]
            tmp = p.with_name(p.name + ".jctest-new")
            tmp.write_text(new)
            tmp.chmod(0o644)
            tmp.rename(p)
        finally:
            lock.unlink()
    finally:
        mine.unlink()


@pytest.mark.parametrize("jc_env", [pytest.param({**b.values[0], "cleanup": {"enabled": True}}, id=b.id)
                                    for b in BOTH] +
                         [pytest.param({"tracer": {"backend": "bpf", "map_opens": True}, "cleanup": {"enabled": True}},
                                       id="bpf-map-opens")], indirect=True)
def test_newuidmap_subordinate_uid_is_an_identity(jc_env: JcEnv, agent_proc: AgentProc, nsusers: NsUsers,
                                                  subids: tuple[int, int], helpers: Helpers) -> None:
    """`unshare --map-users` (through the setuid helper newuidmap) maps the namespace's 0 to a subordinate host uid;
    the payload becomes it (setresuid 0 inside), burns 1 s of CPU and leaves a file.  That host uid is an identity
    of the job via newuidmap with its CPU share, whois maps it back to the job and pilot, `jobcage kill` kills the
    payload, and the epilogue's cleanup removes its file."""
    backend = jc_env.doc["tracer"]["backend"]
    pilot = nsusers.pilot
    sub_uid, sub_gid = subids
    job = f"sub-{secrets.token_hex(2)}"
    clean_dir = jc_env.scratch / f"{job}-tmp"
    clean_dir.mkdir()
    clean_dir.chmod(0o1777)
    jc_env.write_config({"cleanup": {"enabled": True, "dirs": [str(clean_dir)]}})
    agent_proc.restart()
    prologue(jc_env, job, pilot)
    d = job_scratch(jc_env, job)
    end = fifo(d, "end")
    py = script(d, "nsroot.py", NSROOT_PY)
    left = clean_dir / "payload-file"
    # unshare runs newuidmap/newgidmap for the map, then setgid(0)/setuid(0) inside (an exec'd python would have
    # no capabilities left in the namespace to do it itself: its uid is unmapped there until then)
    jc_env.start_job(job, f"{UNSHARE} --map-users={sub_uid},0,{SUB_COUNT} --map-groups={sub_gid},0,{SUB_COUNT} "
                          f"--setuid 0 --setgid 0 {PYTHON} {py} {d}/payload.pid 1.0 {left} {end}\nexit 0", user=pilot, via_root=False)
    try:
        wait_for(lambda: (d / "payload.pid").exists(), 90, "the payload as the subordinate uid")
    except BaseException:
        print(agent_proc.log(80), trail(jc_env, job))
        raise
    pid = int((d / "payload.pid").read_text().split()[0])
    st = os.stat(left)
    assert (st.st_uid, st.st_gid) == (sub_uid, sub_gid), "the payload's file belongs to the subordinate host ids"
    with open(f"/proc/{pid}/status") as f:
        assert [ln.split()[1:3] for ln in f if ln.startswith("Uid:")] == [[str(sub_uid)] * 2]

    evs = wait_events(agent_proc, job, lambda evs: bool(pick(evs, kind="setuid", uid=sub_uid))
                      or (backend == "proc" and bool(pick(evs, kind="setuid", pid=pid))), "the switch to the sub uid")
    evs = trail(jc_env, job)
    sw = first(evs, "identity switch", kind="setuid", pid=pid, uid=sub_uid)
    assert sw["euid"] == sub_uid and sw["detail"]["ok"] and sw["detail"]["via"] == NEWUIDMAP, sw
    if backend == "bpf":   # unshare's setuid(0): 0 in the namespace is the subordinate uid on the host
        assert sw["detail"]["ns_args"] == [0] and sw["detail"]["args"] == [sub_uid], sw
        assert sw["filename"] == UNSHARE and sw["detail"]["ns_ids"] == {"uid": 0, "euid": 0}, sw
        entry = first(evs, "namespace entry", kind="userns", detail_syscall="unshare", detail_ok=True)
        assert entry["detail"]["uid_map"] == [[0, sub_uid, SUB_COUNT]] and entry["detail"]["helper"] == NEWUIDMAP
        assert entry["detail"]["gid_map"] == [[0, sub_gid, SUB_COUNT]], entry
        if jc_env.doc["tracer"].get("map_opens"):   # the writer itself, seen opening the map
            mp = first(evs, "uid_map written by newuidmap", kind="userns", detail_map="uid_map")
            assert mp["detail"]["idmap"] == [[0, sub_uid, SUB_COUNT]] and mp["detail"]["helper"] == NEWUIDMAP, mp
            assert mp["filename"] == NEWUIDMAP and mp["detail"]["userns"]["inode"] == ns_inode(pid), mp
        else:
            assert not pick(evs, kind="userns", detail_syscall="map"), "map opens are not traced by default"
        hx = first(evs, "exec of newuidmap", kind="exec", filename=NEWUIDMAP)
        assert hx["uid"] == pilot.uid and hx["euid"] == 0 and hx["detail"]["setuid_file"], hx

    s = show(jc_env, job)
    got = idents(s)
    assert set(got) == {pilot.uid, sub_uid}, got
    assert got[sub_uid]["via"] == NEWUIDMAP, got[sub_uid]
    assert got[sub_uid]["cpu_seconds"] >= 0.9, f"the payload's CPU is the subordinate uid's: {got}"
    rows = whois(jc_env, sub_uid)
    assert [(r["job_id"], r["pilot_uid"], r["via"]) for r in rows] == [(job, pilot.uid, NEWUIDMAP)], rows

    r = jc_env.jobcage("kill", job).ok()
    assert r.rc == 0
    wait_for(lambda: not alive(pid), 30, "the payload to die")
    summary = json.loads(jc_env.jobcage("epilogue", job, "--json").ok().out)
    assert sub_uid in summary["cleanup"]["uids_cleaned"], summary["cleanup"]
    assert not left.exists(), "cleanup treats the subordinate uid's files as the job's"
    assert sub_uid in idents(summary)
    assert [x["job_id"] for x in whois(jc_env, sub_uid, time.time() - 1)] == [job]


# -- nested namespaces, and setns into a sibling job's namespace ---------------------------------------------------

@pytest.mark.parametrize("jc_env", BOTH, indirect=True)
def test_nested_and_setns_into_sibling_job(jc_env: JcEnv, agent_proc: AgentProc, nsusers: NsUsers) -> None:
    """Job A: a namespace inside a namespace (both `unshare -Ur`): both in A's trail, the inner one at level 2
    under the outer, with host ids.  Job B (same pilot) `nsenter`s into A's outer namespace: that is B's event and
    B's process; nothing of it lands in A's trail."""
    backend = jc_env.doc["tracer"]["backend"]
    pilot = nsusers.pilot
    job_a, job_b = f"nsa-{secrets.token_hex(2)}", f"nsb-{secrets.token_hex(2)}"
    prologue(jc_env, job_a, pilot)
    prologue(jc_env, job_b, pilot)
    d = job_scratch(jc_env, job_a)
    end = fifo(d, "end")
    inner = script(d, "inner.sh", f"echo $$ > {d}/inner.pid\nread _ < {end}\n")
    outer = script(d, "outer.sh", f"echo $$ > {d}/outer.pid\n{UNSHARE} -Ur /bin/sh {inner}\nexit 0\n")
    jc_env.start_job(job_a, f"{UNSHARE} -Ur /bin/sh {outer}\nexit 0", user=pilot, via_root=False)
    outer_pid, inner_pid = pid_file(d / "outer.pid"), pid_file(d / "inner.pid")
    outer_ns, inner_ns = ns_inode(outer_pid), ns_inode(inner_pid)
    assert outer_ns != inner_ns

    def has(ino: int, level: int) -> bool:
        return any((e["detail"].get("userns") or {}).get("inode") == ino
                   and e["detail"]["userns"]["level"] == level for e in userns_entries(a_evs[0], backend))
    a_evs = [[]]

    def both(evs: list[dict]) -> bool:
        a_evs[0] = evs
        return has(outer_ns, 1) and has(inner_ns, 2)
    wait_events(agent_proc, job_a, both, "both namespaces in job A's trail")

    # job B joins A's outer namespace (the pilot owns it, so it may), keeping its ids (setgroups is denied there)
    db = job_scratch(jc_env, job_b)
    end_b = fifo(db, "end")
    joined = script(db, "joined.sh", f"echo $$ > {db}/joined.pid\nread _ < {end_b}\n")
    jc_env.start_job(job_b, f"{NSENTER} --user --preserve-credentials --target {outer_pid} /bin/sh {joined}\nexit 0", user=pilot,
                     via_root=False)
    joined_pid = pid_file(db / "joined.pid")
    assert ns_inode(joined_pid) == outer_ns and jc_env.in_job(joined_pid, job_b)
    if backend == "bpf":
        b_evs = wait_events(agent_proc, job_b, lambda evs: bool(pick(evs, kind="userns", detail_syscall="setns",
                                                                     detail_ok=True)), "the setns in job B")
        sn = first(b_evs, "setns", kind="userns", detail_syscall="setns", detail_ok=True)
        assert sn["detail"]["userns"]["inode"] == outer_ns and sn["uid"] == pilot.uid, sn
    else:
        b_evs = wait_events(agent_proc, job_b, lambda evs: any(
            (e["detail"].get("userns") or {}).get("inode") == outer_ns for e in pick(evs, kind="userns")),
            "job B's process observed in A's namespace")
    wait_events(agent_proc, job_b, lambda evs: bool(pick(evs, pid=joined_pid)), "the joined shell's events")
    b_evs = trail(jc_env, job_b)
    assert pick(b_evs, pid=joined_pid), "the joined process is job B's"
    a_evs_now = trail(jc_env, job_a)
    b_pids = {e["pid"] for e in b_evs if e["pid"] > 0}   # not the lifecycle records (pid 0)
    assert not [e for e in a_evs_now if e["pid"] in b_pids], "job B's processes leaked into A's trail"
    ns = {(e["detail"].get("userns") or {}).get("inode"): e["detail"]["userns"] for e in
          userns_entries(a_evs_now, backend)}
    assert ns[inner_ns]["parent"] == outer_ns and ns[outer_ns]["owner_uid"] == ns[inner_ns]["owner_uid"] == pilot.uid
    inner_maps = [e["detail"].get("uid_map") or e["detail"].get("idmap") for e in pick(a_evs_now, kind="userns")
                  if (e["detail"].get("userns") or {}).get("inode") == inner_ns]
    assert [[0, pilot.uid, 1]] in inner_maps, f"the nested map in host ids: {inner_maps}"
    for evs in (a_evs_now, b_evs):
        no_host_root(evs, pilot)
    for job in (job_a, job_b):
        assert set(idents(show(jc_env, job))) == {pilot.uid}
    whois_names_no_job(jc_env, 0)
    open_gate(end_b)
    open_gate(end)


# -- container runtimes --------------------------------------------------------------------------------------------

RUNTIME_C = r"""
/* A stand-in with apptainer's name and command line (apptainer is not packaged for Debian 12): waits for one
 * line on stdin, so its arguments stay readable while the agent marks the exec. */
#include <stdio.h>
int main(void) { char b[8]; return fgets(b, sizeof b, stdin) ? 0 : 1; }
"""


@pytest.mark.parametrize("jc_env", BOTH, indirect=True)
def test_container_runtime_exec_marked(jc_env: JcEnv, agent_proc: AgentProc, nsusers: NsUsers,
                                       tmp_path: Path) -> None:
    """An exec of a file named like a configured runtime (`[tracer] container_runtimes`, default: apptainer,
    singularity and their starters) is marked in the trail with the image its arguments name; other execs are not."""
    require(shutil.which("gcc") is not None, "gcc is missing")
    pilot = nsusers.pilot
    job = f"rt-{secrets.token_hex(2)}"
    bindir = jc_env.scratch / f"{job}-bin"
    bindir.mkdir()
    bindir.chmod(0o755)
    (tmp_path / "rt.c").write_text(RUNTIME_C)
    subprocess.run(["gcc", "-O2", "-o", str(bindir / "apptainer"), str(tmp_path / "rt.c")], check=True)
    (bindir / "apptainer").chmod(0o755)
    prologue(jc_env, job, pilot)
    d = job_scratch(jc_env, job)
    end = fifo(d, "end")
    image = f"{d}/payload.sif"
    jc_env.start_job(job, f"echo $$ > {d}/pilot.pid\ncat {end} | {bindir}/apptainer exec --contain --bind /tmp "
                          f"{image} /bin/true\nexit 0", user=pilot, via_root=False)
    pilot_pid = pid_file(d / "pilot.pid")
    evs = wait_events(agent_proc, job, lambda evs: any(e["detail"].get("container_runtime") for e in evs),
                      "the runtime exec marked")
    rt = first(evs, "runtime exec", kind="exec", detail_container_runtime="apptainer")
    assert rt["filename"] == f"{bindir}/apptainer" and rt["detail"]["image"] == image, rt
    assert rt["ppid"] == pilot_pid and rt["uid"] == pilot.uid, rt
    assert not [e for e in pick(evs, kind="exec") if e is not rt and e["detail"].get("container_runtime")]
    open_gate(end)
