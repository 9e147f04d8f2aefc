"""Olive keys with no field of their own in orch's models: each is honoured, refused, or (purely cosmetic)
accepted with a note that says so. Nothing is dropped silently.

Called by the reader on the raw mapping after the engine keys were gathered, before pydantic sees it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Keys that change nothing a run produces: accepted with a note.
COSMETIC = {
    "$schema": "an editor's JSON-schema pointer",
    "no_artifacts": "orch writes no run artifacts besides output_dir's model/, manifest.json and training.png",
    "verbose": "orch's verbosity is log_severity_level / --verbose",
}
BUILDABLE_EPS = ("CPUExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider", "WebGpuExecutionProvider")
DEFAULT_EP = {"cpu": "CPUExecutionProvider", "gpu": "CUDAExecutionProvider", "cuda": "CUDAExecutionProvider"}


def apply(raw: dict[str, Any], reader: Any) -> None:
    """Cosmetic keys noted and removed, pass_flows applied, execution providers taken from the target system."""
    for key, why in COSMETIC.items():
        if key in raw:
            raw.pop(key)
            reader.notes.append(f"{key}: accepted, changes nothing ({why})")
    _pass_flows(raw, reader)
    _capture_split_info(raw, reader)
    _adapter_chain(raw, reader)
    _dummy_data_notes(raw, reader)
    _data_config_parts(raw, reader)
    _systems(raw, reader)
    _execution_providers(raw, reader)
    _load_kwargs(raw, reader)
    _input_model_keys(raw, reader)
    _top_level(raw, reader)
    if isinstance(raw.get("engine"), dict):
        engine_notes(raw["engine"], reader)
        _relative_goals(raw, reader)


def _pass_flows(raw: dict[str, Any], reader: Any) -> None:
    """Olive's pass_flows: each flow runs those passes in that order from the input model, and yields its own
    output model. One flow: the workflow's passes become that chain. Several: kept for flow_workflows(), which
    gives each flow its own run into output_dir/<flow name> (shared leading passes come from the cache)."""
    if "pass_flows" not in raw:
        return
    flows = raw.pop("pass_flows")
    passes = raw.get("passes") if isinstance(raw.get("passes"), dict) else {}
    if not isinstance(flows, list) or not all(isinstance(f, list) for f in flows) or not flows:
        reader.problem(["pass_flows"], 'expected a list of pass-name lists, e.g. [["convert", "quantize"]]')
        return
    for i, flow in enumerate(flows):
        unknown = [p for p in flow if p not in passes]
        if unknown:
            reader.problem(["pass_flows", i], f"names no pass in 'passes': {', '.join(map(str, unknown))}")
            return
        if not flow:
            reader.problem(["pass_flows", i], "an empty flow; list the passes it runs")
            return
    used = {p for flow in flows for p in flow}
    dropped = [p for p in passes if p not in used]
    suffix = f" (in no flow, not run: {', '.join(dropped)})" if dropped else ""
    if len(flows) == 1:
        raw["passes"] = {name: passes[name] for name in flows[0]}
        reader.notes.append(f"pass_flows: runs {' -> '.join(flows[0])}{suffix}")
        return
    raw["pass_flows"] = flows
    names = flow_names(flows)
    lines = "; ".join(f"{n}: {' -> '.join(f)}" for n, f in zip(names, flows, strict=True))
    reader.notes.append(f"pass_flows: {len(flows)} flows, one output model each ({lines}){suffix}")


def _capture_split_info(raw: dict[str, Any], reader: Any) -> None:
    """Olive's CaptureSplitInfo plans the parts that a later SplitModel cuts; orch's SplitModel does both, so
    CaptureSplitInfo's num_splits / unique_embeds_lm_head_splits move into the SplitModel after it."""
    passes = raw.get("passes")
    if not isinstance(passes, dict):
        return
    names = list(passes)
    for i, name in enumerate(names):
        entry = passes[name]
        if not isinstance(entry, dict) or str(entry.get("type", "")).lower() != "capturesplitinfo":
            continue
        cfg = {**entry, **(entry.get("config") or {})}
        for key in ("cost_model", "memory"):
            if cfg.get(key) is not None:
                reader.problem(["passes", name, key], "splitting by cost model / memory is unsupported; set num_splits")
                return
        if cfg.get("block_to_split") not in (None, "", "model.layers"):
            reader.problem(["passes", name, "block_to_split"], "orch splits the decoder layers only; drop it")
            return
        if cfg.get("num_splits") is None:
            reader.problem(["passes", name, "num_splits"], "required: the number of layer groups (2 or more)")
            return
        later = [n for n in names[i + 1 :] if isinstance(passes[n], dict)]
        split = next((n for n in later if str(passes[n].get("type", "")).lower() == "splitmodel"), None)
        if split is None:
            reader.problem(["passes", name], "CaptureSplitInfo plans a split that no SplitModel pass after it makes")
            return
        target = passes[split]
        into = target["config"] if isinstance(target.get("config"), dict) else target
        into.setdefault("num_splits", cfg["num_splits"])
        into.setdefault("unique_embeds_lm_head_splits", bool(cfg.get("unique_embeds_lm_head_splits", False)))
        del passes[name]
        reader.notes.append(
            f"passes.{name} (CaptureSplitInfo): num_splits {cfg['num_splits']} planned by "
            f"passes.{split} (orch's SplitModel plans and cuts in one pass)"
        )
        return


