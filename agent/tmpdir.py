"""Per-job private TMPDIR: ``<base>/<job_id>``, owned by the job's uid, mode 0700.

The base comes from the config; a payload must not be able to redirect where we create (and later chown and
remove) things.  So the base is reached component by component from ``/`` with ``O_NOFOLLOW`` directory fds, and
every component must be root-owned and either not writable by group/others or sticky (like ``/tmp``).  The job
directory is created with ``mkdirat`` and chowned through its own fd (``fchown``), never by path.

In a sticky, world-writable base (``/tmp``) another user can take the name ``<base>/<job_id>`` first; we then refuse
(AccessDenied) rather than hand the job a directory someone else prepared.  A root-owned base that is not
world-writable (e.g. ``/var/tmp/jobcage``, ``create_base=True``) has no such denial of service.
"""

from __future__ import annotations

import errno
import os
import stat

from jobcage.agent.cleanup import (
    DEFAULT_MAX_DEPTH,
    DIR_FLAGS,
    ERROR,
    OTHER_FS,
    RACE,
    VANISHED,
    CleanupReport,
    mount_points,
    walk_remove,
)

from .errors import AccessDenied, InvalidArgument

JOB_TMPDIR_MODE = 0o700
BASE_MODE = 0o755  # for a base we create ourselves


def _check_job_id(job_id: object) -> str:
    # The caller validated the job id already; these are the ones that would make it escape the base.
    if not isinstance(job_id, str) or job_id in ("", ".", "..") or "/" in job_id or "\0" in job_id:
        raise InvalidArgument(f"job id not usable as a directory name: {job_id!r}", job_id=str(job_id))
    if len(os.fsencode(job_id)) > 255:
        raise InvalidArgument("job id too long for a directory name", job_id=job_id)
    return job_id


