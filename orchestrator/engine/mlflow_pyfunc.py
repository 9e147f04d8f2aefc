"""MLflow "model from code" file: the final model as a pyfunc that generates text.

Self-contained on purpose (it imports nothing from orch): MLflow copies this file next to the model, so
`mlflow.pyfunc.load_model(uri).predict(["prompt"])` works where orch is not installed.
"""

from __future__ import annotations

import os
from typing import Any

import mlflow.pyfunc
from mlflow.models import set_model


class GenerativeModel(mlflow.pyfunc.PythonModel):
    """predict(list of prompts) -> list of completions (greedy, max_new_tokens from params or 32)."""

    def load_context(self, context: Any) -> None:
        self.path = context.artifacts["model"]
        self.model_format = (context.model_config or {}).get("format", "onnx_genai")
        if self.model_format == "onnx_genai":
            import onnxruntime_genai as og

            self.og = og
            self.model = og.Model(self.path)
            self.tokenizer = og.Tokenizer(self.model)
            self.adapters = None  # an ExtractAdapters folder generates as the fine-tuned model, adapter active
            adapter = os.path.join(self.path, "adapter_weights.onnx_adapter")
            if os.path.isfile(adapter):
                self.adapters = og.Adapters(self.model)
                self.adapters.load(adapter, "adapter")
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.model = AutoModelForCausalLM.from_pretrained(self.path).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        prompts = list(model_input.iloc[:, 0]) if hasattr(model_input, "iloc") else list(model_input)
        max_new = int((params or {}).get("max_new_tokens", 32))
        return [self._generate(str(p), max_new) for p in prompts]

    def _generate(self, prompt: str, max_new: int) -> str:
        if self.model_format == "onnx_genai":
            og = self.og
            ids = self.tokenizer.encode(prompt)
            gp = og.GeneratorParams(self.model)
            gp.set_search_options(max_length=len(ids) + max_new, do_sample=False)
            gen = og.Generator(self.model, gp)
            if self.adapters is not None:
                gen.set_active_adapter(self.adapters, "adapter")
            gen.append_tokens(ids)
            while not gen.is_done():
                gen.generate_next_token()
            return self.tokenizer.decode(gen.get_sequence(0)[len(ids) :])
        import torch

        enc = self.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_new, do_sample=False)
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


set_model(GenerativeModel())
