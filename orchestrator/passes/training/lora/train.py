"""LoRA / QLoRA fine-tuning (Olive's "LoRA" and "QLoRA" passes) on peft + TRL's SFTTrainer.

The pass reads Olive's config names as-is (lora_r, lora_alpha, double_quant, training_args with Olive's old
TrainingArguments names), trains an adapter and writes `adapter/` (PEFT adapter + tokenizer); the base model is
not copied: the output artifact points at it. It is written so that `torchrun --nproc_per_node N` runs it
unchanged: the Trainer does the DDP work, rank 0 alone writes files and reports metrics.
torch / transformers / peft / trl are imported inside functions only (the registry imports this module).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from pydantic import AliasChoices, Field, model_validator

from orchestrator.core.fs import atomic_dir
from orchestrator.core.job import ModelArtifact
from orchestrator.core.prompt import PromptFormat
from orchestrator.passes.base import (
    HeldOut,
    Pass,
    PassConfig,
    PassContext,
    PassError,
    PassOutput,
    Requirements,
    SplitRef,
)
from orchestrator.passes.common import text_blocks
from orchestrator.passes.training.lora.checkpointing import (
    LOG_METRICS,
    CheckpointPolicy,
    checkpoint_callback,
    checkpoint_policy,
    find_resume_point,
    logged_history,
    loss_sum_before,
)

ADAPTER_DIR = "adapter"
QLORA_NO_CUDA = (
    "QLoRA needs a CUDA GPU (bitsandbytes 4-bit); this machine has none. Use LoRA (drop double_quant / "
    "load_in_4bit) or run on a GPU system (--host aml with accelerators [gpu])"
)
# Olive's HFTrainingArguments defaults (QLoRA-paper values), applied where the user's training_args say nothing, so
# an Olive workflow trains the same here. Differences: no max_steps=10000 (num_train_epochs governs unless set),
# optim adamw_torch for LoRA (paged optimizers need bitsandbytes), gradient checkpointing on for QLoRA only.
OLIVE_TRAINING_DEFAULTS: dict[str, Any] = {
    "seed": 42,
    "data_seed": 42,
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1,
    "gradient_accumulation_steps": 16,
    "weight_decay": 0.0,
    "learning_rate": 2e-4,
    "lr_scheduler_type": "constant",  # Olive's warmup_ratio 0.03 is a no-op with a constant schedule
    "logging_steps": 10,
}
# report_to values users put in Olive configs. orch always forwards metrics itself (events.jsonl -> MLflow, or
# the Azure ML run's MLflow), so none of them may make transformers import azureml / mlflow integrations.
REPORT_TO_ACCEPTED = ("azure_ml", "azureml", "mlflow", "none")
# Fused projections of known architectures, for the "target_modules not in this model" hint.
FUSED_HINTS = {"qkv_proj": "q/k/v into qkv_proj", "gate_up_proj": "gate/up into gate_up_proj"}
TORCH_DTYPES = Literal["bfloat16", "float16", "float32"]


class TextSpec(Protocol):
    """The part of orchestrator.passes.common.data.TextDataSpec this pass reads."""

    max_len: int
    pad_to_max_len: bool
    corpus_join: bool
    use_attention_mask: bool
    strategy: str
    max_samples: int | None
    random_seed: int | None
    stride: int | None
    add_special_tokens: bool | None
    chat: bool


MAX_LORA_RANK = 65536  # no layer of any language model is wider: a larger rank cannot be a LoRA


class LoRAConfig(PassConfig):
    """Olive's LoRA / QLoRA pass config (the names users already have in their workflow files)."""

    target_modules: list[str] | None = None  # None: every linear layer except the LM head
    # Sane ranges, not only positive: a rank of 2**31 fails deep inside peft with a message naming no field.
    lora_r: int = Field(64, gt=0, le=MAX_LORA_RANK, validation_alias=AliasChoices("lora_r", "r"))
    lora_alpha: float = Field(16, gt=0, le=1e6, validation_alias=AliasChoices("lora_alpha", "alpha"))
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None
    torch_dtype: TORCH_DTYPES = "bfloat16"  # CUDA only; CPU always trains in float32
    allow_tf32: bool = True
    ephemeral_gpu_offload: bool = False
    device_map: Literal["auto", "current_device"] | None = None  # Olive's; see LoRAPass.config_notes
    use_dora: bool = False  # peft's DoRA (weight-decomposed LoRA); Olive's DoRA pass sets it
    use_rslora: bool = False  # peft's rank-stabilized scaling (alpha / sqrt(r))
    # 4-bit (QLoRA) settings: any of load_in_4bit / double_quant on a "LoRA" pass makes it QLoRA.
    load_in_4bit: bool = False
    double_quant: bool = False
    quant_type: Literal["nf4", "fp4"] = "nf4"
    compute_dtype: TORCH_DTYPES | None = None
    # data
    train_data_config: str
    eval_data_config: str | None = None
    eval_dataset_size: int | float | None = Field(None, gt=0)
    train_split: str | None = None  # `olive finetune --train_split "train[:80%]"`
    eval_split: str | None = None
    training_args: dict[str, Any] = Field(default_factory=dict)
    # orch's resume checkpoints (passes/training/lora/checkpointing.py), used when training_args set no save_strategy /
    # save_steps: a checkpoint every N minutes and/or every N steps into Job.checkpoint_dir, the newest K kept.
    checkpoint_every_minutes: float | None = Field(10.0, gt=0)
    checkpoint_every_steps: int | None = Field(None, gt=0)
    checkpoints_kept: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check(self) -> LoRAConfig:
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is empty: leave it out to target every linear layer")
        from orchestrator.passes.training.lora.training_args import normalize_training_args

        normalize_training_args(dict(self.training_args))  # unknown keys fail at config time, not on the GPU
        return self

    @property
    def four_bit(self) -> bool:
        return self.load_in_4bit or self.double_quant


