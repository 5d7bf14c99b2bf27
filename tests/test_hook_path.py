"""The hook path's own fast parts agree with the slow originals they stand in for: the control socket's
codec with `json`, the config's plain-TOML reader with `tomllib`, the cleanup walk that skips untouched
leaf directories with the walk that opens them.  And the hook commands, through a running agent, import
none of json, re, tomllib, typing, sqlite3, click or rich (bench/hook_latency.py says what that is worth).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
from jctest import JcEnv, require, toml_dump

from jobcage.agent import protocol
from jobcage.agent.cleanup import BEFORE_JOB, CleanupReport, _counts_subdirs, mount_points, walk_remove
from jobcage.agent.config import DEFAULT_PATH, SECTIONS, Config, load, simple_toml
from jobcage.agent.errors import InvalidArgument, ProtocolError

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = Path(sys.executable).parent / "jobcage-launcher"

MESSAGES = [
    {"method": "ping", "params": {}},
    {"method": "epilogue", "params": {"job_id": "j1", "keep": ["/tmp/a b", "/tmp/é\u2028\"\\\n"]}},
    {"ok": True, "result": {"cpu_seconds": 1.5, "big": 10 ** 30, "neg": -0.0, "tiny": 1e-300, "none": None,
                            "flags": [True, False], "nested": {"a": [[], {}, [1, {"b": "c"}]]}}},
    {"ok": False, "error": {"type": "NoSuchJob", "message": "unknown job x", "job_id": "x", "pid": None}},
    {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")},
]


@pytest.mark.parametrize("msg", MESSAGES, ids=range(len(MESSAGES)))
def test_codec_is_json(msg: dict) -> None:
    wire = protocol.encode(msg)
    assert wire[4:] == json.dumps(msg, separators=(",", ":")).encode()
    assert repr(protocol.decode(wire[4:])) == repr(json.loads(wire[4:]))


@pytest.mark.parametrize("bad", ["", " ", "{", '{"a":1} x', "[1,]", "nul", "{'a':1}", "1 2", '{"a":1}}', "\x00"])
def test_codec_refuses_what_json_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        json.loads(bad)
    with pytest.raises(ProtocolError):
        protocol.decode(bad.encode())


def test_codec_edges() -> None:
    assert protocol.decode(b' \n{"a": [1, 2.5]}\r\n') == {"a": [1, 2.5]}
    with pytest.raises(ProtocolError, match="not a JSON object"):
        protocol.decode(b"[1]")
    with pytest.raises(ProtocolError):
        protocol.decode(b"\xff{}")
    with pytest.raises(RecursionError):
        protocol.decode(b"[" * 100_000)
    with pytest.raises(TypeError, match="not JSON serializable"):
        protocol.encode({"a": object()})
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="ircular"):
        protocol.encode(loop)


# --- the config's plain TOML ---------------------------------------------------------------------------------

PLAIN = [
    # what the test suite and the bench write (tests/jctest.py toml_dump), and a hand-written site config
    toml_dump({"cgroups": {"mode": "auto", "subtree": "jobcage-t1", "placement": "top"},
               "agent": {"state_dir": "/var/lib/x", "socket": "/run/x.sock", "reconcile_interval": 1.0},
               "tracer": {"backend": "off"}, "cleanup": {"enabled": False, "dirs": ["/tmp", "/var/tmp"]},
               "jobs": {"default_pids_max": 4096, "kill_timeout": 10}, "prune": {"exempt_uids": [0, 1, 2]}}),
    "# jobcage on this node\n[agent]\nsocket = '/run/jobcage/agent.sock'   # literal string\n\n"
    "[cleanup]\n  enabled = true\n  dirs = [ \"/tmp\", '/dev/shm', ]\n[jobs]\ndefault_pids_max=512\n"
    "kill_timeout = -0.5\n[pam]\nmessage = \"no job, no login: see https://x/y#z\"#c\n",
    "",
    "\n\n# only comments\n   \t# indented\n",
    "[a]\nb = \"tab\tinside\"\nc = 'back\\slash'\nd = \"\"\ne = []\nf = [ ]\ng = [1,2 , 3]\nh = 0\ni = -12\n",
]

TRICKY = [
    # each is either refused by tomllib or beyond the plain subset: tomllib decides
    "[a]\nb = 1\nb = 2\n", "[a]\n[a]\n", "x = 1\n[x]\n", "[a.b]\nc = 1\n", "[[a]]\n", "[a]\nb.c = 1\n",
    '[a]\n"b" = 1\n', "[a]\nb = \"esc\\\"aped\"\n", "[a]\nb = \"\"\"multi\nline\"\"\"\n", "[a]\nb = '''x'''\n",
    "[a]\nb = 1_000\n", "[a]\nb = 0x10\n", "[a]\nb = 1e3\n", "[a]\nb = inf\n", "[a]\nb = +1\n", "[a]\nb = 01\n",
    "[a]\nb = 1.\n", "[a]\nb = .5\n", "[a]\nb = 1979-05-27\n", "[a]\nb = {c = 1}\n", "[a]\nb = [\n1,\n]\n",
    "[a]\nb = [[1]]\n", "[a]\nb = [1,,2]\n", "[a]\nb = [,]\n", "[a]\nb = 1 2\n", "[a]\nb =\n", "[a]\n= 1\n",
    "[a]\nb c = 1\n", "[a]\nb = True\n", "[a]\nb = \"x\" y\n", "[a]\r\nb = 1\r\n", "[a]\nb = \"\x01\"\n",
    "[a]\nb = 1\x7f\n", "[ a ]\nb = 1\n", "[a] # c\nb = 1 # d\n", "[a]\nb = \"unterminated\n", "[a\nb = 1\n",
    "[a]]\n", "[]\n", "\ufeff[a]\nb = 1\n", "[a]\nb = -\n", "[a]\nb = -0\n", "[a]\nb = truex\n", "[a]\nb=1]\n",
]


def _agrees(text: str) -> dict | None:
    fast = simple_toml(text)
    try:
        slow = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        assert fast is None, f"the plain reader accepted what tomllib refuses: {text!r} -> {fast!r}"
        return None
    assert fast is None or fast == slow, f"{text!r}: plain reader {fast!r}, tomllib {slow!r}"
    return fast


@pytest.mark.parametrize("text", PLAIN, ids=range(len(PLAIN)))
def test_plain_configs_are_read_without_tomllib(text: str) -> None:
    assert _agrees(text) is not None, f"not read by the plain reader: {text!r}"


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_plain_reader_agrees_with_tomllib(text: str) -> None:
    _agrees(text)


def test_plain_reader_agrees_on_mutations() -> None:
    """Thousands of one- and two-character edits of real configs: never a different reading."""
    rng = random.Random(1234)
    alphabet = "[]=\"'#,.-+_ \t\n\\0123456789abexyz"
    seeds = PLAIN + TRICKY[:12]
    for _ in range(6000):
        s = list(rng.choice(seeds))
        for _ in range(rng.randint(1, 2)):
            i = rng.randrange(len(s) + 1)
            op = rng.random()
            if op < 0.4 and s:
                del s[min(i, len(s) - 1)]
            elif op < 0.8:
                s.insert(i, rng.choice(alphabet))
            elif s:
                s[min(i, len(s) - 1)] = rng.choice(alphabet)
        _agrees("".join(s))


def test_every_default_written_out_agrees() -> None:
    """A config that spells out every key with its default (what a site copies from docs/operations.md)
    reads the same either way; without the regex defaults of [attach] it takes the fast path."""
    doc = {sec: {key: getattr(Config, attr) for key, attr in keys.items()} for sec, keys in SECTIONS.items()}
    _agrees(toml_dump(doc))
    del doc["attach"]["job_patterns"]   # regexes: backslash escapes in a basic string
    assert _agrees(toml_dump(doc)) is not None


def test_load_errors_keep_their_words(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent]\nsocket = \"/x\"\nsocket = \"/y\"\n")
    with pytest.raises(InvalidArgument, match=str(bad)):
        load(str(bad))
    bad.write_bytes(b"[agent]\nsocket = \"\xff\"\n")
    with pytest.raises(InvalidArgument, match="codec"):
        load(str(bad))
    good = tmp_path / "good.toml"
    good.write_text("[agent]\nsocket = '/run/x.sock'\n[cleanup]\ndirs = [\"/tmp\"]\n[jobs]\nkill_timeout = 3\n")
    cfg = load(str(good))
    assert (cfg.socket_path, cfg.cleanup_dirs, cfg.kill_timeout) == ("/run/x.sock", ["/tmp"], 3.0)
    assert isinstance(cfg.kill_timeout, float) and load(DEFAULT_PATH).path == DEFAULT_PATH


# --- the hook path's imports, through a running agent ----------------------------------------------------------

FORBIDDEN = ("json", "re", "tomllib", "typing", "enum", "sqlite3", "_sqlite3", "click", "rich", "dataclasses",
             "inspect", "jobcage.agent.lifecycle", "jobcage.agent.store")


def _imports(argv: list[str], env: dict[str, str]) -> set[str]:
    """Modules one hook run imports, from the launcher's own interpreter flags (-IS)."""
    r = subprocess.run([sys.executable, "-IS", "-X", "importtime", str(LAUNCHER), *argv], env=env,
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return {line.split("|")[2].strip() for line in r.stderr.splitlines() if line.startswith("import time:")
            and "cumulative" not in line}


@pytest.mark.root
def test_hook_commands_import_nothing_heavy(jc_env: JcEnv, agent_proc: object) -> None:
    assert LAUNCHER.exists(), f"{LAUNCHER}: run scripts/bootstrap-venv.sh"
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        seen: dict[str, set[str]] = {}
        for argv in (["prologue", "h1", "--uid", "0"], ["adopt", "h1", "--pid", str(sleeper.pid)],
                     ["epilogue", "h1"]):
            mods = _imports(argv, jc_env.env)
            assert {"jobcage.agent.hook", "jobcage.agent.client", "_json"} <= mods, mods   # the probe sees imports
            seen[argv[0]] = {m for m in mods if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)}
        assert seen == {"prologue": set(), "adopt": set(), "epilogue": set()}, seen
        sleeper.wait(timeout=30)   # the epilogue killed it
    finally:
        sleeper.kill()


