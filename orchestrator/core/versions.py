"""The installed versions of libraries, read from package metadata (nothing is imported): the runner records
them in each result, and systems put them into cache keys."""

from __future__ import annotations

import importlib.metadata


def library_versions(names: tuple[str, ...] | list[str]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out