class LycorisConfig(LoRAConfig):
    """Olive's LoHa / LoKr fields (olive/passes/pytorch/lora.py's _lora_variant_config), peft's names."""

    lora_alpha: float = Field(16, gt=0, validation_alias=AliasChoices("alpha", "lora_alpha"))
    rank_dropout: float = Field(0.0, ge=0, lt=1)
    module_dropout: float = Field(0.0, ge=0, lt=1)
    use_effective_conv2d: bool = True
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _no_4bit(self) -> LycorisConfig:
        if self.four_bit:
            raise ValueError("LoHa / LoKr train on a full-precision base: drop load_in_4bit / double_quant")
        return self


class LoKrConfig(LycorisConfig):
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False


class LoRAPass(Pass):
    """Train a LoRA adapter; output format hf_adapter (path = the input base, adapter_path = adapter/)."""

    type_name: ClassVar[str] = "LoRA"
    Config: ClassVar[type[PassConfig]] = LoRAConfig
    version: ClassVar[str] = "1"
    libraries: ClassVar[tuple[str, ...]] = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")

    @classmethod
    def held_out(cls, config: dict[str, Any]) -> HeldOut | None:
        """eval_dataset_size rows carved off train_data_config with training_args.data_seed."""
        if not config.get("train_data_config") or not config.get("eval_dataset_size"):
            return None
        seed = int((config.get("training_args") or {}).get("data_seed", OLIVE_TRAINING_DEFAULTS["data_seed"]))
        return HeldOut(config["train_data_config"], config["eval_dataset_size"], seed)

    @classmethod
    def split_refs(cls, config: dict[str, Any]) -> list[SplitRef]:
        data = config.get("train_data_config")
        return [SplitRef(key, config.get(key), data) for key in ("train_split", "eval_split")]

    @classmethod
    def key_config(cls, config: PassConfig) -> dict[str, Any]:
        """The cache key leaves out when and where checkpoints are written (orch's checkpoint_* keys, the training
        args' save_* keys): they change no weight of the adapter, and a changed interval must still resume the
        killed run of the same pass. With load_best_model_at_end the save steps pick the adapter: they stay in."""
        from orchestrator.passes.training.lora.checkpointing import ORCH_CHECKPOINT_KEYS, key_training_args

        data = config.model_dump(mode="json")
        for name in ORCH_CHECKPOINT_KEYS:
            data.pop(name, None)
        data["training_args"] = key_training_args(data.get("training_args") or {})
        return data

    @classmethod
    def config_notes(cls, config: PassConfig) -> list[str]:
        """Olive fields accepted with what they mean here, said when the config is read."""
        assert isinstance(config, LoRAConfig)
        if config.device_map is None:
            return []
        return [
            f"device_map {config.device_map!r}: each training process loads the whole model onto its own device "
            "(Olive's current_device); layers are not spread over several GPUs"
        ]

    always_4bit: ClassVar[bool] = False
    dora: ClassVar[bool] = False  # the DoRA pass: LoRA with use_dora
    data_parallel: ClassVar[bool] = True  # DDP through the Trainer (torchrun / Azure ML PyTorch distribution)

    def is_qlora(self, config: LoRAConfig) -> bool:
        return self.always_4bit or config.four_bit

    def requirements(self, config: PassConfig) -> Requirements:
        assert isinstance(config, LoRAConfig)
        if self.is_qlora(config):
            return Requirements(cuda=True, environment="gpu-train", without_cuda=QLORA_NO_CUDA)
        return Requirements(environment="cpu-train")

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, LoRAConfig)
        import torch

        # Refusals that need nothing loaded come first: no weights read, nothing written.
        if self.is_qlora(config) and not torch.cuda.is_available():
            raise PassError(QLORA_NO_CUDA)
        if model is None or model.format != "hf":
            got = "no model" if model is None else f"a {model.format} model"
            hint = " (merge it first: MergeAdapterWeights)" if model and model.format == "hf_adapter" else ""
            raise PassError(f"{self.type_name} needs an HF checkpoint (format hf) as input, got {got}{hint}")
        targets = resolve_target_modules(model, config.target_modules)
        train_ds, eval_ds, spec = self.load_data(config, ctx, tokenizer=str(Path(model.path).resolve()))
        from orchestrator.passes.common.data import prompt_format

        source = f"{self.type_name} pass {ctx.job.pass_name!r}, data config {config.train_data_config!r}"
        prompt = prompt_format(ctx.job.data_configs[config.train_data_config], source)
        return self.train(config, model, ctx, train_ds, eval_ds, spec, targets=targets, prompt=prompt)

    def load_data(
        self, config: LoRAConfig, ctx: PassContext, tokenizer: str | None = None
    ) -> tuple[Any, Any, TextSpec]:
        """Train/eval splits from the job's data configs (orchestrator.passes.common.data does loading and templating;
        `tokenizer`, the base model's folder, renders chat rows with its chat template)."""
        from orchestrator.passes.common.data import load_splits, text_spec

        data_configs = ctx.job.data_configs
        for name in (config.train_data_config, config.eval_data_config):
            if name is not None and name not in data_configs:
                known = ", ".join(sorted(data_configs)) or "none"
                raise PassError(f"data config {name!r} is not in the workflow's data_configs (known: {known})")
        seed = int(config.training_args.get("data_seed", OLIVE_TRAINING_DEFAULTS["data_seed"]))
        base_dir = None  # relative data paths resolve against the working directory (the systems make them absolute)
        train_dc = data_configs[config.train_data_config]
        train_ds, eval_ds = load_splits(
            train_dc,
            base_dir=base_dir,
            eval_dataset_size=None if config.eval_data_config else config.eval_dataset_size,
            train_split=config.train_split,
            eval_split=None if config.eval_data_config else config.eval_split,
            seed=seed,
            data_files_override=ctx.job.data_files.get(config.train_data_config),
            tokenizer=tokenizer,
        )
        if config.eval_data_config:
            eval_ds, _ = load_splits(
                data_configs[config.eval_data_config],
                base_dir=base_dir,
                train_split=config.eval_split,
                seed=seed,
                data_files_override=ctx.job.data_files.get(config.eval_data_config),
                tokenizer=tokenizer,
            )
        return train_ds, eval_ds, text_spec(train_dc)

    def train(
        self,
        config: LoRAConfig,
        model: ModelArtifact,
        ctx: PassContext,
        train_ds: Any,
        eval_ds: Any,
        spec: TextSpec,
        *,
        targets: list[str] | None = None,
        prompt: PromptFormat | None = None,
    ) -> PassOutput:
        """Train on datasets with a templated "text" column; write adapter/ (rank 0) and return the artifact.
        `prompt` (the format of the training texts) is saved beside the adapter for generation."""
        import torch
        import transformers
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        qlora = self.is_qlora(config)
        if qlora and not torch.cuda.is_available():
            raise PassError(QLORA_NO_CUDA)
        if targets is None:
            targets = resolve_target_modules(model, config.target_modules)
        cuda = torch.cuda.is_available()
        base_path = str(Path(model.path).resolve())
        sft_kwargs, notes, policy = build_training_args(
            config, ctx.out_dir, cuda=cuda, qlora=qlora, has_eval=eval_ds is not None,
            checkpoint_dir=ctx.job.checkpoint_dir,
        )  # fmt: skip
        rank0 = int(os.environ.get("RANK", "0")) == 0
        info = ctx.info if rank0 else (lambda _msg: None)
        if ctx.job.accelerator == "gpu" and not cuda:  # QLoRA was refused above; a LoRA adapter is the same on CPU
            info(f"{self.type_name}: accelerator gpu asked, no CUDA here: training on CPU (the same adapter, slower)")
        for note in notes:
            info(note)

        tokenizer = AutoTokenizer.from_pretrained(base_path, trust_remote_code=model.trust_remote_code)
        if tokenizer.pad_token is None:  # no resize: the embeddings stay frozen and out of the adapter
            tokenizer.pad_token = tokenizer.eos_token
        train_tok = tokenize(train_ds, tokenizer, spec)
        eval_tok = tokenize(eval_ds, tokenizer, spec) if eval_ds is not None else None
        if spec.pad_to_max_len:
            sft_kwargs["pad_to_multiple_of"] = spec.max_len  # every sequence is <= max_len: pads to exactly it

        load_kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
        if qlora:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise PassError("QLoRA needs bitsandbytes: pip install bitsandbytes==0.50.2") from None
            from transformers import BitsAndBytesConfig

            load_kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=config.quant_type,
                bnb_4bit_use_double_quant=config.double_quant,
                bnb_4bit_compute_dtype=getattr(torch, config.compute_dtype or "bfloat16"),
            )
            load_kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}  # one full copy per rank
            load_kwargs["dtype"] = getattr(torch, config.compute_dtype or "bfloat16")
        elif cuda:
            torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
            # float16 weights are unstable to train: keep fp32 master weights and use fp16 autocast instead.
            load_kwargs["dtype"] = (
                torch.float32 if config.torch_dtype == "float16" else getattr(torch, config.torch_dtype)
            )
            if config.torch_dtype == "float16":
                sft_kwargs.setdefault("fp16", True)
        else:
            load_kwargs["dtype"] = torch.float32
        transformers.set_seed(sft_kwargs["seed"])  # the LoRA A matrices are drawn at get_peft_model
        base = AutoModelForCausalLM.from_pretrained(base_path, **load_kwargs)
        if qlora:
            from peft import prepare_model_for_kbit_training

            base = prepare_model_for_kbit_training(
                base, use_gradient_checkpointing=bool(sft_kwargs.get("activation_checkpointing"))
            )
        peft_model = get_peft_model(base, self.peft_config(config, targets))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in peft_model.parameters())
        if cuda:
            sft_kwargs = self.cuda_fast_path(peft_model, sft_kwargs, train_tok, info)
        if rank0:
            ctx.log_param("target_modules", ",".join(targets))
            ctx.log_param("lora_r", config.lora_r)
            ctx.log_param("lora_alpha", config.lora_alpha)
            ctx.log_param("base_quantization", f"bnb-4bit-{config.quant_type}" if qlora else "none")
            ctx.log_param("device", "cuda" if cuda else "cpu")
        info(
            f"{self.type_name}: r={config.lora_r} alpha={config.lora_alpha} on {', '.join(targets)}; "
            f"{trainable:,} trainable of {total:,} parameters; {len(train_tok)} train / "
            f"{len(eval_tok) if eval_tok is not None else 0} eval sequences of <= {spec.max_len} tokens"
        )

        resume = sft_kwargs.pop("resume_from_checkpoint", None)
        found = find_resume_point(policy, writer=rank0)
        history: list[tuple[str, float, int]] = []
        if found is not None:  # a killed / preempted attempt of this very key left it: continue from there
            resume_step, resume_path = found
            resume = str(resume_path)
            history = logged_history(resume_path)
            if rank0:
                ctx.resumed(resume_step, history)
            info(f"{self.type_name}: resumed from step {resume_step} ({resume_path.name}, {policy.root})")
        trainer_cls = SFTTrainer
        if cuda:
            from orchestrator.passes.training.lora import cuda as lora_cuda
            from orchestrator.passes.training.lora import step_trainer

            # the plan cuda_fast_path just applied: its loss choice needs a trainer subclass
            trainer_cls = step_trainer.sft_trainer_class(SFTTrainer, lora_cuda.LAST_PLAN)
        trainer = trainer_cls(
            model=peft_model,
            args=SFTConfig(**checkpointing_names_for(SFTConfig, sft_kwargs)),
            train_dataset=train_tok,
            eval_dataset=eval_tok,
            processing_class=tokenizer,
            callbacks=[metrics_callback(ctx, self.type_name), checkpoint_callback(policy, info)],
        )
        result = trainer.train(resume_from_checkpoint=resume)
        runtime = float(result.metrics.get("train_runtime", 0.0))
        tokens = float(trainer.state.num_input_tokens_seen)
        steps = int(trainer.state.global_step)
        train_loss = float(result.training_loss)
        tokens_now = tokens
        if found is not None:  # the Trainer reports this attempt's steps only: the whole run's mean loss
            resumed_at = found[0]
            train_loss = (loss_sum_before(history) + train_loss * (steps - resumed_at)) / max(steps, 1)
            tokens_now = tokens - float(getattr(trainer, "_initial_num_input_tokens_seen", 0) or 0)
        metrics: dict[str, float] = {
            "train_loss": train_loss,
            "train_runtime_s": runtime,
            "train_tokens": tokens,
            "tokens_per_s": tokens_now / runtime if runtime > 0 else 0.0,  # this attempt's own speed
            "train_steps": float(trainer.state.global_step),
            "trainable_params": float(trainable),
            "world_size": float(trainer.args.world_size),  # data-parallel ranks: global batch = per-device x this
        }
        if qlora:
            metrics["base_4bit"] = 1.0
        if found is not None:
            metrics["resumed_from_step"] = float(found[0])
        if eval_tok is not None:
            eval_loss = float(trainer.evaluate()["eval_loss"])
            metrics["eval_loss"] = eval_loss
            metrics["eval_perplexity"] = math.exp(min(eval_loss, 50.0))

        if trainer.is_world_process_zero():
            save_adapter(trainer.model, tokenizer, ctx.out_dir / ADAPTER_DIR, prompt)
            # checkpoints of this attempt only die with it; Job.checkpoint_dir goes when the cache entry commits
            shutil.rmtree(ctx.out_dir / "checkpoints", ignore_errors=True)
            ctx.log_metrics(
                {k: v for k, v in metrics.items() if k in ("eval_perplexity", "tokens_per_s")},
                step=trainer.state.global_step,
            )
        trainer.accelerator.wait_for_everyone()
        artifact = ModelArtifact(
            format="hf_adapter",
            path=base_path,
            adapter_path=ADAPTER_DIR,
            task=model.task,
            trust_remote_code=model.trust_remote_code,
            quantized=model.quantized,  # the 4-bit QLoRA base is a load-time view: the base on disk is unchanged
        )
        return PassOutput(model=artifact, metrics=metrics)

    def peft_config(self, config: LoRAConfig, targets: list[str]) -> Any:
        """The peft adapter config this pass trains (LoRA; DoRA is LoRA with use_dora)."""
        from peft import LoraConfig
        from peft.tuners.lora import LoraRuntimeConfig

        return LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets,
            bias=config.bias,
            modules_to_save=config.modules_to_save,
            task_type="CAUSAL_LM",
            use_dora=config.use_dora or self.dora,
            use_rslora=config.use_rslora,
            runtime_config=LoraRuntimeConfig(ephemeral_gpu_offload=config.ephemeral_gpu_offload),
        )

    @staticmethod
    def cuda_fast_path(model: Any, sft_kwargs: dict[str, Any], train_tok: Any, info: Any) -> dict[str, Any]:
        """The GPU engineer's CUDA choices (orchestrator.passes.training.lora.cuda), with their reasons logged."""
        import inspect

        from orchestrator.passes.training.lora.cuda import cuda_overrides

        if "notes" in inspect.signature(cuda_overrides).parameters:
            notes: list[str] = []
            sft_kwargs = {**sft_kwargs, "orch_max_len": max(len(ids) for ids in train_tok["input_ids"])}
            out = cuda_overrides(model, sft_kwargs, notes=notes)
            for note in notes:
                info(f"cuda: {note}")
        else:
            out = cuda_overrides(model, sft_kwargs)
        for old in ("gradient_checkpointing", "gradient_checkpointing_kwargs"):  # its choice wins over ours
            if old in out:
                out[old.replace("gradient", "activation")] = out.pop(old)
        return out