# --- the cleanup walk: untouched leaf directories are judged without being opened -------------------------------

@pytest.mark.root
def test_leaf_skip_removes_what_the_full_walk_removes() -> None:
    require(_counts_subdirs(os.path.realpath("/tmp")), "/tmp is on a filesystem whose link counts say nothing")
    top = Path(tempfile.mkdtemp(prefix="jctest-leaf-", dir="/tmp"))
    uid, other = 64981, 64982
    try:
        def make(p: Path, owner: int, dirs: bool = False) -> None:
            if dirs:
                p.mkdir()
            else:
                p.write_text("x")
            os.chown(p, owner, owner)

        for d in range(6):   # before the job: leaves, a nest, the job uid's own old things
            sub = top / f"old{d}"
            sub.mkdir()
            for f in range(20):
                make(sub / f"f{f}", other)
            make(sub / "mine-old", uid)
        (top / "old0" / "nest").mkdir()
        (top / "old0" / "nest" / "leaf").mkdir()
        make(top / "old-owned-dir", uid, dirs=True)
        time.sleep(0.05)
        since = time.time()
        time.sleep(0.05)
        make(top / "old0" / "nest" / "leaf" / "new", uid)    # the job's, deep in old directories
        make(top / "old1" / "new", uid)                      # the job's, in an old leaf made non-old by it
        make(top / "newdir", uid, dirs=True)
        make(top / "newdir" / "x", uid)
        os.chown(top / "old2" / "f0", uid, uid)              # an old file given to the uid: before-job either way

        def run(leaf_skip: bool) -> tuple[CleanupReport, list[str]]:
            report = CleanupReport(dry_run=True)
            opened: list[str] = []
            fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
            try:
                walk_remove(fd, str(top), lambda st: None if st.st_uid == uid and st.st_ctime >= since else
                            ("other-uid" if st.st_uid != uid else BEFORE_JOB), report, mounts=mount_points(),
                            dry_run=True, since=since, leaf_skip=leaf_skip, before_descend=opened.append)
            finally:
                os.close(fd)
            return report, opened

        full, opened_full = run(False)
        fast, opened_fast = run(True)
        assert sorted(fast.removed) == sorted(full.removed) == sorted(
            str(top / p) for p in ("old0/nest/leaf/new", "old1/new", "newdir", "newdir/x")), full.removed
        listed = {(s.path, s.reason) for s in full.skipped}
        assert {(s.path, s.reason) for s in fast.skipped} == listed   # the same verdict on every listed entry
        skipped_leaves = set(opened_full) - set(opened_fast)
        assert skipped_leaves == {str(top / f"old{d}") for d in (2, 3, 4, 5)} | {str(top / "old-owned-dir")}
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_fast_exit_flushes_what_the_hook_printed(tmp_path: Path) -> None:
    """The hooks leave without interpreter teardown (os._exit): what they printed still arrives, through
    a pipe (block-buffered) as well, and the exit status is the hook's."""
    env = {"PATH": "/usr/bin:/bin", "JOBCAGE_CONFIG": str(tmp_path / "missing.toml")}
    for argv in ([str(LAUNCHER)], [str(LAUNCHER.with_name("jobcage"))]):   # the launcher, pip's wrapper (main.py)
        r = subprocess.run([*argv, "epilogue", "--help"], capture_output=True, text=True, env=env, timeout=60)
        assert (r.returncode, r.stdout.startswith("usage: jobcage epilogue")) == (0, True), r
        r = subprocess.run([*argv, "adopt", "j", "--pid", "x"], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 2 and "--pid takes a number" in r.stderr and not r.stdout, r
        r = subprocess.run([*argv, "epilogue", "j"], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 1 and "config file not found" in r.stderr, r


@pytest.mark.root
def test_listing_memo_never_hides_the_jobs_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """An old directory another walk listed is not read again while its ctime stands still; whatever the job
    makes below it, or in it (which moves its ctime), is still found and removed."""
    from jobcage.agent import cleanup as cl

    top = Path(tempfile.mkdtemp(prefix="jctest-memo-", dir="/tmp"))
    uid = 64983
    try:
        for d in ("old0/nest/leaf", "old1/sub"):
            (top / d).mkdir(parents=True)
        for d in ("old0", "old0/nest", "old1"):
            for f in range(5):
                (top / d / f"f{f}").write_text("x")
        key = lambda p: (os.stat(p).st_dev, os.stat(p).st_ino)   # noqa: E731
        cl.cleanup([str(top)], {uid}, since=time.time())
        assert key(top / "old0") not in cl._LISTED, "listed while its ctime was recent: kept anyway"
        monkeypatch.setattr(cl, "LISTED_MIN_AGE", 0.0)
        monkeypatch.setattr(cl, "_LISTED", dict(cl._LISTED))   # what this test lists stays with it
        time.sleep(0.05)
        since = time.time()
        time.sleep(0.05)
        cl.cleanup([str(top)], {uid}, since=since)
        assert {key(top / d) for d in ("old0", "old0/nest", "old1")} <= set(cl._LISTED)
        read: list[tuple[int, int]] = []
        scandir = os.scandir

        def counting_scandir(fd: int) -> object:
            st = os.fstat(fd)
            read.append((st.st_dev, st.st_ino))
            return scandir(fd)

        monkeypatch.setattr(os, "scandir", counting_scandir)
        # the job: a file deep below listed directories, and a new directory in a listed one
        for p, is_dir in ((top / "old0/nest/leaf/new", False), (top / "old1/newdir", True),
                          (top / "old1/newdir/x", False)):
            p.mkdir() if is_dir else p.write_text("job")
            os.chown(p, uid, uid)
        second = cl.cleanup([str(top)], {uid}, since=since)
        assert sorted(second.removed) == sorted(str(top / p) for p in ("old0/nest/leaf/new", "old1/newdir/x",
                                                                       "old1/newdir")), second.removed
        assert not (top / "old0/nest/leaf/new").exists() and not (top / "old1/newdir").exists()
        assert key(top / "old0") not in read and key(top / "old0/nest") not in read, "the memo was not used"
        assert key(top / "old1") in read and key(top / "old0/nest/leaf") in read   # changed: read again
    finally:
        shutil.rmtree(top, ignore_errors=True)
