"""The package's shape, checked on the real source (docs/ARCHITECTURE.md draws it).

Imports are read with ast from every module of orchestrator/, function-level imports included (a lazy import is
still a dependency), and folded onto the rooms (orchestrator.<room>) and, inside passes/, onto the families
(orchestrator.passes.<family>). The rooms must not import each other in a cycle, each imports only the rooms
below it, passes and systems must not know each other; a pass family imports only common/ and the contract, never
another family; nothing new may stand loose at the package's top level. `orch --help` is run in a fresh
interpreter to see that it loads no torch.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "orchestrator"
# Loose modules allowed at the top: the package marker, and the runner (`python -m orchestrator.runner` is the
# command line every system sends into a process, container or Azure ML job).
LOOSE_ALLOWED = {"__init__", "runner"}
ROOMS = {"cli", "core", "engine", "olive", "passes", "schema", "systems"}
# Who may import whom (besides itself): the layering the rooms are built on, lowest first.
ALLOWED = {
    "core": set(),
    "schema": {"core"},
    "passes": {"core", "schema"},
    "systems": {"core", "schema"},
    "olive": {"core", "schema", "passes", "systems"},
    "runner": {"core", "passes"},
    "engine": {"core", "schema", "passes", "systems", "olive"},
    "cli": {"core", "schema", "passes", "systems", "olive", "engine"},
}


# Inside passes/: `passes` (base.py, the contract, and registry.py, the names) at the top of the folder; common/
# (what several families share) below every family; the families side by side, none importing another.
PASSES = PACKAGE / "passes"
FAMILIES = {"models", "training", "onnx", "quantization", "evaluation"}
PASSES_ALLOWED = {
    "passes": set(),
    "common": {"passes"},
    **{family: {"passes", "common"} for family in FAMILIES},
}


# Inside cli/: app (the Typer app, root options, consoles), render and chat at the bottom; errors (one line + exit
# code) on app; run (every command that runs a workflow) on those; the command groups side by side on top of them,
# none importing another; main registers them all.
CLI = PACKAGE / "cli"
CLI_SHARED = {"app", "render", "chat", "errors", "run"}
CLI_COMMANDS = {"olive", "cache", "env", "demo", "ui", "generate", "azure"}
CLI_ALLOWED = {
    "app": set(),
    "render": set(),
    "chat": set(),
    "errors": {"app"},
    "run": {"app", "errors", "render"},
    **{group: CLI_SHARED for group in CLI_COMMANDS},
    "cache": CLI_SHARED | {"azure"},  # `orch cache ls|clean --workspace`: the Azure ML workspace's cache, azure's
    "main": CLI_SHARED | CLI_COMMANDS,
    "__main__": {"main"},
    "__init__": {"main"},
}
CLI_MAX_LINES = 450  # issue 22: no CLI module over ~400 lines; a group that grows past it splits


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """orchestrator modules `path` imports, anywhere in the file, relative imports resolved (code_identity's
    reader: the cache key and this test see the same graph)."""
    from orchestrator.core.code_identity import orchestrator_imports

    return {n for n in orchestrator_imports(_module_name(path)) if n.startswith("orchestrator.")}


def _room(module: str) -> str | None:
    """orchestrator.passes.training.lora.train -> passes; orchestrator.runner -> runner; no file -> None."""
    first = module.split(".")[1]
    if (PACKAGE / first).is_dir() or (PACKAGE / f"{first}.py").is_file():
        return first
    return None  # `from orchestrator import __version__`: an attribute of the package, not a room


def _family(module: str) -> str | None:
    """orchestrator.passes.onnx.model_builder -> onnx; orchestrator.passes.base -> passes; outside passes/ -> None."""
    parts = module.split(".")
    if parts[:2] != ["orchestrator", "passes"]:
        return None
    if len(parts) > 2 and (PASSES / parts[2]).is_dir():
        return parts[2]
    return "passes"


def _graph(root: Path, unit: typing.Callable[[str], str | None]) -> dict[str, dict[str, list[str]]]:
    """unit -> {imported unit: ["a.module -> b.module", ...]} over the modules under `root`."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(root.rglob("*.py")):
        src = _module_name(path)
        if src == "orchestrator":
            continue
        a = unit(src)
        assert a is not None, src
        for target in _imports(path):
            b = unit(target)
            if b is not None and b != a:
                graph.setdefault(a, {}).setdefault(b, []).append(f"{src} -> {target}")
    return graph


def room_graph() -> dict[str, dict[str, list[str]]]:
    """room -> {imported room: ["a.module -> b.module", ...]}."""
    return _graph(PACKAGE, _room)


