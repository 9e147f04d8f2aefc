"""Atomic writes, in one place: a reader (the cache, a container, the user) sees the old file or folder or the
new one, never half of one. Everything here is a temp name beside the destination + one rename, because a
rename within a folder is atomic and a copy is not.

Modes: temp files and folders are private by construction (mkstemp 0600, mkdtemp 0700) and some writers
(safetensors) make their files 0600 too; what lands under its real name is ordinary: files 0644 and folders 0755
under the usual umask 022 (`shareable`), so containers running as another uid, CI and colleagues can read it.
POSIX-only calls (fcntl's reflink ioctl, fchmod) are reached only where they exist: the module imports on Windows.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.core.links import LinkError, check_tree, real, short


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()
FILE_MODE = 0o666 & ~_UMASK  # 0644 under umask 022
DIR_MODE = 0o777 & ~_UMASK  # 0755


def shareable(path: Path) -> Path:
    """Give `path` (a file, or a folder and everything under it) the modes of a file created normally: folders
    DIR_MODE, files FILE_MODE (executables keep their x bits). Symlinks are left alone."""
    path = Path(path)
    if path.is_symlink():
        return path
    if path.is_dir():
        os.chmod(path, DIR_MODE)
        for root, dirs, files in os.walk(path):
            for name in dirs:
                if not os.path.islink(os.path.join(root, name)):
                    os.chmod(os.path.join(root, name), DIR_MODE)
            for name in files:
                _share_file(os.path.join(root, name))
    elif path.is_file():
        _share_file(str(path))
    return path


def _share_file(name: str) -> None:
    if os.path.islink(name):
        return
    mode = os.stat(name).st_mode & 0o777
    wanted = DIR_MODE if mode & 0o100 else FILE_MODE
    if mode != wanted:
        os.chmod(name, wanted)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write via a temp file in the same folder + rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600; a result others (containers, CI) read is 0644
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fresh_dir(dest: Path) -> Path:
    """An empty work folder `.<name>.tmp` beside `dest` (left over from a killed run: cleared first); a pass
    fills it and hands it to `commit_dir`. Fixed name: a pass's staging folder is its own, never shared."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, dest: Path) -> Path:
    """Put a finished temp folder in place of `dest` (an older `dest` is removed first), with ordinary modes."""
    shareable(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temp folder beside `dest`, renamed to `dest` when the block ends well and removed when it fails:
    a reader sees the old folder or the new one, never a half-written model."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        yield tmp
        commit_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dest: Path) -> None:
    """Copy src to dest via a temp sibling + rename: dest is either the old or the new copy, never half. A copy
    that fails (a link it must not follow, a full disk) leaves nothing behind."""
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if src.is_dir():
            copy_tree(src, tmp)
        else:
            tmp.mkdir(parents=True)
            copy_file(str(src), str(tmp / src.name))
        shareable(tmp)  # staging folders are made 0700 (mkdtemp); the user's output is an ordinary folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def copy_tree(src: Path, dst: Path) -> None:
    """dst (new) becomes a copy of the folder src that never follows a link out of the tree or back into it:
    files and file links are copied as content (reflinks where the filesystem offers them: a Hugging Face cache
    snapshot is made of file links), folder links inside the tree stay relative links, and any other link (a
    loop, a folder outside, a dangling link) refuses the copy before a byte is written (core.links)."""
    check_tree(src, f"cannot copy {short(src)}")
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):  # never descends into folder links
        here = Path(dirpath)
        target = dst / here.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in dirnames:
            link = here / name
            if link.is_symlink():  # inside the tree (check_tree): the same relative link in the copy
                os.symlink(os.path.relpath(link.resolve(), real(here)), target / name)
        for name in filenames:
            path = here / name
            if not stat.S_ISREG(path.stat().st_mode):
                raise LinkError(f"cannot copy {short(src)}: {short(path)} is not a regular file (a pipe or device)")
            copy_file(str(path), str(target / name))


def replace_link(link: Path, target: Path | str) -> None:
    """Point the symlink `link` at `target` by one rename (a reader follows the old target or the new one)."""
    tmp = link.with_name(f".{link.name}.link-{uuid.uuid4().hex[:8]}")
    tmp.symlink_to(target)
    os.replace(tmp, link)


FICLONE = 0x40049409  # linux/fs.h: share the blocks copy-on-write (btrfs, xfs, overlay on them)


def copy_file(src: str, dst: str) -> str:
    """A real copy: a reflink where the filesystem offers one (instant, no extra disk), else bytes. Never a
    hard link: an output that shares an inode with the cache (or the user's input model) lets an edit of one
    change the other, and onnx refuses external data with several links."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            import fcntl  # POSIX only; elsewhere the bytes are copied

            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
        except (ImportError, OSError):
            shutil.copyfileobj(fin, fout, 1 << 20)
    shutil.copystat(src, dst)
    return dst
