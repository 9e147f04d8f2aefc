"""Scorers: one interface (encode, decode, logits, generate) over the runtimes a measured model runs in.

Why apart: the quality metrics and the latency timings are written once against Scorer, whether the model is an
onnx_genai folder (onnxruntime-genai) or an hf / hf_adapter checkpoint (transformers), so the input and the output
of a workflow are measured the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import PassError


class Scorer(Protocol):
    """What the metrics need from a model, whatever runs it."""

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def logits(self, ids: Sequence[int]) -> Any: ...  # (len(ids), vocab) float32
    def generate_ids(self, ids: Sequence[int], max_new_tokens: int) -> list[int]: ...
    def chat_prompt(self, text: str) -> str: ...


class HfScorer:
    """transformers fp32 on CPU; hf_adapter = base model + PEFT adapter (not merged)."""

    def __init__(self, model: ModelArtifact) -> None:
        from transformers import AutoTokenizer

        from orchestrator.passes.common import onnx_tools

        self.net = onnx_tools.load_hf_model(model.path, model.trust_remote_code)
        tok_dir = model.path
        if model.format == "hf_adapter":
            from peft import PeftModel

            if not model.adapter_path:
                raise PassError("Evaluate: an hf_adapter model needs adapter_path")
            self.net = PeftModel.from_pretrained(self.net, model.adapter_path).eval()
            if (Path(model.adapter_path) / "tokenizer_config.json").exists():
                tok_dir = model.adapter_path
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=model.trust_remote_code)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def logits(self, ids: Sequence[int]) -> Any:
        from orchestrator.passes.common import onnx_tools

        return onnx_tools.hf_logits(self.net, ids)

    def generate_ids(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
        import torch

        with torch.no_grad():
            out = self.net.generate(
                torch.tensor([list(ids)]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        return [int(i) for i in out[0, len(ids) :]]

    def chat_prompt(self, text: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )


def make_scorer(model: ModelArtifact, execution_provider: str) -> Any:
    """onnx_genai -> onnxruntime-genai; hf/hf_adapter -> transformers."""
    if model.format == "onnx_genai":
        from orchestrator.passes.common import onnx_tools

        return onnx_tools.GenaiModel(model.path, execution_provider)
    if model.format in ("hf", "hf_adapter"):
        return HfScorer(model)
    raise PassError(
        f"Evaluate: format {model.format!r} is not supported; evaluate an onnx_genai folder (ModelBuilder output) "
        "or an HF checkpoint"
    )
