"""LoRA / QLoRA pass on a real tiny Phi-3 (real torch / peft / trl training on CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.core.job import Job, ModelArtifact
from orchestrator.passes.base import PassContext, PassError
from orchestrator.passes.models.tiny_model import build_tiny_phi3
from orchestrator.passes.registry import load_pass
from orchestrator.passes.training.lora.train import LoRAConfig, LoRAPass, QLoRAPass, tokenize

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "### Text: {phrase}\n### The tone is:\n{tone}"


def tone_rows(n: int) -> list[dict[str, str]]:
    spec = importlib.util.spec_from_file_location("make_dataset", REPO / "jobs/tone-classification/make_dataset.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make_rows(n)


@pytest.fixture(scope="session")
def tone_texts() -> list[str]:
    return [TEMPLATE.format(**r) for r in tone_rows(240)]


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory: pytest.TempPathFactory, tone_texts: list[str]) -> Path:
    return build_tiny_phi3(tmp_path_factory.mktemp("base") / "phi3", texts=tone_texts)


def make_ctx(out_dir: Path, model: Path, pass_type: str = "LoRA") -> PassContext:
    job = Job(
        job_id="t",
        pass_name="lora",
        pass_type=pass_type,
        model=ModelArtifact(format="hf", path=str(model)),
        output_dir=str(out_dir),
    )
    return PassContext(job=job, out_dir=out_dir)


def spec(max_len: int = 64, join: bool = False, pad: bool = False) -> SimpleNamespace:
    return SimpleNamespace(max_len=max_len, pad_to_max_len=pad, corpus_join=join, use_attention_mask=False,
                           strategy="join" if join else "line-by-line", max_samples=None, random_seed=None,
                           stride=None, add_special_tokens=None, chat=False)  # fmt: skip


def events(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "events.jsonl").read_text().splitlines()]


def train_tiny(out_dir: Path, model: Path, texts: list[str], **training_args) -> tuple:
    from datasets import Dataset

    config = LoRAConfig(
        train_data_config="tone",
        lora_r=8,
        lora_alpha=16,
        training_args={
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "learning_rate": 5e-3,
            "logging_steps": 5,
            **training_args,
        },
    )
    artifact = ModelArtifact(format="hf", path=str(model))
    train, evalset = Dataset.from_dict({"text": texts[:200]}), Dataset.from_dict({"text": texts[200:]})
    out = LoRAPass().train(config, artifact, make_ctx(out_dir, model), train, evalset, spec())
    return config, out


def test_lora_trains_and_streams_metrics(tmp_path: Path, tiny_phi3: Path, tone_texts: list[str]) -> None:
    _, out = train_tiny(tmp_path, tiny_phi3, tone_texts, max_steps=30, eval_strategy="steps", eval_steps=15)

    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "tokenizer.json").is_file()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}  # all linear but lm_head
    assert out.model == ModelArtifact(format="hf_adapter", path=str(tiny_phi3.resolve()), adapter_path="adapter")

    ev = events(tmp_path)
    losses = [(e["step"], e["value"]) for e in ev if e["type"] == "metric" and e["name"] == "train_loss"]
    assert len(losses) >= 5 and losses[0][0] == 1
    assert losses[-1][1] < losses[0][1] - 0.5 and losses[-1][1] < min(v for _, v in losses[:3]), losses
    names = {e["name"] for e in ev if e["type"] == "metric"}
    assert {"train_loss", "eval_loss", "learning_rate", "grad_norm"} <= names
    evals = [e["step"] for e in ev if e["type"] == "metric" and e["name"] == "eval_loss"]
    assert 15 in evals and 30 in evals
    progress = [e for e in ev if e["type"] == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] == 30 and progress[-1]["desc"] == "LoRA"

    m = out.metrics
    assert {"train_loss", "eval_loss", "eval_perplexity", "train_runtime_s", "tokens_per_s", "trainable_params"} <= set(
        m
    )
    assert m["eval_perplexity"] == pytest.approx(__import__("math").exp(m["eval_loss"]))
    assert m["trainable_params"] > 0 and m["tokens_per_s"] > 0
    # tokens counted are real tokens only: 30 steps x 8 sequences of at most 64 tokens
    assert 30 * 8 * 10 < m["train_tokens"] <= 30 * 8 * 64
    assert not (tmp_path / "checkpoints").exists()


def test_lora_run_from_olive_data_config(tmp_path: Path, tiny_phi3: Path) -> None:
    """The seed tutorial's data config + `olive finetune --train_split/--eval_split`, through run()."""
    data = tmp_path / "data" / "dataset-classification.json"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in tone_rows(100)))
    data_config = {
        "name": "dataset_default_train",
        "type": "HuggingfaceContainer",
        "load_dataset_config": {"data_name": "json", "data_files": str(data), "split": "train"},
        "pre_process_data_config": {
            "dataset_type": "corpus",
            "text_cols": ["phrase", "tone"],
            "text_template": TEMPLATE,
            "corpus_strategy": "join",
            "source_max_len": 64,
            "pad_to_max_len": False,
            "use_attention_mask": False,
        },
    }
    config = LoRAConfig.model_validate(
        {
            "target_modules": ["o_proj", "qkv_proj"],
            "lora_r": 8,
            "lora_alpha": 16,
            "train_data_config": "dataset_default_train",
            "train_split": "train[:80%]",
            "eval_split": "train[80%:]",
            "training_args": {
                "max_steps": 6,
                "learning_rate": 5e-3,
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 1,
                "evaluation_strategy": "steps",  # Olive's old name
                "eval_steps": 3,
                "report_to": "azure_ml",
            },
        }
    )
    out_dir = tmp_path / "out"
    job = Job(
        job_id="t",
        pass_name="lora",
        pass_type="LoRA",
        model=ModelArtifact(format="hf", path=str(tiny_phi3)),
        data_configs={"dataset_default_train": data_config},
        output_dir=str(out_dir),
    )
    out = LoRAPass().run(config, job.model, PassContext(job=job, out_dir=out_dir))
    cfg = json.loads((out_dir / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["o_proj", "qkv_proj"]
    ev = events(out_dir)
    assert any("evaluation_strategy -> eval_strategy" in e.get("message", "") for e in ev)
    assert [e["step"] for e in ev if e.get("name") == "eval_loss"][:2] == [3, 6]
    assert out.metrics["eval_loss"] > 0 and out.metrics["train_steps"] == 6
    # joined corpus: 64-token blocks, 4 a step; at most one of them (the corpus tail) is shorter
    assert 6 * 4 * 64 - 63 <= out.metrics["train_tokens"] <= 6 * 4 * 64


def test_lora_is_reproducible(tmp_path: Path, tiny_phi3: Path, tone_texts: list[str]) -> None:
    from safetensors.torch import load_file

    a = train_tiny(tmp_path / "a", tiny_phi3, tone_texts, max_steps=4, seed=7, data_seed=7)[1].metrics
    b = train_tiny(tmp_path / "b", tiny_phi3, tone_texts, max_steps=4, seed=7, data_seed=7)[1].metrics
    assert a["train_loss"] == b["train_loss"]
    wa = load_file(tmp_path / "a/adapter/adapter_model.safetensors")
    wb = load_file(tmp_path / "b/adapter/adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_missing_target_modules_refused_before_training(tmp_path: Path, tiny_phi3: Path) -> None:
    config = LoRAConfig(train_data_config="tone", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with pytest.raises(PassError) as err:
        LoRAPass().run(config, ModelArtifact(format="hf", path=str(tiny_phi3)), make_ctx(tmp_path, tiny_phi3))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("target_modules q_proj, k_proj, v_proj are not in this model (Phi3ForCausalLM)")
    listed = msg.split("its linear modules are: ")[1].split(".")[0].split(", ")
    assert sorted(listed) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]  # never lm_head
    assert "fuses q/k/v into qkv_proj" in msg
    assert list(tmp_path.iterdir()) == []


def test_qlora_refused_without_cuda(tmp_path: Path, tiny_phi3: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    artifact = ModelArtifact(format="hf", path=str(tiny_phi3))
    for pass_cls, cfg in [
        (QLoRAPass, {"train_data_config": "tone"}),
        (LoRAPass, {"train_data_config": "tone", "double_quant": True}),  # the seed's LoRA + double_quant
        (LoRAPass, {"train_data_config": "tone", "load_in_4bit": True}),
    ]:
        config = pass_cls.Config.model_validate(cfg)
        assert pass_cls().requirements(config).cuda
        with pytest.raises(PassError, match=r"^QLoRA needs a CUDA GPU \(bitsandbytes 4-bit\); this machine has none"):
            pass_cls().run(config, artifact, make_ctx(out, tiny_phi3, pass_cls.type_name))
    assert list(out.iterdir()) == []


def test_config_takes_olive_names() -> None:
    assert load_pass("LoRA") is LoRAPass and load_pass("QLoRA") is QLoRAPass
    seed_cfg = {  # the seed tutorial's "lora" pass config, verbatim
        "target_modules": ["o_proj", "qkv_proj"],
        "double_quant": True,
        "lora_r": 64,
        "lora_alpha": 64,
        "lora_dropout": 0.1,
        "train_data_config": "dataset_default_train",
        "eval_dataset_size": 0.3,
        "training_args": {"seed": 0, "data_seed": 42, "evaluation_strategy": "steps", "eval_steps": 187},
    }
    cfg = LoRAConfig.model_validate(seed_cfg)
    assert cfg.four_bit and cfg.lora_alpha == 64 and cfg.eval_dataset_size == 0.3
    assert LoRAConfig.model_validate({"train_data_config": "d", "r": 16, "alpha": 32}).lora_r == 16  # newer Olive
    with pytest.raises(ValueError, match="lora_rank"):
        LoRAConfig.model_validate({"train_data_config": "d", "lora_rank": 8})


def test_report_to_values(tmp_path: Path) -> None:
    from orchestrator.passes.training.lora.train import build_training_args

    for value in ("azure_ml", "mlflow", "none", ["azure_ml"]):
        args, _, _ = build_training_args(
            LoRAConfig(train_data_config="d", training_args={"report_to": value}),
            tmp_path,
            cuda=False,
            qlora=False,
            has_eval=False,
        )
        assert args["report_to"] == "none" and args["use_cpu"]
    with pytest.raises(PassError, match="report_to 'wandb'"):
        build_training_args(
            LoRAConfig(train_data_config="d", training_args={"report_to": "wandb"}),
            tmp_path,
            cuda=False,
            qlora=False,
            has_eval=False,
        )


def test_tokenize_join_and_truncate(tiny_phi3: Path, tone_texts: list[str]) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_phi3)
    ds = Dataset.from_dict({"text": tone_texts[:50]})
    joined = tokenize(ds, tok, spec(max_len=32, join=True))["input_ids"]
    assert all(len(b) == 32 for b in joined[:-1]) and len(joined[-1]) <= 32
    n_tokens = sum(len(tok(t)["input_ids"]) + 1 for t in tone_texts[:50])  # + EOS each
    assert sum(map(len, joined)) == n_tokens
    cut = tokenize(ds, tok, spec(max_len=8))["input_ids"]
    assert len(cut) == 50 and all(len(b) == 8 for b in cut)


def test_checkpointing_is_spelled_for_the_installed_transformers() -> None:
    """transformers <= 5.17 knows only gradient_checkpointing*: the pass must not hand it the new names."""
    import dataclasses

    from trl import SFTConfig

    from orchestrator.passes.training.lora.train import checkpointing_names_for

    @dataclasses.dataclass
    class OldTrainingArguments:  # the field names of transformers 5.17's TrainingArguments that matter here
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    kwargs = {"activation_checkpointing": True, "activation_checkpointing_kwargs": {"use_reentrant": False}}
    assert checkpointing_names_for(OldTrainingArguments, kwargs) == {
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
    }
    assert checkpointing_names_for(SFTConfig, kwargs) == kwargs  # the pinned transformers knows the new names
    SFTConfig(output_dir="unused", use_cpu=True, bf16=False, **checkpointing_names_for(SFTConfig, kwargs))


def test_gpu_accelerator_without_cuda_trains_lora_on_cpu_and_keeps_the_best(tmp_path: Path, tiny_phi3: Path) -> None:
    """Olive's open_llama LoRA (c05): accelerators [gpu], load_best_model_at_end with eval/save every N steps."""
    import torch
    from datasets import Dataset

    if torch.cuda.is_available():
        pytest.skip("the note is for machines without CUDA")
    texts = [TEMPLATE.format(**r) for r in tone_rows(40)]
    config = LoRAConfig(
        train_data_config="tone",
        lora_r=4,
        training_args={"per_device_train_batch_size": 8, "max_steps": 4, "eval_strategy": "steps",
                       "eval_steps": 2, "save_steps": 2, "load_best_model_at_end": True},
    )  # fmt: skip
    base = make_ctx(tmp_path, tiny_phi3)
    ctx = PassContext(job=base.job.model_copy(update={"accelerator": "gpu"}), out_dir=tmp_path)
    artifact = ModelArtifact(format="hf", path=str(tiny_phi3))
    train, evalset = Dataset.from_dict({"text": texts[:32]}), Dataset.from_dict({"text": texts[32:]})
    out = LoRAPass().train(config, artifact, ctx, train, evalset, spec())
    assert out.model is not None and out.model.adapter_path is not None
    assert (tmp_path / out.model.adapter_path / "adapter_model.safetensors").is_file()
    logs = [e["message"] for e in events(tmp_path) if e["type"] == "log"]
    assert any("accelerator gpu asked, no CUDA here: training on CPU" in m for m in logs), logs
    assert any(m.startswith("save_strategy 'steps' (as eval_strategy): load_best_model_at_end") for m in logs)
    assert any(e["type"] == "metric" and e["name"] == "eval_loss" for e in events(tmp_path))  # (was ValueError)