def checkpointing_names_for(config_cls: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Spell gradient/activation checkpointing the way the installed transformers does.

    transformers renamed `gradient_checkpointing*` to `activation_checkpointing*` after 5.17; 5.17 and earlier
    (what many CUDA images ship) reject the new name, the later releases accept both.
    """
    import dataclasses

    known = {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else set()
    if not known or "activation_checkpointing" in known:
        return kwargs
    out = dict(kwargs)
    for new in ("activation_checkpointing", "activation_checkpointing_kwargs"):
        if new in out:
            out[new.replace("activation", "gradient")] = out.pop(new)
    return out


class QLoRAPass(LoRAPass):
    """Olive's QLoRA: the base is loaded in 4-bit (bitsandbytes nf4) for training; needs CUDA."""

    type_name: ClassVar[str] = "QLoRA"
    always_4bit: ClassVar[bool] = True


class DoRAPass(LoRAPass):
    """Olive's DoRA: weight-decomposed LoRA (peft's use_dora): a magnitude vector beside A/B per layer. It merges
    (MergeAdapterWeights) like LoRA; onnxruntime-genai cannot take it as separate adapter inputs."""

    type_name: ClassVar[str] = "DoRA"
    dora: ClassVar[bool] = True


class LoHaPass(LoRAPass):
    """Olive's LoHa (peft LoHaConfig): low-rank Hadamard products, trained like LoRA and merged for export."""

    type_name: ClassVar[str] = "LoHa"
    Config: ClassVar[type[PassConfig]] = LycorisConfig

    def peft_config(self, config: LoRAConfig, targets: list[str]) -> Any:
        from peft import LoHaConfig

        assert isinstance(config, LycorisConfig)
        return LoHaConfig(
            r=config.lora_r,
            alpha=config.lora_alpha,
            target_modules=targets,
            modules_to_save=config.modules_to_save,
            task_type="CAUSAL_LM",
            **self.lycoris_kwargs(config),
        )

    @staticmethod
    def lycoris_kwargs(config: LycorisConfig) -> dict[str, Any]:
        keys = (
            "rank_dropout",
            "module_dropout",
            "use_effective_conv2d",
            "exclude_modules",
            "init_weights",
            "layers_to_transform",
            "layers_pattern",
            "rank_pattern",
            "alpha_pattern",
        )
        return {k: getattr(config, k) for k in keys}


class LoKrPass(LoHaPass):
    """Olive's LoKr (peft LoKrConfig): Kronecker-product adapters, trained like LoRA and merged for export."""

    type_name: ClassVar[str] = "LoKr"
    Config: ClassVar[type[PassConfig]] = LoKrConfig

    def peft_config(self, config: LoRAConfig, targets: list[str]) -> Any:
        from peft import LoKrConfig as PeftLoKrConfig

        assert isinstance(config, LoKrConfig)
        return PeftLoKrConfig(
            r=config.lora_r,
            alpha=config.lora_alpha,
            target_modules=targets,
            modules_to_save=config.modules_to_save,
            task_type="CAUSAL_LM",
            decompose_both=config.decompose_both,
            decompose_factor=config.decompose_factor,
            rank_dropout_scale=config.rank_dropout_scale,
            **self.lycoris_kwargs(config),
        )


def resolve_target_modules(model: ModelArtifact, requested: list[str] | None) -> list[str]:
    """The module names to wrap, checked on a weightless (meta) copy of the model before anything trains.

    A target that matches nothing would make peft train a silently smaller adapter (or fail deep inside), so any
    missing name is an error that lists the linear modules the model does have.
    """
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=model.trust_remote_code)
    head = skeleton.get_output_embeddings()
    wrappable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)
    linear: list[str] = []
    wrappable_names: list[str] = []
    for name, module in skeleton.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's Conv1D
        if is_linear or isinstance(module, wrappable):
            wrappable_names.append(name)
        leaf = name.rsplit(".", 1)[-1]
        if is_linear and module is not head and leaf not in linear:
            linear.append(leaf)
    if requested is None or requested == ["all-linear"]:
        return linear
    missing = [t for t in requested if not any(n == t or n.endswith("." + t) for n in wrappable_names)]
    if missing:
        arch = (hf_config.architectures or [type(skeleton).__name__])[0]
        hints = [FUSED_HINTS[m] for m in FUSED_HINTS if m in linear]
        family = "Phi-3" if hf_config.model_type == "phi3" else f"This model ({hf_config.model_type})"
        hint = f" {family} fuses {' and '.join(hints)}." if hints else ""
        raise PassError(
            f"target_modules {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not in this model "
            f"({arch}); its linear modules are: {', '.join(linear)}.{hint}"
        )
    return list(requested)