def _check_ids(uid: object, gid: object) -> tuple[int, int]:
    for what, v in (("uid", uid), ("gid", gid)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InvalidArgument(f"{what} must be a non-negative integer, not {v!r}")
    return uid, gid  # type: ignore[return-value]


def _check_trusted(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if st.st_uid != 0:
        raise InvalidArgument(f"unsafe TMPDIR base: {path} is owned by uid {st.st_uid}, not root", path=path)
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise InvalidArgument(f"unsafe TMPDIR base: {path} is group/world writable and not sticky "
                              f"(mode {stat.S_IMODE(st.st_mode):04o})", path=path)


def open_trusted_dir(path: str, *, create: bool = False) -> int:
    """Open ``path`` as a directory fd, walking from ``/`` without following any symlink.

    Every component must be root-owned and not group/world writable unless sticky.  With ``create`` a missing last
    component is created (root, 0755).  Raises InvalidArgument when the path is unusable.
    """
    if not isinstance(path, str) or not os.path.isabs(path):
        raise InvalidArgument(f"TMPDIR base must be an absolute path: {path!r}", path=str(path))
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise InvalidArgument(f"TMPDIR base must not contain '.' or '..': {path}", path=path)
    fd = os.open("/", DIR_FLAGS)
    try:
        _check_trusted(fd, "/")
        sofar = ""
        for i, part in enumerate(parts):
            sofar += "/" + part
            try:
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not (create and i == len(parts) - 1):
                    raise InvalidArgument(f"TMPDIR base does not exist: {sofar}", path=path) from None
                try:
                    os.mkdir(part, BASE_MODE, dir_fd=fd)
                except FileExistsError:
                    pass  # a concurrent prologue made it; it is checked like any other below
                nfd = os.open(part, DIR_FLAGS, dir_fd=fd)
                st = os.fstat(nfd)
                if st.st_uid == 0 and stat.S_IMODE(st.st_mode) != BASE_MODE:
                    os.fchmod(nfd, BASE_MODE)  # undo the umask
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise InvalidArgument(f"unsafe TMPDIR base: {sofar} is a symlink or not a directory",
                                          path=path) from None
                raise InvalidArgument(f"cannot open TMPDIR base {sofar}: {e.strerror}", path=path) from None
            os.close(fd)
            fd = nfd
            _check_trusted(fd, sofar)
        return fd
    except BaseException:
        os.close(fd)
        raise


def job_tmpdir_path(base: str, job_id: str) -> str:
    """The path :func:`create_job_tmpdir` uses (for exporting TMPDIR); validates ``job_id``."""
    return os.path.join(os.path.normpath(base), _check_job_id(job_id))


def create_job_tmpdir(base: str, job_id: str, uid: int, gid: int, *, create_base: bool = False) -> str:
    """Create ``<base>/<job_id>`` owned by ``uid:gid`` with mode 0700 and return its path.

    Idempotent for a retried prologue: an existing directory is accepted only if it is a real directory (not a
    symlink) already owned by ``uid``, not accessible to group/others, and empty; anything else there raises
    AccessDenied and is left untouched.  ``create_base`` creates a missing last component of ``base`` (root, 0755).
    """
    _check_job_id(job_id)
    uid, gid = _check_ids(uid, gid)
    if os.geteuid() != 0:
        raise AccessDenied("creating a job TMPDIR needs root", job_id=job_id)
    path = job_tmpdir_path(base, job_id)
    base_fd = open_trusted_dir(base, create=create_base)
    try:
        created = True
        try:
            os.mkdir(job_id, JOB_TMPDIR_MODE, dir_fd=base_fd)
        except FileExistsError:
            created = False
        try:
            fd = os.open(job_id, DIR_FLAGS, dir_fd=base_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise AccessDenied(f"{path} exists and is not a directory (symlink?); refusing to use it",
                                   job_id=job_id, path=path) from None
            raise
        try:
            st = os.fstat(fd)
            if created:
                # Only root can write in a non-sticky base, and in a sticky one nobody else can rename our
                # root-owned directory: still, make sure the fd is the directory we just made.
                if st.st_uid != 0:
                    raise AccessDenied(f"{path} was replaced while being created", job_id=job_id, path=path)
            else:
                _accept_existing(fd, st, path, job_id, uid)
            # Mode first, then owner: the directory is never the user's while it is still open to others.
            os.fchmod(fd, JOB_TMPDIR_MODE)
            os.fchown(fd, uid, gid)
        finally:
            os.close(fd)
    finally:
        os.close(base_fd)
    return path


def _accept_existing(fd: int, st: os.stat_result, path: str, job_id: str, uid: int) -> None:
    if st.st_uid != uid:
        raise AccessDenied(f"{path} already exists and belongs to uid {st.st_uid}, not {uid}; refusing to use it",
                           job_id=job_id, path=path)
    if st.st_mode & 0o077:
        raise AccessDenied(f"{path} already exists with mode {stat.S_IMODE(st.st_mode):04o} (others may have "
                           f"planted entries); refusing to use it", job_id=job_id, path=path)
    with os.scandir(fd) as it:
        if any(True for _ in it):
            raise AccessDenied(f"{path} already exists and is not empty; refusing to use it",
                               job_id=job_id, path=path)


def remove_job_tmpdir(base: str, job_id: str, *, dry_run: bool = False,
                      max_depth: int = DEFAULT_MAX_DEPTH) -> CleanupReport:
    """Remove ``<base>/<job_id>`` and everything in it, whoever owns it (the whole tree was the job's).

    Same walker as :func:`jobcage.agent.cleanup.cleanup`: no symlink is followed (one inside is unlinked, its target never
    touched), nothing on another filesystem or below a mount point is touched, depth is bounded.  Whatever could not
    be removed is in the report and the job directory then stays.  A missing directory is not an error (reported as
    ``vanished``); one replaced by a symlink or file is left alone and reported as ``race``.
    """
    _check_job_id(job_id)
    path = job_tmpdir_path(base, job_id)
    report = CleanupReport(dry_run=dry_run)
    base_fd = open_trusted_dir(base)
    try:
        try:
            fd = os.open(job_id, DIR_FLAGS, dir_fd=base_fd)
        except FileNotFoundError:
            report.note_skipped(path, VANISHED, "no such directory")
            return report
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                report.note_skipped(path, RACE, "not a directory (symlink?): left alone")
            else:
                report.note_skipped(path, ERROR, f"open: {e.strerror}")
            return report
        try:
            st = os.fstat(fd)
            mounts = mount_points()
            if st.st_dev != os.fstat(base_fd).st_dev or path in mounts:
                report.note_skipped(path, OTHER_FS, "job TMPDIR is a mount point")
                return report
            empty = walk_remove(fd, path, lambda _st: None, report, mounts=mounts, max_depth=max_depth,
                                dry_run=dry_run)
        finally:
            os.close(fd)
        if not empty:
            return report  # what stays is listed in the report; the directory stays with it
        if dry_run:
            report.note_removed(path, True)
            return report
        try:
            now = os.stat(job_id, dir_fd=base_fd, follow_symlinks=False)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                report.note_skipped(path, RACE, "replaced during removal")
                return report
            os.rmdir(job_id, dir_fd=base_fd)
        except FileNotFoundError:
            report.note_skipped(path, VANISHED)
            return report
        except OSError as e:
            reason = RACE if e.errno in (errno.ENOTEMPTY, errno.EEXIST) else ERROR
            report.note_skipped(path, reason, f"rmdir: {e.strerror}")
            return report
        report.note_removed(path, True)
        return report
    finally:
        os.close(base_fd)
