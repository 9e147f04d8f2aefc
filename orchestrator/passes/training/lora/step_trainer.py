"""The SFTTrainer subclass the CUDA plan asks for: the fused loss, no host sync in the step, offloaded checkpoints.

`sft_trainer_class(SFTTrainer, plan)` is TRL's class itself where the plan needs none of this; otherwise a subclass
whose compute_loss runs the fused loss (fused_loss.py), whose collator counts each batch's tokens (and a padding-free
row's sample boundaries) on the CPU (`StepMetadataCollator`), whose metrics stay on the device until the Trainer
logs, and which offloads checkpointed layer inputs (offload.py). The LoRA pass builds its trainer with it, from the
plan cuda_overrides applied (cuda.LAST_PLAN).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from orchestrator.passes.training.lora.fused_loss import chunked_flce, fused_ce_loss
from orchestrator.passes.training.lora.varlen_attention import cu_seqlens_from_position_ids

if TYPE_CHECKING:
    from orchestrator.passes.training.lora.cuda import CudaPlan


STEP_TOKENS_KEY = "orch_step_tokens"  # a batch's real token count, counted on the CPU by StepMetadataCollator


def add_step_metadata(batch: dict[str, Any], padding_free: bool) -> dict[str, Any]:
    """A collated batch (CPU tensors) with its real token count under STEP_TOKENS_KEY and, for a padding-free row,
    cu_seq_lens_q/k and max_length_q/k where the collator gave none (TRL < 1.16): computed here on the CPU, since
    the attention would otherwise derive them from position_ids on the GPU with host syncs in every layer."""
    ids = batch.get("input_ids")
    pos = batch.get("position_ids")
    mask = batch.get("attention_mask")
    packed_row = padding_free and pos is not None and ids is not None and ids.shape[0] == 1 and mask is None
    if packed_row and "cu_seq_lens_q" not in batch and not pos.is_cuda:
        cu, longest = cu_seqlens_from_position_ids(pos)
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
        batch["max_length_q"] = batch["max_length_k"] = longest
    if mask is not None and mask.dim() == 2 and not mask.is_cuda:
        batch[STEP_TOKENS_KEY] = int(mask.sum())
    elif packed_row and "cu_seq_lens_q" in batch and not batch["cu_seq_lens_q"].is_cuda:
        batch[STEP_TOKENS_KEY] = int(batch["cu_seq_lens_q"][-1])
    elif ids is not None:
        batch[STEP_TOKENS_KEY] = int(ids.numel())
    return batch


class StepMetadataCollator:
    """The trainer's own data collator, followed by add_step_metadata (attributes read through to the inner one)."""

    def __init__(self, inner: Any, padding_free: bool) -> None:
        self.inner = inner
        self.padding_free = padding_free

    def __call__(self, features: Any) -> Any:
        return add_step_metadata(self.inner(features), self.padding_free)

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def _host_value(value: Any) -> Any:
    """A device scalar as a Python number (one sync, at logging time); anything else unchanged."""
    item = getattr(value, "item", None)
    return item() if callable(item) and getattr(value, "numel", lambda: 0)() == 1 else value


def _plain_clipping(trainer: Any, model: Any) -> bool:
    """Whether the Trainer would clip through accelerate's plain path (one process or DDP, no sharded or mixed-mesh
    gradients, no SageMaker model parallelism), where the parameter list passed in is all that matters."""
    from accelerate.utils import DistributedType

    if trainer.accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU):
        return False
    mixed = getattr(trainer, "_has_mixed_mesh_grads", None)  # (FSDP has a distributed type of its own)
    return not (mixed is not None and mixed(model))