def build_training_args(
    config: LoRAConfig, out_dir: Path, *, cuda: bool, qlora: bool, has_eval: bool, checkpoint_dir: str | None = None
) -> tuple[dict[str, Any], list[str], CheckpointPolicy]:
    """SFTConfig kwargs: the user's training_args (Olive names normalized), Olive's defaults, orch's fixed parts;
    and the checkpoint policy (checkpoint_dir: the job's folder that outlives the attempt, None for none)."""
    from orchestrator.passes.training.lora.training_args import TrainingArgsError, normalize_training_args

    try:
        args, notes = normalize_training_args(dict(config.training_args))
    except TrainingArgsError as exc:
        raise PassError(str(exc)) from None
    notes = list(notes)
    for key, value in OLIVE_TRAINING_DEFAULTS.items():
        args.setdefault(key, value)
    args.setdefault("optim", "paged_adamw_32bit" if qlora else "adamw_torch")
    # transformers 5 renamed gradient_checkpointing* to activation_checkpointing* (old names still accepted)
    for old in ("gradient_checkpointing", "gradient_checkpointing_kwargs"):
        new = old.replace("gradient", "activation")
        if old in args:
            args.setdefault(new, args.pop(old))
    if args.setdefault("activation_checkpointing", qlora):
        args.setdefault("activation_checkpointing_kwargs", {"use_reentrant": False})

    report_to = args.pop("report_to", None) or "none"
    for value in [report_to] if isinstance(report_to, str) else list(report_to):
        if value not in REPORT_TO_ACCEPTED:
            raise PassError(
                f"training_args.report_to {value!r} is not supported: orch sends the training metrics to MLflow / "
                f"Azure ML itself; use one of {', '.join(REPORT_TO_ACCEPTED)}"
            )
    if args.get("output_dir"):
        notes.append(f"training_args.output_dir {args['output_dir']!r} ignored: orch decides where checkpoints go")
    eval_strategy = str(args.get("eval_strategy", "no"))
    if not has_eval and eval_strategy != "no":
        notes.append(f"eval_strategy {eval_strategy!r} set to 'no': there is no eval data set")
        args["eval_strategy"] = "no"
    if cuda and qlora and args.get("fp16"):
        args.pop("fp16")  # compute dtype of the 4-bit layers decides

    args.update(
        report_to="none",
        use_cpu=not cuda,
        include_num_input_tokens_seen="non_padding",
        # our own tokenization (corpus join / truncation) is passed pre-tokenized: TRL must not redo it
        dataset_kwargs={"skip_prepare_dataset": True},
        packing=False,
        max_length=None,
    )
    best = args.get("load_best_model_at_end") and str(args.get("eval_strategy", "no")) != "no"
    if best and "save_strategy" not in args:  # the best checkpoint is loaded back: saved as often as evaluated
        args["save_strategy"] = args["eval_strategy"]
        notes.append(f"save_strategy {args['save_strategy']!r} (as eval_strategy): load_best_model_at_end")
    policy, checkpoint_notes = checkpoint_policy(config, args, checkpoint_dir, out_dir)  # save_strategy, output_dir
    notes += checkpoint_notes
    args.setdefault("disable_tqdm", True)  # progress goes to ctx.progress; tqdm bars would flood the job log
    args.setdefault("logging_first_step", True)
    args.setdefault("ddp_find_unused_parameters", False)  # LoRA: frozen base params are never "unused" grads
    if not cuda:
        args.pop("tf32", None)
        # explicit False: TRL's SFTConfig turns bf16 on by default, which on CPU means bf16 autocast (~3e-3 relative
        # error, different for each batch shape, so 1-rank and N-rank runs would disagree); CPU trains in float32
        args.update(bf16=False, fp16=False)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # CPU data parallel (CI's torchrun path): nccl needs CUDA
            args.setdefault("ddp_backend", "gloo")
    return args, notes, policy


