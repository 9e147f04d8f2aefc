"""The training loss through a fused linear cross-entropy: the LM head and the loss in token chunks, no full logits.

TRL's SFTTrainer computes the loss through its chunked LM head, which recomputes the logits in its backward (three
vocabulary-size GEMMs per step). `fused_ce_loss` computes TRL's loss from the backbone's hidden states with a fused
linear cross-entropy instead (two): `chunked_flce`, orch's chunk loop around Liger's cross-entropy kernel with no
host sync, or Liger's own function; `reference_flce` is the same in plain torch (CPU tests). The trainer subclass
(step_trainer.py) calls it where the plan (cuda.py) says `flce`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from orchestrator.passes.training.lora.unwrap import base_model

FLCE_LOGITS_BUDGET = 1 << 30  # bytes of transient logits Liger's fused linear cross-entropy may hold per chunk


def flce_chunk_mem_const(tokens: int, hidden: int, budget: int = FLCE_LOGITS_BUDGET) -> int:
    """Liger's chunk_mem_const for ~budget bytes of bf16 logits per chunk.

    Liger sizes its token chunks so that a chunk's logits hold about chunk_mem_const x tokens x hidden values; its
    default (1) cuts a 200,064-token vocabulary into chunks of 128 tokens, GEMMs too thin to run near the GPU's
    rate (bench/gpu_kernels.py: 61 ms for Phi-4-mini's head and loss over 8 x 1024 tokens, 49 ms for TRL's head).
    """
    return max(1, budget // max(1, tokens * hidden * 2))


def _liger_flce(weight: Any, hidden: Any, labels: Any) -> tuple[Any, Any]:
    """(sum of the token losses, token accuracy) through Liger's fused linear cross-entropy (chunked, no logits)."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    loss, _, accuracy, _ = LigerFusedLinearCrossEntropyFunction.apply(
        hidden,
        weight,
        labels,
        None,  # bias
        None,  # ce_weight
        -100,  # ignore_index
        0.0,  # lse_square_scale
        0.0,  # label_smoothing
        "sum",  # reduction
        None,  # softcap
        False,  # return_z_loss
        None,  # accum_dtype
        False,  # use_token_scaling
        True,  # return_token_accuracy
        False,  # return_predicted_tokens
        None,  # ce_impl
        None,  # ce_mode
        flce_chunk_mem_const(hidden.shape[0], hidden.shape[1]),
    )
    return loss, accuracy


def reference_flce(weight: Any, hidden: Any, labels: Any) -> tuple[Any, Any]:
    """What _liger_flce computes, in plain torch (full logits): the CPU tests' stand-in for the Triton kernels."""
    import torch

    logits = (hidden @ weight.to(hidden.dtype).t()).float()
    valid = labels != -100
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    correct = (logits.argmax(-1) == labels) & valid
    return loss, correct.sum() / valid.sum().clamp(min=1)


_CHUNKED_CE: Any = None
# the arguments orch passes to Liger's cross-entropy kernel (liger-kernel 0.8.x); another signature: Liger's own path
_LIGER_CE_ARGS = frozenset(
    {
        "X_ptr",
        "X_stride",
        "Y_ptr",
        "Y_stride",
        "weight_ptr",
        "loss_ptr",
        "z_loss_ptr",
        "loss_stride",
        "token_accuracy_ptr",
        "token_accuracy_stride",
        "predicted_tokens_ptr",
        "predicted_tokens_stride",
        "n_cols",
        "n_non_ignore",
        "sum_non_ignore_weight",
        "weight_sum",
        "ignore_index",
        "lse_square_scale",
        "label_smoothing",
        "reduction",
        "softcap",
        "RETURN_Z_LOSS",
        "RETURN_TOKEN_ACCURACY",
        "RETURN_PREDICTED_TOKENS",
        "BLOCK_SIZE",
        "HAS_WEIGHT",
        "HAS_SOFTCAPPING",
        "HAS_GRADIENTS",
    }
)


