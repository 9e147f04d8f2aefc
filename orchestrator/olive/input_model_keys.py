"""Olive's input-model keys with no field in orch's InputModel: HfModel's generative / io_config / loader
scripts / --test model, from_pretrained kwargs (load_kwargs, hf_config's loading args), model_class and the other
HfModel keys orch does not read: honoured, noted or refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.olive.unsupported import GENERATIVE_ONLY, NO_MODEL_SCRIPTS


def hf_model_keys(raw: dict[str, Any], reader: Any) -> None:
    """Olive's HfModel keys with no field in orch's InputModel: noted, honoured (the --test model) or refused."""
    model = raw.get("input_model")
    if not isinstance(model, dict):
        return
    where = ["input_model"]
    if "generative" in model:
        if model.pop("generative") is False:
            reader.problem([*where, "generative"], GENERATIVE_ONLY)
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
                f"{NO_MODEL_SCRIPTS}: give a Hugging Face model folder (config.json, weights, tokenizer) as model_path",
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


# from_pretrained kwargs that cannot change an exported model: passes load the checkpoint their own way
_NO_EFFECT = {"attn_implementation", "_attn_implementation", "torch_dtype", "dtype", "low_cpu_mem_usage", "device_map"}


def load_kwargs(raw: dict[str, Any], reader: Any) -> None:
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