def tokenize(ds: Any, tokenizer: Any, spec: TextSpec) -> Any:
    """input_ids per sequence, packed by Olive's strategy (passes.common.text_blocks): the corpus joined and
    cut into max_len blocks (contiguous, sliding or random), or each text truncated to max_len (in order or drawn).

    EOS ends every text so the model learns where an answer stops. Padding is left to the collator (which masks
    it out of the loss and, with pad_to_max_len, pads to max_len). use_attention_mask=False is Olive's way of
    saying "no mask needed": with right padding and padded labels masked, the mask changes no loss.
    """
    from datasets import Dataset

    # a chat template carries its own special tokens; add_special_tokens false (Olive's) adds none; else the
    # tokenizer's BOS and an EOS after each text
    # (read with defaults: a spec made before these fields, e.g. a test's namespace, means neither)
    plain = getattr(spec, "chat", False) or getattr(spec, "add_special_tokens", None) is False
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and not plain else []
    encoded = tokenizer(list(ds["text"]), add_special_tokens=not plain)["input_ids"]
    try:
        blocks = text_blocks.pack(
            [[*ids, *eos] for ids in encoded], spec.strategy, spec.max_len, max_samples=spec.max_samples,
            random_seed=spec.random_seed, stride=spec.stride,
        )  # fmt: skip
    except ValueError as exc:
        raise PassError(f"data: {exc}") from None
    blocks = [b for b in blocks if len(b) > 1]
    if not blocks:
        raise PassError("the training data is empty after tokenization: check the data config's text_template")
    return Dataset.from_dict({"input_ids": blocks})


