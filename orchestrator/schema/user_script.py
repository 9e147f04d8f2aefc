"""Olive's `user_script` for data configs: a Python file whose functions register data components.

Olive scripts do `from olive.data.registry import Registry` and decorate functions with
`@Registry.register_dataset()` / `register_pre_process()` / `register_post_process()` / `register_dataloader()`
(name: the function's name unless given). orch loads the file with importlib (`script_dir`, if given, goes on
sys.path first, as Olive does) and reads what it registered. When the real `olive` package is not importable, a
minimal `olive.data.registry` stand-in is put in sys.modules while the script is loaded, and only then.

Components are called as Olive's DataContainer calls them: load_dataset(**params), pre_process(dataset, **params),
with the params the function's signature names (all of them when it takes **kwargs); a required parameter nobody
gave is None (Olive's fill_in_params). The script runs where the data is loaded: in the job's process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.core.errors import UserError

# Olive's DataComponentType values
KINDS = ("load_dataset", "pre_process_data", "post_process_data", "dataloader")
# Olive's own component names: with them a config asks for what orch does itself (datasets.load_dataset, templating)
OLIVE_BUILTIN = {
    "load_dataset": {"default_load_dataset", "huggingface_dataset", "local_dataset", "simple_dataset"},
    "pre_process_data": {
        "default_pre_process_data", "huggingface_pre_process", "text_generation_huggingface_pre_process",
    },
}  # fmt: skip


class UserScriptError(UserError, ValueError):
    """A user script that cannot be loaded, or a component it does not register: one line."""


def _registry_class(found: dict[str, dict[str, Callable[..., Any]]]) -> type:
    """A stand-in for olive.data.registry.Registry whose decorators record into `found`."""

    def register(kind: str) -> Callable[..., Any]:
        def deco_factory(cls: type, name: str | None = None) -> Callable[[Any], Any]:
            def decorator(component: Any) -> Any:
                found[kind][name if name is not None else component.__name__] = component
                return component

            return decorator

        return classmethod(deco_factory)

    def register_any(cls: type, sub_type: Any, name: str | None = None) -> Callable[[Any], Any]:
        kind = str(getattr(sub_type, "value", sub_type))
        if kind not in found:  # a data container class: orch has its own containers
            return lambda component: component
        return getattr(cls, {k: f"register_{s}" for k, s in zip(KINDS, _SUFFIX, strict=True)}[kind])(name)

    attrs: dict[str, Any] = {f"register_{s}": register(k) for k, s in zip(KINDS, _SUFFIX, strict=True)}
    attrs["register"] = classmethod(register_any)
    for k, s in zip(KINDS, _SUFFIX, strict=True):
        default = f"default_{k}"
        attrs[f"register_default_{s}"] = classmethod(lambda cls, _s=s, _d=default: getattr(cls, f"register_{_s}")(_d))
    return type("Registry", (), attrs)


_SUFFIX = ("dataset", "pre_process", "post_process", "dataloader")


def _real_olive() -> bool:
    try:
        return importlib.util.find_spec("olive.data.registry") is not None
    except (ImportError, ValueError):
        return False


@contextmanager
def _shim(found: dict[str, dict[str, Callable[..., Any]]]) -> Iterator[None]:
    names = ("olive", "olive.data", "olive.data.registry")
    saved = {n: sys.modules[n] for n in names if n in sys.modules}
    mods = {n: types.ModuleType(n) for n in names}
    mods["olive"].data = mods["olive.data"]  # type: ignore[attr-defined]
    mods["olive.data"].registry = mods["olive.data.registry"]  # type: ignore[attr-defined]
    mods["olive.data.registry"].Registry = _registry_class(found)  # type: ignore[attr-defined]
    sys.modules.update(mods)
    try:
        yield
    finally:
        for n in names:
            if n in saved:
                sys.modules[n] = saved[n]
            else:
                sys.modules.pop(n, None)


_LOADED: dict[tuple[str, float], dict[str, dict[str, Callable[..., Any]]]] = {}


def load(path: str | Path, script_dir: str | Path | None = None) -> dict[str, dict[str, Callable[..., Any]]]:
    """{kind: {name: function}} the script registers. Loaded once per file version in a process."""
    path = Path(path)
    if not path.is_file():
        raise UserScriptError(f"file {str(path)!r} not found")
    key = (str(path), path.stat().st_mtime)
    if key in _LOADED:
        return _LOADED[key]
    if script_dir is not None:
        folder = Path(script_dir)
        if not folder.is_dir():
            raise UserScriptError(f"script_dir {str(folder)!r} is not a folder")
        if str(folder) not in sys.path:  # Olive appends it for good: the script may import from it later too
            sys.path.append(str(folder))
    found: dict[str, dict[str, Callable[..., Any]]] = {k: {} for k in KINDS}
    real = _real_olive()
    name = f"orch_user_script_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        if real:
            spec.loader.exec_module(module)
        else:
            with _shim(found):
                spec.loader.exec_module(module)
    except Exception as exc:
        raise UserScriptError(f"{path.name} failed to load: {type(exc).__name__}: {exc}") from None
    if real:  # the script registered into Olive's own registry: take what this file defines
        from olive.data.registry import Registry  # type: ignore[import-not-found]

        for kind in KINDS:
            for reg_name, fn in Registry._REGISTRY.get(kind, {}).items():
                if getattr(fn, "__module__", None) == name:
                    found[kind][reg_name] = fn
    _LOADED[key] = found
    return found


def component(
    path: str | Path, script_dir: str | Path | None, kind: str, name: str | None
) -> Callable[..., Any] | None:
    """The script's function for `kind` named `name`; None when `name` is Olive's own (orch does that part).
    A name neither registered nor Olive's raises UserScriptError naming what the script registers."""
    found = load(path, script_dir)
    if name is not None and name in found[kind]:
        return found[kind][name]
    if name is None or name in OLIVE_BUILTIN.get(kind, ()):
        return None
    have = ", ".join(sorted(found[kind])) or "nothing"
    raise UserScriptError(f"{name!r} is not a {kind} component of {Path(path).name} (it registers: {have})")


def call_args(fn: Callable[..., Any], params: dict[str, Any], *, skip_first: bool) -> dict[str, Any]:
    """Olive's fill_in_params: the params the signature names (all with **kwargs), missing required ones None."""
    sig = inspect.signature(fn).parameters
    items = list(sig.items())[1:] if skip_first else list(sig.items())
    if any(p.kind is p.VAR_KEYWORD for _, p in items):
        out = dict(params)
    else:
        out = {k: v for k, v in params.items() if k in sig}
    for k, p in items:
        if k not in out and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.default is p.empty:
            out[k] = None
    return out


def unknown_args(fn: Callable[..., Any], given: set[str], *, skip_first: bool) -> list[str]:
    """Arguments the config gives the component that its signature cannot take (Olive would fail calling it)."""
    params = list(inspect.signature(fn).parameters.values())[1 if skip_first else 0 :]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    return sorted(given - {p.name for p in params})
