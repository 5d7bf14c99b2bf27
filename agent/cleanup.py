"""Identity-aware file cleanup that is safe against hostile payloads.

At epilogue jobcage removes what a job's identities left in the shared temporary directories.  Those trees are
written by the payload, so they are hostile: symlinks to ``/etc``, directories swapped for symlinks while we walk,
mount points, deep nesting.  The walker therefore

* holds an open directory fd for every level and names entries only relative to it (``*at`` syscalls), so a path
  component renamed behind our back cannot redirect us;
* never follows a symlink: entries are ``lstat``-ed (``follow_symlinks=False``), directories are opened with
  ``O_NOFOLLOW`` and the opened fd must be the very inode we ``lstat``-ed (``st_dev`` + ``st_ino``), else the entry
  is reported as a race and left alone;
* never leaves the top directory's filesystem (``st_dev``) nor enters a mount point of the same filesystem (bind
  mounts, from ``/proc/self/mountinfo``);
* re-checks an entry (same inode, same owner) immediately before ``unlinkat``/``rmdir``.

What it can not close: there is no "unlink this inode" syscall, so between the last check and ``unlinkat`` the name
could be swapped by someone with write access to that directory.  The window is a few microseconds and the swapped-in
entry must be in the same directory, i.e. something the swapper could have deleted (or, in a sticky directory, a file
its owner created in that instant).  ``rmdir`` only removes empty directories, so a swapped directory costs nothing.

Public interface: :func:`cleanup` (identity-aware, for ``/tmp`` & co.) and :class:`CleanupReport`.
:mod:`jobcage.agent.tmpdir` reuses the walker through :func:`walk_remove`.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet

from jobcage.cgroups import proc

from .errors import InvalidArgument

DEFAULT_DIRS: tuple[str, ...] = ("/tmp", "/var/tmp", "/dev/shm")
DEFAULT_MIN_UID = 1000
DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_PATHS = 200  # per list in the report: removed paths, and skipped paths per reason

# Skip reasons (stable strings: they end up in JSON output).
OTHER_UID = "other-uid"            # owned by a uid we were not asked to clean
BELOW_MIN_UID = "below-min-uid"    # asked to clean it, but the uid is a system uid
OTHER_FS = "other-filesystem"      # different st_dev, or a mount point of the same filesystem
PROTECTED = "protected"            # a protected path (e.g. a home directory): untouched, not entered
RACE = "race"                      # changed between our check and our action (swapped, refilled)
VANISHED = "vanished"              # gone before we got to it (harmless)
TOO_DEEP = "too-deep"              # deeper than max_depth: not entered
NOT_EMPTY = "not-empty"            # a removable directory kept because something inside stays
ERROR = "error"                    # an unexpected OSError
BEFORE_JOB = "before-job"          # there before the job started (ctime older): not the job's to remove
REASONS: tuple[str, ...] = (OTHER_UID, BELOW_MIN_UID, OTHER_FS, PROTECTED, RACE, VANISHED, TOO_DEEP,
                            NOT_EMPTY, ERROR, BEFORE_JOB)

# O_NOFOLLOW makes opening a symlink fail (ELOOP), O_DIRECTORY makes opening a non-directory fail (ENOTDIR).
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# Decides whether an entry may be removed: None = yes, else the skip reason.
OwnerCheck = Callable[[os.stat_result], "str | None"]


class Skipped:
    """One entry left in place, and why."""

    __slots__ = ("path", "reason", "detail")

    def __init__(self, path: str, reason: str, detail: str = "") -> None:
        self.path = path
        self.reason = reason
        self.detail = detail

    def __repr__(self) -> str:
        return f"Skipped(path={self.path!r}, reason={self.reason!r}, detail={self.detail!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Skipped) and (self.path, self.reason, self.detail) == \
            (other.path, other.reason, other.detail)

    def __hash__(self) -> int:
        return hash((self.path, self.reason, self.detail))

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason, "detail": self.detail}


class CleanupReport:
    """What a cleanup removed (or would remove, in a dry run) and what it left, with a reason per entry.

    Counts are exact for what the walk looked at (the files of a directory judged on its lstat alone --
    untouched since the job started, no subdirectories -- are not counted, only the directory); the path
    lists are bounded (``max_paths`` removed paths, ``max_paths`` skipped entries per
    reason) and ``removed_unlisted`` / ``skipped_unlisted`` say how many were left out of them.
    (A plain class, not a dataclass: this module is on the prologue/epilogue hook path, where importing
    ``dataclasses`` -> ``inspect`` costs milliseconds.)
    """

    def __init__(self, dry_run: bool = False, max_paths: int = DEFAULT_MAX_PATHS) -> None:
        self.dry_run = dry_run
        self.max_paths = max_paths
        self.removed_files = 0     # every non-directory: regular files, symlinks, fifos, sockets
        self.removed_dirs = 0
        self.removed_bytes = 0     # sum of st_size of removed non-directories
        self.removed: list[str] = []
        self.skipped: list[Skipped] = []
        self.skipped_counts: dict[str, int] = {}
        self.removed_unlisted = 0
        self.skipped_unlisted = 0

    def __repr__(self) -> str:
        return (f"CleanupReport(dry_run={self.dry_run}, removed_files={self.removed_files}, "
                f"removed_dirs={self.removed_dirs}, skipped_counts={self.skipped_counts})")

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped_counts.values())

    def skipped_for(self, reason: str) -> list[Skipped]:
        return [s for s in self.skipped if s.reason == reason]

    def note_removed(self, path: str, is_dir: bool, size: int = 0) -> None:
        if is_dir:
            self.removed_dirs += 1
        else:
            self.removed_files += 1
            self.removed_bytes += size
        if len(self.removed) < self.max_paths:
            self.removed.append(path)
        else:
            self.removed_unlisted += 1

    def note_skipped_count(self, reason: str, n: int) -> None:
        """n entries left for ``reason`` without looking at them one by one (not listed)."""
        self.skipped_counts[reason] = self.skipped_counts.get(reason, 0) + n
        self.skipped_unlisted += n

    def note_skipped(self, path: str, reason: str, detail: str = "") -> None:
        n = self.skipped_counts.get(reason, 0)
        self.skipped_counts[reason] = n + 1
        if n < self.max_paths:
            self.skipped.append(Skipped(path, reason, detail))
        else:
            self.skipped_unlisted += 1

    def to_dict(self) -> dict:
        return {
            "dry_run": self.dry_run,
            "removed_files": self.removed_files,
            "removed_dirs": self.removed_dirs,
            "removed_bytes": self.removed_bytes,
            "removed": list(self.removed),
            "removed_unlisted": self.removed_unlisted,
            "skipped_counts": dict(self.skipped_counts),
            "skipped": [s.to_dict() for s in self.skipped],
            "skipped_unlisted": self.skipped_unlisted,
        }


def mount_points() -> frozenset[str]:
    """Every mount point of this mount namespace (no /proc: empty, and the st_dev check alone still guards
    against other filesystems)."""
    return frozenset(point for point, _fstype in proc.mountinfo())


# Filesystems where a directory's st_nlink is 2 + its subdirectories (ext4 says 1 past 65,000 of them; btrfs
# always 1): there a directory with st_nlink 2 has none.  Others (overlay, NFS, FUSE...) are walked in full.
NLINK_COUNTS_SUBDIRS = frozenset({"ext2", "ext3", "ext4", "xfs", "tmpfs"})


def _counts_subdirs(top: str) -> bool:
    """Whether the filesystem mounted at or above ``top`` (a real path) is one of NLINK_COUNTS_SUBDIRS."""
    best, fstype = "", ""
    for point, kind in proc.mountinfo():
        if (top == point or top.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, kind   # the last of equal mounts is the visible one
    return fstype in NLINK_COUNTS_SUBDIRS


# What walks of this process found in directories untouched since their job began, by (st_dev, st_ino):
# ((ctime_ns, mtime_ns, nlink), subdirectory names, other entries).  The agent runs an epilogue per job,
# and most of a /tmp never changes between two: a directory whose ctime is the same has the same entries
# (every create, unlink and rename in it moves the ctime), so it is not read again -- its subdirectories
# are still looked at one by one.  Only a ctime older than LISTED_MIN_AGE when listed is kept: a change
# after the listing then gets a later ctime whatever the clock's granularity.
_LISTED: dict[tuple[int, int], tuple[tuple[int, int, int], tuple[str, ...], int]] = {}
LISTED_MIN_AGE = 2.0
LISTED_MAX = 200_000


class _Walker:
    """Depth-first, post-order removal below one open directory; see the module docstring for the rules."""

    def __init__(self, report: CleanupReport, owner_check: OwnerCheck, *, top_dev: int,
                 protect: AbstractSet[tuple[int, int]], mounts: AbstractSet[str], max_depth: int,
                 dry_run: bool, before_descend: Callable[[str], None] | None,
                 since: float | None = None, leaf_skip: bool = False) -> None:
        self.since = since
        self.leaf_skip = leaf_skip   # the filesystem counts subdirectories in st_nlink (see _counts_subdirs)
        self.report = report
        self.owner_check = owner_check
        self.top_dev = top_dev
        self.protect = protect
        self.mounts = mounts
        self.max_depth = max_depth
        self.dry_run = dry_run
        self.before_descend = before_descend

    def walk(self, dfd: int, path: str, depth: int) -> bool:
        """Handle every entry of the open directory ``dfd`` (at ``depth`` below the top).

        True when nothing is left in it (in a dry run: when nothing would be).
        """
        old_dir = False
        key = seen = None
        if self.since is not None:
            # Creating, linking or renaming an entry into a directory sets the directory's ctime (and
            # nobody can set a ctime back): in a directory untouched since the job started no entry is
            # the job's, so its non-directories are not even lstat-ed, only its subdirectories entered.
            try:
                st = os.fstat(dfd)
                old_dir = st.st_ctime < self.since
                key, seen = (st.st_dev, st.st_ino), (st.st_ctime_ns, st.st_mtime_ns, st.st_nlink)
            except OSError:
                old_dir = False
        before = 0
        memo = _LISTED.get(key) if old_dir else None
        try:
            if memo is not None and memo[0] == seen:
                # listed by an earlier walk and not changed since (same ctime): the same entries
                names, before = list(memo[1]), memo[2]
            else:
                # List first, act after: we do not modify the directory under an open readdir stream.
                with os.scandir(dfd) as it:
                    if old_dir:
                        names = []
                        for e in it:
                            try:
                                is_dir = e.is_dir(follow_symlinks=False)   # d_type: no stat
                            except OSError:
                                is_dir = True
                            if is_dir:
                                names.append(e.name)
                            else:
                                before += 1
                    else:
                        names = [e.name for e in it]
                if old_dir and seen is not None and seen[0] < time.time_ns() - int(LISTED_MIN_AGE * 1e9):
                    if len(_LISTED) >= LISTED_MAX:
                        _LISTED.clear()
                    _LISTED[key] = (seen, tuple(names), before)
        except OSError as e:
            self.report.note_skipped(path, ERROR, f"cannot list: {e.strerror}")
            return False
        if before:
            self.report.note_skipped_count(BEFORE_JOB, before)
        empty = not before
        for name in names:
            if not self._entry(dfd, path, name, depth):
                empty = False
        return empty

    def _entry(self, dfd: int, parent: str, name: str, depth: int) -> bool:
        path = f"{parent}/{name}" if parent[-1:] != "/" else parent + name   # os.path.join, cheaper
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            self.report.note_skipped(path, VANISHED)
            return True
        except OSError as e:
            self.report.note_skipped(path, ERROR, f"lstat: {e.strerror}")
            return False
        if st.st_dev != self.top_dev:
            self.report.note_skipped(path, OTHER_FS, "different device")
            return False
        if path in self.mounts:
            self.report.note_skipped(path, OTHER_FS, "mount point")
            return False
        if (st.st_dev, st.st_ino) in self.protect:
            self.report.note_skipped(path, PROTECTED)
            return False
        if stat.S_ISDIR(st.st_mode):
            return self._dir(dfd, path, name, st, depth)
        why = self.owner_check(st)
        if why is not None:
            self.report.note_skipped(path, why, f"uid {st.st_uid}")
            return False
        return self._unlink(dfd, path, name, st)

    def _dir(self, dfd: int, path: str, name: str, st: os.stat_result, depth: int) -> bool:
        if depth + 1 > self.max_depth:
            self.report.note_skipped(path, TOO_DEEP, f"deeper than {self.max_depth} levels")
            return False
        if self.leaf_skip and st.st_nlink == 2 and self.since is not None and st.st_ctime < self.since:
            # Untouched since the job started (no entry made in it since) and, by its link count, without
            # subdirectories: nothing in it can be the job's, so it is not even opened -- on a /tmp of many
            # such directories this is most of the walk.  Its own verdict is the one the walk would give.
            why = self.owner_check(st)   # never None: it is older than the job
            self.report.note_skipped(path, why or BEFORE_JOB, f"uid {st.st_uid}")
            return False
        if self.before_descend is not None:
            self.before_descend(path)  # test hook: lets a test swap the entry exactly here
        try:
            sub = os.open(name, DIR_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            self.report.note_skipped(path, VANISHED)
            return True
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                self.report.note_skipped(path, RACE, "directory replaced by a non-directory")
            else:
                self.report.note_skipped(path, ERROR, f"open: {e.strerror}")
            return False
        try:
            fst = os.fstat(sub)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
                self.report.note_skipped(path, RACE, "directory replaced by another one")
                return False
            empty = self.walk(sub, path, depth + 1)
        finally:
            os.close(sub)
        # The owner is judged on the inode we actually held open, not on the earlier lstat.
        why = self.owner_check(fst)
        if why is not None:
            self.report.note_skipped(path, why, f"uid {fst.st_uid}")
            return False
        if not empty:
            self.report.note_skipped(path, NOT_EMPTY, "kept: something inside was not removed")
            return False
        return self._rmdir(dfd, path, name, fst)

    def _same(self, dfd: int, path: str, name: str, st: os.stat_result) -> bool | None:
        """Re-lstat just before acting: True same entry, False swapped (reported), None vanished (reported)."""
        try:
            now = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            self.report.note_skipped(path, VANISHED)
            return None
        except OSError as e:
            self.report.note_skipped(path, ERROR, f"lstat: {e.strerror}")
            return False
        if (now.st_dev, now.st_ino, now.st_uid, stat.S_IFMT(now.st_mode)) != \
                (st.st_dev, st.st_ino, st.st_uid, stat.S_IFMT(st.st_mode)):
            self.report.note_skipped(path, RACE, "entry replaced before removal")
            return False
        return True

    def _unlink(self, dfd: int, path: str, name: str, st: os.stat_result) -> bool:
        if self.dry_run:
            self.report.note_removed(path, False, st.st_size)
            return True
        same = self._same(dfd, path, name, st)
        if same is None:
            return True
        if not same:
            return False
        try:
            os.unlink(name, dir_fd=dfd)  # unlinkat(): removes the name, never what a symlink points to
        except FileNotFoundError:
            self.report.note_skipped(path, VANISHED)
            return True
        except IsADirectoryError:
            self.report.note_skipped(path, RACE, "replaced by a directory before removal")
            return False
        except OSError as e:
            self.report.note_skipped(path, ERROR, f"unlink: {e.strerror}")
            return False
        self.report.note_removed(path, False, st.st_size)
        return True

    def _rmdir(self, dfd: int, path: str, name: str, st: os.stat_result) -> bool:
        if self.dry_run:
            self.report.note_removed(path, True)
            return True
        same = self._same(dfd, path, name, st)
        if same is None:
            return True
        if not same:
            return False
        try:
            os.rmdir(name, dir_fd=dfd)
        except FileNotFoundError:
            self.report.note_skipped(path, VANISHED)
            return True
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                self.report.note_skipped(path, RACE, "refilled during cleanup")
            else:
                self.report.note_skipped(path, ERROR, f"rmdir: {e.strerror}")
            return False
        self.report.note_removed(path, True)
        return True


def walk_remove(dfd: int, path: str, owner_check: OwnerCheck, report: CleanupReport, *,
                protect: AbstractSet[tuple[int, int]] = frozenset(), mounts: AbstractSet[str] | None = None,
                max_depth: int = DEFAULT_MAX_DEPTH, dry_run: bool = False,
                before_descend: Callable[[str], None] | None = None, since: float | None = None,
                leaf_skip: bool = False) -> bool:
    """Remove what ``owner_check`` allows below the open directory ``dfd`` (shown as ``path``); never ``dfd`` itself.

    The filesystem boundary is ``dfd``'s own ``st_dev``.  Returns True when the directory is now empty (in a dry
    run: would be).  Building block for :func:`cleanup` and :mod:`jobcage.agent.tmpdir`.  ``leaf_skip`` (with
    ``since``, on a filesystem whose directory link count is 2 + its subdirectories): a directory older than
    ``since`` without subdirectories is judged on its lstat alone, not opened.
    """
    top_dev = os.fstat(dfd).st_dev
    walker = _Walker(report, owner_check, top_dev=top_dev, protect=protect,
                     mounts=mount_points() if mounts is None else mounts, max_depth=max_depth,
                     dry_run=dry_run, before_descend=before_descend, since=since, leaf_skip=leaf_skip)
    return walker.walk(dfd, path, 0)


def _check_uid(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{what} must be a non-negative integer, not {value!r}")
    return value


def _identities(paths: Iterable[str]) -> set[tuple[int, int]]:
    ids: set[tuple[int, int]] = set()
    for p in paths:
        try:
            st = os.stat(p)  # admin-supplied or from passwd: trusted, following symlinks is intended
        except OSError:
            continue
        ids.add((st.st_dev, st.st_ino))
    return ids


def cleanup(dirs: Sequence[str] | None, uids: AbstractSet[int], *, min_uid: int = DEFAULT_MIN_UID,
            protect: Sequence[str] = (), protect_homes: bool = True, dry_run: bool = False,
            max_depth: int = DEFAULT_MAX_DEPTH, max_paths: int = DEFAULT_MAX_PATHS,
            before_descend: Callable[[str], None] | None = None, since: float | None = None,
            keep: Sequence[str] = ()) -> CleanupReport:
    """Remove, below each of ``dirs``, the files and directories owned by one of ``uids``.

    ``dirs``: trusted top directories (default :data:`DEFAULT_DIRS` when None); symlinks in these admin-given paths
    are resolved once, the tops themselves are never removed, and a missing top is reported as ``vanished``.
    ``uids``: the identities to clean; files of a uid below ``min_uid`` are never removed (``below-min-uid``).
    ``protect``: paths never entered nor removed (compared by inode); with ``protect_homes`` the home directories
    of ``uids`` are added (except a home that is itself one of the tops).  A directory owned by a target uid is
    removed only once everything inside it is; else it stays (``not-empty``) while what could go inside it went.
    Directories of other owners are entered (a target uid's files inside them are removed) but kept.  ``before_descend(path)`` is a test hook called just
    before a subdirectory is opened.  The caller decides which uids are free to clean (no other running job).
    ``since`` (the job's start): only what was created (or changed) after it goes -- an entry whose ctime is
    older is ``before-job``, and in a directory untouched since then only its subdirectories are looked at.
    ``keep``: paths never removed (the batch system's stdout/stderr files of the job).
    """
    tops = DEFAULT_DIRS if dirs is None else dirs
    if isinstance(tops, str):
        raise InvalidArgument("dirs must be a sequence of paths, not a string")
    min_uid = _check_uid(min_uid, "min_uid")
    targets = frozenset(_check_uid(u, "uid") for u in uids)
    if max_depth < 1:
        raise InvalidArgument(f"max_depth must be >= 1, not {max_depth}")
    report = CleanupReport(dry_run=dry_run, max_paths=max_paths)

    real_tops: list[str] = []
    for top in tops:
        if not isinstance(top, str) or not os.path.isabs(top):
            raise InvalidArgument(f"cleanup directory must be an absolute path: {top!r}", path=str(top))
        real = os.path.realpath(top)
        if real == "/":
            raise InvalidArgument(f"refusing to clean the whole filesystem ({top!r} is /)", path=top)
        if real not in real_tops:  # /var/tmp -> /tmp must not be walked twice
            real_tops.append(real)
    if not targets:
        return report

    def owner_check(st: os.stat_result) -> str | None:
        if st.st_uid not in targets:
            return OTHER_UID
        if st.st_uid < min_uid:
            return BELOW_MIN_UID
        if since is not None and st.st_ctime < since:
            return BEFORE_JOB
        return None

    protected = _identities([*protect, *keep])
    if protect_homes:
        homes = []
        for uid in sorted(targets):
            try:
                homes.append(pwd.getpwuid(uid).pw_dir)
            except KeyError:
                continue
        # A pool account whose home *is* /tmp (it happens) must not shield all of /tmp: tops are never
        # removed anyway, so a home that is a top protects nothing more.
        protected |= _identities(h for h in homes if h) - _identities(real_tops)
    mounts = mount_points()

    for top in real_tops:
        try:
            dfd = os.open(top, DIR_FLAGS)
        except FileNotFoundError:
            report.note_skipped(top, VANISHED, "no such directory")
            continue
        except OSError as e:
            report.note_skipped(top, ERROR, f"open: {e.strerror}")
            continue
        try:
            st = os.fstat(dfd)
            if (st.st_dev, st.st_ino) in protected:
                report.note_skipped(top, PROTECTED)
                continue
            walk_remove(dfd, top, owner_check, report, protect=protected, mounts=mounts,
                        max_depth=max_depth, dry_run=dry_run, before_descend=before_descend, since=since,
                        leaf_skip=since is not None and _counts_subdirs(top))
        finally:
            os.close(dfd)
    return report
