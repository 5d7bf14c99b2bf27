"""agent.tmpdir: per-job private TMPDIR, created and removed safely, with real users in a private tree."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
from jctest import User, mount_tmpfs, run_as

from jobcage.agent.cleanup import OTHER_FS, RACE, VANISHED
from jobcage.agent.errors import AccessDenied, InvalidArgument
from jobcage.agent.tmpdir import create_job_tmpdir, job_tmpdir_path, remove_job_tmpdir

pytestmark = pytest.mark.root


def etc_state() -> tuple[int, int, int]:
    st = os.stat("/etc")
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


@pytest.fixture
def base(private_tree: str) -> str:
    """A root-owned 0755 base: nobody but root can create names in it."""
    path = f"{private_tree}/base"
    os.mkdir(path)
    os.chmod(path, 0o755)
    return path


def test_create_private_dir(pool_users: tuple[User, User], base: str) -> None:
    a, b = pool_users
    path = create_job_tmpdir(base, "job-1", a.uid, a.gid)
    assert path == f"{base}/job-1" == job_tmpdir_path(base, "job-1")
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert (st.st_uid, st.st_gid) == (a.uid, a.gid)
    run_as(a, ["sh", "-c", f"echo hi > {path}/mine"])
    r = run_as(b, ["sh", "-c", f"ls {path} || echo hi > {path}/theirs"], check=False)
    assert r.returncode != 0
    assert os.listdir(path) == ["mine"]
    # A retried prologue gets the same (empty, own, private) directory back.
    os.unlink(f"{path}/mine")
    assert create_job_tmpdir(base, "job-1", a.uid, a.gid) == path


def test_umask_does_not_matter(pool_users: tuple[User, User], base: str) -> None:
    a, _b = pool_users
    old = os.umask(0o777)
    try:
        path = create_job_tmpdir(base, "job-umask", a.uid, a.gid)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700


@pytest.mark.parametrize("job_id", ["", ".", "..", "a/b", "../x", "a\0b", "x" * 256, 5])
def test_bad_job_ids(pool_users: tuple[User, User], base: str, job_id: object) -> None:
    a, _b = pool_users
    with pytest.raises(InvalidArgument):
        create_job_tmpdir(base, job_id, a.uid, a.gid)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        remove_job_tmpdir(base, job_id)  # type: ignore[arg-type]
    assert os.listdir(base) == []


def test_bad_ids(base: str) -> None:
    for uid, gid in ((-1, 0), (0, -1), (True, 0), ("1000", 1000)):
        with pytest.raises(InvalidArgument):
            create_job_tmpdir(base, "j", uid, gid)  # type: ignore[arg-type]


def test_untrusted_bases_refused(pool_users: tuple[User, User], private_tree: str) -> None:
    a, _b = pool_users
    t = private_tree
    os.mkdir(f"{t}/user_owned")
    os.chown(f"{t}/user_owned", a.uid, a.gid)
    os.mkdir(f"{t}/world_writable")
    os.chmod(f"{t}/world_writable", 0o777)
    os.mkdir(f"{t}/group_writable")
    os.chmod(f"{t}/group_writable", 0o775)
    os.mkdir(f"{t}/good")
    os.chmod(f"{t}/good", 0o755)
    os.symlink(f"{t}/good", f"{t}/link")
    os.mkdir(f"{t}/user_owned/inner")  # root-owned, but inside a directory the user controls
    for bad in ("user_owned", "world_writable", "group_writable", "link", "link/", "user_owned/inner", "missing",
                "good/../good"):
        with pytest.raises(InvalidArgument):
            create_job_tmpdir(f"{t}/{bad}", "j", a.uid, a.gid)
    with pytest.raises(InvalidArgument):
        create_job_tmpdir("relative/base", "j", a.uid, a.gid)
    assert os.listdir(f"{t}/good") == [] and os.listdir(f"{t}/user_owned") == ["inner"]
    # Sticky and world-writable, like /tmp: fine.
    assert create_job_tmpdir(t, "j", a.uid, a.gid) == f"{t}/j"
    # A missing last component can be created on request.
    path = create_job_tmpdir(f"{t}/good/new_base", "j", a.uid, a.gid, create_base=True)
    st = os.stat(f"{t}/good/new_base")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o755)
    assert os.stat(path).st_uid == a.uid


def test_name_taken_by_another_user(pool_users: tuple[User, User], private_tree: str) -> None:
    """In a sticky base anyone can take the name first: refused, and nothing of theirs is changed."""
    a, b = pool_users
    t = private_tree
    run_as(b, ["mkdir", "-m", "0777", f"{t}/job-b"])
    with pytest.raises(AccessDenied):
        create_job_tmpdir(t, "job-b", a.uid, a.gid)
    st = os.lstat(f"{t}/job-b")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (b.uid, 0o777)


def test_planted_symlink_never_chowned_through(pool_users: tuple[User, User],
                                               private_tree: str) -> None:
    """The classic: a link named like the next job's TMPDIR pointing at /etc, hoping root chowns /etc."""
    a, b = pool_users
    t = private_tree
    before = etc_state()
    run_as(b, ["ln", "-s", "/etc", f"{t}/job-etc"])
    run_as(a, ["ln", "-s", "/etc", f"{t}/job-etc-own"])  # even the job user's own link
    with pytest.raises(AccessDenied):
        create_job_tmpdir(t, "job-etc", a.uid, a.gid)
    with pytest.raises(AccessDenied):
        create_job_tmpdir(t, "job-etc-own", a.uid, a.gid)
    assert etc_state() == before
    assert os.path.islink(f"{t}/job-etc")