def _cli_unit(module: str) -> str | None:
    """orchestrator.cli.cache -> cache; outside cli/ -> None; orchestrator.cli itself (`from orchestrator.cli import
    chat` names the module chat, which the reader reports too) -> None."""
    parts = module.split(".")
    return parts[2] if parts[:2] == ["orchestrator", "cli"] and len(parts) > 2 else None


def cli_graph() -> dict[str, dict[str, list[str]]]:
    """cli module -> {imported cli module: [...]}; the package's __init__ (it re-exports main) as `__init__`."""
    graph = _graph(CLI, lambda m: "__init__" if m == "orchestrator.cli" else _cli_unit(m))
    return {a: {b: v for b, v in deps.items() if b != "__init__"} for a, deps in graph.items()}


def family_graph() -> dict[str, dict[str, list[str]]]:
    """pass family -> {imported family: [...]}, inside orchestrator/passes/."""
    return _graph(PASSES, _family)


def against(graph: dict[str, dict[str, list[str]]], allowed: dict[str, set[str]]) -> dict[str, list[str]]:
    """The arrows `allowed` does not draw (an upward one, or one between peers): "a -> b": its first imports."""
    unknown = (set(graph) | {b for deps in graph.values() for b in deps}) - set(allowed)
    assert not unknown, f"not in the layering (update it and docs/ARCHITECTURE.md): {sorted(unknown)}"
    return {f"{a} -> {b}": deps[b][:3] for a, deps in graph.items() for b in deps if b not in allowed[a]}


def _cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_rooms_import_each_other_without_cycles() -> None:
    graph = room_graph()
    cycle = _cycle(graph)
    why = [graph[a][b][0] for a, b in zip(cycle, cycle[1:], strict=False)] if cycle else []
    assert cycle is None, f"import cycle between rooms: {' -> '.join(cycle or [])} ({'; '.join(why)})"


def test_each_room_imports_only_the_rooms_below_it() -> None:
    wrong = against(room_graph(), ALLOWED)
    assert wrong == {}, f"imports against the layering: {json.dumps(wrong, indent=1)}"


