"""Olive's keys that decide which passes run, in which order, and whether the chain can work: pass_flows (one
flow becomes the passes; several, one run and output model each), CaptureSplitInfo folded into the SplitModel after
it, and a DoRA / LoHa / LoKr adapter that an ONNX step after it cannot keep separate. Read on the whole `passes`
section, before any pass's own config is checked (pass_keys).
"""

from __future__ import annotations

from typing import Any


def pass_flows(raw: dict[str, Any], reader: Any) -> None:
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


def flow_names(flows: list[list[str]]) -> list[str]:
    """Each flow's name (its output folder): its last pass's name, numbered where two flows end alike."""
    lasts = [f[-1] for f in flows]
    return [last if lasts.count(last) == 1 else f"flow{i + 1}_{last}" for i, last in enumerate(lasts)]


def capture_split_info(raw: dict[str, Any], reader: Any) -> None:
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


def adapter_chain(raw: dict[str, Any], reader: Any) -> None:
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
