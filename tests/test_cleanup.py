"""agent.cleanup against hostile trees: real users, real files, real mounts, in a private /tmp/jctest-* tree."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest
from jctest import User, bind_mount, create_user, delete_user, mount_tmpfs, run_as

from jobcage.agent.cleanup import (
    BELOW_MIN_UID,
    NOT_EMPTY,
    OTHER_FS,
    OTHER_UID,
    PROTECTED,
    RACE,
    TOO_DEEP,
    VANISHED,
    cleanup,
)
from jobcage.agent.errors import InvalidArgument

pytestmark = pytest.mark.root


def mkfile(path: str, uid: int, data: bytes = b"payload\n") -> str:
    with open(path, "wb") as f:
        f.write(data)
    os.lchown(path, uid, -1)
    return path


def mkdir(path: str, uid: int, mode: int = 0o755) -> str:
    os.mkdir(path)
    os.chmod(path, mode)
    os.lchown(path, uid, -1)
    return path


def mklink(target: str, path: str, uid: int) -> str:
    os.symlink(target, path)
    os.lchown(path, uid, -1)
    return path


def snapshot(top: str) -> dict[str, tuple[int, int, int, int]]:
    """Every entry below top (symlinks not followed): path -> (ino, uid, mode, size)."""
    out = {}
    for d, dirs, files in os.walk(top):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            out[p] = (st.st_ino, st.st_uid, st.st_mode, st.st_size)
    return out


# rewritten (renamed over, locked, backed up) by useradd/userdel, which other suites on the node run any time
USER_DB = ("passwd", "group", "shadow", "gshadow", "subuid", "subgid")


def etc_snapshot() -> dict[str, tuple[int, int, float]]:
    """/etc's entries: what a cleanup that followed a link into /etc would delete (or touch)."""
    out = {}
    for n in os.listdir("/etc"):
        if n.rstrip("-+").removesuffix(".lock") in USER_DB and n not in USER_DB:
            continue   # useradd's locks and backups come and go
        try:
            st = os.lstat(os.path.join("/etc", n))
        except FileNotFoundError:   # gone between listdir and lstat: someone else's doing
            continue
        # the user databases get a new inode with every useradd, directories a new mtime with every entry
        # another suite adds (sudoers.d): that they are there is what counts
        out[n] = (0, 0, 0.0) if n in USER_DB or stat.S_ISDIR(st.st_mode) else (st.st_ino, st.st_uid, st.st_mtime)
    return out


@pytest.fixture
def outside(private_tree: str):
    """A second private directory next to the tree (same filesystem): what must never be touched."""
    path = private_tree + ".outside"
    os.mkdir(path)
    os.chmod(path, 0o1777)
    yield path
    subprocess.run(["rm", "-rf", "--one-file-system", path], check=False)


def test_removes_only_target_uid(pool_users: tuple[User, User], private_tree: str) -> None:
    a, b = pool_users
    t = private_tree
    mkfile(f"{t}/a_file", a.uid)
    mkdir(f"{t}/a_dir", a.uid)
    mkdir(f"{t}/a_dir/sub", a.uid)
    mkfile(f"{t}/a_dir/sub/deep", a.uid)
    mkfile(f"{t}/a_dir/x", a.uid)
    os.mkfifo(f"{t}/a_fifo")
    os.lchown(f"{t}/a_fifo", a.uid, -1)
    mkfile(f"{t}/b_file", b.uid)
    mkfile(f"{t}/root_file", 0)
    mkdir(f"{t}/b_dir", b.uid, 0o777)
    mkfile(f"{t}/b_dir/a_in_b", a.uid)
    mkfile(f"{t}/b_dir/b_in_b", b.uid)
    mkdir(f"{t}/a_dir2", a.uid)
    mkfile(f"{t}/a_dir2/b_inside", b.uid)
    mkfile(f"{t}/a_dir2/a_inside", a.uid)

    rep = cleanup([t], {a.uid})

    for gone in ("a_file", "a_dir", "a_fifo", "b_dir/a_in_b", "a_dir2/a_inside"):
        assert not os.path.lexists(f"{t}/{gone}"), gone
    for kept in ("b_file", "root_file", "b_dir", "b_dir/b_in_b", "a_dir2", "a_dir2/b_inside"):
        assert os.path.lexists(f"{t}/{kept}"), kept
    assert os.path.isdir(t)
    assert rep.removed_files == 6  # a_file a_fifo deep x a_in_b a_inside
    assert rep.removed_dirs == 2   # a_dir/sub a_dir
    assert f"{t}/a_dir" in rep.removed
    assert rep.skipped_counts[OTHER_UID] == 5  # b_file root_file b_in_b b_inside b_dir
    assert [s.path for s in rep.skipped_for(NOT_EMPTY)] == [f"{t}/a_dir2"]
    assert rep.to_dict()["removed_files"] == 6