NOT_LORA = {"dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


def _adapter_chain(raw: dict[str, Any], reader: Any) -> None:
    """A DoRA / LoHa / LoKr adapter (its pass, or LoRA with use_dora) has no onnxruntime-genai adapter form: a
    ModelBuilder or ExtractAdapters after it, with no MergeAdapterWeights between, is refused now (one line,
    what to add) instead of failing after training."""
    passes = raw.get("passes")
    if not isinstance(passes, dict):
        return
    pending: tuple[str, str] | None = None
    for name, entry in passes.items():
        if not isinstance(entry, dict):
            continue
        cfg = {**entry, **(entry.get("config") or {})}
        kind = str(entry.get("type", "")).lower()
        if kind in NOT_LORA or (kind in ("lora", "qlora") and cfg.get("use_dora")):
            pending = (name, NOT_LORA.get(kind, "DoRA"))
        elif kind in ("lora", "qlora", "mergeadapterweights"):
            pending = None
        elif pending and (kind == "extractadapters" or (kind == "modelbuilder" and not cfg.get("metadata_only"))):
            reader.problem(
                ["passes", name],
                f"a {pending[1]} adapter (passes.{pending[0]}) cannot stay separate: onnxruntime-genai's adapters "
                f"are LoRA A/B pairs; add a MergeAdapterWeights pass before passes.{name}"
                + (" and drop ExtractAdapters" if kind == "extractadapters" else ""),
            )
            return


def _dummy_data_notes(raw: dict[str, Any], reader: Any) -> None:
    """Dummy containers' keys that Olive uses to find shapes orch reads from the graph itself."""
    for dc in raw.get("data_configs") or []:
        if not isinstance(dc, dict) or "dummydatacontainer" not in str(dc.get("type", "")).lower():
            continue
        load = dc.get("load_dataset_config") or {}
        params = {**load, **(load.get("params") or {})} if isinstance(load, dict) else {}
        given = sorted(k for k in ("model_name", "trust_remote_code", "model_framework") if k in params)
        if given:
            reader.notes.append(
                f"data config {dc.get('name')!r}: {', '.join(given)} accepted, changes nothing (orch takes the "
                "input names, KV heads and vocabulary from the ONNX graph and its config.json)"
            )


def flow_names(flows: list[list[str]]) -> list[str]:
    """Each flow's name (its output folder): its last pass's name, numbered where two flows end alike."""
    lasts = [f[-1] for f in flows]
    return [last if lasts.count(last) == 1 else f"flow{i + 1}_{last}" for i, last in enumerate(lasts)]


def _execution_providers(raw: dict[str, Any], reader: Any) -> None:
    """Olive takes the execution providers from the target system's accelerators; so does orch, when
    engine.execution_providers does not set them. A gpu accelerator without a list means CUDA, as in Olive."""
    engine = raw.get("engine")
    systems = raw.get("systems")
    if not isinstance(engine, dict) or engine.get("execution_providers") or not isinstance(systems, dict):
        return
    target = engine.get("target") or engine.get("host")
    system = systems.get(target) if isinstance(target, str) else None
    if not isinstance(system, dict):
        return
    accelerators = system.get("accelerators")
    if not isinstance(accelerators, list):
        return
    eps: list[str] = []
    for acc in accelerators:
        if isinstance(acc, str):
            acc = {"device": acc}
        if not isinstance(acc, dict):
            return
        listed = acc.get("execution_providers")
        if isinstance(listed, list):
            eps += [ep for ep in listed if isinstance(ep, str) and ep not in eps]
        elif str(acc.get("device", "cpu")).lower() in DEFAULT_EP:
            ep = DEFAULT_EP[str(acc.get("device", "cpu")).lower()]
            if ep not in eps:
                eps.append(ep)
    unbuildable = [ep for ep in eps if ep not in BUILDABLE_EPS]
    if unbuildable:  # said now, not after the passes before ModelBuilder ran
        reader.problem(
            ["systems", target, "accelerators"],
            f"execution provider(s) {', '.join(unbuildable)}: orch builds models for "
            f"{', '.join(BUILDABLE_EPS)} (NPU toolchains are not part of orch)",
        )
        return
    if eps and eps != ["CPUExecutionProvider"]:
        engine["execution_providers"] = eps
        reader.notes.append(f"execution providers from systems.{target}.accelerators: {', '.join(eps)}")


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
            reader.problem(
                ["engine", key],
                "Olive's Azure Blob shared cache is not used: orch caches passes by "
                "content in engine.cache_dir (on Azure ML in the workspace's datastore); drop it",
            )
        elif value not in (None, False, {}, ""):
            reader.notes.append(f"engine.{key}: accepted, no effect ({why})")


def _top_level(raw: dict[str, Any], reader: Any) -> None:
    """Olive's top-level keys with no place in orch's WorkflowConfig."""
    if "auto_optimizer_config" in raw:
        raw.pop("auto_optimizer_config")
        reader.notes.append("auto_optimizer_config: accepted, no effect (orch runs the passes listed, once, in order)")
    if raw.get("workflow_host") is not None:
        raw.pop("workflow_host")
        reader.problem(
            ["workflow_host"],
            "running the whole workflow on another system is `orch submit --config "
            "FILE` (one Azure ML job); drop workflow_host",
        )


def _data_config_parts(raw: dict[str, Any], reader: Any) -> None:
    """Olive's dataloader_config / post_process_data_config: orch's passes tokenize, batch and score the text rows
    themselves, so their parameters change nothing (empty ones, which Olive's CLI templates write, are dropped
    silently); a post-processing function of a user_script is refused where the components are read."""
    for i, dc in enumerate(raw.get("data_configs") or []):
        if not isinstance(dc, dict):
            continue
        for part in ("dataloader_config", "post_process_data_config"):
            if part not in dc:
                continue
            value = dc.pop(part)
            if not value:
                continue
            if not isinstance(value, dict):
                reader.problem(["data_configs", i, part], "expected a mapping of parameters")
                continue
            params = {**value, **(value.get("params") or {})}
            params.pop("params", None)
            if part == "post_process_data_config" and params.get("type") and dc.get("user_script"):
                reader.problem(
                    ["data_configs", i, part, "type"],
                    "post-processing functions are not run by orch (its "
                    "passes tokenize, batch and score the text rows themselves); drop it, or do the work in "
                    "load_dataset / pre_process_data",
                )
                continue
            shown = ", ".join(f"{k}={v}" for k, v in params.items())
            reader.notes.append(
                f"data_configs[{i}].{part} ({shown}): accepted, no effect (orch's passes tokenize, "
                "batch and score the text rows themselves)"
            )


_DOCKER_IMAGE_KEYS = (
    "image_name",
    "dockerfile",
    "build_context_path",
    "build_args",
    "run_params",
    "base_image",
    "conda_file_path",
)


def _systems(raw: dict[str, Any], reader: Any) -> None:
    """Olive's system spellings: a Docker system's image keys at its top level (or local_docker_config) go to
    docker_config; a PythonEnvironment's olive_managed_env / requirements_file are Olive's venv management."""
    systems = raw.get("systems")
    if not isinstance(systems, dict):
        return
    for name, sys_cfg in systems.items():
        if not isinstance(sys_cfg, dict):
            continue
        kind = str(sys_cfg.get("type", ""))
        if kind == "Docker":
            legacy = sys_cfg.pop("local_docker_config", None)
            moved = {k: sys_cfg.pop(k) for k in _DOCKER_IMAGE_KEYS if k in sys_cfg}
            if isinstance(legacy, dict):
                moved = {**legacy, **moved}
            if moved:
                target = sys_cfg.setdefault("docker_config", {})
                if isinstance(target, dict):
                    for k, v in moved.items():
                        target.setdefault(k, v)
                    reader.notes.append(f"systems.{name}: {', '.join(moved)} read as docker_config")
        if sys_cfg.get("olive_managed_env") is not None:
            managed = sys_cfg.pop("olive_managed_env")
            if managed:
                reader.notes.append(
                    f"systems.{name}.olive_managed_env: accepted; orch builds the environment each "
                    "pass needs itself (environments/*.conda.yaml, side venvs on first use)"
                )
        if kind == "LocalSystem" and "requirements_file" in sys_cfg:
            req = sys_cfg.pop("requirements_file")
            reader.notes.append(
                f"systems.{name}.requirements_file {req}: accepted, not installed (orch's passes run "
                "in their own environments; for a prepared interpreter set python_environment_path)"
            )


def _input_model_keys(raw: dict[str, Any], reader: Any) -> None:
    """Olive's HfModel keys with no field in orch's InputModel: noted, honoured (the --test model) or refused."""
    model = raw.get("input_model")
    if not isinstance(model, dict):
        return
    where = ["input_model"]
    if "generative" in model:
        if model.pop("generative") is False:
            reader.problem(
                [*where, "generative"],
                "orch optimizes generative language models; a non-generative model is not supported",
            )
        else:
            reader.notes.append("input_model.generative: accepted (orch's models are generative language models)")
    if "io_config" in model:
        model.pop("io_config")
        reader.notes.append(
            "input_model.io_config: accepted, no effect (the exporters take the decoder's inputs and "
            "outputs: input_ids, attention_mask, position_ids, past_key_values.N.key/value, logits)"
        )
    for key in ("model_loader", "model_script", "dummy_inputs_func", "script_dir"):
        if model.get(key):
            model.pop(key)
            reader.problem(
                [*where, key],
                "PyTorch model-loader scripts are not run by orch: give a Hugging Face "
                "model folder (config.json, weights, tokenizer) as model_path",
            )
    test_config = model.pop("test_model_config", None)
    test_path = model.pop("test_model_path", None)
    if test_config is not None or test_path is not None:
        layers = (test_config or {}).get("hidden_layers", 2) if isinstance(test_config, dict) else 2
        src = model.get("model_path")
        if not isinstance(src, str) or not test_path:
            reader.problem([*where, "test_model_path"], "a test model needs model_path and test_model_path")
            return
        dest = Path(test_path) if Path(test_path).is_absolute() else reader.base_dir / test_path
        if not (dest / "config.json").is_file():
            from orchestrator.olive.model_ref import make_test_model

            origin = (
                Path(src) if Path(src).is_absolute() or not (reader.base_dir / src).exists() else reader.base_dir / src
            )
            make_test_model(str(origin), dest, layers=int(layers))
        model["model_path"] = str(dest)
        reader.notes.append(
            f"input_model.test_model_path: a random {layers}-layer copy of {src} at {dest} stands in "
            "for the model (Olive's --test)"
        )


# data-config parameters Olive's components take that change nothing here, and why
DATA_PARAM_NOTES: dict[str, dict[str, str]] = {
    "load_dataset_config": {
        "trust_remote_code": "datasets reads the data files; no dataset script is run",
        "streaming": "the rows are read whole (small fine-tuning and calibration sets)",
    },
    "pre_process_data_config": {
        "trust_remote_code": "the tokenizer is the model's, loaded by the pass",
        "joiner": "the join strategies concatenate the token streams with the tokenizer's EOS between texts",
        "padding_side": "the collator pads on the right and masks the padding out of the loss",
        "processing_batch_size": "rows are rendered in one map",
        "random_retries": "random windows are drawn from texts long enough for them",
    },
}


def data_params(dc: dict[str, Any], path: tuple[Any, ...], reader: Any) -> None:
    """Component parameters of Olive's HuggingfaceContainer with no effect here: noted and dropped."""
    if not isinstance(dc, dict) or "dummydatacontainer" in str(dc.get("type", "")).lower():
        return
    for part, notes in DATA_PARAM_NOTES.items():
        cfg = dc.get(part)
        if not isinstance(cfg, dict):
            continue
        for key, why in notes.items():
            if key in cfg:
                value = cfg.pop(key)
                reader.notes.append(
                    f"data_configs {dc.get('name')!r}: {part}.{key} {value!r}: accepted, no effect ({why})"
                )


_LOAD_KEYS = {"data_name", "subset", "split", "data_files", "data_dir", "col_filters"}


def params_config(dc: dict[str, Any], path: tuple[Any, ...], reader: Any) -> None:
    """Olive < 0.7's `params_config` (+ `component_kwargs`) -> load_dataset_config / pre_process_data_config."""
    params = dc.get("params_config")
    if not isinstance(params, dict):
        return
    if "load_dataset_config" in dc or "pre_process_data_config" in dc:
        reader.problem([*path, "params_config"], "give params_config or load/pre_process_data_config, not both")
        return
    dc.pop("params_config")
    params = dict(params)
    kwargs = params.pop("component_kwargs", None) or {}
    load = {k: params.pop(k) for k in list(params) if k in _LOAD_KEYS}
    load |= kwargs.get("load_dataset") or {}
    pre = dict(params) | (kwargs.get("pre_process_data") or {})  # the rest are pre-processing arguments
    for other in sorted(set(kwargs) - {"load_dataset", "pre_process_data"}):
        reader.problem([*path, "params_config", "component_kwargs", other], "only load_dataset and pre_process_data")
    dc["load_dataset_config"] = load
    if pre:
        dc["pre_process_data_config"] = pre
    reader.notes.append(
        f"data_configs {dc.get('name')!r}: params_config read as load_dataset_config + pre_process_data_config"
    )


# from_pretrained kwargs that cannot change an exported model: passes load the checkpoint their own way
_NO_EFFECT = {"attn_implementation", "_attn_implementation", "torch_dtype", "dtype", "low_cpu_mem_usage", "device_map"}


def _load_kwargs(raw: dict[str, Any], reader: Any) -> None:
    """input_model.load_kwargs (and hf_config's loading args): trust_remote_code is read; kwargs that only steer
    loading are noted; `revision` pins a hub model's commit; the rest (quantization_config, ...) would change the
    model and are refused.
    The other input_model keys orch does not read are said out loud too."""
    model = raw.get("input_model")
    if not isinstance(model, dict):
        return
    hf = model.get("hf_config") if isinstance(model.get("hf_config"), dict) else {}
    places = [(("input_model", "load_kwargs"), model.get("load_kwargs"))]
    places += [(("input_model", "hf_config", k), hf.get(k)) for k in ("from_pretrained_args", "model_loading_args")]
    for where, kwargs in places:
        if not isinstance(kwargs, dict):
            continue
        noted = sorted(k for k in kwargs if k in _NO_EFFECT)
        if noted:
            reader.notes.append(
                f"{'.'.join(where)} {', '.join(noted)}: accepted, no effect (ModelBuilder reads the checkpoint "
                "itself; LoRA/QLoRA choose dtype and attention for the device)"
            )
        for key in sorted(set(kwargs) - _NO_EFFECT - {"trust_remote_code", "revision"}):
            reader.problem([*where, key], "not supported: orch loads checkpoints as saved; drop it")
    cls = hf.get("model_class")
    if isinstance(cls, str):
        if cls.endswith("ForCausalLM"):
            reader.notes.append(f"hf_config.model_class {cls}: the class config.json names is loaded (AutoModel)")
        else:
            reader.problem(["input_model", "hf_config", "model_class"], f"{cls}: orch handles *ForCausalLM models")
    if model.get("model_file_format"):
        reader.notes.append(
            f"input_model.model_file_format {model['model_file_format']}: not read; the model folder must hold "
            "config.json and the weights"
        )
    if model.get("model_attributes"):
        reader.problem(["input_model", "model_attributes"], "overrides are not applied; edit config.json instead")


# ---- pass keys ------------------------------------------------------------------------------------------------

# Olive's external-data options (get_external_data_config) on every ONNX pass
EXTERNAL_DATA = (
    "save_as_external_data",
    "all_tensors_to_one_file",
    "external_data_name",
    "size_threshold",
    "convert_attribute",
)
_ONE_FILE = "orch writes an ONNX model's weights to one <model>.onnx.data beside it"
# Keys of Olive's passes that orch's pass configs do not declare: (note | rename | refuse, text / new name)
PASS_KEYS: dict[str, dict[str, tuple[str, str]]] = {
    "OnnxConversion": {
        "past_key_value_name": (
            "note",
            "the exporter names the KV cache inputs past_key_values.N.key/value, as onnxruntime-genai reads them",
        ),
        "parallel_jobs": ("note", "one export job (the decoder is one graph)"),
        "optimize": ("note", "graph optimization is its own pass here (OrtTransformersOptimization / ModelBuilder)"),
        "dynamic": ("note", "the decoder is exported with dynamic batch and sequence axes"),
    },
    "OptimumConversion": {
        "components": (
            "note",
            "one decoder graph serves the prompt and the cached steps (what OptimumMerging makes of Optimum's two)",
        ),
        "extra_args": ("note", "Optimum's exporter arguments; orch exports with torch.onnx"),
        "device": ("note", "exported on the CPU; the graph does not depend on the device"),
    },
    "SplitModel": {
        "split_assignments": (
            "refuse",
            "explicit layer assignments are not read; give num_splits (the "
            "layers are cut into equal groups) or a CaptureSplitInfo pass",
        )
    },
    "GraphSurgeries": {"remove_duplicate_initializers": ("note", "the surgeries here create no duplicates")},
    "SelectiveMixedPrecision": {
        "kld_memory_mode": ("note", "orch computes the KLD gradients on CPU in one mode"),
    },
    "OrtSessionParamsTuning": {
        "execution_providers_list": ("rename", "providers_list"),
        "provider_options_list": ("note", "each provider is tried with its default options"),
        "device": ("note", "the device follows the providers listed"),
    },
    "OrtPerfTuning": {"execution_providers_list": ("rename", "providers_list")},
    "QLoRA": {
        "save_quant_config": (
            "note",
            "the adapter is saved beside the unquantized base (orch's QLoRA output "
            "points at it); no 4-bit quantization config is written",
        )
    },
    "OnnxDynamicQuantization": {
        "quant_mode": ("note", "dynamic quantization (the pass's only mode)"),
        "quant_preprocess": (
            "note",
            "onnxruntime's shape-inference preprocessing is not needed for dynamic MatMul quantization",
        ),
    },
}
# onnxruntime quantizer extra options Olive lets a config give at the top level of the pass
ORT_EXTRA_OPTIONS = (
    "ActivationSymmetric",
    "WeightSymmetric",
    "EnableSubgraph",
    "ForceQuantizeNoInputCheck",
    "MatMulConstBOnly",
    "AddQDQPairToWeight",
    "OpTypesToExcludeOutputQuantization",
    "DedicatedQDQPair",
    "QDQOpTypePerChannelSupportToAxis",
    "CalibTensorRangeSymmetric",
    "CalibMovingAverage",
    "CalibMovingAverageConstant",
    "SmoothQuant",
    "SmoothQuantAlpha",
    "SmoothQuantFolding",
)


def pass_keys(type_name: str, cfg: dict[str, Any], where: tuple[Any, ...], fields: set[str], reader: Any) -> None:
    """Olive's keys a pass config may carry that orch's pass does not declare, in place: noted and dropped,
    renamed, moved into extra_options, or refused with what to use. Unknown keys stay for the pass's own check."""
    prefix = ".".join(str(p) for p in where)
    dropped = [k for k in EXTERNAL_DATA if k in cfg and k not in fields]
    if dropped:
        for k in dropped:
            cfg.pop(k)
        reader.notes.append(f"{prefix}: {', '.join(dropped)}: accepted, no effect ({_ONE_FILE})")
    if type_name == "OnnxDynamicQuantization":
        moved = {k: cfg.pop(k) for k in ORT_EXTRA_OPTIONS if k in cfg}
        if moved:
            extra = cfg.setdefault("extra_options", {})
            if isinstance(extra, dict):
                extra.update(moved)
                reader.notes.append(f"{prefix}: {', '.join(moved)} passed to onnxruntime's quantizer (extra_options)")
        precision = cfg.pop("precision", None) if "precision" not in fields else None
        if precision is not None:
            if precision not in ("int8", "uint8"):
                reader.problem([*where, "precision"], f"{precision!r}: dynamic quantization writes int8 or uint8")
            else:
                cfg.setdefault("weight_type", "QUInt8" if precision == "uint8" else "QInt8")
    if type_name == "OptimumConversion":
        reader.notes.append(f"{prefix}: OptimumConversion exported by torch.onnx as OnnxConversion does (the same "
                            "decoder graph with its KV cache, checked against transformers)")  # fmt: skip
        fp16 = cfg.pop("fp16", None) if "fp16" not in fields else None
        if fp16:
            cfg.setdefault("torch_dtype", "float16")
            reader.notes.append(f"{prefix}.fp16: read as torch_dtype float16")
    for key, (action, text) in PASS_KEYS.get(type_name, {}).items():
        if key not in cfg or key in fields:
            continue
        if action == "rename":
            value = cfg.pop(key)
            if text in cfg and cfg[text] != value:
                reader.problem([*where, key], f"also given as {text}; keep one")
            cfg.setdefault(text, value)
            reader.notes.append(f"{prefix}.{key}: read as {text} (its later name)")
        elif action == "note":
            cfg.pop(key)
            reader.notes.append(f"{prefix}.{key}: accepted, no effect ({text})")
        else:
            reader.problem([*where, key], text)
            cfg.pop(key)


def pass_run_keys(entry: dict[str, Any], where: tuple[Any, ...], raw: dict[str, Any], reader: Any) -> None:
    """Olive's per-pass `evaluator` / `host` (RunPassConfig): orch runs every pass on the engine's host and
    evaluates the final model with the engine's evaluator."""
    prefix = ".".join(str(p) for p in where)
    if entry.get("evaluator") is not None:
        reader.notes.append(
            f"{prefix}.evaluator: accepted, not run per pass (orch evaluates the final model with engine.evaluator)"
        )
    host = entry.get("host")
    if host is not None:
        engine = raw.get("engine") if isinstance(raw.get("engine"), dict) else {}
        if host != engine.get("host", "local"):
            reader.problem(
                [*where, "host"],
                f"{host!r}: per-pass hosts are not supported; orch runs every pass on "
                "engine.host (set it there, or split the workflow)",
            )
    for key in ("clean_run_cache", "output_name"):
        if entry.get(key) is not None:
            reader.notes.append(
                f"{prefix}.{key}: accepted, no effect (each pass's output is cached by content; "
                "the final model is output_dir/model)"
            )


def _relative_goals(raw: dict[str, Any], reader: Any) -> None:
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
