"""Does config.json describe the weights beside it? Read from the safetensors headers, no weight is loaded.

transformers loads a checkpoint whose tensors do not fit its config with a warning: the missing tensors are
initialised at random and training goes on (a llama config.json over Phi-3 weights trains a random model). Here
the model the config describes is built on the meta device (no memory, no weights: transformers' own module
tree, so every architecture it knows is covered) and its tensor names and shapes are compared with the
safetensors headers. A missing tensor, an unused one or a shape that differs is an error naming both sides.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

from orchestrator.core.errors import UserError

# Tensor names that tell a checkpoint's family apart (for the message only), most specific first.
FAMILIES: tuple[tuple[tuple[str, ...], str, tuple[str, ...]], ...] = (
    (("qkv_proj", "gate_up_proj"), "Phi-3 (Phi3ForCausalLM)", ("Phi3",)),
    (("self_attn.dense", "mlp.fc1"), "Phi-1/Phi-2 (PhiForCausalLM)", ("Phi",)),
    (("query_key_value",), "GPT-NeoX / Falcon", ("GPTNeoX", "Falcon")),
    (("attn.c_attn",), "GPT-2", ("GPT2",)),
    (("q_proj.bias", "mlp.gate_proj"), "Qwen2 (Qwen2ForCausalLM)", ("Qwen2",)),
    (("self_attn.q_proj", "mlp.gate_proj"), "Llama-style (Llama, Mistral, Qwen3)", ("Llama", "Mistral", "Qwen3")),
    (("self_attn.q_proj", "fc1"), "OPT", ("OPT",)),
)
SHOWN = 2  # example tensor names per kind of difference


class WeightsMismatch(UserError):
    """config.json and the weights disagree: one line naming the architecture, the tensors and the fix."""


def read_safetensors_header(path: Path) -> tuple[int, Any]:
    """(length, parsed JSON) of a .safetensors file's header: 8 bytes of little-endian length, then that much
    JSON. ValueError for a file too short or a length out of range (a truncated or foreign file)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > min(size - 8, 100 << 20):
            raise ValueError("header length out of range")
        return n, json.loads(fh.read(n))


def safetensors_header(path: Path) -> dict[str, Any]:
    """name -> {"dtype", "shape"} of one .safetensors file (its JSON header only)."""
    _, header = read_safetensors_header(path)
    return {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or every *.safetensors in the folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        except (ValueError, AttributeError):
            shards = []
        files = [folder / s for s in shards if (folder / s).is_file()]
        if files:
            return files
    return sorted(folder.glob("*.safetensors"))


MEMO_FILE = "verified-models.json"  # in the cache folder and in ORCH_HOME: digests of (config, headers) that matched
_MATCHED: set[str] = set()  # the same, for this process


def home_memo() -> Path:
    """The machine's memo ($ORCH_HOME, default ~/.cache/orch, as Docker's image probes): a model folder checked once
    is not checked again by a run with another cache folder (each check imports torch + transformers: seconds)."""
    return Path(os.environ.get("ORCH_HOME", Path.home() / ".cache" / "orch")) / MEMO_FILE


def weights_digest(folder: Path) -> str:
    """sha256 of config.json and every safetensors header, transformers' version and this check's own source:
    what decides the verdict (a memo of a digest never outlives a change of any of them)."""
    import hashlib

    from orchestrator.core.versions import library_versions

    h = hashlib.sha256(json.dumps(library_versions(("transformers",))).encode())
    h.update(Path(__file__).read_bytes())
    h.update((folder / "config.json").read_bytes())
    for f in weight_files(folder):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h.update(f.name.encode() + b"\0" + fh.read(n))
    return h.hexdigest()


def known_matches(cache_root: Path) -> set[str]:
    """Digests earlier runs found matching, in this cache or on this machine (building the model on the meta
    device costs seconds of imports)."""
    return set(_MATCHED) | _recorded(cache_root / MEMO_FILE) | _recorded(home_memo())


def _recorded(memo: Path) -> set[str]:
    try:
        data = json.loads(memo.read_text())
    except (OSError, ValueError):
        return set()
    return {d for d in data if isinstance(d, str)} if isinstance(data, list) else set()


def remember_matches(cache_root: Path, digests: set[str]) -> None:
    """Record digests that matched (called once the whole pre-flight passed: a refused run writes nothing), in the
    cache folder (it travels with the cache) and in the machine's memo."""
    for memo in (cache_root / MEMO_FILE, home_memo()):
        _remember(memo, digests)


def machine_matches() -> set[str]:
    """Digests this process or this machine found matching (for folders outside a workflow's inputs: the HF cache)."""
    return set(_MATCHED) | _recorded(home_memo())


def remember_on_machine(digests: set[str]) -> None:
    _remember(home_memo(), digests)


def _remember(memo: Path, digests: set[str]) -> None:
    recorded = _recorded(memo)
    if not digests - recorded:
        return
    from orchestrator.core.fs import atomic_write_text

    with contextlib.suppress(OSError):  # a memo: the next run checks again
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo, json.dumps(sorted(recorded | digests)))