def test_user_made_tree_and_top_dir_kept(pool_users: tuple[User, User], private_tree: str) -> None:
    a, _b = pool_users
    top = f"{private_tree}/top"
    mkdir(top, a.uid)  # the top itself belongs to the user: it still stays
    run_as(a, ["sh", "-c", f"cd {top} && mkdir -p x/y/z && touch x/y/z/f x/g .hidden && ln -s x/g lnk"])
    rep = cleanup([top], {a.uid})
    assert os.listdir(top) == []
    assert os.path.isdir(top)
    assert (rep.removed_files, rep.removed_dirs) == (4, 3)


def test_dry_run_changes_nothing(pool_users: tuple[User, User], private_tree: str) -> None:
    a, b = pool_users
    t = private_tree
    mkdir(f"{t}/d", a.uid)
    mkfile(f"{t}/d/f", a.uid, b"12345")
    mkfile(f"{t}/b", b.uid)
    mkdir(f"{t}/mixed", a.uid)
    mkfile(f"{t}/mixed/b", b.uid)
    before = snapshot(t)
    dry = cleanup([t], {a.uid}, dry_run=True)
    assert snapshot(t) == before
    real = cleanup([t], {a.uid})
    assert dry.dry_run and not real.dry_run
    assert (dry.removed_files, dry.removed_dirs, dry.removed_bytes) == (1, 1, 5)
    assert (dry.removed_files, dry.removed_dirs, dry.removed) == (real.removed_files, real.removed_dirs,
                                                                  real.removed)
    assert dry.skipped_counts == real.skipped_counts


def test_symlinks_unlinked_never_followed(pool_users: tuple[User, User], private_tree: str,
                                          outside: str) -> None:
    a, b = pool_users
    t = private_tree
    # A directory of another user, outside the tree, holding files of both users: a cleanup that followed the
    # planted link would delete the file of user a in there.
    bdir = mkdir(f"{outside}/bdir", b.uid, 0o777)
    mkfile(f"{bdir}/b_file", b.uid)
    mkfile(f"{bdir}/a_file_outside", a.uid)
    etc_before = etc_snapshot()
    outside_before = snapshot(outside)
    # Planted by the payload itself, as it would be.
    run_as(a, ["sh", "-c", f"cd {t} && ln -s /etc etc_link && ln -s {bdir} b_link && ln -s /etc/passwd pw && "
                           f"mkdir sub && ln -s /etc sub/etc && ln -s {bdir}/a_file_outside sub/f"])
    mklink("/etc", f"{t}/b_owned_link", b.uid)

    rep = cleanup([t], {a.uid})

    for gone in ("etc_link", "b_link", "pw", "sub"):
        assert not os.path.lexists(f"{t}/{gone}"), gone
    assert os.path.islink(f"{t}/b_owned_link")  # someone else's link: not ours to remove
    assert etc_snapshot() == etc_before
    assert snapshot(outside) == outside_before
    assert rep.removed_files == 5 and rep.removed_dirs == 1


