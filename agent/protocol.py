"""Wire format of the control socket: 4-byte big-endian length + JSON object.

Request  {"method": str, "params": {...}}
Response {"ok": true, "result": ...} | {"ok": false, "error": {"type", "message", ...}}
Kept apart from the method table (agent/api.py) so transport and logic stay separate.
"""

from __future__ import annotations

import json
import struct

from .errors import ProtocolError

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs ~3 ms per hook call

if TYPE_CHECKING:
    import socket

MAX_MESSAGE = 1 << 20
HEADER = struct.Struct("!I")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ProtocolError("connection closed mid-message" if buf else "connection closed")
        buf += chunk
    return bytes(buf)


def encode(obj: object) -> bytes:
    """One frame: the length prefix and the JSON body."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(len(data)) + data


def decode(data: bytes) -> dict:
    """The JSON object of a frame's body; ProtocolError if it is none (RecursionError if nested too deeply)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("message is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("message is not a JSON object")
    return obj


def send(sock: socket.socket, obj: object) -> None:
    data = encode(obj)
    if len(data) > MAX_MESSAGE + HEADER.size:
        raise ProtocolError(f"message too large ({len(data) - HEADER.size} bytes)")
    sock.sendall(data)


def recv(sock: socket.socket) -> dict:
    (n,) = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if n > MAX_MESSAGE:
        raise ProtocolError(f"message too large ({n} bytes)")
    return decode(_recv_exact(sock, n))
