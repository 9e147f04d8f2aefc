"""Read a workflow file (Olive's format, JSON or YAML) into a checked WorkflowConfig, or say everything wrong.

The reader first brings Olive's spellings to one shape (nested "config"/"params" levels flattened, engine keys
at the top level moved under "engine", inline data configs named), remembering where each part was written so
error paths match the user's file. Then pydantic checks the structure, each pass's config is checked against
its pass class, and cross-references (data configs, systems, evaluator) are resolved. All problems are raised
together in one ConfigError.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.olive.data_config_keys import data_params, params_config
from orchestrator.olive.engine_keys import ENGINE_NOTES
from orchestrator.olive.keys import apply as apply_keys
from orchestrator.olive.pass_chain_keys import flow_names
from orchestrator.olive.pass_keys import pass_keys, pass_run_keys
from orchestrator.passes.training.lora.training_args import TrainingArgsError, normalize_training_args
from orchestrator.schema.errors import ConfigError, fmt_path, nearest, suggest, translate
from orchestrator.schema.files import load_config_file
from orchestrator.schema.models import DataConfig, EngineConfig, EvaluatorConfig, InputModel, PassEntry
from orchestrator.schema.resources import AzureMLClient
from orchestrator.schema.systems import SystemConfig
from orchestrator.systems.registry import KEYWORDS as HOST_WORDS
from orchestrator.systems.registry import MAIN_KEYWORDS, canonical_type

ENGINE_KEYS = tuple(EngineConfig.model_fields)
DATA_REF_KEYS = ("train_data_config", "eval_data_config", "data_config")
# Olive's per-pass run keys (RunPassConfig), beside type/config: search and per-pass host/evaluator (pass_run_keys)
PASS_RUN_KEYS = ("disable_search", "evaluator", "host", "clean_run_cache", "output_name")


class WorkflowConfig(BaseModel):
    """A checked workflow. Relative paths are already resolved against `base_dir` (the config file's folder)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    input_model: InputModel
    data_configs: list[DataConfig] = Field(default_factory=list)
    systems: dict[str, SystemConfig] = Field(default_factory=dict)
    passes: dict[str, PassEntry] = Field(default_factory=dict)
    evaluators: dict[str, EvaluatorConfig] = Field(default_factory=dict)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    azureml_client: AzureMLClient | None = None
    workflow_id: str | None = None
    base_dir: Path = Field(default_factory=Path.cwd)
    notes: list[str] = Field(default_factory=list)  # what the reader changed (renamed keys...), for the user
    pass_flows: list[list[str]] | None = None  # Olive's several flows (one flow is applied to passes when read)

    def flow_workflows(self) -> list[tuple[str | None, WorkflowConfig]]:
        """The runs this workflow makes: itself, or one per pass flow (its passes in order, its own output_dir
        folder and workflow_id), as Olive gives one output model per flow."""
        if not self.pass_flows:
            return [(None, self)]
        runs: list[tuple[str | None, WorkflowConfig]] = []
        for name, flow in zip(flow_names(self.pass_flows), self.pass_flows, strict=True):
            engine = self.engine.model_copy(
                update={"output_dir": None if self.engine.output_dir is None else self.engine.output_dir / name}
            )
            runs.append((name, self.model_copy(update={
                "passes": {p: self.passes[p] for p in flow},
                "engine": engine,
                "workflow_id": f"{self.workflow_id or 'workflow'}-{name}",
                "pass_flows": None,
            })))  # fmt: skip
        return runs

    def data_config(self, name: str) -> DataConfig:
        return next(dc for dc in self.data_configs if dc.name == name)

    def to_json_dict(self) -> dict[str, Any]:
        """Normalized json form (for manifests and cache keys); load_workflow reads it back unchanged."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"base_dir", "notes"})


class _Reader:
    """One read: the problems and notes found so far, and where flattened levels were in the user's file."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.nested: dict[tuple[Any, ...], str] = {}  # normalized path -> the key the user nested it under

    def problem(self, path: list[Any] | tuple[Any, ...], msg: str) -> None:
        self.problems.append(f"{fmt_path(self.relocate(list(path)))}: {msg}")

    def relocate(self, path: list[Any]) -> list[Any]:
        """A path in the flattened data -> the path in the user's file ("config"/"params" put back)."""
        out: list[Any] = []
        for i, el in enumerate(path):
            out.append(el)
            level = self.nested.get(tuple(path[: i + 1]))
            if level and i + 1 < len(path) and path[i + 1] != "type":
                out.append(level)
        return out

    def flatten(self, parent: Any, key: Any, path: tuple[Any, ...], level: str) -> None:
        """parent[key] = {..., level: {...}} -> the two merged, remembering `level` for error paths."""
        node = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(level), dict):
            return
        inner = node[level]
        rest = {k: v for k, v in node.items() if k != level}
        for k in sorted(set(rest) & set(inner) - {"type"}):
            self.problem([*path, k], f"set both here and under {level!r}; keep one")
        parent[key] = {**rest, **inner}
        self.nested[path] = level


