"""A private, real OpenSSH server for the adoption tests (tests/test_sshd_adopt.py).

``sshd`` fixture: Debian's /usr/sbin/sshd started by the test in the foreground on a free loopback port, with
its own host key, config, authorized-keys directory and PAM service.  sshd names its PAM service after its
program name, so the fixture runs it through a symlink ``<base>/sshd-jct<hex>`` and writes
``/etc/pam.d/sshd-jct<hex>``: a copy of the distribution's /etc/pam.d/sshd with jobcage's lines added exactly
where docs/ssh-adoption.md tells a site to add them (/etc/pam.d/sshd itself is never touched; the file is
removed at teardown).  Clients log in with a key the fixture made; ``authorize(user)`` lets a user in.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from jctest import JOBCAGE, JcEnv, User, free_port, require, wait_for

SSHD = "/usr/sbin/sshd"
PAM_EXEC = ("/usr/lib/x86_64-linux-gnu/security/pam_exec.so", "/lib/x86_64-linux-gnu/security/pam_exec.so",
            "/usr/lib64/security/pam_exec.so")
SYSTEM_PAM = Path("/etc/pam.d/sshd")


# What the docs put in the PAM line is /usr/local/bin/jobcage, the venv's site-less launcher
# (scripts/bootstrap-venv.sh); the suite uses its own checkout's launcher, or its jobcage script.
_LAUNCHER = Path(JOBCAGE).with_name("jobcage-launcher")
PAM_JOBCAGE = str(_LAUNCHER) if _LAUNCHER.exists() else JOBCAGE


def pam_lines(config_path: str) -> tuple[str, str]:
    """The account and session lines of docs/ssh-adoption.md, for this env's config."""
    cmd = f"{PAM_JOBCAGE} pam --config {config_path}"
    return (f"account    required     pam_exec.so quiet stdout {cmd}",
            f"session    required     pam_exec.so quiet stdout {cmd}")


