"""A data config checked before any pass reads it: each local file it names exists, is readable, not empty,
parses whole, and has the columns its text_template / text_cols / chat_template read; a split expression is
well formed and selects rows.

data_check.py reads one file whole; this module walks a data config's files (data_paths.py finds them) and
counts their rows, so the pre-flight can also refuse a split or a held-out size that leaves nothing.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

from orchestrator.core.links import check_tree, link_problem
from orchestrator.engine.data_check import DataFileError, Needed, needed_columns, scan_file, split_rows
from orchestrator.engine.data_paths import data_path, hub_dataset_id, local_data_paths
from orchestrator.engine.preflight_error import PreflightError

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".txt", ".parquet", ".arrow")  # also gzipped (.jsonl.gz)


def check_data_config(data_config: dict[str, Any], base_dir: Path, where: str) -> int | None:
    """Each local file a data config names exists, is readable, is not empty, parses, and every row has the
    columns its text_template / text_cols name (engine/data_check.py reads the whole file). Returns the rows of
    all its files (None when some cannot be counted)."""
    pre = data_config.get("pre_process_data_config") or {}
    scripted = _scripted(data_config)
    if "load_dataset" in scripted:  # the user_script's function reads the data its own way (checked when it runs)
        return None
    needed = Needed() if "pre_process_data" in scripted else _needed_columns(pre, where)
    paths = local_data_paths(data_config, base_dir)
    total: int | None = 0 if paths else None  # no local file (a hub dataset, a datastore): rows unknown here
    for field, written, found in paths:
        label = f"{where}.load_dataset_config.{field}"
        if not found:
            looked = data_path(written, base_dir)
            problem = link_problem(looked)
            hint = "matches no file" if glob.has_magic(written) else f"not found (looked at {looked})"
            raise PreflightError(f"{label}: {written!r} {problem or hint}")
        files: list[Path] = []
        for p in found:
            if p.is_dir():
                if not os.access(p, os.R_OK | os.X_OK):
                    raise PreflightError(f"{label}: folder {p} is not readable (permission denied)")
                check_tree(p, label)
                inner = [f for f in sorted(p.rglob("*")) if f.is_file() and _data_suffix(f) in DATA_SUFFIXES]
                if not inner and field != "data_dir":
                    raise PreflightError(f"{label}: folder {p} holds no data file ({', '.join(DATA_SUFFIXES)})")
                files += inner
            else:
                files.append(p)
        for f in files:
            rows = check_data_file(f, label, needed)
            total = None if total is None or rows is None else total + rows
    return total


def _data_suffix(path: Path) -> str:
    return Path(path.name.lower().removesuffix(".gz")).suffix


def _scripted(data_config: dict[str, Any]) -> set[str]:
    """The components a data config's user_script does ("load_dataset", "pre_process_data")."""
    if not data_config.get("user_script"):
        return set()
    from orchestrator.schema.models import DataConfig

    dc = DataConfig.model_validate(data_config)
    return {kind for kind in ("load_dataset", "pre_process_data") if dc.script_component(kind) is not None}


def _needed_columns(pre: dict[str, Any], where: str = "data_configs") -> Needed:
    if pre.get("chat_template"):  # rows are chat messages (their form checked on the first row), not text columns
        return Needed(chat_col=pre.get("message_col") or "messages")
    template = pre.get("text_template")
    if template:
        from orchestrator.passes.common.data import template_columns

        try:
            fields = template_columns(template)
        except ValueError as exc:
            raise PreflightError(f"{where}.pre_process_data_config.text_template: {exc}") from None
        if not fields:
            raise PreflightError(
                f"{where}.pre_process_data_config.text_template {template[:60]!r} names no column, so every row "
                "would train on the same text; put the columns in braces, e.g. {prompt} {response}"
            )
        return needed_columns([c for c in fields if c], [])
    cols = pre.get("text_cols")
    return needed_columns([], [cols] if isinstance(cols, str) else list(cols or ["text"]))


def check_data_file(path: Path, label: str, needed: Needed | list[str]) -> int | None:
    """One data file read whole (engine/data_check.py); its row count, or None for a format not counted here."""
    if isinstance(needed, list):
        needed = needed_columns(needed, [])
    if not os.access(path, os.R_OK):
        raise PreflightError(f"{label}: {path} is not readable (permission denied)")
    if path.stat().st_size == 0:
        raise PreflightError(f"{label}: {path} is empty; it needs at least one row")
    try:
        return scan_file(path, label, Needed(list(needed.plain), list(needed.nested), needed.chat_col))
    except DataFileError as exc:
        raise PreflightError(str(exc)) from None


_SLICE = r"(\[\s*-?\d*%?\s*:\s*-?\d*%?\s*\](?:\((?:closest|pct1_dropremainder)\))?)?"
SPLIT = re.compile(rf"^\s*[\w.-]+{_SLICE}(\s*\+\s*[\w.-]+{_SLICE})*\s*$")


def check_split(
    field: str, split: str | None, data_config: dict[str, Any] | None = None, rows: int | None = None
) -> None:
    """A datasets split expression ("train", "train[:80%]", "train[10:20]+test"): the syntax, for data read
    from data_files (one file or a list) the split name, which is then always "train", and with the data's `rows`
    known, that the split selects at least one of them."""
    if split is None:
        return
    if not isinstance(split, str) or not SPLIT.match(split):
        raise PreflightError(
            f"{field} {split!r} is not a split expression; write e.g. train, train[:80%], train[80%:] or train[:100]"
        )
    load = (data_config or {}).get("load_dataset_config") or {}
    if isinstance(load.get("data_files"), str | list) and not hub_dataset_id(load.get("data_name")):
        names = {re.split(r"[\[\s]", part.strip(), maxsplit=1)[0] for part in split.split("+")}
        wrong = sorted(names - {"train"})
        if wrong:
            raise PreflightError(
                f"{field} {split!r}: data read from data_files has one split, 'train' (not {wrong[0]!r}); carve "
                "parts of it with slices, e.g. train[:80%] and train[80%:]"
            )
    if rows is not None and split_rows(split, rows) == 0:
        raise PreflightError(f"{field} {split!r} selects no rows: the data has {rows}; widen the slice")