def test_pass_families_import_only_common_and_the_contract() -> None:
    """passes/<family>/ imports passes/common/ and passes/base (never another family); common/ only base."""
    graph = family_graph()
    folders = {p.name for p in PASSES.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == FAMILIES | {"common"}, f"families changed: {sorted(folders ^ (FAMILIES | {'common'}))}"
    wrong = against(graph, PASSES_ALLOWED)
    assert wrong == {}, f"imports against the pass families' layering: {json.dumps(wrong, indent=1)}"
    assert _cycle(graph) is None


def test_the_cli_by_command_group() -> None:
    """cli/: the command groups import only the shared modules (app, errors, run, render, chat), never each other;
    no module over ~400 lines."""
    wrong = against(cli_graph(), CLI_ALLOWED)
    assert wrong == {}, f"imports against the CLI's layering: {json.dumps(wrong, indent=1)}"
    modules = {p.stem for p in CLI.glob("*.py")}
    assert modules == set(CLI_ALLOWED), f"cli modules changed: {sorted(modules ^ set(CLI_ALLOWED))}"
    long = {p.name: n for p in CLI.glob("*.py") if (n := len(p.read_text().splitlines())) > CLI_MAX_LINES}
    assert long == {}, f"split these by command group: {long}"


def test_the_layering_check_catches_an_upward_arrow() -> None:
    """The checks above are the same function on other graphs: an arrow up (common -> onnx), one between two
    families (onnx -> quantization), one from a lower room to a higher (passes -> engine), one between two command
    groups (ui -> demo) and one up inside cli/ (app -> run) are each named."""
    graph = family_graph()
    graph.setdefault("common", {})["onnx"] = ["orchestrator.passes.common.data -> orchestrator.passes.onnx.x"]
    graph.setdefault("onnx", {})["quantization"] = ["orchestrator.passes.onnx.a -> orchestrator.passes.quantization.b"]
    assert set(against(graph, PASSES_ALLOWED)) == {"common -> onnx", "onnx -> quantization"}
    rooms = room_graph()
    rooms.setdefault("passes", {})["engine"] = ["orchestrator.passes.base -> orchestrator.engine.run"]
    assert set(against(rooms, ALLOWED)) == {"passes -> engine"}
    cli = cli_graph()
    cli.setdefault("ui", {})["demo"] = ["orchestrator.cli.ui -> orchestrator.cli.demo"]
    cli.setdefault("app", {})["run"] = ["orchestrator.cli.app -> orchestrator.cli.run"]
    assert set(against(cli, CLI_ALLOWED)) == {"ui -> demo", "app -> run"}


def test_passes_and_systems_do_not_know_each_other() -> None:
    graph = room_graph()
    assert "systems" not in graph.get("passes", {}), graph.get("passes", {}).get("systems")
    assert "passes" not in graph.get("systems", {}), graph.get("systems", {}).get("passes")


def test_no_loose_modules_at_the_top_level() -> None:
    loose = {p.stem for p in PACKAGE.glob("*.py")}
    assert loose <= LOOSE_ALLOWED, f"put these in a room: {sorted(loose - LOOSE_ALLOWED)}"
    rooms = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert rooms == ROOMS, f"rooms changed: {sorted(rooms ^ ROOMS)} (update ROOMS, ALLOWED and ARCHITECTURE.md)"


def test_orch_help_imports_no_heavy_library() -> None:
    """`orch --help` (and so every command's start) loads no torch, onnxruntime, transformers, docker or azure."""
    code = (
        "import sys, json\n"
        "from orchestrator.cli.main import run_cli\n"
        "rc = run_cli(['--help'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'onnxruntime', 'onnx', 'transformers', 'peft', 'datasets', 'docker', 'azure'))\n"
        "import orchestrator\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy, 'file': orchestrator.__file__}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["file"] == str(PACKAGE / "__init__.py")  # this checkout's code, not an installed copy
    assert out["rc"] == 0 and out["heavy"] == [], out


def test_one_system_registry_names_every_system() -> None:
    """The registry's config models are the schema's system models, and every class path points at a module."""
    import importlib.util

    from orchestrator.schema.systems import SystemConfig
    from orchestrator.systems.registry import KEYWORDS, KINDS, canonical_type, keyword_of, kind_of

    union = typing.get_args(typing.get_args(SystemConfig)[0])
    assert {k.config_model for k in KINDS} == set(union)
    for k in KINDS:
        assert importlib.util.find_spec(k.target.partition(":")[0]) is not None, k.target
        assert typing.get_args(k.config_model.model_fields["type"].annotation) == (k.type_name,)
        for alias in (k.type_name, *k.aliases):
            assert canonical_type(alias.lower()) == k.type_name and kind_of(alias) is k
            assert keyword_of(alias) == k.keywords[0]
    assert KEYWORDS == {"local": "LocalSystem", "docker": "Docker", "aml": "AzureML", "azureml": "AzureML"}


def test_the_engine_reads_no_pass_keys() -> None:
    """What a pass's config means (its data, held-out rows, splits) the pass says; the engine never names its keys."""
    keys = ("train_data_config", "eval_dataset_size", "data_seed", "train_split", "eval_split", "training_args")
    found = {
        f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}"
        for path in (PACKAGE / "engine").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in keys
    }
    assert found == set(), sorted(found)


def test_every_error_is_a_user_error_or_a_run_failure() -> None:
    """The CLI picks an exit code by isinstance (core.errors): an exception class of orch's own must be one of the
    two kinds, or its errors would show as internal ones."""
    import importlib
    import pkgutil

    import orchestrator
    from orchestrator.core.errors import OrchError

    loose = []
    for info in pkgutil.walk_packages(orchestrator.__path__, "orchestrator."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        loose += [
            f"{info.name}.{value.__name__}"
            for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == info.name
            and not issubclass(value, OrchError)
        ]
    assert loose == [], f"subclass UserError or RunFailure: {loose}"


NOT_MODULES = {"orchestrator.passes.not_written_yet"}  # tests/test_config.py: a registry entry whose module is missing


def _is_module_here(name: str) -> bool:
    parts = name.split(".")[1:]
    where = PACKAGE.joinpath(*parts)
    return not parts or where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def test_every_orchestrator_name_in_the_source_exists_in_this_checkout() -> None:
    """Imports and dotted strings ("orchestrator.passes.x:Class", `-m orchestrator.runner`) name modules of this
    checkout. Checked on the files, not with find_spec: an editable install of another checkout would answer for
    a module moved away here, and the old code would run without a word."""
    import re

    dotted = re.compile(r"^orchestrator(\.\w+)+(:\w+)?$")
    wrong: list[str] = []
    files = [*PACKAGE.rglob("*.py"), *(REPO / "tests").rglob("*.py"), *(REPO / "bench").rglob("*.py")]
    for path in files:
        where = path.relative_to(REPO)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "orchestrator"]
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("orchestrator"):
                names = [node.module or ""]
                init = PACKAGE.joinpath(*(node.module or "").split(".")[1:]) / "__init__.py"
                if init.is_file():  # `from orchestrator.pkg import name`: a module, or a name the package defines
                    text = init.read_text()
                    wrong += [
                        f"{where}:{node.lineno}: {node.module}.{a.name}"
                        for a in node.names
                        if not _is_module_here(f"{node.module}.{a.name}") and not re.search(rf"\b{a.name}\b", text)
                    ]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and dotted.match(node.value):
                names = [node.value.partition(":")[0]]
            wrong += [f"{where}:{node.lineno}: {n}" for n in names if not _is_module_here(n) and n not in NOT_MODULES]
    assert wrong == [], wrong
