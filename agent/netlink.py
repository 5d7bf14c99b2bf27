"""Reading a netlink multicast socket that pyroute2 has set up (the proc connector, taskstats): the datagrams
as they came, drained until the socket is empty, with the overruns counted.  The consumers parse the bytes
themselves (their per-record cost matters); pyroute2 keeps the family set-up and registration."""

from __future__ import annotations

import ctypes as ct
import errno
import logging
import os
import socket

log = logging.getLogger("jobcage.netlink")

SO_RCVBUFFORCE = 33          # asm-generic/socket.h; not exported by Python's socket module
MSG_DONTWAIT = 0x40


class _IoVec(ct.Structure):
    _fields_ = [("base", ct.c_void_p), ("len", ct.c_size_t)]


class _MsgHdr(ct.Structure):
    _fields_ = [("name", ct.c_void_p), ("namelen", ct.c_uint32), ("iov", ct.POINTER(_IoVec)),
                ("iovlen", ct.c_size_t), ("control", ct.c_void_p), ("controllen", ct.c_size_t),
                ("flags", ct.c_int)]


class _MMsgHdr(ct.Structure):
    _fields_ = [("hdr", _MsgHdr), ("len", ct.c_uint)]


class _Mmsg:
    """recvmmsg(2) through ctypes: up to ``n`` datagrams of at most ``size`` bytes per syscall.  Python's
    socket has no recvmmsg, and one recv per exit record of the whole node was the accounting's largest cost."""

    def __init__(self, fd: int, n: int, size: int) -> None:
        libc = ct.CDLL(None, use_errno=True)
        self._recvmmsg = libc.recvmmsg
        self._recvmmsg.argtypes = [ct.c_int, ct.c_void_p, ct.c_uint, ct.c_int, ct.c_void_p]
        self._recvmmsg.restype = ct.c_int
        self.fd, self.n, self.size = fd, n, size
        self.buf = ct.create_string_buffer(n * size)
        self.base = ct.addressof(self.buf)
        self.iov = (_IoVec * n)()
        self.msgs = (_MMsgHdr * n)()
        for i in range(n):
            self.iov[i].base, self.iov[i].len = self.base + i * size, size
            self.msgs[i].hdr.iov, self.msgs[i].hdr.iovlen = ct.pointer(self.iov[i]), 1

    def read(self) -> list[bytes]:
        got = self._recvmmsg(self.fd, self.msgs, self.n, MSG_DONTWAIT, None)
        if got < 0:
            err = ct.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise BlockingIOError(err, os.strerror(err))
            raise OSError(err, os.strerror(err))
        msgs, base, size = self.msgs, self.base, self.size
        # A truncated datagram (larger than a slot) is cut off: the consumers drop what is incomplete.
        return [ct.string_at(base + i * size, min(msgs[i].len, size)) for i in range(got)]


class DatagramReader:
    """A non-blocking duplicate of ``fileno`` (pyroute2's socket) with a 16 MiB receive buffer where root may
    force one: bursts of the whole node's events must not overrun it.  ``batch`` > 1 reads with recvmmsg,
    ``batch`` datagrams of up to ``size`` bytes per syscall (one recv per datagram where libc lacks it)."""

    def __init__(self, fileno: int, what: str, *, batch: int = 1, size: int = 1 << 16) -> None:
        self.sock = socket.socket(fileno=os.dup(fileno))
        self.sock.setblocking(False)
        self.what, self.size = what, size
        self.overruns = 0     # ENOBUFS: datagrams the kernel dropped
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        except OSError:
            pass
        self._mmsg: _Mmsg | None = None
        if batch > 1:
            try:
                self._mmsg = _Mmsg(self.sock.fileno(), batch, size)
            except (OSError, AttributeError) as e:   # no recvmmsg in this libc
                log.info("recvmmsg unavailable (%s): reading %s one datagram at a time", e, what)

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, budget: int = 1 << 30) -> list[bytes]:
        """The datagrams waiting now, until the socket is empty or ``budget`` of them were read (so a storm of
        node-wide events cannot starve the caller); an overrun is counted and logged, and reading goes on."""
        got: list[bytes] = []
        mmsg = self._mmsg
        while len(got) < budget:
            try:
                if mmsg is not None:
                    batch = mmsg.read()
                    got.extend(batch)
                    if len(batch) < mmsg.n:
                        break
                else:
                    got.append(self.sock.recv(self.size))
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                log.warning("%s socket overrun: messages lost", self.what)
        return got

    def close(self) -> None:
        self.sock.close()