def metrics_callback(ctx: PassContext, desc: str) -> Any:
    """A TrainerCallback that streams loss / lr / grad norm / eval loss and progress through ctx (rank 0 only)."""
    from transformers import TrainerCallback

    names = LOG_METRICS

    class _Metrics(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            if not state.is_world_process_zero or not logs:
                return
            for key, name in names.items():
                value = logs.get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    ctx.log_metric(name, value, state.global_step)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            every = max(1, state.max_steps // 200)  # at most ~200 progress lines per run
            if state.is_world_process_zero and (state.global_step % every == 0 or state.global_step == state.max_steps):
                # tokens seen so far (non-padding, all ranks): the host turns them into tokens/s
                ctx.progress(state.global_step, state.max_steps, desc, tokens=int(state.num_input_tokens_seen or 0))

    return _Metrics()


def save_adapter(peft_model: Any, tokenizer: Any, dest: Path, prompt: PromptFormat | None = None) -> Path:
    """adapter_config.json + adapter_model.safetensors + tokenizer (+ the prompt format trained on), via a temp
    folder renamed into place."""
    with atomic_dir(dest) as tmp:
        peft_model.save_pretrained(tmp, save_embedding_layers=False, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if prompt is not None:
            prompt.write(tmp)
        cfg = json.loads((tmp / "adapter_config.json").read_text())
        if not cfg.get("target_modules"):
            raise PassError("the saved adapter targets no modules (internal error)")
    return dest
