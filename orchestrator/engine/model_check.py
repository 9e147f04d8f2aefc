"""A local model or adapter folder checked before any pass reads it: readable, the files a format needs, each JSON
file parses, safetensors headers fit their files, the tokenizer fits the embedding, config.json fits the weights.

The pre-flight checks the workflow's input model and adapter here; resources.py checks a hub model here once it
is downloaded. A truncated copy or a tokenizer from another model fails in a second, not after a fine-tune.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from orchestrator.core.links import check_tree, link_problem
from orchestrator.engine.preflight_error import PreflightError, first_line
from orchestrator.engine.weights_check import check_weights_match_config, read_safetensors_header

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def _read_json(path: Path, what: str) -> Any:
    try:
        data = path.read_bytes()
    except PermissionError:
        raise PreflightError(f"{what}: {path} is not readable (permission denied)") from None
    except OSError as exc:
        raise PreflightError(f"{what}: {path} cannot be read ({exc.strerror or exc})") from None
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        from orchestrator.schema.files import encoding_problem

        raise PreflightError(f"{what}: {path} {encoding_problem(data, exc)}") from None
    except ValueError as exc:
        raise PreflightError(f"{what}: {path} is not valid JSON ({first_line(exc)}); restore it") from None


def check_safetensors(path: Path, what: str) -> None:
    """The header of a .safetensors file parses and its tensors fit in the file (a truncated copy fails here)."""
    try:
        size = path.stat().st_size
        n, header = read_safetensors_header(path)
    except PermissionError:
        raise PreflightError(f"{what}: {path} is not readable (permission denied)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PreflightError(f"{what}: {path} is not a valid safetensors file ({first_line(exc)})") from None
    if not isinstance(header, dict):
        raise PreflightError(f"{what}: {path} is not a valid safetensors file (header is not a mapping)")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if ends and 8 + n + max(ends) > size:
        raise PreflightError(
            f"{what}: {path} is truncated ({size} bytes, its header describes {8 + n + max(ends)}); copy it again"
        )


def check_model_folder(path: Path, what: str, *, needs_tokenizer: bool = True, matched: set[str] | None = None) -> str:
    """A local input model: readable, and either ONNX (GenAI) or an HF checkpoint with config, weights and
    tokenizer that fit each other. Returns the format found (hf, onnx, onnx_genai). `matched`: digests of
    config + weights known to match (weights_check's memo); the digest checked here is added to it."""
    if not path.exists():
        problem = link_problem(path)
        if problem:
            raise PreflightError(f"{what}: {problem}; give a local model folder (with config.json and weights)")
        raise PreflightError(f"{what}: {path} not found; give a local model folder (with config.json and weights)")
    if path.is_file():
        if path.suffix == ".onnx":
            return "onnx"
        raise PreflightError(
            f"{what}: {path} is a file; give the model folder that holds it (config.json, weights, tokenizer)"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise PreflightError(f"{what}: {path} is not readable (permission denied)")
    check_tree(path, what)  # a link loop or a link out of the folder: publishing a copy of it could never end
    if (path / "genai_config.json").exists():
        _read_json(path / "genai_config.json", what)
        return "onnx_genai"
    if any(path.glob("*.onnx")):
        return "onnx"
    config = path / "config.json"
    if not config.exists():
        raise PreflightError(
            f"{what}: {path} has no config.json; give a Hugging Face model folder (config.json, weights, tokenizer)"
        )
    cfg = _read_json(config, what)
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise PreflightError(f"{what}: {config} has no model_type; it is not a transformers model config")
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not any(path.glob("pytorch_model*.bin")):
        raise PreflightError(f"{what}: {path} has no weights (*.safetensors or pytorch_model*.bin)")
    for w in weights:
        check_safetensors(w, what)
    if needs_tokenizer and not any((path / name).exists() for name in TOKENIZER_FILES):
        raise PreflightError(
            f"{what}: {path} has no tokenizer (tokenizer.json or tokenizer.model); copy the base model's tokenizer "
            "files into it"
        )
    for name in ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if (path / name).exists():
            _read_json(path / name, what)
    if (path / "tokenizer.json").exists():
        check_tokenizer_file(path / "tokenizer.json", cfg, what)
    if weights:
        digest = check_weights_match_config(path, cfg, what, known=matched)
        if digest is not None and matched is not None:
            matched.add(digest)
    return "hf"


def check_tokenizer_file(path: Path, cfg: dict[str, Any], what: str) -> None:
    """tokenizer.json is a tokenizer (the `tokenizers` library reads it) whose ids fit the model's embedding."""
    data = _read_json(path, what)
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise PreflightError(
            f"{what}: {path} is JSON but not a tokenizer (no 'model' section); copy the base model's tokenizer.json"
        )
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
    except ImportError:
        return
    except Exception as exc:  # tokenizers raises its own Exception subclass with the parse error
        raise PreflightError(
            f"{what}: {path} is not a tokenizer the tokenizers library can read ({first_line(exc)}); copy the base "
            "model's tokenizer.json"
        ) from None
    vocab = cfg.get("vocab_size")
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if isinstance(vocab, int) and not isinstance(vocab, bool) and size > vocab:
        raise PreflightError(
            f"{what}: {path} has {size} tokens but config.json's vocab_size is {vocab}: token ids past {vocab - 1} "
            "have no embedding; use the tokenizer that came with the model"
        )


def check_adapter_folder(path: Path, what: str) -> None:
    """A PEFT adapter folder: adapter_config.json parses, its safetensors fit their files, no link leads out."""
    if not path.exists():
        problem = link_problem(path) or f"{path} not found"
        raise PreflightError(f"{what}: {problem}; give the adapter folder a LoRA run wrote (adapter/)")
    if not path.is_dir():
        raise PreflightError(f"{what}: {path} is a file; give the adapter folder (adapter_config.json + weights)")
    check_tree(path, what)
    if not (path / "adapter_config.json").exists():
        raise PreflightError(f"{what}: {path} has no adapter_config.json; it is not a PEFT adapter folder")
    _read_json(path / "adapter_config.json", what)
    for w in sorted(path.glob("*.safetensors")):
        check_safetensors(w, what)
