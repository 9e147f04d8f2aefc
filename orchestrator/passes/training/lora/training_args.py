"""Olive's training_args (written against transformers 4.x) -> the names transformers 5.23 / TRL 1.16 accept.

Olive tutorials still say `evaluation_strategy`, `group_by_length`, `warmup_ratio`...; transformers renamed or
dropped them. We map what has a successor (with a note the user sees), drop what no longer does anything (with a
note), and report any other unknown key with the nearest valid name, before a job is submitted.

The accepted names are a snapshot (tests compare it with the installed TrainingArguments / SFTConfig), so config
validation never imports transformers: `orch validate` stays fast and a submit-only client needs no ML stack.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestrator.core.errors import UserError
from orchestrator.schema.errors import suggest

TRAINING_ARGUMENTS_FIELDS = frozenset(
    {
        "accelerator_config",
        "activation_checkpointing",
        "activation_checkpointing_kwargs",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "auto_find_batch_size",
        "average_tokens_across_devices",
        "batch_eval_metrics",
        "bf16",
        "bf16_full_eval",
        "data_seed",
        "dataloader_drop_last",
        "dataloader_in_order",
        "dataloader_multiprocessing_context",
        "dataloader_num_workers",
        "dataloader_persistent_workers",
        "dataloader_pin_memory",
        "dataloader_prefetch_factor",
        "ddp_backend",
        "ddp_broadcast_buffers",
        "ddp_bucket_cap_mb",
        "ddp_find_unused_parameters",
        "ddp_static_graph",
        "ddp_timeout",
        "debug",
        "deepspeed",
        "disable_tqdm",
        "do_eval",
        "do_predict",
        "do_train",
        "enable_jit_checkpoint",
        "eval_accumulation_steps",
        "eval_delay",
        "eval_do_concat_batches",
        "eval_on_start",
        "eval_steps",
        "eval_strategy",
        "eval_use_gather_object",
        "fp16",
        "fp16_full_eval",
        "fsdp",
        "fsdp_config",
        "full_determinism",
        "gradient_accumulation_steps",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "greater_is_better",
        "hub_always_push",
        "hub_model_id",
        "hub_private_repo",
        "hub_revision",
        "hub_strategy",
        "hub_token",
        "ignore_data_skip",
        "include_for_metrics",
        "include_num_input_tokens_seen",
        "label_names",
        "label_smoothing_factor",
        "learning_rate",
        "length_column_name",
        "liger_kernel_config",
        "load_best_model_at_end",
        "local_rank",
        "log_level",
        "log_level_replica",
        "log_on_each_node",
        "logging_first_step",
        "logging_nan_inf_filter",
        "logging_steps",
        "logging_strategy",
        "lr_scheduler_kwargs",
        "lr_scheduler_type",
        "max_grad_norm",
        "max_steps",
        "metric_for_best_model",
        "neftune_noise_alpha",
        "num_train_epochs",
        "optim",
        "optim_args",
        "optim_target_modules",
        "output_dir",
        "parallelism_config",
        "per_device_eval_batch_size",
        "per_device_train_batch_size",
        "prediction_loss_only",
        "project",
        "push_to_hub",
        "remove_unused_columns",
        "report_to",
        "restore_callback_states_from_checkpoint",
        "resume_from_checkpoint",
        "run_name",
        "save_on_each_node",
        "save_only_model",
        "save_steps",
        "save_strategy",
        "save_total_limit",
        "seed",
        "skip_memory_metrics",
        "tf32",
        "torch_compile",
        "torch_compile_backend",
        "torch_compile_mode",
        "torch_empty_cache_steps",
        "trackio_bucket_id",
        "trackio_space_id",
        "trackio_static_space_id",
        "train_sampling_strategy",
        "use_cache",
        "use_cpu",
        "use_liger_kernel",
        "warmup_steps",
        "weight_decay",
    }
)
SFT_CONFIG_FIELDS = frozenset(
    {
        "activation_offloading",
        "assistant_only_loss",
        "chat_template_path",
        "completion_only_loss",
        "dataset_kwargs",
        "dataset_num_proc",
        "dataset_text_field",
        "eos_token",
        "eval_packing",
        "loss_type",
        "max_length",
        "model_init_kwargs",
        "packing",
        "packing_strategy",
        "pad_to_multiple_of",
        "pad_token",
        "padding_free",
        "router_aux_loss_coef",
        "shuffle_dataset",
        "truncation_mode",
        "trust_remote_code",
    }
)
ACCEPTED = TRAINING_ARGUMENTS_FIELDS | SFT_CONFIG_FIELDS

# old name -> (new name, why)
RENAMED: dict[str, tuple[str, str]] = {
    "evaluation_strategy": ("eval_strategy", "renamed in transformers 4.46"),
    "per_gpu_train_batch_size": ("per_device_train_batch_size", "renamed in transformers 4.x"),
    "per_gpu_eval_batch_size": ("per_device_eval_batch_size", "renamed in transformers 4.x"),
    "no_cuda": ("use_cpu", "renamed in transformers 4.34"),
    "push_to_hub_token": ("hub_token", "renamed in transformers 4.x"),
    "push_to_hub_model_id": ("hub_model_id", "renamed in transformers 4.x"),
    "xpu_backend": ("ddp_backend", "renamed in transformers 4.x"),
}
# old name -> why it is dropped (it has no effect in transformers 5)
DROPPED: dict[str, str] = {
    "overwrite_output_dir": "removed in transformers 5 (orch writes every pass to a fresh folder)",
    "logging_dir": "removed in transformers 5 (set TENSORBOARD_LOGGING_DIR; orch logs metrics to MLflow)",
    "use_mps_device": "removed in transformers 5 (MPS is used when available)",
    "fp16_backend": "removed (always native AMP)",
    "half_precision_backend": "removed in transformers 5 (always native AMP)",
    "fp16_opt_level": "removed in transformers 5 (apex is no longer supported)",
    "save_safetensors": "removed in transformers 5 (checkpoints are always safetensors)",
    "tpu_num_cores": "removed in transformers 5",
    "tpu_metrics_debug": "removed in transformers 5",
    "use_ipex": "removed in transformers 5",
    "jit_mode_eval": "removed in transformers 5",
    "torchdynamo": "removed (use torch_compile / torch_compile_backend)",
    "ray_scope": "removed in transformers 5",
    "mp_parameters": "removed in transformers 5",
    "sharded_ddp": "removed (use fsdp)",
    "use_legacy_prediction_loop": "removed in transformers 5",
    "past_index": "removed in transformers 5",
    "include_tokens_per_second": "removed in transformers 5 (orch reports tokens/s itself)",
    "push_to_hub_organization": "removed (put the organization in hub_model_id: 'org/name')",
}
ACCELERATOR_KEYS = ("dispatch_batches", "split_batches", "even_batches", "use_seedable_sampler")
FSDP_KEYS = {
    "fsdp_min_num_params": "min_num_params",
    "fsdp_transformer_layer_cls_to_wrap": "transformer_layer_cls_to_wrap",
}


class TrainingArgsError(UserError, ValueError):
    """Unknown training_args keys; `.problems` is [(key, message)], str() one '; '-joined line."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"training_args.{k}: {m}" for k, m in problems))