def test_directory_swapped_for_symlink_via_hook(pool_users: tuple[User, User], private_tree: str,
                                                outside: str) -> None:
    """Deterministic race: between the lstat that saw a directory and the open, the name becomes a symlink."""
    a, _b = pool_users
    t = private_tree
    victim = mkdir(f"{outside}/victim", a.uid)  # same owner, same filesystem: only the walk's rules protect it
    mkfile(f"{victim}/precious", a.uid)
    mkdir(f"{victim}/sub", a.uid)
    mkfile(f"{victim}/sub/precious2", a.uid)
    mkdir(f"{t}/d", a.uid)
    mkfile(f"{t}/d/f", a.uid)
    victim_before = snapshot(victim)

    def swap(path: str) -> None:
        if path == f"{t}/d":
            os.rename(path, f"{outside}/d.moved")
            mklink(victim, path, a.uid)

    rep = cleanup([t], {a.uid}, before_descend=swap)
    assert snapshot(victim) == victim_before
    assert os.path.exists(f"{outside}/d.moved/f")  # moved away before we entered: not followed either
    assert [s.path for s in rep.skipped_for(RACE)] == [f"{t}/d"]
    assert rep.removed_files == 0 and rep.removed_dirs == 0


def test_directory_swapped_for_other_directory_via_hook(pool_users: tuple[User, User],
                                                        private_tree: str, outside: str) -> None:
    a, _b = pool_users
    t = private_tree
    other = mkdir(f"{outside}/other", a.uid)
    mkfile(f"{other}/precious", a.uid)
    mkdir(f"{t}/d", a.uid)
    mkfile(f"{t}/d/f", a.uid)

    def swap(path: str) -> None:
        if path == f"{t}/d":
            os.rename(path, f"{outside}/d.moved")
            os.rename(other, path)  # a different directory under the same name

    rep = cleanup([t], {a.uid}, before_descend=swap)
    assert os.path.exists(f"{t}/d/precious")
    assert [s.path for s in rep.skipped_for(RACE)] == [f"{t}/d"]
    assert rep.removed_files == 0


HAMMER = r"""
import os, signal, sys, time
tree, victim, end = sys.argv[1], sys.argv[2], time.time() + float(sys.argv[3])
swaps = 0
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # the test says when it has run enough
print("ready", flush=True)
while not stop and time.time() < end:
    for n in os.listdir(tree):
        if n.endswith('.x'):
            continue
        p = os.path.join(tree, n)
        try:
            os.rename(p, p + '.x')      # the directory goes away...
            os.symlink(victim, p)       # ...and a link to the victim takes its name
            swaps += 1
            os.unlink(p)
            os.rename(p + '.x', p)
        except OSError:
            pass
print(swaps)
"""


def test_rename_race_hammered_deletes_nothing_outside(pool_users: tuple[User, User],
                                                      private_tree: str, outside: str) -> None:
    """A payload swapping directories for symlinks to a victim while cleanup walks: the victim survives.

    Many cleanup runs over freshly built trees while the payload (as the user) swaps: at least 2 s and
    25 runs, however slow the node (a count, not a time, decides; the hammer's own cap is 120 s).
    """
    a, _b = pool_users
    t = private_tree
    victim = mkdir(f"{outside}/victim", a.uid)
    for i in range(5):
        mkfile(f"{victim}/precious{i}", a.uid)
    mkdir(f"{victim}/sub", a.uid)
    mkfile(f"{victim}/sub/precious", a.uid)
    victim_before = snapshot(victim)
    races = removed = runs = 0
    staging = mkdir(f"{outside}/staging", 0, 0o700)
    hammer = subprocess.Popen([sys.executable, "-c", HAMMER, t, victim, "120"], user=a.uid, group=a.gid,
                              extra_groups=[], stdout=subprocess.PIPE, text=True)
    try:
        assert hammer.stdout is not None and hammer.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        while hammer.poll() is None and (runs < 25 or time.monotonic() - t0 < 2.0):
            for i in range(6):
                # Built aside and renamed in: the payload is renaming things in the tree all the time.
                stage = f"{staging}/d{i}"
                if not os.path.lexists(stage):
                    mkdir(stage, a.uid)
                    for j in range(3):
                        sub = mkdir(f"{stage}/s{j}", a.uid)
                        for k in range(4):
                            mkfile(f"{sub}/f{k}", a.uid)
                try:
                    os.rename(stage, f"{t}/d{i}")
                except OSError:
                    pass  # the name is taken (by a dir or a planted link): keep the stage for later
            rep = cleanup([t], {a.uid})
            runs += 1
            races += rep.skipped_counts.get(RACE, 0)
            removed += rep.removed_files
            assert snapshot(victim) == victim_before
        hammer.terminate()
        swaps = int(hammer.stdout.read().strip() or 0)
    finally:
        hammer.kill()
        hammer.wait()
    assert snapshot(victim) == victim_before
    assert swaps > 100 and runs > 20 and removed > 0
    print(f"hammer: {swaps} swaps, {runs} cleanup runs, {races} races detected, {removed} files removed")


