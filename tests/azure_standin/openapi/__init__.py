"""Request bodies checked against the service's own OpenAPI (Swagger 2.0) definitions, per api-version.

`check_request(method, path, api_version, body)` finds the operation whose swagger path template matches the path
(an optional `/mferp/managementfrontend` prefix is ignored, as the stand-in's routes do) and raises the stand-in's
`HttpError(400, "InvalidRequestContent", ...)` when the body breaks its schema; the message names every offending
property path (`properties.inputs.data.uri`), as ARM does. Operations or api-versions not extracted are not
checked. The schemas are `mfe-request-schemas.json`, made by `extract.py` from Azure/azure-rest-api-specs.

Swagger semantics, as Azure ML's (ASP.NET) front end applies them:
- `$ref`, `allOf` (properties and `required` of every parent are inherited);
- `discriminator` + `x-ms-discriminator-value`: the discriminator property picks the subtype (JobBase.jobType ->
  CommandJob, JobInput.jobInputType, JobOutput.jobOutputType, IdentityConfiguration.identityType,
  DistributionConfiguration.distributionType, ...); a value no subtype carries is refused, even where the property's
  enum is `modelAsString`. Subtypes kept as stubs by extract.py (AutoML, Sweep, ... jobs) are accepted unchecked;
- `readOnly` properties sent in a request are ignored (neither checked nor refused), as ARM does;
- `x-nullable: true` allows null; null is refused for required properties and for non-nullable booleans, numbers
  and enums (value types in the service), and accepted for other non-nullable properties;
- `x-ms-enum.modelAsString: true` accepts any string; a closed enum is compared case-insensitively (.NET's enum
  converter does the same);
- `format` (date-time, uuid, duration, int32, int64, ...) is checked for its JSON type only; integers accept
  integral JSON numbers, never strings or booleans;
- `additionalProperties`: a schema makes the object a map whose values are checked (inputs, outputs, tags,
  environmentVariables); `false` refuses unknown properties ("Could not find member ..."); absent allows them.
  One departure from the letter of the spec, measured on the SDK: a JSON number/boolean is accepted as a value of
  a string map (see `_string_map_scalar`);
- `required`, `minLength`/`maxLength`, `pattern` (searched, not anchored, as JSON Schema does), minimum/maximum,
  items/minItems/maxItems; property names match case-insensitively (the service's JSON binder does).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from ..web import HttpError

SCHEMAS = Path(__file__).with_name("mfe-request-schemas.json")
MFE_PREFIX = "/mferp/managementfrontend"
MAX_ERRORS = 10
_VALUE_TYPES = ("boolean", "integer", "number")


@functools.lru_cache(maxsize=1)
def _spec() -> dict[str, Any]:
    return json.loads(SCHEMAS.read_text(encoding="utf-8"))


@functools.cache
def _operations(api_version: str) -> list[tuple[re.Pattern[str], str, dict[str, Any]]]:
    version = _spec()["api_versions"].get(api_version)
    if version is None:
        return []
    out = []
    for op in version["operations"]:
        rx = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(op["path"])) + "$"
        out.append((re.compile(rx, re.IGNORECASE), op["method"], op))
    return out


@functools.cache
def _checker(api_version: str) -> _Checker:
    return _Checker(_spec()["api_versions"][api_version]["definitions"])


def find_operation(method: str, path: str, api_version: str | None) -> dict[str, Any] | None:
    """The extracted operation (method, swagger path template, operationId, body schema) a request maps to."""
    if not api_version:
        return None
    if path.lower().startswith(MFE_PREFIX):
        path = path[len(MFE_PREFIX) :]
    for rx, m, op in _operations(api_version):
        if m == method.upper() and rx.match(path):
            return op
    return None


def check_request(method: str, path: str, api_version: str | None, body: Any) -> None:
    """Raise HttpError(400) when `body` breaks the OpenAPI schema of the operation `method path` maps to."""
    op = find_operation(method, path, api_version)
    if op is None:
        return
    assert api_version is not None
    schema = op["body"]["schema"]
    errors = errors_for(api_version, schema, body, required=op["body"]["required"])
    if errors:
        more = len(errors) - MAX_ERRORS
        shown = "; ".join(errors[:MAX_ERRORS]) + (f"; and {more} more" if more > 0 else "")
        name = schema.get("$ref", "").rsplit("/", 1)[-1] or "body"
        raise HttpError(
            400,
            "InvalidRequestContent",
            f"The request content was invalid ({op['operationId']}, api-version {api_version}, {name}): {shown}",
        )


def errors_for(api_version: str, schema: dict[str, Any], body: Any, *, required: bool = True) -> list[str]:
    """Every violation of `schema` by `body`, each naming its property path (empty list: valid)."""
    errors: list[str] = []
    if body is None:
        if required:
            errors.append("The request body is required. Path ''.")
        return errors
    _checker(api_version).check(body, schema, "", errors)
    return errors


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _json(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _string_map_scalar(additional: dict[str, Any], item: Any) -> bool:
    """A JSON number or boolean as the value of a string map (`additionalProperties: {type: string}`, e.g.
    ResourceBase.properties). The spec says string; the service binds these maps to Dictionary<string, string>,
    whose JSON reader turns scalars into their text, and azure-ai-ml 1.35.2 relies on it: its code-version PUT
    (2023-04-01) sends `properties.properties.hash_version` as the integer 202208. Accepted there only (a
    string-typed property still refuses numbers; objects and arrays are refused everywhere)."""
    return (
        additional.get("type") == "string" and "$ref" not in additional and "enum" not in additional
        and isinstance(item, (bool, int, float))
    )  # fmt: skip


class _Checker:
    def __init__(self, definitions: dict[str, Any]):
        self.defs = definitions
        self.children: dict[str, list[str]] = {}
        for name, d in definitions.items():
            for parent in d.get("allOf", []):
                ref = parent.get("$ref", "")
                if ref.startswith("#/definitions/"):
                    self.children.setdefault(ref[len("#/definitions/") :], []).append(name)

    # ---- schema helpers ---------------------------------------------------------------------------------------
    @staticmethod
    def _ref_name(schema: dict[str, Any]) -> str | None:
        ref = schema.get("$ref")
        return ref[len("#/definitions/") :] if isinstance(ref, str) and ref.startswith("#/definitions/") else None

    def _parents(self, name: str) -> list[str]:
        return [n for n in (self._ref_name(a) for a in self.defs[name].get("allOf", [])) if n]

    @functools.cache  # noqa: B019 - one checker per api-version, kept for the process
    def _effective(self, name: str) -> tuple[dict[str, Any], frozenset[str], Any, str | None]:
        """(properties, required, additionalProperties, discriminator) of a definition with its allOf parents."""
        d = self.defs[name]
        props: dict[str, Any] = {}
        required: set[str] = set()
        disc = None
        for part in d.get("allOf", []):
            parent = self._ref_name(part)
            if parent:
                p_props, p_req, _, p_disc = self._effective(parent)
                props.update(p_props)
                required |= p_req
                disc = disc or p_disc
            else:
                props.update(part.get("properties", {}))
                required |= set(part.get("required", []))
        props.update(d.get("properties", {}))
        required |= set(d.get("required", []))
        return props, frozenset(required), d.get("additionalProperties"), d.get("discriminator") or disc

    def _is_object(self, schema: dict[str, Any]) -> bool:
        return schema.get("type") == "object" or any(k in schema for k in ("properties", "allOf", "discriminator"))

    def _descendants(self, name: str) -> list[str]:
        out, stack = [], list(self.children.get(name, []))
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(self.children.get(n, []))
        return out

    def _disc_value(self, name: str) -> str:
        return self.defs[name].get("x-ms-discriminator-value", name)

    def _target(self, schema: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        name = self._ref_name(schema)
        if name is None:
            return schema, None
        if name not in self.defs:
            raise KeyError(f"schema {name} missing from {SCHEMAS.name}")
        return self.defs[name], name

    def _read_only(self, schema: dict[str, Any]) -> bool:
        target, _ = self._target(schema)
        return bool(schema.get("readOnly") or target.get("readOnly"))

    # ---- checking ---------------------------------------------------------------------------------------------
    def check(self, value: Any, schema: dict[str, Any], path: str, errors: list[str]) -> None:
        target, name = self._target(schema)
        if value is None:
            nullable = schema.get("x-nullable", target.get("x-nullable"))
            if not nullable and (target.get("type") in _VALUE_TYPES or "enum" in target):
                errors.append(f"Null is not allowed for '{path}' ({target.get('type', 'enum')}). Path '{path}'.")
            return
        if name is not None and self._is_object(target):
            self._check_definition(value, name, path, errors)
        else:
            self._check_inline(value, target, path, errors, where=name)

    def _check_definition(self, value: Any, name: str, path: str, errors: list[str]) -> None:
        if not isinstance(value, dict):
            errors.append(f"Invalid value {_json(value)} for '{path or 'body'}': expected an object ({name}). "
                          f"Path '{path}'.")  # fmt: skip
            return
        _, _, _, disc = self._effective(name)
        if disc:
            key = next((k for k in value if k.lower() == disc.lower()), None)
            if key is None:
                errors.append(f"Required property '{disc}' not found in JSON (it selects the {name} subtype). "
                              f"Path '{_join(path, disc)}'.")  # fmt: skip
                return
            sent = value[key]
            candidates = [name, *self._descendants(name)] if "x-ms-discriminator-value" in self.defs[name] else (
                self._descendants(name))  # fmt: skip
            match = next((c for c in candidates if self._disc_value(c) == sent), None) or next(
                (c for c in candidates if isinstance(sent, str) and self._disc_value(c).lower() == sent.lower()), None
            )
            if match is None:
                known = sorted(self._disc_value(c) for c in candidates)
                errors.append(f"Unknown {disc} {_json(sent)} for {name}; the service knows {known}. "
                              f"Path '{_join(path, key)}'.")  # fmt: skip
                return
            if self.defs[match].get("x-standin-not-extracted"):
                return  # a known subtype the stand-in does not check (its handler decides)
            name = match
        self._check_object(value, name, path, errors)

    def _check_object(self, value: dict[str, Any], name: str, path: str, errors: list[str]) -> None:
        props, required, additional, _ = self._effective(name)
        by_lower = {p.lower(): p for p in props}
        for key, item in value.items():
            prop = key if key in props else by_lower.get(key.lower())
            sub = _join(path, key)
            if prop is not None:
                pschema = props[prop]
                if self._read_only(pschema):
                    continue  # ARM ignores read-only properties in requests
                if item is None and prop in required:
                    errors.append(f"Required property '{prop}' expects a non-null value. Path '{sub}'.")
                    continue
                self.check(item, pschema, sub, errors)
            elif isinstance(additional, dict):
                if not _string_map_scalar(additional, item):
                    self.check(item, additional, sub, errors)
            elif additional is False:
                errors.append(f"Could not find member '{key}' on object of type '{name}'. Path '{sub}'.")
        present = {k.lower() for k in value}
        for req in sorted(required):
            if req.lower() not in present and not self._read_only(props.get(req, {})):
                errors.append(f"Required property '{req}' not found in JSON ({name}). Path '{_join(path, req)}'.")

    def _check_inline(
        self, value: Any, schema: dict[str, Any], path: str, errors: list[str], where: str | None
    ) -> None:
        typ = schema.get("type")
        label = f"{typ}{'/' + schema['format'] if 'format' in schema else ''}{' ' + where if where else ''}"
        bad = f"Invalid value {_json(value)} for '{path}': expected {label}. Path '{path}'."
        if typ == "object" or (typ is None and ("additionalProperties" in schema or "properties" in schema)):
            if not isinstance(value, dict):
                errors.append(bad)
                return
            props = schema.get("properties", {})
            additional = schema.get("additionalProperties")
            for key, item in value.items():
                sub = _join(path, key)
                if key in props:
                    if not self._read_only(props[key]):
                        self.check(item, props[key], sub, errors)
                elif isinstance(additional, dict):
                    if not _string_map_scalar(additional, item):
                        self.check(item, additional, sub, errors)
                elif additional is False:
                    errors.append(f"Could not find member '{key}' on object. Path '{sub}'.")
            for req in schema.get("required", []):
                if req not in value:
                    errors.append(f"Required property '{req}' not found in JSON. Path '{_join(path, req)}'.")
            return
        if typ == "array":
            if not isinstance(value, list):
                errors.append(bad)
                return
            if "minItems" in schema and len(value) < schema["minItems"]:
                errors.append(f"'{path}' needs at least {schema['minItems']} items. Path '{path}'.")
            if "maxItems" in schema and len(value) > schema["maxItems"]:
                errors.append(f"'{path}' allows at most {schema['maxItems']} items. Path '{path}'.")
            for i, item in enumerate(value):
                if "items" in schema:
                    self.check(item, schema["items"], f"{path}[{i}]", errors)
            return
        if typ == "string" or (typ is None and "enum" in schema):
            if not isinstance(value, str):
                errors.append(bad)
                return
            self._check_string(value, schema, path, errors, where)
        elif typ == "integer":
            integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
            if isinstance(value, bool) or not integral:
                errors.append(bad)
            else:
                self._check_range(value, schema, path, errors)
        elif typ == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                errors.append(bad)
            else:
                self._check_range(value, schema, path, errors)
        elif typ == "boolean" and not isinstance(value, bool):
            errors.append(bad)

    @staticmethod
    def _check_string(value: str, schema: dict[str, Any], path: str, errors: list[str], where: str | None) -> None:
        enum = schema.get("enum")
        closed = enum is not None and not (schema.get("x-ms-enum") or {}).get("modelAsString")
        if closed and value.lower() not in {str(e).lower() for e in enum}:
            errors.append(f"Value {_json(value)} is not one of {enum} ({where or 'enum'}). Path '{path}'.")
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(f"'{path}' must be at least {schema['minLength']} characters long. Path '{path}'.")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"'{path}' must be at most {schema['maxLength']} characters long. Path '{path}'.")
        if "pattern" in schema:
            try:
                ok = re.search(schema["pattern"], value) is not None
            except re.error:
                ok = True  # a pattern Python cannot compile is not held against the request
            if not ok:
                errors.append(f"{_json(value)} does not match the pattern {schema['pattern']!r}. Path '{path}'.")

    @staticmethod
    def _check_range(value: float, schema: dict[str, Any], path: str, errors: list[str]) -> None:
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if lo is not None and (value < lo or (schema.get("exclusiveMinimum") and value == lo)):
            errors.append(f"{value} is below the minimum {lo}. Path '{path}'.")
        if hi is not None and (value > hi or (schema.get("exclusiveMaximum") and value == hi)):
            errors.append(f"{value} is above the maximum {hi}. Path '{path}'.")


__all__ = ["check_request", "errors_for", "find_operation", "SCHEMAS"]