def _read_file(path: Path) -> Any:
    """The workflow file: UTF-8 JSON or YAML 1.2, duplicate keys refused (schema/files.py)."""
    return load_config_file(path)


def load_workflow(source: str | Path | dict[str, Any], *, base_dir: Path | None = None) -> WorkflowConfig:
    """A workflow file (.json / .yaml / .yml) or dict -> WorkflowConfig; raises ConfigError listing every problem.

    Relative paths resolve against `base_dir`, by default the file's folder (the working directory for a dict).
    """
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
        base = Path(base_dir or Path.cwd()).resolve()
    else:
        path = Path(source).expanduser()
        raw = _read_file(path)
        base = Path(base_dir or path.resolve().parent).resolve()
    if not isinstance(raw, dict):
        shown = repr(raw) if len(repr(raw)) <= 60 else type(raw).__name__
        raise ConfigError([f"the workflow must be a mapping of sections (input_model, passes, ...), got {shown}"])
    numbers = _unusable_numbers(raw, [])
    if numbers:
        raise ConfigError(numbers)
    reader = _Reader(base)
    _normalize(raw, reader)
    passes = _check_passes(raw, reader)
    _check_references(raw, reader)
    _script_systems(raw, reader)
    raw["passes"] = passes
    context = {"base_dir": base}
    try:
        config = WorkflowConfig.model_validate({**raw, "base_dir": base, "notes": []}, context=context)
    except ValidationError as exc:
        reader.problems += translate(exc, WorkflowConfig, relocate=reader.relocate)
        config = None
    if config is not None:
        _check_evaluator(config, reader)
    if reader.problems or config is None:
        raise ConfigError(_unique(reader.problems))
    config.notes = reader.notes
    return config


INT64_MAX = 2**63 - 1


def _unusable_numbers(node: Any, path: list[Any]) -> list[str]:
    """Numbers no pass can use, wherever they are written: inf / nan (JSON's and YAML's 1e999 read as inf) and
    integers beyond 64 bits. Checked on the raw file, so free-form sections (training_args) are covered too."""
    import math

    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _unusable_numbers(v, [*path, k])]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _unusable_numbers(v, [*path, i])]
    if isinstance(node, float) and not math.isfinite(node):
        why = " (a number too large for a float reads as inf)" if math.isinf(node) else ""
        return [f"{fmt_path(path)}: must be a finite number, got {node!r}{why}"]
    if isinstance(node, int) and not isinstance(node, bool) and abs(node) > INT64_MAX:
        return [f"{fmt_path(path)}: {node} is out of range (at most {INT64_MAX})"]
    return []


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _normalize(raw: dict[str, Any], r: _Reader) -> None:
    """Olive's alternative spellings -> one shape (in place)."""
    for key in ("base_dir", "notes"):
        if key in raw:
            r.problem([key], "unknown key (set by the reader, not in the file)")
            raw.pop(key)
    engine = raw.get("engine")
    if engine is None:
        engine = raw["engine"] = {}
    if isinstance(engine, dict):
        for key in (*ENGINE_KEYS, *ENGINE_NOTES):
            if key in raw:  # newer Olive puts host/target/evaluator/cache_dir... at the top level
                value = raw.pop(key)
                if key in engine and engine[key] != value:
                    r.problem([key], f"also set as engine.{key} to {engine[key]!r}; keep one")
                engine[key] = value
        for key in ("host", "target"):  # Olive allows the system itself here: it becomes a named system
            if isinstance(engine.get(key), dict):
                systems = raw.setdefault("systems", {})
                if isinstance(systems, dict):
                    name = f"{key}_system"
                    while name in systems:
                        name += "_"
                    systems[name] = engine[key]
                    engine[key] = name
                    r.notes.append(f"engine.{key}: the system given inline is systems.{name}")
        search = engine.get("search_strategy")
        if search:
            r.notes.append("engine.search_strategy ignored: orch runs every pass once, in the order written")
    r.flatten(raw, "input_model", ("input_model",), "config")
    model = raw.get("input_model")
    if isinstance(model, dict):
        r.flatten(model, "model_path", ("input_model", "model_path"), "config")
    systems = raw.get("systems")
    if isinstance(systems, dict):
        for name in list(systems):
            r.flatten(systems, name, ("systems", name), "config")
            if isinstance(systems[name], dict) and "type" in systems[name]:
                systems[name]["type"] = canonical_type(systems[name]["type"])
    data_configs = raw.get("data_configs")
    if isinstance(data_configs, dict):  # older Olive: {name: config}
        raw["data_configs"] = data_configs = [
            {"name": k, **v} if isinstance(v, dict) else v for k, v in data_configs.items()
        ]
    if isinstance(data_configs, list):
        for i, dc in enumerate(data_configs):
            _flatten_data_config(dc, ("data_configs", i), r)
    apply_keys(raw, r)  # cosmetic keys, pass_flows, execution providers from the target's accelerators


