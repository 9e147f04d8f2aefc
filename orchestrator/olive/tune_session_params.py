"""Olive's tune-session-params -> a workflow of one OrtSessionParamsTuning pass, and the settings file Olive
writes from its result (named by the accelerator, cpu-cpu.json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from orchestrator.olive.flag_parsing import Given, split_values
from orchestrator.olive.model_ref import input_model, resolve_model
from orchestrator.olive.plan import DEVICE_PROVIDERS, FlagError, Plan, _engine, common, note_memory, remote


def tune_session_params_workflow(args: argparse.Namespace | Given, host: str | None = None) -> dict[str, Any]:
    """The workflow Olive's tune-session-params runs: one OrtSessionParamsTuning pass over dummy inputs of the
    graph (a prompt, or one token with a KV cache under --predict_with_kv_cache)."""
    get = args.get if isinstance(args, Given) else (lambda k, d=None: getattr(args, k, d))
    device = get("device", "cpu") or "cpu"
    providers = get("providers_list") or get("providers")
    if isinstance(providers, str):
        providers = split_values(providers)
    providers = providers or [DEVICE_PROVIDERS.get(device, "CPUExecutionProvider")]
    providers = [p if p.endswith("ExecutionProvider") else f"{p}ExecutionProvider" for p in providers]

    def ints(key: str) -> list[int] | None:
        value = get(key)
        if value is None:
            return None
        items = split_values(value) if isinstance(value, str) else value
        try:
            return [int(v) for v in items]
        except ValueError:
            raise FlagError(
                f"tune-session-params: argument --{key}: invalid int value: "
                f"{next(v for v in items if not str(v).lstrip('-').isdigit())!r}"
            ) from None

    tuning: dict[str, Any] = {}
    for key in ("execution_mode_list", "opt_level_list", "intra_thread_num_list", "inter_thread_num_list"):
        if ints(key) is not None:
            tuning[key] = ints(key)
    for key in ("cpu_cores", "io_bind", "enable_cuda_graph", "trt_fp16_enable", "enable_profiling"):
        if get(key) not in (None, False):
            tuning[key] = get(key)
    if get("extra_session_config"):
        extra = get("extra_session_config")
        try:
            tuning["extra_session_config"] = json.loads(extra) if isinstance(extra, str) else extra
        except ValueError:
            raise FlagError(f'--extra_session_config {extra!r}: not JSON (give \'{{"key": "value"}}\')') from None
    container = (
        "TransformersTokenDummyDataContainer"
        if get("predict_with_kv_cache")
        else ("TransformersPromptDummyDataContainer")
    )
    return {
        "input_model": input_model(get("model_name_or_path"), trust_remote_code=False, task=None),
        "data_configs": [{"name": "session_params_tuning_data", "type": container}],
        "passes": {
            "session_params_tuning": {
                "type": "OrtSessionParamsTuning",
                "data_config": "session_params_tuning_data",
                "providers_list": providers,
                "force_evaluate_other_eps": not get("disable_force_evaluate_other_eps"),
                **tuning,
            }
        },
        "engine": _engine(
            get("output_path") or "tuned-inference-settings", int(get("log_level", 3) or 3), providers, host, host
        ),
    }


def accelerator_key(device: str, provider: str) -> str:
    """Olive's name for an accelerator spec, which its tune-session-params output file is named by: cpu-cpu."""
    return f"{device}-{provider.removesuffix('ExecutionProvider').lower()}"


def build_tune_session_params(g: Given, host: str | None) -> Plan:
    plan = Plan()
    common(g, plan)
    model = resolve_model(g["model_name_or_path"])
    if model.kind != "onnx":
        raise FlagError(f"-m {g['model_name_or_path']}: tune-session-params times an ONNX model (export it first)")
    note_memory(g, plan)
    values = dict(g.values, model_name_or_path=model.path)
    plan.workflow = tune_session_params_workflow(Given(values, g.explicit), host=host)
    remote(g, plan.workflow, plan)
    device = g.get("device", "cpu")
    output = g["output_path"] or "tuned-inference-settings"

    def write_settings(summary: Any) -> None:
        from orchestrator.core.job import atomic_write_text
        from orchestrator.passes.common.onnx_tools import SETTINGS_FILE

        if summary is None or summary.final_model is None:
            return
        settings = json.loads((Path(summary.final_model.path) / SETTINGS_FILE).read_text())
        dest = Path(output) / f"{accelerator_key(device, settings['execution_provider'][0])}.json"
        atomic_write_text(dest, json.dumps(settings, indent=4) + "\n")
        plan.message = f"Inference session parameters are saved to {dest}"

    plan.after = write_settings
    return plan