def test_existing_own_dir_rules(pool_users: tuple[User, User], private_tree: str) -> None:
    a, _b = pool_users
    t = private_tree
    run_as(a, ["sh", "-c", f"mkdir -m 0777 {t}/open && mkdir -m 0700 {t}/full && touch {t}/full/x && "
                           f"mkdir -m 0700 {t}/fine"])
    with pytest.raises(AccessDenied):
        create_job_tmpdir(t, "open", a.uid, a.gid)  # others could have planted entries
    with pytest.raises(AccessDenied):
        create_job_tmpdir(t, "full", a.uid, a.gid)
    assert create_job_tmpdir(t, "fine", a.uid, a.gid) == f"{t}/fine"


def test_remove_everything_inside(pool_users: tuple[User, User], base: str, private_tree: str) -> None:
    a, b = pool_users
    path = create_job_tmpdir(base, "job-rm", a.uid, a.gid)
    outside = f"{private_tree}/outside"
    os.mkdir(outside)
    os.chown(outside, a.uid, a.gid)
    run_as(a, ["sh", "-c", f"touch {outside}/precious"])
    etc_before = os.listdir("/etc")
    run_as(a, ["sh", "-c", f"cd {path} && mkdir -p x/y && touch f x/g x/y/h && ln -s /etc etc && "
                           f"ln -s {outside} out && ln -s {outside}/precious x/p && mkfifo fifo"])
    # Whoever owns them: the whole tree was the job's (files given away by a setuid helper, say).
    with open(f"{path}/x/rootfile", "w") as f:
        f.write("r")
    os.mkdir(f"{path}/x/bdir")
    os.chown(f"{path}/x/bdir", b.uid, b.gid)

    dry = remove_job_tmpdir(base, "job-rm", dry_run=True)
    assert os.path.isdir(f"{path}/x/y")
    rep = remove_job_tmpdir(base, "job-rm")
    assert not os.path.lexists(path)
    # nothing of /etc went (other things may appear there meanwhile: useradd's lock files)
    assert set(etc_before) <= set(os.listdir("/etc"))
    assert os.path.exists(f"{outside}/precious")
    assert (rep.removed_files, rep.removed_dirs) == (8, 4)  # f g h etc out p fifo rootfile; x y bdir + job dir
    assert (dry.removed_files, dry.removed_dirs) == (rep.removed_files, rep.removed_dirs)
    assert not rep.skipped


def test_remove_skips_mounts(pool_users: tuple[User, User], base: str) -> None:
    a, _b = pool_users
    path = create_job_tmpdir(base, "job-mnt", a.uid, a.gid)
    os.mkdir(f"{path}/mnt")
    mount_tmpfs(f"{path}/mnt")
    with open(f"{path}/mnt/on_tmpfs", "w") as f:
        f.write("x")
    with open(f"{path}/plain", "w") as f:
        f.write("x")
    rep = remove_job_tmpdir(base, "job-mnt")
    assert os.path.exists(f"{path}/mnt/on_tmpfs")
    assert not os.path.exists(f"{path}/plain")
    assert [s.path for s in rep.skipped_for(OTHER_FS)] == [f"{path}/mnt"]
    assert os.path.isdir(path)  # stays with what could not go
    subprocess.run(["umount", f"{path}/mnt"], check=True)
    rep = remove_job_tmpdir(base, "job-mnt")
    assert not os.path.lexists(path) and not rep.skipped


def test_remove_missing_and_swapped(pool_users: tuple[User, User], private_tree: str) -> None:
    a, _b = pool_users
    t = private_tree
    rep = remove_job_tmpdir(t, "never-made")
    assert [s.reason for s in rep.skipped] == [VANISHED]
    # In a sticky base the job user can move its own TMPDIR away and plant a link in its place.
    path = create_job_tmpdir(t, "job-swap", a.uid, a.gid)
    victim = f"{t}/victim"
    run_as(a, ["sh", "-c", f"mkdir {victim} && touch {victim}/precious && mv {path} {t}/moved && "
                           f"ln -s {victim} {path}"])
    rep = remove_job_tmpdir(t, "job-swap")
    assert [s.reason for s in rep.skipped] == [RACE]
    assert os.path.exists(f"{victim}/precious") and os.path.islink(path)


def test_untrusted_base_refused_on_remove(pool_users: tuple[User, User], private_tree: str) -> None:
    a, _b = pool_users
    t = private_tree
    os.mkdir(f"{t}/ub")
    os.chown(f"{t}/ub", a.uid, a.gid)
    run_as(a, ["sh", "-c", f"mkdir {t}/ub/j && touch {t}/ub/j/f"])
    with pytest.raises(InvalidArgument):
        remove_job_tmpdir(f"{t}/ub", "j")
    assert os.path.exists(f"{t}/ub/j/f")