def _flatten_data_config(dc: Any, path: tuple[Any, ...], r: _Reader) -> None:
    if not isinstance(dc, dict):
        return
    params_config(dc, path, r)  # Olive < 0.7's params_config form
    _components(dc, path, r)
    for part in ("load_dataset_config", "pre_process_data_config"):
        r.flatten(dc, part, (*path, part), "params")
    load = dc.get("load_dataset_config")
    if isinstance(load, dict):
        r.flatten(load, "data_files", (*path, "load_dataset_config", "data_files"), "config")
    data_params(dc, path, r)


_COMPONENT_PARTS = {"load_dataset": "load_dataset_config", "pre_process_data": "pre_process_data_config"}


def _components(dc: dict[str, Any], path: tuple[Any, ...], r: _Reader) -> None:
    """Olive < 0.7's `components` ({load_dataset: {type, params}, ...}) -> load/pre_process_data_config's type
    and params (params_config / component_kwargs, read before, win over a component's params, as in Olive)."""
    comps = dc.pop("components", None)
    if comps is None:
        return
    if not isinstance(comps, dict):
        r.problem([*path, "components"], "expected a mapping {load_dataset: {type, params}, pre_process_data: ...}")
        return
    for kind, comp in comps.items():
        where = (*path, "components", kind)
        if kind in ("post_process_data", "dataloader"):
            r.problem(
                where,
                f"{kind} components are not run by orch (its passes tokenize, batch and score the text rows "
                "themselves); drop it, or do the work in load_dataset / pre_process_data",
            )
            continue
        if kind not in _COMPONENT_PARTS:
            r.problem(where, f"unknown data component{suggest(str(kind), [*_COMPONENT_PARTS, 'post_process_data'])}")
            continue
        if not isinstance(comp, dict):
            r.problem(where, "expected {type: <function name>, params: {...}}")
            continue
        for key in sorted(set(comp) - {"type", "params", "name"}):
            r.problem([*where, key], f"unknown key{suggest(key, ['type', 'params', 'name'])}")
        target = dc.setdefault(_COMPONENT_PARTS[kind], {})
        if not isinstance(target, dict):
            continue
        if comp.get("type") is not None:
            target["type"] = comp["type"]
        for k, v in (comp.get("params") or {}).items():
            target.setdefault(k, v)


def _script_systems(raw: dict[str, Any], r: _Reader) -> None:
    """A data config's user_script runs where the data is loaded: only a LocalSystem has the file today."""
    dcs = raw.get("data_configs") if isinstance(raw.get("data_configs"), list) else []
    systems = raw.get("systems") if isinstance(raw.get("systems"), dict) else {}
    engine = raw.get("engine") if isinstance(raw.get("engine"), dict) else {}
    remote = []
    for key in ("host", "target"):
        name = engine.get(key)
        spec = systems.get(name) if isinstance(name, str) else None
        kind = spec.get("type") if isinstance(spec, dict) else {"docker": "Docker", "aml": "AzureML"}.get(str(name))
        if kind and kind != "LocalSystem":
            remote.append(f"engine.{key} {name!r} is a {kind}System")
    if not remote:
        return
    for i, dc in enumerate(dcs):
        if isinstance(dc, dict) and dc.get("user_script"):
            r.problem(
                ["data_configs", i, "user_script"],
                f"runs only on LocalSystem for now ({'; '.join(remote)}); the script is not shipped with the job: "
                "run on a LocalSystem, or use load_dataset_config + text_template instead of a script",
            )


def _data_names(raw: dict[str, Any]) -> list[str]:
    dcs = raw.get("data_configs")
    return (
        [dc["name"] for dc in dcs if isinstance(dc, dict) and isinstance(dc.get("name"), str)]
        if isinstance(dcs, list)
        else []
    )


