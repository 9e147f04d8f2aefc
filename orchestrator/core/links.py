"""Symlinks and overlapping folders, read safely: what a path really is, and whether a copy of a tree can end.

A folder orch writes (output_dir, cache_dir) must never be, contain or sit inside an input it reads (the model,
the adapter, the data), after every symlink is resolved: publishing a model into a folder inside that model
copies it into itself until paths are too long. A tree orch copies (a model into output_dir) must have no link
that leads out of it or back into it as a folder: such a copy never ends, or copies the user's disk. Everything
here only reads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from orchestrator.core.errors import UserError

SHORT_PATH = 160  # characters of a path shown in a message; longer ones keep their head and tail


class LinkError(UserError):
    """A symlink that cannot be followed (dangling, a loop) or a tree that cannot be copied: one line."""


def short(path: Path | str) -> str:
    """A path for a one-line message: whole when short, else its head and tail (a runaway copy's paths are
    tens of thousands of characters)."""
    text = str(path)
    if len(text) <= SHORT_PATH:
        return text
    return f"{text[:60]}...{text[-(SHORT_PATH - 63):]}"


def link_problem(path: Path) -> str | None:
    """Why `path` (or a folder above it) is a symlink that leads nowhere: dangling or a loop; None when fine."""
    probe = Path(os.path.abspath(path))
    chain = [probe, *probe.parents]
    for p in reversed(chain):  # the top-most bad link is the one to fix
        if not p.is_symlink():
            continue
        try:
            p.resolve(strict=True)
        except FileNotFoundError:
            target = os.readlink(p)
            return f"{short(p)} is a symlink to {short(target)}, which does not exist"
        except (RuntimeError, OSError):  # RuntimeError: Python < 3.13's "Symlink loop"; OSError: ELOOP
            return f"{short(p)} is a symlink loop (it leads back to itself)"
    return None


def real(path: Path | str) -> Path:
    """The path with every symlink resolved, also for paths that do not exist yet (their existing part is); a
    loop is left where it starts (Path.resolve raises on it: the checks name it instead)."""
    try:
        return Path(os.path.realpath(path))
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def written_path(base_dir: Path, path: str | Path) -> Path:
    """A path as a workflow writes it: ~ expanded, a relative one taken from the workflow's folder and resolved
    (`real`: a link loop is left for the checks to name)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else real(base_dir / p)


def within(inner: Path, outer: Path) -> bool:
    """inner is outer or lies inside it (both already resolved)."""
    return inner == outer or outer in inner.parents


@dataclass(frozen=True)
class Overlap:
    """An output folder and an input that share files: how, in words."""

    relation: str  # "is", "is inside", "contains"

    @staticmethod
    def of(output: Path, input_: Path) -> Overlap | None:
        out, inp = real(output), real(input_)
        if out == inp:
            return Overlap("is")
        if within(out, inp):
            return Overlap("is inside")
        if within(inp, out):
            return Overlap("contains")
        return None


# ---- trees ----------------------------------------------------------------------------------------------------
def tree_link_problem(root: Path) -> str | None:
    """The first symlink under `root` that a copy of the tree must not follow, in words; None when every link is
    a file link (copied as its content, as a Hugging Face cache snapshot is made of) or a folder link inside the
    tree that does not lead back up (kept as a link)."""
    top = real(root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            if not p.is_symlink():
                continue
            try:
                target = p.resolve(strict=True)
            except FileNotFoundError:
                return f"{short(p)} is a symlink to {short(os.readlink(p))}, which does not exist"
            except (RuntimeError, OSError):
                return f"{short(p)} is a symlink loop (it leads back to itself)"
            if not target.is_dir():
                continue
            here = real(p.parent)
            if within(here, target):
                return (
                    f"{short(p)} is a symlink to {short(target)}, a folder that holds it (a loop: a copy would never "
                    "end)"
                )
            if not within(target, top):
                return f"{short(p)} is a symlink to the folder {short(target)} outside {short(root)}"
    return None


def check_tree(root: Path, what: str) -> None:
    """LinkError naming the first link under `root` a copy cannot take (see tree_link_problem)."""
    problem = tree_link_problem(root)
    if problem is not None:
        raise LinkError(f"{what}: {problem}; remove the link or replace it with what it points to")
