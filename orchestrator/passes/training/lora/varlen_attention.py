"""Variable-length attention for padding-free rows: transformers' attn_implementation "orch_varlen".

A padding-free batch lays its samples end to end in one row (position_ids restarting at 0, cu_seq_lens marking the
starts); this attention function keeps them apart, causal attention per sample, through torch's varlen flash
attention, cuDNN SDPA where every sample of the row has one length (`CUDNN_UNIFORM`, set by cuda.apply_plan), or
per-sample SDPA (the reference and the fallback). The plan (cuda.py) decides whether it is used; this module is the
attention itself, so that it can be read and tested on its own (tests/test_lora_cuda.py: packed == separate logits).
"""

from __future__ import annotations

import inspect
from typing import Any

VARLEN_ATTN = "orch_varlen"


def varlen_fn() -> Any:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def cu_seqlens_from_position_ids(position_ids: Any) -> tuple[Any, int]:
    """Sample boundaries of a padding-free row from its position_ids (each sample restarts at 0)."""
    import torch

    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([torch.zeros(1, dtype=starts.dtype, device=starts.device), starts])
    cu = torch.cat([starts, torch.tensor([pos.numel()], device=pos.device, dtype=starts.dtype)]).to(torch.int32)
    return cu, int(cu.diff().max())


def _segment_attention(q: Any, k: Any, v: Any, cu: Any, scaling: float | None) -> Any:
    """Reference / fallback: causal SDPA over each sample separately. q, k, v: (T, H, D); returns (T, H, D)."""
    import torch
    import torch.nn.functional as F

    bounds = [int(x) for x in cu.tolist()]
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b <= a:
            continue
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, s, D)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling).transpose(0, 1))
    return torch.cat(outs, dim=0) if outs else q.new_empty((0, *q.shape[1:]))


_VARLEN_KW: dict[str, Any] | None = None


def _varlen_call(q: Any, k: Any, v: Any, cu: Any, max_len: int, scaling: float | None) -> Any:
    """torch's varlen flash attention, whichever of its signatures this torch has; None if it cannot do this call."""
    global _VARLEN_KW
    fn = varlen_fn()
    if fn is None or not q.is_cuda:
        return None
    if _VARLEN_KW is None:
        params = inspect.signature(fn).parameters
        _VARLEN_KW = {
            "window": "window_size" in params,
            "is_causal": "is_causal" in params,
            "scale": "scale" in params,
            "gqa": "enable_gqa" in params,
        }
    kw: dict[str, Any] = {}
    if _VARLEN_KW["window"]:
        kw["window_size"] = (-1, 0)
    elif _VARLEN_KW["is_causal"]:
        kw["is_causal"] = True
    else:
        return None
    default_scale = q.shape[-1] ** -0.5
    if scaling is not None and abs(scaling - default_scale) > 1e-12:
        if not _VARLEN_KW["scale"]:
            return None
        kw["scale"] = scaling
    if k.shape[1] != q.shape[1]:
        if _VARLEN_KW["gqa"]:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
    return fn(q, k, v, cu, cu, max_len, max_len, **kw)


def varlen_attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention function: per-sample causal attention over a padding-free row.

    query/key/value come as (batch, heads, seq, head_dim); returns (batch, seq, heads, head_dim) as transformers'
    own functions do. A batch that is not padding-free (batch > 1, or an explicit mask) goes to transformers' SDPA.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    position_ids = kwargs.get("position_ids")
    packed_row = query.shape[0] == 1 and attention_mask is None and (cu is not None or position_ids is not None)
    if not packed_row or (dropout and module.training):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if cu is None:
        cu, max_len = cu_seqlens_from_position_ids(position_ids)
    elif max_len is None:
        max_len = int(cu.diff().max())
    if sliding_window is not None and max_len > sliding_window:
        raise ValueError(
            f"padding-free attention: samples of {max_len} tokens exceed the model's sliding window "
            f"({sliding_window}); set ORCH_CUDA_FASTPATH=-padding_free"
        )
    cu = cu.to(device=query.device, dtype=torch.int32)
    # squeeze, not [0]: an index's backward writes the gradient into a zero-filled (1, H, T, D) tensor (a fill and
    # a transposing copy per q / k / v and layer: 17 ms of a 320 ms Phi-3-mini step on an H100, bench/RESULTS.md);
    # a squeeze's backward is a view, so the gradients keep the (T, H, D) layout the attention kernels wrote
    q = query.squeeze(0).transpose(0, 1)  # (T, H, D)
    k = key.squeeze(0).transpose(0, 1)
    v = value.squeeze(0).transpose(0, 1)
    out_dtype = q.dtype
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        # flash kernels take half precision only; fp32 reaches here when layers were upcast (QLoRA's
        # prepare_model_for_kbit_training): compute in the autocast dtype, as transformers' flash path does
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        q, k, v = q.to(half), k.to(half), v.to(half)
    n_samples = cu.numel() - 1
    if CUDNN_UNIFORM and q.is_cuda and n_samples > 0 and int(max_len) * n_samples == q.shape[0]:
        # every sample of the row has the same length (fixed-length data): a plain causal batch for cuDNN
        out = _uniform_sdpa(q, k, v, n_samples, int(max_len), scaling)
        if out is not None:
            return out.to(out_dtype).unsqueeze(0), None
    out = _varlen_call(q.contiguous(), k.contiguous(), v.contiguous(), cu, int(max_len), scaling)
    if out is not None:
        out = out.to(out_dtype)
    else:
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = _segment_attention(q, k, v, cu, scaling)
    return out.unsqueeze(0), None


CUDNN_UNIFORM = False  # set by cuda.apply_plan (plan.cudnn_attn)


def _uniform_sdpa(q: Any, k: Any, v: Any, n: int, seq: int, scaling: float | None) -> Any:
    """Causal attention of n equal-length samples laid end to end, (T, H, D) in and out, through cuDNN SDPA."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qb, kb, vb = (t.contiguous().view(n, seq, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
    try:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(
                qb, kb, vb, is_causal=True, scale=scaling, enable_gqa=k.shape[1] != q.shape[1]
            )
    except RuntimeError:
        return None  # this torch / cuDNN cannot run the shape: the varlen kernel does
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], v.shape[2])


def register_varlen_attention() -> None:
    """Make attn_implementation="orch_varlen" known to transformers (idempotent).

    No mask function is registered on purpose: transformers then passes attention_mask=None and builds no
    (tokens x tokens) mask for the padding-free row.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTN, varlen_attention_forward)
