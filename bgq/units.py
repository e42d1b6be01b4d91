"""Durations (`7d`, `12h`) and sizes (`20G`, `500M`) as people write them."""

from __future__ import annotations

import re

_DURATION = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_NUMBER = r"(\d+(?:\.\d+)?)"


def parse_duration(text: str | float) -> float:
    """Seconds in `30s`, `15m`, `12h`, `7d`, `2w` or a bare number of seconds."""
    match = re.fullmatch(_NUMBER + r"\s*([smhdw]?)", str(text).strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30s, 15m, 12h, 7d or 2w")
    return float(match[1]) * _DURATION[match[2] or "s"]


def parse_size(text: str | int) -> int:
    """Bytes in `512K`, `500M`, `20G`, `1T` (binary units, optional `B`/`iB`) or bare bytes."""
    match = re.fullmatch(_NUMBER + r"\s*([kmgt]?)(?:i?b)?", str(text).strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a size like 500M, 20G or 1T")
    return int(float(match[1]) * _SIZE[match[2]])


def format_size(size: float) -> str:
    """`1.5 GiB`-style text for a number of bytes."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def format_duration(seconds: float) -> str:
    """`4.2 s`, `3 min 12 s` or `2 h 5 min`: a duration as people read it."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"
