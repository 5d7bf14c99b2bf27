"""Wire format of the control socket: 4-byte big-endian length + JSON object.

Request  {"method": str, "params": {...}}
Response {"ok": true, "result": ...} | {"ok": false, "error": {"type", "message", ...}}
Kept apart from the method table (agent/api.py) so transport and logic stay separate.
"""

from __future__ import annotations

import struct

from .errors import ProtocolError

try:
    # json's own C accelerator, called directly: `import json` pulls in re, enum and functools, a few ms
    # on every hook call.  The same C scanner and encoder json.loads/json.dumps use, so the same bytes.
    from _json import encode_basestring_ascii as _encode_str
    from _json import make_encoder as _make_encoder
    from _json import make_scanner as _make_scanner
except ImportError:   # an interpreter without the accelerator: the json module
    _make_scanner = None

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


def _not_serializable(o: object) -> object:
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


class _Decoding:
    """What the C scanner reads from its context: json.JSONDecoder's defaults."""
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__
    memo: dict = {}


_scan = _make_scanner(_Decoding) if _make_scanner is not None else None
# dumps_plain's one encoder for every call, without json.dumps' markers dict (its check for circular references)
_plain_enc = _make_encoder(None, _not_serializable, _encode_str, None, ":", ",", False, False, True) \
    if _make_scanner is not None else None
_WS = " \t\n\r"


def dumps(obj: object) -> str:
    """json.dumps(obj, separators=(",", ":"))."""
    if _make_scanner is None:
        import json

        return json.dumps(obj, separators=(",", ":"))
    # a fresh markers dict per call (circular references are refused, as json.dumps does)
    return "".join(_make_encoder({}, _not_serializable, _encode_str, None, ":", ",", False, False, True)(obj, 0))


def dumps_plain(obj: object) -> str:
    """:func:`dumps` of data the agent built itself (an event's detail), which is never circular: one encoder
    for every call and no check for circular references (one would end in RecursionError).  A fresh encoder per
    call was ~40 % of the cost of an exec event's detail, written once per exec."""
    if _plain_enc is None:
        return dumps(obj)
    return "".join(_plain_enc(obj, 0))


def loads(text: str) -> object:
    """json.loads(text): ValueError if it is not one JSON value."""
    if _scan is None:
        import json

        return json.loads(text)
    s = text.strip(_WS)
    try:
        obj, end = _scan(s, 0)
    except StopIteration:
        raise ValueError("Expecting value") from None
    if end != len(s):
        raise ValueError("Extra data")
    return obj


def encode(obj: object) -> bytes:
    """One frame: the length prefix and the JSON body."""
    data = dumps(obj).encode()
    return HEADER.pack(len(data)) + data


def decode(data: bytes) -> dict:
    """The JSON object of a frame's body; ProtocolError if it is none (RecursionError if nested too deeply)."""
    try:
        obj = loads(data.decode())
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