def sft_trainer_class(base_cls: Any, plan: CudaPlan | None) -> Any:
    """base_cls (TRL's SFTTrainer), or a subclass with the plan's training-step choices: the loss through a fused
    linear cross-entropy (plan.flce), no host sync in the step (plan.nosync): token counts from the CPU batch,
    TRL's metrics kept on the device and read when the Trainer logs, and none of the Trainer's per-step walks over
    every parameter (the flop count's parameter total and gradient clipping's parameter list, each made once per
    train()), and the checkpointed layer inputs in host memory (plan.offload_checkpoints: `orch_offloader`,
    installed on the layers when training begins)."""
    if plan is None or not (plan.flce or plan.nosync or plan.offload_checkpoints):
        return base_cls

    class OrchSFTTrainer(base_cls):  # type: ignore[misc, valid-type]
        orch_ce = staticmethod(chunked_flce)
        orch_plan = plan

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if plan.nosync and getattr(self, "data_collator", None) is not None:
                self.data_collator = StepMetadataCollator(self.data_collator, plan.padding_free)
            self.orch_offloader = None
            if plan.offload_checkpoints:
                from orchestrator.passes.training.lora.offload import CheckpointOffloader, offload_callback

                # installed by the callback: the Trainer sets torch's checkpoint function on every layer in train()
                self.orch_offloader = CheckpointOffloader()
                self.add_callback(offload_callback(self.orch_offloader))

        def train(self, *args: Any, **kwargs: Any) -> Any:
            self._orch_trainable: list[Any] | None = None  # counted afresh for every train() call
            self._orch_flop_params: int | None = None
            return super().train(*args, **kwargs)

        def floating_point_ops(self, inputs: Any) -> int:
            # the Trainer's count walks every module and parameter of the model each step (num_parameters, ~3,000
            # parameters on Phi-3-mini: 17 ms of the host's step in run 11's cProfile); the count does not change
            main = getattr(self.model, "main_input_name", "input_ids")
            if not (plan.nosync and isinstance(inputs, Mapping) and main in inputs):
                return super().floating_point_ops(inputs)
            if getattr(self, "_orch_flop_params", None) is None:  # the Trainer's own count for one token
                import torch

                self._orch_flop_params = super().floating_point_ops({main: torch.zeros(1, dtype=torch.long)})
            return self._orch_flop_params * int(inputs[main].numel())

        def _clip_grad_norm(self, model: Any) -> Any:
            # the same accelerate call over the parameters that can have gradients, listed once, not a walk of all
            # of them every step (frozen ones have none to clip); FSDP and the other sharded cases as the Trainer does
            if not plan.nosync or not _plain_clipping(self, model):
                return super()._clip_grad_norm(model)
            if getattr(self, "_orch_trainable", None) is None:
                self._orch_trainable = [p for p in model.parameters() if p.requires_grad]
            return self.accelerator.clip_grad_norm_(self._orch_trainable, self.args.max_grad_norm)

        def _prepare_inputs(self, inputs: Any) -> Any:
            if isinstance(inputs, Mapping) and STEP_TOKENS_KEY in inputs:
                inputs = {k: v for k, v in inputs.items() if k != STEP_TOKENS_KEY}
            return super()._prepare_inputs(inputs)

        def _track_num_input_tokens(self, inputs: Any) -> None:
            count = inputs.get(STEP_TOKENS_KEY) if isinstance(inputs, Mapping) else None
            mode = str(getattr(self.args, "include_num_input_tokens_seen", "no"))
            if count is not None and int(getattr(self.args, "world_size", 1)) == 1 and mode not in ("no", "False"):
                self.state.num_input_tokens_seen += int(count)  # counted on the CPU batch: no .item() on the GPU
                return
            if isinstance(inputs, Mapping):
                inputs = {k: v for k, v in inputs.items() if k != STEP_TOKENS_KEY}
            super()._track_num_input_tokens(inputs)

        def compute_loss(
            self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            if plan.flce and not return_outputs:
                loss = fused_ce_loss(self, model, inputs, num_items_in_batch, self.orch_ce)
                if loss is not None:
                    return loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

        def log(self, logs: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            # the metrics the loss kept on the device, read now (the Trainer syncs when it logs anyway)
            for store in (getattr(self, "_metrics", None) or {}).values():
                for key in list(store):
                    store[key] = [_host_value(v) for v in store[key]]
            if hasattr(self, "_total_train_tokens"):
                self._total_train_tokens = _host_value(self._total_train_tokens)
            return super().log({k: _host_value(v) for k, v in logs.items()}, *args, **kwargs)

    OrchSFTTrainer.__qualname__ = OrchSFTTrainer.__name__ = f"Orch{base_cls.__name__}"
    return OrchSFTTrainer