def _check_passes(raw: dict[str, Any], r: _Reader) -> dict[str, PassEntry]:
    """Each pass: known type, its data references, training_args normalized, config checked by its class."""
    from orchestrator.passes.registry import PASSES, load_pass, unsupported_hint

    passes = raw.get("passes", {})
    out: dict[str, PassEntry] = {}
    if passes is None:
        return out
    if not isinstance(passes, dict):
        r.problem(["passes"], "expected a mapping of pass name -> {type, config}")
        return out
    for name, entry in passes.items():
        where: tuple[Any, ...] = ("passes", name)
        if isinstance(entry, list):  # Olive >= 0.10: a list of alternative configs for its search
            if len(entry) != 1:
                r.problem(list(where), f"{len(entry)} alternative configs: Olive searches over them, orch runs each "
                          "pass once; keep one")  # fmt: skip
                continue
            entry = entry[0]
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            r.problem([*where, "type"], "required: the pass type, e.g. 'LoRA'")
            continue
        type_name = entry["type"]
        if type_name not in PASSES:
            canon = {k.lower(): k for k in PASSES}.get(type_name.lower())
            if canon is None and unsupported_hint(type_name):
                r.problem([*where, "type"], str(unsupported_hint(type_name)))
                continue
            if canon is None:
                r.problem(
                    [*where, "type"],
                    f"unknown pass type {type_name!r}{nearest(type_name, PASSES)} (known: {', '.join(sorted(PASSES))})",
                )
                continue
            type_name = canon
        nested = isinstance(entry.get("config"), dict)
        cfg_path = (*where, "config") if nested else where
        if nested:
            cfg = dict(entry["config"])
            for key in entry:
                if key not in ("type", "config", *PASS_RUN_KEYS):
                    r.problem([*where, key], f"unknown key{suggest(key, ['type', 'config', *PASS_RUN_KEYS])}")
        else:
            cfg = {k: v for k, v in entry.items() if k not in ("type", "config", *PASS_RUN_KEYS)}
        if entry.get("disable_search") is not None:
            r.notes.append(f"{fmt_path([*where, 'disable_search'])} ignored: orch does no search")
        pass_run_keys(entry, where, raw, r)
        try:
            fields = set(load_pass(type_name).Config.model_fields)
        except Exception:  # not importable: its job checks the config when it runs
            fields = None
        if fields is not None:
            pass_keys(type_name, cfg, cfg_path, fields, r)
        _check_data_refs(cfg, cfg_path, raw, r)
        to_check = cfg
        if isinstance(cfg.get("training_args"), dict):
            try:
                cfg["training_args"], notes = normalize_training_args(cfg["training_args"])
            except TrainingArgsError as exc:
                for key, msg in exc.problems:
                    r.problem([*cfg_path, "training_args", key], msg)
                to_check = {**cfg, "training_args": {}}  # reported above, not again by the pass's own check
            else:
                prefix = fmt_path(cfg_path)
                r.notes += [f"{prefix}.{note}" for note in notes]
        try:
            pass_cls = load_pass(type_name)
        except Exception as exc:  # a registered pass whose module is missing or broken: checked at run time
            r.notes.append(
                f"{fmt_path(where)}: config not checked here ({type_name} pass not importable: "
                f"{type(exc).__name__}: {exc}); the job checks it when it runs"
            )
        else:
            try:
                checked = pass_cls.Config.model_validate(to_check)
            except ValidationError as exc:
                r.problems += translate(exc, pass_cls.Config, prefix=cfg_path)
            else:  # a pass's own refusals that need nothing loaded: now, not once earlier passes ran
                default = getattr(pass_cls, "default_data_config", lambda c: None)(checked)
                if default is not None:
                    _add_default_data(default, cfg, where, raw, r)
                for msg in getattr(pass_cls, "config_problems", lambda c: [])(checked):
                    r.problem(where, msg)
                for msg in getattr(pass_cls, "config_notes", lambda c: [])(checked):
                    r.notes.append(f"{fmt_path(where)}: {msg}")
        out[name] = PassEntry(type=type_name, config=cfg)
    return out


def _add_default_data(
    default: dict[str, Any], cfg: dict[str, Any], where: tuple[Any, ...], raw: dict[str, Any], r: _Reader
) -> None:
    """A pass with no data_config reads Olive's default calibration set: it joins data_configs (once, under
    Olive's name, unless the file has a data config of that name) and the pass names it; a note says so."""
    from orchestrator.passes.common.data import describe_data

    name = default["name"]
    if name not in _data_names(raw):
        dcs = raw.setdefault("data_configs", [])
        if isinstance(dcs, list):
            dcs.append(copy.deepcopy(default))
    cfg["data_config"] = name
    r.notes.append(
        f"{fmt_path(where)}: no data_config: Olive's default calibration data, {describe_data(default)} "
        f"(data config {name!r}, read from the Hugging Face hub)"
    )


