"""Olive's argparse grammar read by click, and the values it yields.

Olive's argparse has two forms click does not: space-separated lists (`--input_cols a b`) and flags with an optional
value (`--test [DIR]`, `--enable_search [SAMPLER]`). `normalize_argv` rewrites those into one `--flag=value` token
before click sees the line; split_values and parse_bool read such values back, and Given carries what a command
line gave to the command's builder. Kept apart from the flag tables: every builder reads values, none needs a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.olive.flag_spec import Command, Flag

LIST_SEP = "\x1f"  # joins the items of a space-separated list flag into one click value


def normalize_argv(command: Command | tuple[Flag, ...], argv: list[str]) -> list[str]:
    """Olive's argparse grammar -> one token per flag value: `--input_cols a b` -> `--input_cols=a<SEP>b`, and a
    bare optional-value flag (`--test` then another flag or the end) -> `--test=<const>`."""
    flags = command.flags if isinstance(command, Command) else command
    by_name = {s: f for f in flags for s in f.spellings}
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        spec = by_name.get(name)
        if spec is None or "=" in token or spec.kind not in ("list", "optional"):
            out.append(token)
            i += 1
            continue
        values: list[str] = []
        j = i + 1
        while j < len(argv) and not _is_flag(argv[j]) and (spec.kind == "list" or not values):
            values.append(argv[j])
            j += 1
        if spec.kind == "optional":
            out.append(f"{name}={values[0] if values else spec.const}")
        else:
            out.append(f"{name}={LIST_SEP.join(values)}")
        i = j
    return out


def _is_flag(token: str) -> bool:
    """A token that starts another flag (negative numbers are values)."""
    return token.startswith("-") and not token[1:2].isdigit() and token != "-"


def split_values(value: str | None) -> list[str] | None:
    """A list flag's value (LIST_SEP-joined, or typed comma-separated) -> its items."""
    if value is None:
        return None
    items = value.split(LIST_SEP) if LIST_SEP in value else [value]
    return [v.strip() for item in items for v in item.split(",") if v.strip()] if items != [""] else []


def parse_bool(flag: str, value: str | bool | None) -> bool | None:
    """Olive's type=bool flags take a value; "false"/"0"/"no" mean False (argparse's bool("False") would not)."""
    if value is None or isinstance(value, bool):
        return value
    low = value.strip().lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off", ""):
        return False
    from orchestrator.core.errors import UserError

    raise UserError(f"{flag} {value!r}: give true or false")


@dataclass
class Given:
    """The values a command line gave, by dest, with the flags that were set explicitly (not defaulted)."""

    values: dict[str, Any]
    explicit: set[str] = field(default_factory=set)

    def __getitem__(self, key: str) -> Any:
        return self.values.get(key)

    def get(self, key: str, default: Any = None) -> Any:
        value = self.values.get(key)
        return default if value is None else value

    def given(self, key: str) -> bool:
        return key in self.explicit
