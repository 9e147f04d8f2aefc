"""One writer for bench/RESULTS.md: each benchmark owns the text between its `<!-- name:start/end -->` markers.

Every script rewrites only its own section, so results measured on different machines (a lent GPU, this 2-core
host, a Docker engine) live side by side in one file. The file is replaced atomically: a run that dies mid-write
leaves the previous results whole.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_section(path: Path, name: str, body: str) -> None:
    """Put `body` between the `name` markers of `path` (appended at the end when the markers are not there yet)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
