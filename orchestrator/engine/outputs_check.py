"""Where a run writes, checked before it writes: the cache, the output folder and a local tracking store are
folders it can write (or create), and none of them is, holds or sits inside an input (symlinks resolved).

Publishing into a folder inside the model copies the model into itself, and a cache or output folder that holds
an input replaces or deletes it; both are refused here, in one line naming the two fields.
"""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.core.links import Overlap, link_problem, real, short
from orchestrator.engine.preflight_error import PreflightError

CACHE_INPUT_FOLDERS = ("models", "remote")  # folders of the cache that hold inputs orch made (a converted model)


def check_writable_dir(field: str, path: Path) -> None:
    """path is a folder we can write, or can be created: never a file, never under a read-only parent, never
    (through) a symlink that leads nowhere."""
    problem = link_problem(path)
    if problem is not None:
        raise PreflightError(
            f"{field} {short(path)}: {problem}; remove the link, make it point at a folder, or give another folder"
        )
    if path.exists() and not path.is_dir():
        raise PreflightError(f"{field} {path} is a file, not a folder; give a folder path (it is created if missing)")
    probe = path
    while not probe.exists():
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if probe.exists() and not probe.is_dir():
        raise PreflightError(f"{field} {path}: {probe} is a file, so the folder cannot be created there")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" ({probe} is not writable, so it cannot be created)"
        raise PreflightError(f"{field} {path} is not writable{where}; choose a folder you can write to")


def check_apart_from_inputs(outputs: list[tuple[str, Path]], inputs: list[tuple[str, Path]]) -> None:
    """No (field, folder) a run writes is, contains or sits inside an input (field, path), symlinks resolved.
    The cache's own inputs (models/, remote/) are its to hold."""
    for in_field, inp in inputs:
        for out_field, out in outputs:
            overlap = Overlap.of(out, inp)
            if overlap is None or (overlap.relation == "is inside" and not real(inp).is_dir()):
                continue  # a folder "inside" a file: the writable-folder checks name that
            if out_field == "engine.cache_dir" and overlap.relation == "contains":
                inside = real(inp).relative_to(real(out)).parts
                if inside and inside[0] in CACHE_INPUT_FOLDERS:
                    continue
            what = {"engine.output_dir": "output folder", "engine.cache_dir": "cache folder"}.get(
                out_field, "tracking store"
            )
            if overlap.relation == "contains":
                message = (
                    f"{in_field} {short(inp)} is inside the {what} {short(out)} ({out_field}), which this run "
                    f"writes and replaces parts of; give a {what} that holds no input"
                )
            else:
                message = (
                    f"{out_field} {short(out)} {overlap.relation} the input {in_field} {short(inp)}"
                    + (f" (resolved: {short(real(out))})" if real(out) != Path(os.path.abspath(out)) else "")
                    + f": orch never writes into an input; give a {what} apart from the model, adapter and data"
                )
            raise PreflightError(message)
