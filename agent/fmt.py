"""How the agent names things for people: times (ISO 8601 UTC, milliseconds, as the trail prints them)
and users (name, else the uid)."""

from __future__ import annotations

import pwd
from datetime import UTC, datetime


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