@dataclass
class Sshd:
    env: JcEnv
    base: Path
    service: str
    port: int
    key: Path
    log_file: Path
    proc: subprocess.Popen | None = None
    clients: list[subprocess.Popen] = field(default_factory=list)

    @property
    def pam_path(self) -> Path:
        return Path("/etc/pam.d") / self.service

    def authorize(self, user: User | str) -> None:
        name = user if isinstance(user, str) else user.name
        pub = (self.key.with_suffix(".pub")).read_text()
        (self.base / "keys" / name).write_text(pub)
        (self.base / "keys" / name).chmod(0o644)

    def argv(self, user: User | str, command: str, send_env: Sequence[str] = ()) -> list[str]:
        name = user if isinstance(user, str) else user.name
        argv = ["ssh", "-F", "/dev/null", "-T", "-i", str(self.key), "-p", str(self.port),
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "ConnectTimeout=30", "-o", "LogLevel=INFO"]
        for var in send_env:
            argv += ["-o", f"SendEnv={var}"]
        return [*argv, f"{name}@127.0.0.1", command]

    def ssh(self, user: User | str, command: str, env: Mapping[str, str] | None = None,
            send_env: Sequence[str] = (), timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """One login running `command`; returns when the session has ended."""
        e = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})}
        try:
            return subprocess.run(self.argv(user, command, send_env), env=e, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"ssh {command!r} did not finish in {timeout:g}s; sshd log:\n{self.log()}", pytrace=False)

    def popen(self, user: User | str, command: str, **kw: object) -> subprocess.Popen:
        """A login kept open (e.g. `sleep 300` in the foreground); killed at teardown."""
        p = subprocess.Popen(self.argv(user, command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)  # type: ignore
        self.clients.append(p)
        return p

    def decisions(self) -> list[dict]:
        """The hook's decision records ([pam] log_file), oldest first."""
        try:
            return [json.loads(line) for line in self.log_file.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []

    def log(self, tail: int = 40) -> str:
        try:
            return "\n".join((self.base / "sshd.log").read_text().splitlines()[-tail:])
        except FileNotFoundError:
            return "(no sshd log)"

    def start(self) -> None:
        link = self.base / self.service
        log = open(self.base / "sshd.log", "a")  # noqa: SIM115 - handed to the child
        # -D: foreground child of the test (no daemon to chase); -e: log to the file above.
        self.proc = subprocess.Popen([str(link), "-D", "-e", "-f", str(self.base / "sshd_config")],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"sshd exited with {self.proc.returncode}:\n{self.log()}", pytrace=False)
            with socket.socket() as s:
                s.settimeout(1)
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_for(up, 30, "sshd listening")

    def stop(self) -> None:
        for p in self.clients:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def make_sshd(env: JcEnv, sshd_options: Mapping[str, str] | None = None,
              pam_overrides: Mapping[str, object] | None = None, with_jobcage: bool = True,
              account_before: Sequence[str] = ()) -> Sshd:
    """with_jobcage=False: the distribution's stack alone (the baseline of bench/ssh_login.py).
    account_before: PAM account lines right before jobcage's (e.g. the batch system's own adoption module)."""
    require(os.access(SSHD, os.X_OK), f"{SSHD} missing: apt-get install openssh-server (vagrant/provision.sh)")
    require(SYSTEM_PAM.is_file(), f"{SYSTEM_PAM} missing (openssh-server)")
    require(any(os.path.exists(p) for p in PAM_EXEC), "pam_exec.so missing (libpam-modules)")
    require(shutil.which("ssh") is not None and shutil.which("ssh-keygen") is not None, "openssh-client missing")
    base = Path(tempfile.mkdtemp(prefix="jcsshd-", dir="/tmp"))
    base.chmod(0o755)
    service = f"sshd-jct{secrets.token_hex(4)}"
    (base / service).symlink_to(SSHD)
    (base / "keys").mkdir(mode=0o755)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / name)], check=True)
    port = free_port()
    options = {"Port": str(port), "ListenAddress": "127.0.0.1", "HostKey": str(base / "host_key"),
               "PidFile": str(base / "sshd.pid"), "AuthorizedKeysFile": f"{base}/keys/%u",
               "StrictModes": "no",  # the keys live under /tmp (world-writable parent)
               "UsePAM": "yes", "PasswordAuthentication": "no", "KbdInteractiveAuthentication": "no",
               "PermitRootLogin": "prohibit-password", "UseDNS": "no", "PrintMotd": "no",
               "AcceptEnv": "SLURM_JOB_ID PBS_JOBID", "MaxStartups": "64", "LogLevel": "VERBOSE",
               **{k: v.format(config=env.config_path, jobcage=PAM_JOBCAGE) for k, v in (sshd_options or {}).items()}}
    (base / "sshd_config").write_text("".join(f"{k} {v}\n" for k, v in options.items()))
    log_file = base / "pam.jsonl"
    env.write_config({"pam": {"log_file": str(log_file), **(pam_overrides or {})}})
    # The site's PAM file as the docs say: the distribution's sshd stack, jobcage's account line right after
    # the account includes, its session line after the session includes (it re-adopts what pam_systemd moved).
    account, session = pam_lines(str(env.config_path))
    out = []
    for line in SYSTEM_PAM.read_text().splitlines():
        out.append(line)
        words = line.split()
        # Debian: "@include common-account"; EL9: "account include password-auth"
        if not with_jobcage:
            continue
        if words[:2] == ["@include", "common-account"] or words[:3] == ["account", "include", "password-auth"]:
            out.extend([*account_before, account])
        elif words[:2] == ["@include", "common-session"] or words[:3] == ["session", "include", "password-auth"]:
            out.append(session)
    assert not with_jobcage or (account in out and session in out), \
        f"{SYSTEM_PAM}: no account/session include to put jobcage after"
    sshd = Sshd(env=env, base=base, service=service, port=port, key=base / "client_key", log_file=log_file)
    sshd.pam_path.write_text("\n".join(out) + "\n")
    try:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir (the package's own)
        sshd.start()
    except BaseException:
        remove_sshd(sshd)
        raise
    return sshd


def remove_sshd(server: Sshd) -> None:
    server.stop()
    with contextlib.suppress(FileNotFoundError):
        server.pam_path.unlink()
    shutil.rmtree(server.base, ignore_errors=True)


def elapsed_ok(rec: dict, limit: float = 2.0) -> bool:
    return isinstance(rec.get("elapsed"), int | float) and rec["elapsed"] < limit


def wait_dead(pids: Sequence[int], timeout: float = 20.0) -> None:
    from jctest import alive

    wait_for(lambda: not any(alive(p) for p in pids), timeout, f"pids {list(pids)} gone")


def now() -> float:
    return time.time()