def _chunked_ce_function() -> Any:
    """An autograd Function: the LM head GEMM and the cross-entropy in token chunks, Liger's Triton kernel for the
    loss and its gradient, and no host sync (Liger's own fused linear cross-entropy reads the number of labelled
    tokens with .item() in the forward and compares the output gradient with 1.0 on the host in the backward)."""
    import torch
    import triton
    from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel

    if not _LIGER_CE_ARGS.issubset(getattr(liger_cross_entropy_kernel, "arg_names", ())):
        return None

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        """(sum of token losses, number of correct argmax tokens) of hidden @ weight^T against labels (-100 ignored).

        The sum reduction needs no count of labelled tokens; the caller divides by its own count on the device.
        """

        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, labels: Any) -> Any:
            n_tokens, vocab = hidden.shape[0], weight.shape[0]
            chunk = max(1, min(n_tokens, FLCE_LOGITS_BUDGET // (2 * vocab)))
            loss_1d = torch.zeros(n_tokens, dtype=torch.float32, device=hidden.device)  # ignored rows stay 0
            correct_1d = torch.zeros(n_tokens, dtype=torch.float32, device=hidden.device)
            grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            logits = torch.empty((chunk, vocab), dtype=hidden.dtype, device=hidden.device)
            labels = labels.contiguous()
            for start in range(0, n_tokens, chunk):
                end = min(start + chunk, n_tokens)
                block = logits[: end - start]
                torch.mm(hidden[start:end], weight.t(), out=block)
                liger_cross_entropy_kernel[(end - start,)](
                    X_ptr=block,
                    X_stride=block.stride(-2),
                    Y_ptr=labels[start:end],
                    Y_stride=1,
                    weight_ptr=None,
                    loss_ptr=loss_1d[start:end],
                    z_loss_ptr=None,
                    loss_stride=1,
                    token_accuracy_ptr=correct_1d[start:end],
                    token_accuracy_stride=1,
                    predicted_tokens_ptr=None,
                    predicted_tokens_stride=0,
                    n_cols=vocab,
                    n_non_ignore=1,  # read by the "mean" reduction only
                    sum_non_ignore_weight=1,
                    weight_sum=0.0,
                    ignore_index=-100,
                    lse_square_scale=0.0,
                    label_smoothing=0.0,
                    reduction="sum",
                    softcap=None,
                    RETURN_Z_LOSS=False,
                    RETURN_TOKEN_ACCURACY=True,
                    RETURN_PREDICTED_TOKENS=False,
                    BLOCK_SIZE=min(32768, triton.next_power_of_2(vocab)),
                    HAS_WEIGHT=False,
                    HAS_SOFTCAPPING=False,
                    HAS_GRADIENTS=grad is not None,
                    num_warps=32,
                )
                if grad is not None:  # the kernel left d loss / d logits in the chunk's logits
                    torch.mm(block, weight, out=grad[start:end])
            ctx.save_for_backward(grad)
            return loss_1d.sum(), correct_1d.sum()

        @staticmethod
        def backward(ctx: Any, grad_loss: Any, _grad_correct: Any) -> tuple[Any, None, None]:
            (grad,) = ctx.saved_tensors
            return (None if grad is None else grad * grad_loss.to(grad.dtype)), None, None

    return ChunkedLinearCrossEntropy


def chunked_flce(weight: Any, hidden: Any, labels: Any) -> tuple[Any, Any]:
    """(sum of the token losses, token accuracy) as device tensors, no host sync: orch's chunk loop around Liger's
    cross-entropy kernel (Liger's own function where this liger-kernel has another kernel signature)."""
    global _CHUNKED_CE
    if _CHUNKED_CE is None:
        _CHUNKED_CE = _chunked_ce_function() or False
    if not _CHUNKED_CE:
        return _liger_flce(weight, hidden, labels)
    loss, correct = _CHUNKED_CE.apply(hidden, weight, labels)
    return loss, correct / (labels != -100).sum().clamp(min=1)


def fused_ce_loss(trainer: Any, model: Any, inputs: Mapping[str, Any], num_items_in_batch: Any, ce: Any) -> Any:
    """The training loss of TRL's SFTTrainer.compute_loss through `ce` (a fused linear cross-entropy); None when
    TRL's own path must run (eval, another loss type, a loss function or label smoother, data parallel, a head
    with bias / softcapping / logit scale, or a model without the usual backbone + lm_head layout).

    Same loss as TRL's: the summed negative log-likelihood of the next-token labels (-100 ignored), divided by
    num_items_in_batch (or the number of labelled tokens). TRL's entropy metric is not computed (it needs the full
    softmax); its mean_token_accuracy and num_tokens metrics are kept.
    """
    import torch

    if not model.training or getattr(trainer, "compute_loss_func", None) is not None:
        return None
    if getattr(trainer, "label_smoother", None) is not None or getattr(trainer, "aux_loss_enabled", False):
        return None
    args = trainer.args
    if str(getattr(args, "loss_type", "nll")) != "nll" or int(getattr(args, "world_size", 1)) > 1:
        return None
    labels = inputs.get("labels")
    if labels is None:
        return None
    base = base_model(model)
    backbone = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if backbone is None or head is None or getattr(head, "bias", None) is not None or backbone is base:
        return None
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    kwargs = {k: v for k, v in inputs.items() if k != "labels"}
    kwargs["use_cache"] = False
    # the Trainer's mixed precision: accelerate applies it by wrapping the prepared model's forward, which this
    # call of the backbone does not go through
    accelerator = getattr(trainer, "accelerator", None)
    amp = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    with amp:
        hidden = backbone(**kwargs).last_hidden_state
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = labels[:, 1:].reshape(-1).to(h.device)
        if labels.shape[0] > 1:  # padded batches: score only the labelled positions (padding-free rows have few)
            keep = y != -100
            h, y = h[keep], y[keep]
        weight = head.weight
        if torch.is_autocast_enabled(h.device.type):
            dtype = torch.get_autocast_dtype(h.device.type)
            h, weight = h.to(dtype), weight.to(dtype)  # one cast of an fp32 head per step, not one per chunk
        loss_sum, accuracy = ce(weight, h, y)
    num_tokens = (y != -100).sum() if num_items_in_batch is None else num_items_in_batch
    loss = loss_sum / torch.as_tensor(num_tokens, device=loss_sum.device).clamp(min=1)

    metrics = getattr(trainer, "_metrics", None)
    if isinstance(metrics, Mapping) and "train" in metrics:
        # kept on the device (no host sync in the step): OrchSFTTrainer.log reads them when it logs
        metrics["train"]["mean_token_accuracy"].append(accuracy.detach())
        if hasattr(trainer, "_total_train_tokens"):
            if "attention_mask" in inputs:
                n_tok = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:
                n_tok = int(inputs["position_ids"].size(1))
            else:
                n_tok = int(inputs["input_ids"].numel())
            trainer._total_train_tokens += n_tok // int(getattr(trainer, "_tp_size", 1) or 1)
            metrics["train"]["num_tokens"] = [trainer._total_train_tokens]
    return loss