def test_other_filesystem_skipped(pool_users: tuple[User, User], private_tree: str) -> None:
    a, _b = pool_users
    t = private_tree
    mkdir(f"{t}/a_dir", a.uid)
    mnt = mkdir(f"{t}/a_dir/mnt", a.uid)
    mount_tmpfs(mnt)
    os.chown(mnt, a.uid, -1)
    mkfile(f"{mnt}/on_tmpfs", a.uid)
    mkdir(f"{mnt}/dir_on_tmpfs", a.uid)
    mkfile(f"{t}/a_dir/plain", a.uid)

    rep = cleanup([t], {a.uid})
    assert os.path.exists(f"{mnt}/on_tmpfs") and os.path.isdir(f"{mnt}/dir_on_tmpfs")
    assert not os.path.exists(f"{t}/a_dir/plain")
    assert [s.path for s in rep.skipped_for(OTHER_FS)] == [mnt]
    assert [s.path for s in rep.skipped_for(NOT_EMPTY)] == [f"{t}/a_dir"]


def test_bind_mount_of_same_filesystem_skipped(pool_users: tuple[User, User], private_tree: str,
                                               outside: str) -> None:
    """Same st_dev, still another place: mount points are not entered."""
    a, _b = pool_users
    t = private_tree
    src = mkdir(f"{outside}/src", a.uid)
    mkfile(f"{src}/precious", a.uid)
    dst = mkdir(f"{t}/bind", a.uid)
    bind_mount(src, dst)
    assert os.stat(dst).st_dev == os.stat(t).st_dev
    rep = cleanup([t], {a.uid})
    assert os.path.exists(f"{src}/precious")
    assert [(s.path, s.detail) for s in rep.skipped_for(OTHER_FS)] == [(dst, "mount point")]


def test_uids_below_min_uid_untouched(pool_users: tuple[User, User], private_tree: str) -> None:
    a, _b = pool_users
    t = private_tree
    mkfile(f"{t}/sys_file", 999)
    mkdir(f"{t}/sys_dir", 999)
    mkfile(f"{t}/a_file", a.uid)
    rep = cleanup([t], {999, a.uid})
    assert os.path.exists(f"{t}/sys_file") and os.path.isdir(f"{t}/sys_dir")
    assert not os.path.exists(f"{t}/a_file")
    assert sorted(s.path for s in rep.skipped_for(BELOW_MIN_UID)) == [f"{t}/sys_dir", f"{t}/sys_file"]
    # And min_uid above the user's uid protects the user too.
    mkfile(f"{t}/a_file", a.uid)
    rep = cleanup([t], {a.uid}, min_uid=a.uid + 1)
    assert os.path.exists(f"{t}/a_file")
    assert rep.skipped_counts[BELOW_MIN_UID] == 1


