"""MergeAdapterWeights on a real tiny Phi-3 and a really trained LoRA adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.core.job import Job, ModelArtifact
from orchestrator.passes.base import PassContext, PassError
from orchestrator.passes.models.tiny_model import build_tiny_phi3
from orchestrator.passes.training.lora.train import LoRAConfig, LoRAPass
from orchestrator.passes.training.merge import MergeAdapterWeightsPass, MergeConfig

TEXTS = [
    f"### Text: phrase number {i} is {'happy' if i % 2 else 'sad'}\n### The tone is:\n{'Joy' if i % 2 else 'Sad'}"
    for i in range(64)
]


def make_ctx(out_dir: Path, pass_type: str) -> PassContext:
    return PassContext(
        job=Job(job_id="t", pass_name=pass_type, pass_type=pass_type, output_dir=str(out_dir)), out_dir=out_dir
    )


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_phi3(tmp_path_factory.mktemp("merge") / "phi3", texts=TEXTS)


@pytest.fixture(scope="session")
def adapter_artifact(base: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    """A LoRA adapter trained for a few steps (an untrained one has lora_B = 0 and merges to the base)."""
    from datasets import Dataset

    out = tmp_path_factory.mktemp("lora")
    config = LoRAConfig(
        train_data_config="d",
        lora_r=4,
        training_args={
            "max_steps": 6,
            "learning_rate": 5e-3,
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1,
        },
    )
    spec = SimpleNamespace(max_len=48, pad_to_max_len=False, corpus_join=False, use_attention_mask=False,
                           strategy="line-by-line", max_samples=None, random_seed=None, stride=None)  # fmt: skip
    res = LoRAPass().train(
        config,
        ModelArtifact(format="hf", path=str(base)),
        make_ctx(out, "LoRA"),
        Dataset.from_dict({"text": TEXTS}),
        None,
        spec,
    )
    return res.model.with_root(out)


def logits(model_dir: Path, ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def test_merge_changes_targeted_weights_and_matches_peft(tmp_path: Path, base: Path, adapter_artifact) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = MergeAdapterWeightsPass().run(MergeConfig(), adapter_artifact, make_ctx(tmp_path, "MergeAdapterWeights"))
    assert out.model == ModelArtifact(format="hf", path="model")
    merged_dir = tmp_path / "model"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (merged_dir / name).is_file(), name
    assert out.metrics["changed_tensors"] == 8  # 2 layers x (qkv_proj, o_proj, gate_up_proj, down_proj)
    assert out.metrics["max_abs_delta"] > 0

    before, after = load_file(base / "model.safetensors"), load_file(merged_dir / "model.safetensors")
    assert before.keys() == after.keys()
    diff = {k for k in before if not torch.equal(before[k], after[k])}
    targeted = {k for k in before if k.rsplit(".", 2)[-2] in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}
    assert diff == targeted and len(diff) == 8  # the adapted layers changed, nothing else did

    ids = list(range(5, 25))
    merged_logits, base_logits = logits(merged_dir, ids), logits(base, ids)
    assert (merged_logits - base_logits).abs().max() > 1e-4
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_artifact.adapter_path)
    with torch.no_grad():
        peft_logits = peft_model.eval()(torch.tensor([ids])).logits
    assert torch.allclose(merged_logits, peft_logits, atol=1e-4)  # merged == base + adapter at inference


def test_untrained_adapter_is_a_noop_error(tmp_path: Path, base: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["qkv_proj"]))
    fresh.save_pretrained(tmp_path / "adapter")
    artifact = ModelArtifact(format="hf_adapter", path=str(base), adapter_path=str(tmp_path / "adapter"))
    out = tmp_path / "out"
    with pytest.raises(PassError, match="^adapter is a no-op"):
        MergeAdapterWeightsPass().run(MergeConfig(), artifact, make_ctx(out, "MergeAdapterWeights"))
    assert not (out / "model").exists()


def test_quantized_base_refused(tmp_path: Path, base: Path, adapter_artifact: ModelArtifact) -> None:
    qbase = tmp_path / "awq"
    shutil.copytree(base, qbase)
    cfg = json.loads((qbase / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (qbase / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    for artifact in (
        adapter_artifact.model_copy(update={"path": str(qbase)}),
        adapter_artifact.model_copy(update={"quantized": True}),
    ):
        with pytest.raises(PassError, match="^merge needs an unquantized base model: load the fp16/fp32 base"):
            MergeAdapterWeightsPass().run(MergeConfig(), artifact, make_ctx(out, "MergeAdapterWeights"))
    assert not out.exists()
    with pytest.raises(PassError, match="needs an hf_adapter model"):
        MergeAdapterWeightsPass().run(MergeConfig(), ModelArtifact(format="hf", path=str(base)), make_ctx(out, "M"))
