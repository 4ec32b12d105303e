"""Release numbers of the libraries whose private parts the adapters use (torch for SchedulePPLL, DeepSpeed)."""

from __future__ import annotations


def release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "2.13.0+cu128" or "0.18.1", local and pre-release parts left out,
    to compare with an adapter's tested range."""
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2] if p.isdigit())
