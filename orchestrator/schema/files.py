"""Reading the files a user writes by hand (workflow configs, settings): text, JSON and YAML, strictly.

- Text is UTF-8 (a UTF-8 BOM is allowed; UTF-16/32 with a BOM are decoded); anything else is refused in one line
  that names the file, the first bad byte and the encoding it looks like (a Latin-1 file, say), not a traceback.
- JSON and YAML refuse a key written twice in one mapping (naming the key and its line): the last value winning
  silently is how a typo trains the wrong model.
- YAML is read as YAML 1.2 (what JSON users expect): `1e-4` is a float, `yes`/`on` are strings, `0o17` is octal,
  `017` is 17. PyYAML's defaults are YAML 1.1, where `1e-4` is a string and `1:30` is the integer 90.
"""

from __future__ import annotations

import codecs
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from orchestrator.core.errors import UserError
from orchestrator.schema.errors import ConfigError


class FileReadError(ConfigError):
    """A config file that cannot be read as written: one line per problem, naming the file and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(message.splitlines())


_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def read_text(path: Path, what: str = "config file") -> str:
    """The file as text (UTF-8, or a Unicode encoding its BOM names); one-line FileReadError otherwise."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise FileReadError(f"{what} {path} is a folder; give the file inside it") from None
    except PermissionError:
        raise FileReadError(f"{what} {path} is not readable (permission denied)") from None
    except FileNotFoundError:
        raise FileReadError(f"{what} {path} not found") from None
    except OSError as exc:  # a symlink loop, a name too long, an I/O error
        raise FileReadError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    return decode(data, path, what)


def decode(data: bytes, path: Path | str, what: str = "file") -> str:
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    if encoding == "utf-8" and b"\0" in data[:4096]:  # ASCII in UTF-16/32 is valid UTF-8 full of NUL bytes
        raise FileReadError(
            f"{what} {path} is not UTF-8 (it holds NUL bytes: it looks like {guess_encoding(data)}): save it as UTF-8"
        )
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise FileReadError(f"{what} {path} {encoding_problem(data, exc)}") from None


def encoding_problem(data: bytes, exc: UnicodeDecodeError) -> str:
    """'is not UTF-8 (byte 0xe9 at line 3, column 12; it looks like Latin-1): save it as UTF-8'."""
    pos = exc.start
    line = data.count(b"\n", 0, pos) + 1
    column = pos - (data.rfind(b"\n", 0, pos) + 1) + 1
    bad = data[pos : pos + 1].hex()
    return (
        f"is not UTF-8 (byte 0x{bad} at line {line}, column {column}; it looks like {guess_encoding(data)}): "
        "save it as UTF-8"
    )


def guess_encoding(data: bytes) -> str:
    """A human name for the likely encoding of bytes that are not UTF-8."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\0" in data[:4096]:
        return "UTF-16 or UTF-32 without a byte order mark"
    if any(0x80 <= b <= 0x9F for b in data):
        try:
            data.decode("cp1252")
            return "Windows-1252"
        except UnicodeDecodeError:
            pass
    return "Latin-1 (ISO-8859-1)"


# ---- JSON ---------------------------------------------------------------------------------------------------
def load_json_text(text: str, path: Path | str, what: str = "config file") -> Any:
    """JSON with every duplicated key refused (named with its line)."""
    dupes: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for k, v in items:
            if k in seen:
                dupes.append(k)
            seen[k] = v
        return seen

    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise FileReadError(f"{what} {path}: invalid JSON at {where}: {exc.msg}") from None
    except RecursionError:
        raise FileReadError(f"{what} {path}: nested too deeply to read") from None
    if dupes:
        raise FileReadError(
            "\n".join(
                f"{what} {path}: key {k!r} appears twice in one object (line {_json_line(text, k)}); keep one"
                for k in dict.fromkeys(dupes)
            )
        )
    return data


def _json_line(text: str, key: str) -> int:
    """The line of the second occurrence of "key": (for the message; the parser does not keep positions)."""
    hits = [m.start() for m in re.finditer(re.escape(json.dumps(key)) + r"\s*:", text)]
    pos = hits[1] if len(hits) > 1 else (hits[0] if hits else 0)
    return text.count("\n", 0, pos) + 1


# ---- YAML 1.2 -----------------------------------------------------------------------------------------------
@cache
def _yaml_loader() -> type:
    import yaml

    class Yaml12Loader(yaml.SafeLoader):
        """SafeLoader with YAML 1.2 core-schema scalars and duplicate keys refused."""

    # Drop YAML 1.1's implicit resolvers for bool/int/float/null, then add the 1.2 core schema's.
    Yaml12Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in _RESOLVED]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    for tag, regexp, first in _CORE_12:
        Yaml12Loader.add_implicit_resolver(tag, regexp, list(first))  # type: ignore[no-untyped-call]
    Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
    Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
    Yaml12Loader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)
    Yaml12Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
    return Yaml12Loader


_RESOLVED = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:null"}
_CORE_12 = (
    ("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), "tTfF"),
    ("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), "-+0123456789"),
    (
        "tag:yaml.org,2002:float",
        re.compile(
            r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        "-+.0123456789",
    ),
)


def _construct_int(loader: Any, node: Any) -> int:
    value = loader.construct_scalar(node)
    if value.startswith("0o"):
        return int(value[2:], 8)
    if value.startswith("0x"):
        return int(value[2:], 16)
    return int(value, 10)


def _construct_float(loader: Any, node: Any) -> float:
    value = loader.construct_scalar(node).lower()
    if value.lstrip("+-") == ".inf":
        return float("-inf") if value.startswith("-") else float("inf")
    if value == ".nan":
        return float("nan")
    return float(value)


def _construct_bool(loader: Any, node: Any) -> bool:
    return loader.construct_scalar(node).lower() == "true"


def _construct_mapping(loader: Any, node: Any) -> dict[Any, Any]:
    import yaml

    own = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
    loader.flatten_mapping(node)  # merged (<<: *anchor) pairs first, then the mapping's own: own keys override them
    merged = len(node.value) - own
    out: dict[Any, Any] = {}
    seen: set[Any] = set()
    for i, (key_node, value_node) in enumerate(node.value):
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value", key_node.start_mark
            ) from None
        if i >= merged:
            if key in seen:
                raise DuplicateKeyError(key, key_node.start_mark.line + 1)
            seen.add(key)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


class DuplicateKeyError(UserError):
    """Raised inside the YAML loader; turned into a FileReadError (naming the file) by load_yaml_text."""

    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"key {key!r} appears twice in one mapping (again at line {line})")
        self.key, self.line = key, line


def load_yaml_text(text: str, path: Path | str, what: str = "config file") -> Any:
    """YAML 1.2 scalars, duplicate keys refused; one-line FileReadError on any problem."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as exc:
        raise FileReadError(
            f"{what} {path}: key {exc.key!r} appears twice in one mapping (again at line {exc.line}); keep one"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what_ = getattr(exc, "problem", None) or str(exc)
        raise FileReadError(f"{what} {path}: invalid YAML{where}: {what_}") from None
    except RecursionError:
        raise FileReadError(f"{what} {path}: nested too deeply to read") from None


def load_config_file(path: Path, what: str = "config file") -> Any:
    """A JSON (.json) or YAML (anything else) config file, read strictly (see the module's docstring)."""
    if not path.exists() and not path.is_symlink():
        raise FileReadError(f"{what} {path} not found")
    text = read_text(path, what)
    if path.suffix.lower() == ".json":
        return load_json_text(text, path, what)
    return load_yaml_text(text, path, what)
