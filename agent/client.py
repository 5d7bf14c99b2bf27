"""Talk to the agent.  Small on purpose: the hook path imports this."""

from __future__ import annotations

# _socket, not socket: socket.py pulls in enum and selectors (~5 ms on every hook call)
import _socket
import sys

from . import protocol
from .errors import AgentUnavailable, error_class

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~3 ms per hook call
if TYPE_CHECKING:
    from .config import Config


def _connect(s: _socket.socket, path: str, timeout: float | None) -> None:
    end = None
    while True:
        try:
            return s.connect(path)
        except BlockingIOError:
            # The listen backlog is full (a flood of connections): wait for room as a blocking connect would.
            import time

            now = time.monotonic()
            end = end or now + (timeout or 60.0)
            if now >= end:
                raise
            time.sleep(0.002)


def _check_peer(s: _socket.socket, socket_path: str) -> None:
    """The agent runs as root: whoever else listens on the socket path (a job's own fake agent, when the
    real one is down and the directory lets it in) is not answered to.  The kernel says who it is."""
    raw = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    uid = int.from_bytes(raw[4:8], sys.byteorder)
    if uid != 0:
        raise AgentUnavailable(f"{socket_path} is served by uid {uid}, not root: not the jobcage agent",
                               path=socket_path)


def call(socket_path: str, method: str, timeout: float | None = 60.0, **params: object) -> object:
    """One request, one response.  Raises AgentUnavailable if nobody listens, or the
    agent's own error re-raised as the same exception class."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        try:
            _connect(s, socket_path, timeout)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise AgentUnavailable(f"agent not running ({socket_path}: {e.strerror})", path=socket_path) from None
        except PermissionError:
            raise AgentUnavailable(f"agent socket not accessible: {socket_path}", path=socket_path) from None
        _check_peer(s, socket_path)
        try:
            protocol.send(s, {"method": method, "params": params})
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before we finished sending: the agent's one-line answer is waiting
        resp = protocol.recv(s)
    except OSError as e:
        raise AgentUnavailable(f"agent connection failed: {e}", path=socket_path) from None
    finally:
        s.close()
    if resp.get("ok"):
        return resp.get("result")
    err = resp.get("error") or {}
    cls = error_class(str(err.get("type")))
    raise cls(str(err.get("message", "agent error")), job_id=err.get("job_id"), pid=err.get("pid"),
              path=err.get("path"))


def socket_for(cfg: Config) -> str:
    """The socket this process should call: root (the hooks, PAM, an admin) has its own listener, whose
    backlog users' connections cannot fill; everyone else the shared one."""
    import os

    return cfg.root_socket if os.geteuid() == 0 and os.path.exists(cfg.root_socket) else cfg.socket_path


class Invoker:
    """The one agent-or-direct path: a method through the agent when it is up, else (root only) the
    same method table in-process (agent/api.py), so validation and permission rules are identical and
    containment never depends on the agent.  Held by a long-running reader (jobtrace --live/--follow):
    the direct method table is made once, not per call."""

    def __init__(self, cfg: Config | None = None) -> None:
        if cfg is None:
            from .config import load

            cfg = load()
        self.cfg = cfg
        self._api: object | None = None

    def __call__(self, method: str, timeout: float | None = 60.0, **params: object) -> object:
        import os

        if self._api is None:
            try:
                return call(socket_for(self.cfg), method, timeout=timeout, **params)
            except AgentUnavailable as e:
                if os.geteuid() != 0:
                    raise AgentUnavailable(f"{e}; non-root callers need the agent for '{method}'") from None
            from .api import Api
            from .lifecycle import JobManager

            self._api = Api(JobManager(self.cfg))
        from .api import Caller

        return self._api.dispatch(Caller(os.getpid(), 0, 0), method, params)  # type: ignore[attr-defined]


def invoke(method: str, **params: object) -> object:
    """One method call, through the agent when it is up, else directly as root (see Invoker)."""
    return Invoker()(method, **params)
