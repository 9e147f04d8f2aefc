"""Olive keys with no field of their own in orch's models: each is honoured, refused, or (purely cosmetic)
accepted with a note that says so. Nothing is dropped silently.

Called by the reader on the raw mapping after the engine keys were gathered, before pydantic sees it.
"""

from __future__ import annotations

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
    _dummy_data_notes(raw, reader)
    _execution_providers(raw, reader)
    _load_kwargs(raw, reader)
    if isinstance(raw.get("engine"), dict):
        engine_notes(raw["engine"], reader)


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
        reader.notes.append(f"passes.{name} (CaptureSplitInfo): num_splits {cfg['num_splits']} planned by "
                            f"passes.{split} (orch's SplitModel plans and cuts in one pass)")  # fmt: skip
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


def engine_notes(engine: dict[str, Any], reader: Any) -> None:
    """Engine keys orch reads elsewhere or not at all, said out loud."""
    if engine.get("log_to_file"):
        reader.notes.append("log_to_file: every pass's full log is already a file in the cache (named on failure)")


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