def _move(
    out: dict[str, Any], notes: list[str], problems: list[tuple[str, str]], old: str, new: str, value: Any, why: str
) -> None:
    """Put value under its new name unless the user also set the new name to something else."""
    if new in out and out[new] != value:
        problems.append(
            (old, f"is the old name of {new!r} ({why}) and both are set, to different values; keep {new!r}")
        )
        return
    out[new] = value
    notes.append(f"training_args.{old} -> {new} ({why})")


def _special(key: str) -> Callable[[dict[str, Any], Any], tuple[str, Any] | None] | None:
    """Old keys whose successor takes a different value shape: value -> (new key, new value) or None (drop)."""
    table: dict[str, Callable[[dict[str, Any], Any], tuple[str, Any] | None]] = {
        "group_by_length": lambda out, v: ("train_sampling_strategy", "group_by_length") if v else None,
        "include_inputs_for_metrics": lambda out, v: ("include_for_metrics", ["inputs"]) if v else None,
        # transformers 5: warmup_steps < 1 is a fraction of the training steps, i.e. the old warmup_ratio
        "warmup_ratio": lambda out, v: ("warmup_steps", float(v)) if v else None,
    }
    return table.get(key)


def normalize_training_args(args: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(args with today's names, notes saying what was renamed or dropped). Idempotent on normalized args.

    Raises TrainingArgsError for keys that neither transformers' TrainingArguments nor TRL's SFTConfig know,
    each with the nearest valid name. Olive's `extra_args` dict is merged into the top level.
    """
    if not isinstance(args, dict):
        raise TrainingArgsError([("<root>", f"expected a mapping of TrainingArguments, got {args!r}")])
    out: dict[str, Any] = {}
    notes: list[str] = []
    problems: list[tuple[str, str]] = []
    items = list(args.items())
    extra = args.get("extra_args")
    if isinstance(extra, dict):
        items = [(k, v) for k, v in items if k != "extra_args"] + list(extra.items())
        notes.append("training_args.extra_args merged into training_args (Olive's catch-all)")
    for key, value in items:  # names already current go first, so a renamed key can see a conflict
        if key in ACCEPTED:
            out[key] = value
    for key, value in items:
        if key in ACCEPTED:
            continue
        if key in RENAMED:
            new, why = RENAMED[key]
            _move(out, notes, problems, key, new, value, why)
        elif (convert := _special(key)) is not None:
            if key == "warmup_ratio" and not 0 <= float(value) < 1:
                problems.append((key, f"must be in [0, 1), got {value!r}"))
                continue
            moved = convert(out, value)
            if moved is None:
                notes.append(f"training_args.{key}={value!r} dropped (the default in transformers 5)")
            else:
                why = f"{key}={value!r} is {moved[0]}={moved[1]!r} since transformers 5"
                _move(out, notes, problems, key, moved[0], moved[1], why)
        elif key in ACCELERATOR_KEYS:
            cfg = dict(out.get("accelerator_config") or {})
            cfg[key] = value
            out["accelerator_config"] = cfg
            notes.append(f"training_args.{key} -> accelerator_config.{key} (moved in transformers 5)")
        elif key in FSDP_KEYS:
            cfg = dict(out.get("fsdp_config") or {})
            cfg[FSDP_KEYS[key]] = value
            out["fsdp_config"] = cfg
            notes.append(f"training_args.{key} -> fsdp_config.{FSDP_KEYS[key]} (moved in transformers 5)")
        elif key in DROPPED:
            notes.append(f"training_args.{key} dropped: {DROPPED[key]}")
        else:
            problems.append((key, f"unknown key{suggest(key, ACCEPTED)}"))
    problems += check_values(out)
    if problems:
        raise TrainingArgsError(problems)
    for key, value in out.items():  # YAML's 1e3 is 1000.0: a whole-number argument gets the int it means
        if VALUE_RULES.get(key, ("",))[0] == "int" and isinstance(value, float) and value.is_integer():
            out[key] = int(value)
    return out, notes


# Value rules of the training arguments users set most, checked at config time so a typo ("ten", -1e-4, 0, 1e999)
# stops before any job is submitted instead of deep inside transformers after the model has loaded.
# kind: "int", "number" (int or float), "bool"; bound: (operator, limit) below; upper: the largest sane value
# (beyond it a run cannot work: numpy seeds are 32-bit, AdamW's betas are < 1, a learning rate of 1e3 diverges).
VALUE_RULES: dict[str, tuple[str, tuple[str, float] | None]] = {
    "max_steps": ("int", (">=", -1)),
    "num_train_epochs": ("number", (">", 0)),
    "learning_rate": ("number", (">", 0)),
    "per_device_train_batch_size": ("int", (">=", 1)),
    "per_device_eval_batch_size": ("int", (">=", 1)),
    "gradient_accumulation_steps": ("int", (">=", 1)),
    "eval_accumulation_steps": ("int", (">=", 1)),
    "logging_steps": ("number", (">", 0)),
    "eval_steps": ("number", (">", 0)),
    "save_steps": ("number", (">", 0)),
    "save_total_limit": ("int", (">=", 0)),
    "warmup_steps": ("number", (">=", 0)),
    "weight_decay": ("number", (">=", 0)),
    "max_grad_norm": ("number", (">=", 0)),
    "adam_beta1": ("number", (">=", 0)),
    "adam_beta2": ("number", (">=", 0)),
    "adam_epsilon": ("number", (">", 0)),
    "label_smoothing_factor": ("number", (">=", 0)),
    "dataloader_num_workers": ("int", (">=", 0)),
    "seed": ("int", (">=", 0)),
    "data_seed": ("int", (">=", 0)),
    "max_length": ("int", (">=", 1)),
    "neftune_noise_alpha": ("number", (">=", 0)),
    "torch_empty_cache_steps": ("int", (">=", 1)),
    "bf16": ("bool", None),
    "fp16": ("bool", None),
    "gradient_checkpointing": ("bool", None),
    "packing": ("bool", None),
    "do_train": ("bool", None),
    "do_eval": ("bool", None),
    "use_cpu": ("bool", None),
}
UPPER: dict[str, tuple[str, float]] = {
    "max_steps": ("<=", 2**31 - 1),
    "num_train_epochs": ("<=", 1e6),
    "learning_rate": ("<=", 10.0),
    "per_device_train_batch_size": ("<=", 2**20),
    "per_device_eval_batch_size": ("<=", 2**20),
    "gradient_accumulation_steps": ("<=", 2**20),
    "eval_accumulation_steps": ("<=", 2**20),
    "dataloader_num_workers": ("<=", 1024),
    "adam_beta1": ("<", 1.0),
    "adam_beta2": ("<", 1.0),
    "adam_epsilon": ("<=", 1.0),
    "label_smoothing_factor": ("<=", 1.0),
    "seed": ("<=", 2**32 - 1),
    "data_seed": ("<=", 2**32 - 1),
    "max_length": ("<=", 2**20),
}
INT64_MAX = 2**63 - 1
_KIND_TEXT = {"int": "a whole number", "number": "a number", "bool": "true or false"}


def check_values(args: dict[str, Any]) -> list[tuple[str, str]]:
    """[(key, problem)] for values of the wrong type or out of range (None means 'the default' and passes).
    Every number, named in VALUE_RULES or not, must be finite and fit in 64 bits."""
    problems: list[tuple[str, str]] = []
    for key, value in args.items():
        if value is None:
            continue
        rule = VALUE_RULES.get(key)
        problem = _finite(value)
        if problem is not None:
            problems.append((key, problem))
            continue
        if rule is None:
            continue
        kind, bound = rule
        is_bool = isinstance(value, bool)
        ok = (
            is_bool
            if kind == "bool"
            else not is_bool and (isinstance(value, int) if kind == "int" else isinstance(value, int | float))
        )
        if kind == "int" and isinstance(value, float) and value.is_integer():
            ok = True
        if not ok:
            hint = " (write the number without quotes)" if isinstance(value, str) and _numeric(value) else ""
            problems.append((key, f"expected {_KIND_TEXT[kind]}, got {value!r}{hint}"))
            continue
        if bound is not None:
            op, limit = bound
            upper = UPPER.get(key)
            if not (value >= limit if op == ">=" else value > limit):
                problems.append((key, f"must be {op} {_num(limit)}{_range_text(upper)}, got {value!r}"))
            elif key == "max_steps" and value == 0:
                problems.append((key, "must be >= 1 (or -1: train num_train_epochs), got 0"))
            elif upper is not None and not (value <= upper[1] if upper[0] == "<=" else value < upper[1]):
                problems.append((key, f"must be {op} {_num(limit)}{_range_text(upper)}, got {value!r}"))
    return problems


def _range_text(upper: tuple[str, float] | None) -> str:
    return "" if upper is None else f" and {upper[0]} {_num(upper[1])}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _finite(value: Any) -> str | None:
    """A problem for numbers no training can use: inf/nan (JSON/YAML 1e999 reads as inf), ints beyond 64 bits."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
        return f"is out of range ({value} does not fit in 64 bits)"
    if isinstance(value, dict):
        for k, v in value.items():
            inner = _finite(v)
            if inner is not None:
                return f"{k}: {inner}"
    if isinstance(value, list):
        for v in value:
            inner = _finite(v)
            if inner is not None:
                return inner
    return None


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
