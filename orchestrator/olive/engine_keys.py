"""Olive's engine keys with no field in orch's EngineConfig (said out loud; the shared cache refused), and its
relative goals, which need the input model evaluated too (engine.evaluate_input_model).
"""

from __future__ import annotations

from typing import Any

from orchestrator.olive.unsupported import NO_SHARED_CACHE

# Olive's engine keys (RunEngineConfig / EngineConfig, 0.7-0.13) with no field in orch's EngineConfig, and why
# each changes nothing here; the reader moves them from the top level (Olive >= 0.8's flat form) like the others
ENGINE_NOTES: dict[str, str] = {
    "ort_log_severity_level": "onnxruntime's own log lines stay at its default level; log_severity_level sets orch's",
    "ort_py_log_severity_level": "onnxruntime's own log lines stay at its default level",
    "clean_evaluation_cache": "the evaluation step is cached by content like a pass (clean_cache reruns everything)",
    "plot_pareto_frontier": "orch runs no search, so there is no frontier to plot",
    "output_name": "the final model is written to output_dir/model",
    "enable_shared_cache": "orch's cache is engine.cache_dir (and the workspace's datastore on Azure ML)",
    "cache_config": "orch's cache is engine.cache_dir (and the workspace's datastore on Azure ML)",
}


def engine_notes(engine: dict[str, Any], reader: Any) -> None:
    """Engine keys orch reads elsewhere or not at all, said out loud."""
    if engine.get("log_to_file"):
        reader.notes.append("log_to_file: every pass's full log is already a file in the cache (named on failure)")
    for key, why in ENGINE_NOTES.items():
        if key not in engine:
            continue
        value = engine.pop(key)
        shared = (
            key == "enable_shared_cache"
            and value
            or key == "cache_config"
            and isinstance(value, dict)
            and (value.get("enable_shared_cache") or value.get("account_name") or value.get("container_name"))
        )
        if shared:
            reader.problem(["engine", key], f"{NO_SHARED_CACHE}; drop it")
        elif value not in (None, False, {}, ""):
            reader.notes.append(f"engine.{key}: accepted, no effect ({why})")


def relative_goals(raw: dict[str, Any], reader: Any) -> None:
    """Olive's improvement/degradation goals compare with the input model's metrics, which Olive computes by
    default (evaluate_input_model): orch evaluates the input model too when the engine's evaluator has one."""
    engine = raw["engine"]
    name = engine.get("evaluator")
    evaluators = raw.get("evaluators") if isinstance(raw.get("evaluators"), dict) else {}
    ev = evaluators.get(name) if isinstance(name, str) else None
    metrics = ev.get("metrics") if isinstance(ev, dict) else None
    relative = [
        f"{m.get('name')}-{sub.get('name')}"
        for m in metrics or []
        if isinstance(m, dict)
        for sub in m.get("sub_types") or []
        if isinstance(sub, dict) and isinstance(sub.get("goal"), dict) and sub["goal"].get("type") != "threshold"
    ]
    if relative and engine.get("evaluate_input_model") is not False:
        engine["evaluate_input_model"] = True
        reader.notes.append(
            f"goals {', '.join(relative)} compare with the input model: it is evaluated too "
            "(engine.evaluate_input_model, Olive's default)"
        )