def check_weights_match_config(
    folder: Path, config: dict[str, Any], what: str, *, known: set[str] | None = None
) -> str | None:
    """Raise WeightsMismatch when config.json's architecture does not fit the safetensors tensors (see module);
    returns the digest of what matched (None when nothing was checked)."""
    if config.get("quantization_config") or not isinstance(config.get("model_type"), str):
        return None  # quantized checkpoints store packed tensors under other names
    files = weight_files(folder)
    if not files:
        return None
    digest = weights_digest(folder)
    if digest in _MATCHED or digest in (known or set()):
        return digest
    stored: dict[str, tuple[int, ...]] = {}
    for f in files:
        stored.update({k: tuple(v.get("shape") or ()) for k, v in safetensors_header(f).items()})
    built = _expected(folder, config, what)
    if built is None:
        return None
    arch, expected, optional, prefix = built
    stored = _with_prefix(stored, expected, prefix)
    missing = sorted(k for k in expected if k not in stored and k not in optional)
    unused = sorted(k for k in stored if k not in expected)
    shapes = sorted(k for k in expected if k in stored and stored[k] != expected[k])
    if not (missing or unused or shapes):
        _MATCHED.add(digest)
        return digest
    names = ", ".join(f.name for f in files[:2]) + (" ..." if len(files) > 2 else "")
    model_type = config["model_type"]
    if missing or unused:
        family = _family(stored, arch)
        looks = f"; these weights look like {family}" if family else ""
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) the config needs are missing (e.g. {', '.join(missing[:SHOWN])})")
        if unused:
            parts.append(f"{len(unused)} tensor(s) it would not use (e.g. {', '.join(unused[:SHOWN])})")
        raise WeightsMismatch(
            f"{what}: {folder / 'config.json'} describes {arch} (model_type {model_type!r}) but {names} holds other "
            f"weights: {'; '.join(parts)}{looks}; give the config.json that came with these weights "
            "(transformers would re-initialise the missing tensors at random and train on them)"
        )
    key = shapes[0]
    raise WeightsMismatch(
        f"{what}: {names} tensor {key} has shape {list(stored[key])}, but {folder / 'config.json'} ({arch}, "
        f"hidden_size {config.get('hidden_size')}, intermediate_size {config.get('intermediate_size')}, "
        f"vocab_size {config.get('vocab_size')}) needs {list(expected[key])}"
        + (f" ({len(shapes)} tensors differ)" if len(shapes) > 1 else "")
        + "; restore the config.json that came with these weights"
    )


def _expected(
    folder: Path, config: dict[str, Any], what: str
) -> tuple[str, dict[str, tuple[int, ...]], set[str], str] | None:
    """(architecture, name -> shape, names allowed to be absent, base prefix) of the model config.json
    describes, built on the meta device; None when transformers cannot say (remote code, renamed checkpoints)."""
    try:
        import torch
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # a client without the ML stack: the pass checks when it loads
        return None
    model_type = config["model_type"]
    if get_checkpoint_conversion_mapping(model_type) is not None:
        return None  # transformers renames this family's checkpoint keys while loading
    try:
        cfg = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception:  # remote code (auto_map) or a model_type this transformers does not know
        if config.get("auto_map"):
            return None  # the model's own code: trust_remote_code loads it in the pass
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if model_type not in CONFIG_MAPPING_NAMES:
            import difflib

            close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING_NAMES), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise WeightsMismatch(
                f"{what}: {folder / 'config.json'} has model_type {model_type!r}, which transformers "
                f"{transformers.__version__} does not know; {hint}give the config.json that came with the model"
            ) from None
        return None
    arch_names = [a for a in (config.get("architectures") or []) if isinstance(a, str)]
    cls = getattr(transformers, arch_names[0], None) if arch_names else None
    try:
        with torch.device("meta"):
            model = cls._from_config(cfg) if cls is not None else AutoModelForCausalLM.from_config(cfg)
    except Exception:  # a config transformers cannot build: the pass names transformers' own error
        return None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    optional: set[str] = set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if getattr(cfg, "tie_word_embeddings", False) or getattr(cfg.get_text_config(), "tie_word_embeddings", False):
        optional.update(tied if isinstance(tied, dict | list | set | tuple) else [])
    for attr in ("_keys_to_ignore_on_load_missing",):
        patterns = getattr(model, attr, None) or []
        optional.update(k for k in expected for p in patterns if re.search(p, k))
    ignored_unused = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    for k in list(expected):
        if any(re.search(p, k) for p in ignored_unused):
            optional.add(k)
    return type(model).__name__, expected, optional, getattr(model, "base_model_prefix", "") or ""


def _with_prefix(
    stored: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], prefix: str
) -> dict[str, tuple[int, ...]]:
    """A base-model checkpoint ("layers.0...") loaded into a model with a head ("model.layers.0..."), and the
    legacy gamma/beta names: the keys as transformers would match them."""
    out = {}
    for k, shape in stored.items():
        name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k))
        out[name if name in expected else k] = shape
    head = prefix + "."
    if prefix and not any(k.startswith(head) for k in out) and any(k.startswith(head) for k in expected):
        out = {(f"{prefix}.{k}" if f"{prefix}.{k}" in expected else k): v for k, v in out.items()}
    return out


def _family(stored: dict[str, tuple[int, ...]], arch: str) -> str | None:
    """The family the tensor names suggest, when it is not the config's own architecture."""
    names = " ".join(stored)
    for needles, family, classes in FAMILIES:
        if all(n in names for n in needles):
            own = any(arch.startswith(c) and arch[len(c) :][:1].isupper() for c in classes)
            return None if own else family
    return None