def _check_data_refs(cfg: dict[str, Any], cfg_path: tuple[Any, ...], raw: dict[str, Any], r: _Reader) -> None:
    """train_data_config & co must name a data config; an inline one joins data_configs under its name."""
    for key in DATA_REF_KEYS:
        value = cfg.get(key)
        if value is None:
            continue
        known = _data_names(raw)
        if isinstance(value, dict):  # Olive allows the data config inline
            name = value.get("name")
            if not isinstance(name, str) or not name:
                r.problem([*cfg_path, key, "name"], "required key missing (an inline data config needs a name)")
                continue
            if name in known:
                r.problem([*cfg_path, key, "name"], f"{name!r} is already a data config in data_configs")
                continue
            dcs = raw.setdefault("data_configs", [])
            if isinstance(dcs, list):
                dcs.append(value)
                _flatten_data_config(value, ("data_configs", len(dcs) - 1), r)
                r.notes.append(f"{fmt_path([*cfg_path, key])}: inline data config added to data_configs as {name!r}")
            cfg[key] = name
        elif isinstance(value, str) and value not in known:
            r.problem(
                [*cfg_path, key],
                f"{value!r} is not a data config{nearest(value, known)} (known: {', '.join(known) or 'none'})",
            )


def _check_references(raw: dict[str, Any], r: _Reader) -> None:
    """Names that point elsewhere in the file: data configs unique, host/target systems, the evaluator."""
    names = _data_names(raw)
    for name in sorted({n for n in names if names.count(n) > 1}):
        r.problem(["data_configs"], f"data config name {name!r} is used more than once")
    systems = raw.get("systems") if isinstance(raw.get("systems"), dict) else {}
    engine = raw.get("engine") if isinstance(raw.get("engine"), dict) else {}
    for key in ("host", "target"):
        value = engine.get(key)
        if isinstance(value, str) and value not in systems and value not in HOST_WORDS:
            close = nearest(value, [*systems, *MAIN_KEYWORDS])
            r.problem(
                ["engine", key],
                f"{value!r} is not a system in 'systems' (known: {', '.join(sorted(systems)) or 'none'}) "
                f"or one of {', '.join(MAIN_KEYWORDS)}{close}",
            )
    evaluators = raw.get("evaluators") if isinstance(raw.get("evaluators"), dict) else {}
    evaluator = engine.get("evaluator")
    if isinstance(evaluator, str) and evaluator not in evaluators:
        r.problem(
            ["engine", "evaluator"],
            f"{evaluator!r} is not in 'evaluators'{nearest(evaluator, evaluators)} "
            f"(known: {', '.join(sorted(evaluators)) or 'none'})",
        )
    for ev_name, ev in evaluators.items():
        metrics = ev.get("metrics") if isinstance(ev, dict) else None
        for i, metric in enumerate(metrics if isinstance(metrics, list) else []):
            ref = metric.get("data_config") if isinstance(metric, dict) else None
            if isinstance(ref, str) and ref not in names:
                r.problem(
                    ["evaluators", ev_name, "metrics", i, "data_config"],
                    f"{ref!r} is not a data config{nearest(ref, names)} (known: {', '.join(names) or 'none'})",
                )


def _check_evaluator(config: WorkflowConfig, r: _Reader) -> None:
    """The engine's evaluator runs as the Evaluate pass: check its metrics with that pass's Config now."""
    from orchestrator.passes.registry import PASSES, load_pass

    name = config.engine.evaluator
    if not name or name not in config.evaluators or "Evaluate" not in PASSES:
        return
    metrics = [m.model_dump(mode="json", exclude_none=True) for m in config.evaluators[name].metrics]
    try:
        pass_cls = load_pass("Evaluate")
    except Exception as exc:  # not written yet / broken: the job checks it when it runs
        r.notes.append(f"evaluators.{name}: not checked here (Evaluate pass not importable: {type(exc).__name__})")
        return
    try:
        checked = pass_cls.Config.model_validate({"metrics": metrics})
    except ValidationError as exc:
        r.problems += translate(exc, pass_cls.Config, prefix=("evaluators", name))
        return
    metric_checks = getattr(pass_cls, "metric_checks", None)
    for i, metric in enumerate(getattr(checked, "metrics", [])):  # before any pass runs, not after all did
        notes, problem = metric_checks(metric) if metric_checks else ([], None)
        r.notes += notes
        if problem:
            r.problem(["evaluators", name, "metrics", i, "sub_types"], problem)
