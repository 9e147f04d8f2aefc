"""One error type for every workflow-config problem, and the translation of pydantic errors into it.

Users see JSON paths as they wrote them (`passes.lora.config.lora_rr`) with the nearest valid key, all problems at
once, so one edit-run cycle fixes a whole file.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from orchestrator.core.errors import UserError
from orchestrator.core.redact import is_secret_key, redact

Loc = tuple[str | int, ...]
_FIELD_MESSAGE = re.compile(r"^field '([^']+)': (.*)$", re.S)


class ConfigError(UserError):
    """Every problem found in a workflow config; str() is one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def lines(self) -> list[str]:
        """One printed line per problem (every problem of a file is reported at once)."""
        return str(self).splitlines()


def suggest(key: str, valid: Iterable[str]) -> str:
    """ "; did you mean 'x'?" for the closest valid name, or the list of valid names when none is close."""
    valid = sorted(set(valid))
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f" (valid: {', '.join(valid)})" if valid else ""


def nearest(key: str, valid: Iterable[str]) -> str:
    """ "; did you mean 'x'?" for the closest valid name, else "" (for messages that list the names anyway)."""
    close = difflib.get_close_matches(key, sorted(set(valid)), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def fmt_path(path: Sequence[str | int]) -> str:
    """('data_configs', 0, 'name') -> 'data_configs[0].name'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def keys_of(name: str, info: Any) -> set[str]:
    """A field's accepted keys: its name and its aliases."""
    out = {name}
    if info.alias:
        out.add(info.alias)
    alias = info.validation_alias
    if isinstance(alias, str):
        out.add(alias)
    elif alias is not None and hasattr(alias, "choices"):
        out.update(c for c in alias.choices if isinstance(c, str))
    return out


def field_names(model: type[BaseModel]) -> set[str]:
    """Keys a model accepts: field names and their aliases."""
    return {key for name, info in model.model_fields.items() for key in keys_of(name, info)}


def _strip(tp: Any) -> Any:
    """Annotated[X, ...] -> X; Optional[X] -> X."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _strip(args[0])
    return tp


def _member_for_tag(tp: Any, tag: Any) -> Any | None:
    """The member of a (discriminated) union that a pydantic loc tag names, if any."""
    for member in typing.get_args(tp):
        meta = typing.get_args(member)[1:] if typing.get_origin(member) is typing.Annotated else ()
        if any(getattr(m, "tag", None) == tag for m in meta):
            return member
        inner = _strip(member)
        if isinstance(inner, type) and issubclass(inner, BaseModel) and "type" in inner.model_fields:
            ann = inner.model_fields["type"].annotation
            if tag in typing.get_args(ann) or inner.model_fields["type"].default == tag:
                return member
    return None


def walk(root: type[BaseModel], loc: Loc) -> tuple[list[str | int], type[BaseModel] | None]:
    """Follow a pydantic error loc through the types: (path without union tags, model owning the last key)."""
    tp: Any = root
    path: list[str | int] = []
    owner: type[BaseModel] | None = None
    for el in loc:
        tp = _strip(tp)
        origin = typing.get_origin(tp)
        if origin in (Union, types.UnionType):
            member = _member_for_tag(tp, el)
            if member is not None:
                tp = member
                continue
            path.append(el)
            tp = Any
            continue
        path.append(el)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            owner = tp
            info = next((f for n, f in tp.model_fields.items() if el in keys_of(n, f)), None)
            tp = info.annotation if info is not None else Any
        elif origin in (list, tuple, set):
            args = typing.get_args(tp)
            tp = args[0] if args else Any
            owner = None
        elif origin is dict:
            args = typing.get_args(tp)
            tp = args[1] if args else Any
            owner = None
        else:
            tp = Any
            owner = None
    return path, owner


def _short(value: Any) -> str:
    text = redact(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def translate(
    err: ValidationError,
    root: type[BaseModel],
    *,
    prefix: Sequence[str | int] = (),
    relocate: Any = None,
) -> list[str]:
    """Pydantic errors -> one problem line each: 'path: what is wrong' (+ nearest key for unknown keys).

    `relocate(path) -> path` maps a path of the normalized data back to where the user wrote it (nested
    "config"/"params" levels that the reader flattened).
    """
    problems: list[str] = []
    for e in err.errors():
        loc = tuple(e["loc"])
        kind = e["type"]
        sub, owner = walk(root, loc)
        path = [*prefix, *sub]
        if kind in ("union_tag_invalid", "union_tag_not_found"):
            key = str((e.get("ctx") or {}).get("discriminator", "")).strip("'")
            path.append(key or "type")
            if kind == "union_tag_not_found":
                msg = "required key missing"
            else:
                tag = str(e["ctx"]["tag"])
                known = [t.strip().strip("'") for t in str(e["ctx"]["expected_tags"]).split(",")]
                msg = f"unknown type {tag!r}{nearest(tag, known)} (known: {', '.join(known)})"
        elif kind == "extra_forbidden":
            valid = field_names(owner) if owner is not None else set()
            msg = f"unknown key{suggest(str(loc[-1]), valid)}"
        else:
            if kind == "missing":
                msg = "required key missing"
            else:
                msg = e["msg"]
                for lead in ("Value error, ", "Assertion failed, "):
                    if msg.startswith(lead):
                        msg = msg[len(lead) :]
                named = _FIELD_MESSAGE.match(msg)
                if named:  # a model-level check that names its field: the field goes into the path
                    path.append(named.group(1))
                    msg = named.group(2)
                if kind in ("value_error", "assertion_error") or isinstance(e.get("input"), dict | list):
                    pass
                elif is_secret_key(next((p for p in reversed(loc) if isinstance(p, str)), None)):
                    msg += " (the value is not shown: it is a secret; keep secrets out of config files)"
                else:
                    msg += f" (got {_short(e.get('input'))})"
        if relocate is not None:
            path = relocate(path)
        problems.append(f"{fmt_path(path)}: {msg}")
    return problems
