"""The harness every benchmark in bench/ uses: a row in its own process, per-row JSON, markdown tables, RESULTS.md.

- `run_row`: one row in a child process (its own CUDA context and peak memory; a crash or a hang is that row's
  alone), its output in a log file, its wall time and exit status (-9 when it ran past its time).
- `write_json` / `read_json`: the per-row and per-run records, written atomically (a killed run leaves the last
  whole file), so a table can always be rendered again from what was measured.
- `row` / `table`: markdown table lines (`| a | b |`, an empty cell as `| |`).
- `write_section` / `section_of`: bench/RESULTS.md, where each benchmark owns the text between its
  `<!-- name:start/end -->` markers, so results measured on different machines (a lent GPU, this 2-core host, a
  Docker engine) live side by side in one file. The file is replaced atomically.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS_MD = BENCH / "RESULTS.md"


@dataclass
class RowRun:
    """What a row's process did: exit status (-9: killed at its time limit), wall seconds, its log file."""

    rc: int
    wall_s: float
    log: Path

    def tail(self, n: int = 3) -> list[str]:
        """The log's last `n` lines (a failed row's one-line reason)."""
        return self.log.read_text(errors="replace").strip().splitlines()[-n:] if self.log.exists() else []


def run_row(
    cmd: Sequence[str],
    log: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    check: bool = False,
) -> RowRun:
    """Run one row's command in its own process, stdout and stderr into `log`; `check`: a failure raises."""
    t0 = time.perf_counter()
    try:
        with open(log, "w") as fh:
            rc = subprocess.run(
                list(cmd), cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
    except subprocess.TimeoutExpired:
        rc = -9
    result = RowRun(rc, time.perf_counter() - t0, log)
    if check and rc != 0:
        raise subprocess.CalledProcessError(rc, list(cmd), output="\n".join(result.tail(20)))
    return result


def write_json(path: Path, data: Any, *, indent: int | None = 1) -> None:
    """`data` as JSON at `path`, replaced atomically (values JSON does not know are written as str)."""
    write_text(path, json.dumps(data, indent=indent, default=str))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: Path, text: str) -> None:
    """`text` at `path` through a temporary file renamed into place (mode 0644)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def row(*cells: Any) -> str:
    """One markdown table row: `| a | b |`; an empty cell is `| |`."""
    return "|" + "|".join(f" {c} " if str(c) != "" else " " for c in cells) + "|"


def table(header: Sequence[str], align: str, rows: Sequence[Sequence[Any]] = ()) -> list[str]:
    """A markdown table's lines: the header, its rule (`align`: one letter a column, l or r) and the rows."""
    assert len(align) == len(header), (header, align)
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return [row(*header), rule, *(row(*r) for r in rows)]


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
    write_text(path, text)


def section_of(path: Path, name: str) -> str:
    """The body between the `name` markers of `path` ("" when they are not there)."""
    text = path.read_text() if path.exists() else ""
    start, end = f"<!-- {name}:start -->\n", f"\n<!-- {name}:end -->"
    if start not in text or end not in text:
        return ""
    return text.partition(start)[2].partition(end)[0]
