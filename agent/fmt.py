"""How the agent names things for people: times (ISO 8601 UTC, milliseconds, as the trail prints them)
and users (name, else the uid)."""

from __future__ import annotations

import pwd
from datetime import UTC, datetime


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_names: dict[int, str] = {}


def user_name(uid: int) -> str:
    """The user's name, else the uid as text.  Names found are kept (a view of thousands of processes
    asks for a few uids thousands of times); a uid without a name is asked again (it may get one)."""
    name = _names.get(uid)
    if name is None:
        try:
            name = _names[uid] = pwd.getpwuid(uid).pw_name
        except (KeyError, OverflowError):
            return str(uid)
    return name