def test_protected_paths_and_homes(pool_users: tuple[User, User], private_tree: str) -> None:
    a, _b = pool_users
    t = private_tree
    mkdir(f"{t}/keep", a.uid)
    mkfile(f"{t}/keep/f", a.uid)
    rep = cleanup([t], {a.uid}, protect=[f"{t}/keep"])
    assert os.path.exists(f"{t}/keep/f")
    assert [s.path for s in rep.skipped_for(PROTECTED)] == [f"{t}/keep"]

    home = f"{t}/home_of_user"
    u = create_user("jccl", home=home)  # a pool account whose home lives in a cleaned directory
    try:
        mkdir(home, u.uid, 0o700)
        mkfile(f"{home}/.profile", u.uid)
        mkfile(f"{t}/u_tmpfile", u.uid)
        rep = cleanup([t], {u.uid})
        assert os.path.exists(f"{home}/.profile")
        assert not os.path.exists(f"{t}/u_tmpfile")
        assert [s.path for s in rep.skipped_for(PROTECTED)] == [home]
        rep = cleanup([t], {u.uid}, protect_homes=False)
        assert not os.path.exists(home)
    finally:
        assert not delete_user(u)
    v = create_user("jccl", home=t)  # home = the cleaned directory itself: must not shield everything in it
    try:
        mkfile(f"{t}/v_tmpfile", v.uid)
        rep = cleanup([t], {v.uid})
        assert not os.path.exists(f"{t}/v_tmpfile") and os.path.isdir(t)
    finally:
        assert not delete_user(v)


def test_depth_is_bounded(pool_users: tuple[User, User], private_tree: str) -> None:
    a, _b = pool_users
    t = private_tree
    d = t
    for i in range(70):
        d = mkdir(f"{d}/n{i}", a.uid)
        mkfile(f"{d}/f", a.uid)
    rep = cleanup([t], {a.uid})  # default bound: 64 levels
    assert rep.skipped_counts[TOO_DEEP] == 1
    assert rep.removed_files == 64  # the files of levels 1..64; level 65 and below were not entered
    assert os.path.isdir(f"{t}/n0")
    assert not os.path.exists(f"{t}/n0/f")
    rep = cleanup([t], {a.uid}, max_depth=3)
    assert rep.skipped_for(TOO_DEEP)[0].path == f"{t}/n0/n1/n2/n3"


def test_report_is_bounded(pool_users: tuple[User, User], private_tree: str) -> None:
    a, b = pool_users
    t = private_tree
    for i in range(30):
        mkfile(f"{t}/a{i}", a.uid)
        mkfile(f"{t}/b{i}", b.uid)
    rep = cleanup([t], {a.uid}, max_paths=10)
    assert rep.removed_files == 30 and len(rep.removed) == 10 and rep.removed_unlisted == 20
    assert rep.skipped_counts[OTHER_UID] == 30 and len(rep.skipped) == 10 and rep.skipped_unlisted == 20


def test_missing_top_and_bad_arguments(private_tree: str) -> None:
    rep = cleanup([f"{private_tree}/nope"], {1234})
    assert [s.reason for s in rep.skipped] == [VANISHED]
    with pytest.raises(InvalidArgument):
        cleanup(["relative/dir"], {1234})
    with pytest.raises(InvalidArgument):
        cleanup(private_tree, {1234})  # type: ignore[arg-type]  # a string, not a list of paths
    with pytest.raises(InvalidArgument):
        cleanup(["/"], {1234})
    with pytest.raises(InvalidArgument):
        cleanup([private_tree], {-1})
    with pytest.raises(InvalidArgument):
        cleanup([private_tree], {"1000"})  # type: ignore[arg-type]
    assert cleanup([private_tree], set()).removed_files == 0


def test_top_symlink_resolved_once(pool_users: tuple[User, User], private_tree: str) -> None:
    """Configured tops are trusted paths: /var/tmp -> /tmp style links are resolved and walked once."""
    a, _b = pool_users
    t = private_tree
    real = mkdir(f"{t}/real", 0, 0o1777)
    os.symlink(real, f"{t}/alias")
    mkfile(f"{real}/f", a.uid)
    rep = cleanup([real, f"{t}/alias"], {a.uid})
    assert rep.removed_files == 1 and not rep.skipped
    assert stat.S_ISDIR(os.lstat(real).st_mode)
